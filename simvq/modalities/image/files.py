"""Image files to token files and back (``simvq encode`` / ``simvq decode`` for image tokenizers)."""

from __future__ import annotations

from pathlib import Path

import torch

from simvq.modalities.image.data import list_images, save_image_file
from simvq.tokens import TokenFile, config_hash, save_tokens


def image_inputs(items: list[str]) -> list[Path]:
    """Files named on the command line, folders expanded to their images (sorted, recursive)."""
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files.extend(list_images(path))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} is neither an image file nor a folder")
    return files


def encode_image_files(tok, config: dict, items: list[str], out: Path, *, size: int | None, device=None) -> str:
    """Encode images (each at its own size, or short side resized to ``size`` and centre-cropped) with a
    :class:`simvq.Tokenizer` ``tok`` (its ``encode`` does the work; ``device`` is the tokenizer's)."""
    files = image_inputs(items)
    tokens, names = [], []
    for f in files:
        tokens.append(tok.encode(f, size=size)[0].cpu())
        names.append(f.name)
    save_tokens(
        out, tokens, names=names, modality="image", codebook_size=tok.codebook_size,
        config_hash=config_hash(config), extra={"channels": tok.in_channels, "downsample_factor": tok.downsample_factor},
    )
    return f"encoded {len(files)} image(s) into {out} ({sum(t.numel() for t in tokens)} tokens)"


def decode_targets(tokens: TokenFile, out: Path, suffix: str, *, overwrite: bool) -> list[Path]:
    """One output file per item under the folder ``out`` (``<source stem><suffix>``, made unique)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    targets, seen = [], set()
    for i, name in enumerate(tokens.names):
        stem = Path(name).stem or f"item_{i}"
        target = out / f"{stem}{suffix}"
        if target.name in seen:
            target = out / f"{stem}_{i}{suffix}"
        seen.add(target.name)
        if target.exists() and not overwrite:
            raise ValueError(f"{target} exists; pass --force to replace it or choose another --out")
        targets.append(target)
    return targets


def decode_image_tokens(tok, tokens: TokenFile, out: Path, *, overwrite: bool, device=None) -> str:
    """Decode every item of a token file into a PNG under the folder ``out`` with a :class:`simvq.Tokenizer`."""
    targets = decode_targets(tokens, out, ".png", overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    for t, target in zip(tokens.tokens, targets):
        image = tok.decode(torch.as_tensor(t)[None])[0]  # [0, 1]
        save_image_file(image * 2 - 1, target)
    return f"decoded {len(targets)} image(s) into {out}"


__all__ = ["decode_image_tokens", "decode_targets", "encode_image_files", "image_inputs"]
