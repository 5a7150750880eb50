"""Token files: code indices of encoded images (or audio) plus what is needed to decode them safely.

A token file is an ``.npz`` archive with one integer array per item (``tokens_0``, ``tokens_1``, ...; an
image gives an ``(h, w)`` grid, audio a ``(T,)`` sequence) and a JSON ``meta`` entry recording the
modality, the codebook size, each item's grid shape and source name, and the hash of the model config
(:func:`config_hash`). :func:`check_compatible` compares these with a model before decoding,
so tokens are never decoded by a model that would read them differently.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simvq.io import save_file_atomic

FORMAT_VERSION = 1


def config_hash(config: dict) -> str:
    """A short hash of what fixes the meaning of tokens: the modality, model and quantizer sections."""
    key = {k: config.get(k) for k in ("modality", "model", "quantizer")}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class TokenFile:
    """The contents of a token file."""

    tokens: list[np.ndarray]
    names: list[str]
    modality: str
    codebook_size: int
    config_hash: str
    extra: dict = field(default_factory=dict)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(t.shape) for t in self.tokens]


def _index_dtype(codebook_size: int):
    for dt in (np.uint8, np.uint16, np.uint32):
        if codebook_size - 1 <= np.iinfo(dt).max:
            return dt
    return np.int64


def save_tokens(
    path: str | Path,
    tokens: list,
    *,
    names: list[str],
    modality: str,
    codebook_size: int,
    config_hash: str,
    extra: dict | None = None,
) -> Path:
    """Write ``tokens`` (a list of integer arrays/tensors, one per item) to ``path`` atomically."""
    if len(tokens) != len(names):
        raise ValueError(f"got {len(tokens)} token arrays but {len(names)} names")
    if not tokens:
        raise ValueError("nothing to save: the token list is empty")
    dtype = _index_dtype(codebook_size)
    arrays = {}
    for i, t in enumerate(tokens):
        a = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"tokens[{i}] must hold integers, got dtype {a.dtype}")
        if a.size and (a.min() < 0 or a.max() >= codebook_size):
            raise ValueError(f"tokens[{i}] has indices outside [0, {codebook_size})")
        arrays[f"tokens_{i}"] = a.astype(dtype)
    meta = {
        "format": "simvq-tokens",
        "version": FORMAT_VERSION,
        "modality": modality,
        "codebook_size": int(codebook_size),
        "config_hash": config_hash,
        "names": list(names),
        "shapes": [list(a.shape) for a in arrays.values()],
        "extra": extra or {},
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"token files end in .npz, got {path.name}")
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return save_file_atomic(path, buf.getvalue())


def load_tokens(path: str | Path) -> TokenFile:
    """Read a token file written by :func:`save_tokens` (no pickles are loaded)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the .npz token file that `simvq encode` wrote")
    if not path.is_file():
        raise FileNotFoundError(f"token file {path} does not exist")
    if path.stat().st_size and not zipfile.is_zipfile(path):  # an .npz is a zip archive (an empty file: "truncated")
        raise ValueError(f"{path} is not a readable .npz token file (truncated or corrupt, or another kind of file); give the "
                         "file that `simvq encode` wrote, or encode the inputs again")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "meta" not in npz.files:
                raise ValueError(f"{path} is not a simvq token file (no 'meta' entry)")
            meta = json.loads(npz["meta"].tobytes().decode())
            if not isinstance(meta, dict) or not isinstance(meta.get("names"), list):
                raise ValueError(f"{path} is not a simvq token file (its 'meta' entry is malformed)")
            tokens = [npz[f"tokens_{i}"].astype(np.int64) for i in range(len(meta["names"]))]
    except (OSError, KeyError, json.JSONDecodeError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, UnicodeDecodeError) as err:
        if isinstance(err, ValueError) and "simvq token file" in str(err):
            raise
        raise ValueError(
            f"cannot read token file {path}: it is truncated or corrupt ({type(err).__name__}: {err}); encode the inputs again with `simvq encode`"
        ) from None
    if meta.get("format") != "simvq-tokens":
        raise ValueError(f"{path} is not a simvq token file")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} uses token-file version {meta['version']}; this simvq reads up to {FORMAT_VERSION}")
    return TokenFile(
        tokens=tokens,
        names=list(meta["names"]),
        modality=meta["modality"],
        codebook_size=int(meta["codebook_size"]),
        config_hash=meta["config_hash"],
        extra=meta.get("extra", {}),
    )


def check_compatible(tokens: TokenFile, config: dict, codebook_size: int) -> None:
    """Raise ValueError when ``tokens`` were not made by a model with this config and codebook size."""
    modality = config.get("modality", "image")
    problems = []
    if tokens.modality != modality:
        problems.append(f"modality {tokens.modality!r} vs the model's {modality!r}")
    if tokens.codebook_size != codebook_size:
        problems.append(f"codebook size {tokens.codebook_size} vs the model's {codebook_size}")
    if tokens.config_hash != config_hash(config):
        problems.append(f"model config hash {tokens.config_hash} vs the model's {config_hash(config)}")
    if problems:
        raise ValueError(
            "these tokens were made by a different model (" + "; ".join(problems) + "); decode them with the "
            "model directory that encoded them"
        )


__all__ = ["TokenFile", "check_compatible", "config_hash", "load_tokens", "save_tokens"]
