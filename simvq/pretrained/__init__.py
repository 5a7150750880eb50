"""Tokenizers that ship inside the package, loadable offline by name.

Each is a model folder (``config.yaml`` + ``model.safetensors``) under this package with a ``card.json``
that states how it was trained (the command) and what it measures on held-out data. Load one with
``simvq.Tokenizer.from_pretrained("fashion-8k")`` (or any simvq command's ``--model fashion-8k``); list them
with ``simvq models``.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CARD_FILE = "card.json"


def list_models() -> dict[str, dict]:
    """Name -> model card of every shipped tokenizer."""
    cards = {}
    for folder in sorted(p for p in ROOT.iterdir() if (p / CARD_FILE).is_file()):
        cards[folder.name] = json.loads((folder / CARD_FILE).read_text(encoding="utf-8"))
    return cards


def model_path(name: str) -> Path | None:
    """The folder of the shipped tokenizer called ``name``, or None when there is none."""
    folder = ROOT / str(name)
    if "/" in str(name) or "\\" in str(name) or not (folder / CARD_FILE).is_file():
        return None
    return folder


__all__ = ["list_models", "model_path"]
