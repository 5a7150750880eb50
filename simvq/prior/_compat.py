"""The few project functions the prior uses, found wherever the modality refactor puts them.

Each lookup tries the target layout first (``simvq.io``, ``simvq.modalities``, ``simvq.tokens``) and falls
back to the earlier one, so the prior keeps working while code moves between packages.
"""

from __future__ import annotations

try:
    from simvq.io import atomic_path, save_file_atomic  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - earlier layout
    from simvq.checkpoints import atomic_path, save_file_atomic


def build_datasets(config: dict):
    """``(train, eval)`` data sets of a tokenizer config."""
    try:
        from simvq.modalities import build_datasets as build  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover - earlier layout
        from simvq.data import build_datasets as build
    return build(config)


def read_idx(path):
    try:
        from simvq.modalities.image.data import read_idx as read  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover - earlier layout
        from simvq.data.images import read_idx as read
    return read(path)


def config_hash(config: dict) -> str:
    """The tokenizer config hash (modality, model, quantizer sections) that fixes what its tokens mean."""
    try:
        from simvq.tokens import config_hash as digest  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - earlier layout
        from simvq.config import config_hash as digest
    return digest(config)


def fid_inception_class():
    try:
        from simvq.modalities.image.inception import FIDInceptionV3  # type: ignore[import-not-found]
    except ImportError:
        from simvq.metrics.inception import FIDInceptionV3
    return FIDInceptionV3


def random_conv_features(seed: int = 0):
    try:
        from simvq.modalities.image.inception import RandomConvFeatures  # type: ignore[import-not-found]
    except ImportError:
        from simvq.metrics.inception import RandomConvFeatures
    return RandomConvFeatures(seed=seed)


__all__ = ["atomic_path", "build_datasets", "config_hash", "fid_inception_class", "random_conv_features", "read_idx", "save_file_atomic"]
