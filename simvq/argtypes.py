"""argparse types shared by every command: one-line errors for zero, negative or malformed numbers."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (zero or negative sizes, counts and batch sizes are errors)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {value}")
    return value


def device(text: str) -> str:
    """argparse type: a torch device string this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return text
    backend = getattr(torch, dev.type, None) if dev.type != "mps" else torch.backends.mps
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    if not available:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no {dev.type} device (torch {torch.__version__}); use cpu")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count()} {dev.type} device(s), numbered from 0")
    return text


__all__ = ["device", "fraction", "positive_float", "positive_int"]
