"""Tokenizer training shared by every modality: Lightning module, EMA, callbacks, ``train()``.

A modality plugs in through :class:`~simvq.training.tasks.Task` (model, losses, discriminator, data,
samples) and :func:`~simvq.training.tasks.register_task`; everything else here is shared.
"""

from simvq.training.ema import EMA
from simvq.training.run import TrainResult, train
from simvq.training.tasks import ImageTask, Task, get_task, register_task

__all__ = ["EMA", "ImageTask", "Task", "TrainResult", "get_task", "register_task", "train"]
