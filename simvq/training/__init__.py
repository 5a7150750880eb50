"""Tokenizer training shared by every modality: Lightning module, EMA, callbacks, ``train()``.

A modality plugs in through its :class:`~simvq.modalities.Task` (model, losses, discriminator, data,
samples); everything here is shared.
"""

from simvq.training.ema import EMA
from simvq.training.run import TrainResult, check_trainer_settings, train

__all__ = ["EMA", "TrainResult", "check_trainer_settings", "train"]
