"""Token data for a prior: the tokenizer's splits encoded once into a cached token file, with class labels.

``prior_datasets`` gives the data sets a prior is trained and scored on: an image tokenizer's splits as they
are; for an audio tokenizer, windows of ``data.frames`` tokens (the modality's ``prior_datasets`` hook,
:mod:`simvq.modalities.audio.prior`: random training crops, consecutive held-out windows).
``encode_split`` runs the tokenizer's encoder over a data set and returns ``(N, h, w)`` int32 indices
(audio windows: ``(N, 1, frames)``).
``load_or_encode`` keeps them in ``<prior run>/tokens/<split>.safetensors`` together with the labels (when
the data set has them) and the tokenizer's config hash; a later run reuses the file when the hash, the
split size and the limits agree, and re-encodes otherwise.

Labels: a data set object with a ``labels`` attribute is used as is; Fashion-MNIST's labels are read from
the IDX label files next to the images (``train-labels-idx1-ubyte.gz`` / ``t10k-labels-idx1-ubyte.gz`` under
``data.path``); scikit-learn digits' labels follow the data module's fixed split. Other data sets have none
and give unconditional priors.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch

from simvq.io import save_file_atomic
from simvq.modalities import build_datasets, modality_of
from simvq.modalities.image.data import read_idx

log = logging.getLogger("simvq.prior")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
TOKENS_DIR = "tokens"


def _limit(config_limit, prior_limit):
    return config_limit if prior_limit == "tokenizer" else prior_limit


def data_config(tokenizer_config: dict, prior_data: dict) -> dict:
    """The tokenizer's config with the prior's ``train_limit`` / ``eval_limit`` applied to its data section."""
    cfg = copy.deepcopy(tokenizer_config)
    data = cfg.setdefault("data", {})
    for key in ("train_limit", "eval_limit"):
        data[key] = _limit(data.get(key), prior_data.get(key, "tokenizer"))
    return cfg


def _read_idx_labels(folder: Path, split: str) -> np.ndarray:
    for name in (f"{split}-labels-idx1-ubyte.gz", f"{split}-labels-idx1-ubyte", f"{split}-labels.idx1-ubyte"):
        if (folder / name).is_file():
            return read_idx(folder / name).astype(np.int64)
    raise FileNotFoundError(f"no {split}-labels-idx1-ubyte[.gz] in {folder}; the prior needs it for class labels")


def dataset_labels(config: dict, split: str, length: int) -> tuple[np.ndarray | None, list[str] | None]:
    """Class labels ``(N,)`` of the ``"train"`` or ``"eval"`` split of the data set ``config`` describes, or None.

    ``length`` is the data set's length; labels that do not line up with it are an error, never a guess.
    """
    data = config.get("data", {})
    name = data.get("dataset")
    limit = data.get("train_limit" if split == "train" else "eval_limit")
    labels = names = None
    if not modality_of(config).token_grid:
        return None, None
    if name == "fashion_mnist":
        folder = Path(data.get("path") or FASHION_MNIST_DIR)
        try:
            labels = _read_idx_labels(folder, "train" if split == "train" else "t10k")
        except FileNotFoundError as err:
            log.warning("%s; training an unconditional prior", err)
            return None, None
        names = list(FASHION_MNIST_CLASSES)
    elif name == "digits":
        from sklearn.datasets import load_digits

        target = load_digits().target.astype(np.int64)
        order = np.random.default_rng(0).permutation(len(target))  # the data module's fixed split
        n_eval = max(1, int(round(len(target) * data.get("eval_fraction", 0.1))))
        labels = target[order[n_eval:]] if split == "train" else target[order[:n_eval]]
        names = [str(i) for i in range(10)]
    else:
        return None, None
    if limit is not None:
        labels = labels[: int(limit)]
    if len(labels) != length:
        raise ValueError(
            f"{name}: {len(labels)} {split} labels for {length} images; the label files do not match the images "
            "(point data.path at one Fashion-MNIST copy)"
        )
    return labels, names


def prior_datasets(tokenizer_config: dict, prior_data: dict):
    """``(train, eval)`` data sets of a prior: the tokenizer's own for token grids (images); windows of
    ``prior_data["frames"]`` tokens from the modality's ``prior_datasets`` hook for token sequences (audio)."""
    frames = prior_data.get("frames")
    if frames is None:
        return build_datasets(tokenizer_config)
    return modality_of(tokenizer_config).prior_datasets(tokenizer_config, frames=int(frames), crops=int(prior_data.get("crops", 1)))


def as_grid(indices: torch.Tensor, frames: int | None = None) -> torch.Tensor:
    """A batch of encoder indices as the prior's grids: ``(B, h, w)`` as is (``frames`` None), or audio
    windows ``(B, frames)`` as ``(B, 1, frames)``; any other shape is a ValueError naming it."""
    if frames is None:
        if indices.dim() != 3:
            raise ValueError(f"the prior needs a 2-D token grid (B, h, w) per image; this tokenizer gives {tuple(indices.shape)}")
        return indices
    if indices.dim() != 2 or indices.shape[1] != frames:
        raise ValueError(
            f"a window of data.frames={frames} tokens encoded to indices of shape {tuple(indices.shape)}, not (B, {frames}); "
            "the prior needs one token per step (a single-level quantizer) and windows of a whole number of tokens"
        )
    return indices[:, None, :]


@torch.no_grad()
def encode_split(tokenizer, dataset, *, train: bool, batch_size: int = 256, progress=None, frames: int | None = None) -> torch.Tensor:
    """Token grids ``(N, h, w)`` int32 of every item; training items are fetched as ``(index, 0)``.

    With ``frames`` (audio windows) every item must encode to exactly ``frames`` tokens: ``(N, 1, frames)``.
    """
    device = next(tokenizer.parameters()).device
    out = []
    n = len(dataset)
    for lo in range(0, n, batch_size):
        items = [dataset[(i, 0)] if train else dataset[i] for i in range(lo, min(n, lo + batch_size))]
        x = torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items]).to(device)
        indices = as_grid(tokenizer.encode(x).indices, frames)
        out.append(indices.to(torch.int32).cpu())
        if progress is not None:
            progress(min(n, lo + batch_size), n)
    return torch.cat(out)


def _cache_key(tokenizer_hash: str, config: dict, split: str, n: int, frames: int | None = None, crops: int = 1) -> dict:
    data = config.get("data", {})
    window = {} if frames is None else {  # audio windows: their length in tokens and how they are cut
        "frames": str(frames), "crops": str(crops), "eval_max_seconds": str(data.get("eval_max_seconds"))}
    return {
        **window,
        "tokenizer_hash": tokenizer_hash,
        "split": split,
        "items": str(n),
        "dataset": str(data.get("dataset")),
        "path": str(data.get("path")),
        "limit": str(data.get("train_limit" if split == "train" else "eval_limit")),
        "image_size": str(data.get("image_size")),
    }


def load_or_encode(
    run_dir: str | Path,
    tokenizer,
    tokenizer_hash: str,
    config: dict,
    dataset,
    split: str,
    *,
    batch_size: int = 256,
    progress=None,
    frames: int | None = None,
    crops: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """``(tokens (N, h, w) int64, labels (N,) int64 or None, reused)`` for one split, cached in ``run_dir/tokens``.

    ``frames`` / ``crops``: the audio window length in tokens and the training crops per clip (part of the
    cache key; ``frames`` None for images)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = Path(run_dir) / TOKENS_DIR / f"{split}.safetensors"
    key = _cache_key(tokenizer_hash, config, split, len(dataset), frames, crops)
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = dict(fh.metadata() or {})
            if all(meta.get(k) == v for k, v in key.items()):
                tensors = load_file(str(path))
                labels = tensors.get("labels")
                return tensors["tokens"].long(), None if labels is None else labels.long(), True
            log.info("token cache %s was made by another tokenizer or data setting; encoding again", path)
        except Exception as err:  # a truncated cache file is rebuilt, never trusted
            log.warning("token cache %s unreadable (%s); encoding again", path, err)
    labels, names = dataset_labels(config, split, len(dataset))
    tokens = encode_split(tokenizer, dataset, train=split == "train", batch_size=batch_size, progress=progress, frames=frames)
    tensors = {"tokens": tokens.contiguous()}
    if labels is not None:
        tensors["labels"] = torch.from_numpy(labels).contiguous()
    meta = dict(key, class_names=json.dumps(names))
    save_file_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return tokens.long(), None if labels is None else tensors["labels"].long(), False


def class_names(run_dir: str | Path) -> list[str] | None:
    """Class names stored with a run's training tokens (None when unconditional or unknown)."""
    from safetensors import safe_open

    path = Path(run_dir) / TOKENS_DIR / "train.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as fh:
        return json.loads((fh.metadata() or {}).get("class_names", "null"))


__all__ = [
    "FASHION_MNIST_CLASSES", "as_grid", "class_names", "data_config", "dataset_labels", "encode_split", "load_or_encode",
    "prior_datasets",
]
