"""The ``Modality`` interface: everything that differs between images, audio (and any future modality).

A modality is one package under :mod:`simvq.modalities` exposing one :class:`Modality` object as
``MODALITY``; :mod:`simvq.modalities` lists them in a static registry. The layers above (config, training,
evaluation, checkpoints, the CLI, ``simvq compare``) dispatch only through that object, never on the
modality's name, so adding a modality means one new package and one registry line.

What a modality provides:

- configuration: the schemas of its ``model``, ``loss`` and ``data`` sections and a ``finalize`` step
  (expand presets, fill derived keys, check values that depend on several sections);
- the tokenizer (:meth:`Modality.build_model`) and its data sets;
- training: a :class:`Task` with the discriminator, loss networks, generator and discriminator losses,
  sample figures;
- evaluation: a metric object (``update(x, x_hat)``, ``compute() -> dict``) and the bitrate;
- files: encode inputs (image or audio files) into a token file and decode a token file back;
- official checkpoints: recognise and convert an official SimVQ state dict;
- ``simvq compare``: defaults and ``--data`` handling (:mod:`simvq.modalities.<name>.compare`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn


def bits_per_token(quantizer) -> float:
    """Bits one token position carries: ``index_levels * log2(K)`` (residual stacks have several levels).

    The one bitrate formula of the project: audio bit/s and image bits per image multiply it by the number of
    token positions.
    """
    return float(getattr(quantizer, "index_levels", 1)) * math.log2(int(quantizer.codebook_size))


def check_positive(cfg: dict, key: str, section: str, allow_none: bool = True, allow_zero: bool = False) -> None:
    """ValueError naming ``section.key`` unless its value is > 0 (>= 0 with ``allow_zero``; None if allowed)."""
    v = cfg[section][key]
    if v is None and allow_none:
        return
    if v is None or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{section}.{key} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss (or the quantizer was fed non-finite features): the run diverged."""


class Task:
    """The modality-specific pieces of training one config.

    ``step`` arguments are the number of completed training steps (generator updates) before the current
    batch. The defaults build through the modality object; subclasses implement the losses.
    """

    def __init__(self, config: dict, modality: "Modality") -> None:
        self.config = config
        self.modality = modality

    # ----- building --------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The tokenizer (``encoder``, ``quantize``, ``decoder``; ``forward(x) -> (x_hat, QuantizerOutput)``)."""
        return self.modality.build_model(self.config)

    def build_discriminator(self) -> nn.Module | None:
        """All discriminators as one module (None: train without a GAN)."""
        return None

    def build_loss_modules(self) -> nn.Module | None:
        """Modules the losses need (e.g. a perceptual network); not trained, not exported."""
        return None

    def build_datasets(self):
        """``(train, eval)`` data sets; training items ``(index, seed)``, see :mod:`simvq.data`."""
        return self.modality.build_datasets(self.config)

    # ----- losses ----------------------------------------------------------------------------------
    def model_input(self, batch) -> torch.Tensor:
        """The tensor fed to the tokenizer from one loader batch."""
        return batch

    def gan_active(self, step: int) -> bool:
        return False

    def generator_loss(self, *, x, x_hat, quant, discriminator, loss_modules, step: int):
        """``(loss, logs)``: the scalar to minimise for the tokenizer and a dict of detached scalars."""
        raise NotImplementedError

    def discriminator_loss(self, *, x, x_hat, discriminator, step: int):
        """``(loss, logs)`` for the discriminator; ``x_hat`` is already detached."""
        raise NotImplementedError

    # ----- evaluation and samples ------------------------------------------------------------------
    def reconstruct(self, model: nn.Module, x: torch.Tensor):
        """Evaluation reconstruction ``(x_hat, QuantizerOutput)`` (clamped to the valid range)."""
        x_hat, quant = model(x)
        return x_hat.clamp(-1.0, 1.0), quant

    def collate_samples(self, items: list[torch.Tensor]) -> torch.Tensor:
        """Evaluation items drawn for sample figures -> one batch."""
        return torch.stack(items)

    def save_samples(self, x: torch.Tensor, x_hat: torch.Tensor, path: Path) -> Path:
        """Write a small comparison of originals and reconstructions; returns the file written."""
        raise NotImplementedError

    def build_metrics(self, device):
        """The modality's metric object for :func:`simvq.evaluation.evaluate`."""
        return self.modality.build_metrics(self.config, device)


class Modality:
    """One modality (see the module docstring). Subclasses set the class attributes and implement the
    methods; every method takes a resolved config where it needs one."""

    #: the ``modality:`` value of a config
    name: str = ""
    #: the Task subclass that trains it
    task_class: type[Task] = Task
    #: tokens form a 2-D grid per item (images) rather than a 1-D sequence (audio); token priors need a grid
    token_grid: bool = False

    # ----- configuration ---------------------------------------------------------------------------
    def sections(self) -> dict[str, Any]:
        """Schemas of the ``model``, ``loss`` and ``data`` sections (dataclasses)."""
        raise NotImplementedError

    def finalize_config(self, config: dict) -> dict:
        """Expand presets, fill derived keys and check cross-section values of a validated config."""
        return config

    def code_dim(self, config: dict) -> int:
        """The token (code) dimension the model gives the quantizer."""
        raise NotImplementedError

    # ----- model, data, training ---------------------------------------------------------------------
    def build_model(self, config: dict) -> nn.Module:
        raise NotImplementedError

    def build_datasets(self, config: dict):
        """``(train, eval)`` data sets of a resolved config."""
        raise NotImplementedError

    def task(self, config: dict) -> Task:
        return self.task_class(config, self)

    def eval_dataset(self, config: dict, data) -> tuple[Any, str]:
        """The evaluation set ``data`` names (see :func:`simvq.evaluation.evaluate`) and a description.

        ``data`` is None (the config's own evaluation split), a dict of ``data`` keys to change, or a string
        (a built-in data-set name or a folder); returns ``(dataset, description)``.
        """
        raise NotImplementedError

    def data_changes(self, text: str) -> dict:
        """The ``data`` keys a ``--data TEXT`` argument of ``simvq eval`` sets."""
        raise NotImplementedError

    # ----- evaluation ------------------------------------------------------------------------------
    def build_metrics(self, config: dict, device):
        """An object with ``update(x, x_hat)`` and ``compute() -> dict``."""
        raise NotImplementedError

    def rate(self, model: nn.Module, config: dict) -> dict:
        """Token rate and bitrate of a tokenizer (one formula, :func:`bits_per_token`)."""
        raise NotImplementedError

    # ----- files -----------------------------------------------------------------------------------
    def encode_files(self, tok, config: dict, inputs: list[str], out: Path, *, size: int | None, device) -> str:
        """Encode input files (or folders of them) into the token file ``out`` with ``tok``, a
        :class:`simvq.Tokenizer` (passed in, not imported: the tokenizer API sits above this layer; its
        ``encode`` does the work on its own device); returns a summary line."""
        raise NotImplementedError

    def decode_files(self, tok, config: dict, tokens, out: Path, *, overwrite: bool, device) -> str:
        """Decode a loaded token file into files under ``out`` with the :class:`simvq.Tokenizer` ``tok``;
        returns a summary line."""
        raise NotImplementedError

    # ----- official checkpoints ----------------------------------------------------------------------
    def is_official(self, state_dict: Mapping[str, torch.Tensor]) -> bool:
        """Whether an official SimVQ state dict holds this modality's model."""
        return False

    def convert_official(self, state_dict: Mapping[str, torch.Tensor], use_ema: bool) -> tuple[dict, dict]:
        """``(tokenizer state dict, config sections)`` from an official state dict."""
        raise NotImplementedError(f"no converter for official {self.name} checkpoints")

    # ----- token priors over 1-D token sequences (simvq.prior; grids need none of these) ----------------
    #: whether :meth:`prior_datasets` and the two methods after it are implemented
    prior_windows: bool = False

    def prior_datasets(self, config: dict, *, frames: int, crops: int = 1):
        """``(training windows, held-out windows)`` of ``frames`` tokens each for a token prior."""
        raise NotImplementedError

    def prior_sample_metrics(self, samples: torch.Tensor, references: torch.Tensor, config: dict) -> dict:
        """A labelled sample-quality proxy of decoded prior samples next to reconstructed held-out windows."""
        raise NotImplementedError

    def save_prior_samples(self, samples: torch.Tensor, out: Path, config: dict) -> list[Path]:
        """Write decoded prior samples as files in ``out``; returns them."""
        raise NotImplementedError

    # ----- simvq compare -----------------------------------------------------------------------------
    def compare(self):
        """The module with this modality's ``simvq compare`` defaults, data handling and report sections."""
        raise NotImplementedError


__all__ = ["Modality", "NonFiniteLossError", "Task", "bits_per_token", "check_positive"]
