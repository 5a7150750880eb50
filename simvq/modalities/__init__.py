"""The modalities: one package each, listed in a static registry.

Every layer above (config, training, evaluation, checkpoints, the CLI, ``simvq compare``) reaches a
modality only through :func:`get_modality`; adding a modality is one package exposing ``MODALITY`` and
one line in :data:`REGISTRY`. Packages are imported on first use, so ``import simvq`` stays light and
the audio stack loads only for audio configs.
"""

from __future__ import annotations

import importlib
from typing import Mapping

from simvq.modalities.base import Modality, NonFiniteLossError, Task, bits_per_token

#: modality name -> the package that exposes its ``MODALITY`` object
REGISTRY: dict[str, str] = {
    "image": "simvq.modalities.image",
    "audio": "simvq.modalities.audio",
}


def modality_names() -> list[str]:
    return list(REGISTRY)


def get_modality(name: str) -> Modality:
    """The :class:`Modality` registered as ``name``; ValueError listing the valid names otherwise."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown modality {name!r}; valid modalities: {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).MODALITY


def modality_of(config: Mapping) -> Modality:
    """The modality of a config (``modality:`` key, default image)."""
    return get_modality(config.get("modality", "image"))


def build_tokenizer(config: dict):
    """Build the tokenizer a full config describes (the quantizer's ``dim`` is filled from the model)."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    for section in ("model", "quantizer"):
        if section not in config:
            raise ValueError(f"config has no '{section}' section; a tokenizer config needs 'model' and 'quantizer'")
    return modality_of(config).build_model(config)


def build_datasets(config: dict):
    """``(train, eval)`` data sets of a resolved config."""
    return modality_of(config).build_datasets(config)


def official_modality(state_dict: Mapping) -> Modality:
    """The modality whose official SimVQ checkpoint layout ``state_dict`` has; ValueError when none does."""
    for name in REGISTRY:
        modality = get_modality(name)
        if modality.is_official(state_dict):
            return modality
    sample = sorted(state_dict)[:6]
    raise ValueError(f"cannot tell which official model this checkpoint holds (first keys: {sample}); expected SimVQ "
                     "image or audio weights")


__all__ = [
    "REGISTRY",
    "Modality",
    "NonFiniteLossError",
    "Task",
    "bits_per_token",
    "build_datasets",
    "build_tokenizer",
    "get_modality",
    "modality_names",
    "modality_of",
    "official_modality",
]
