"""Exponential moving average of a model's trainable weights (one implementation, used by every modality)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class EMA(nn.Module):
    """Shadow copies of every trainable parameter of ``model``, updated as ``s <- d s + (1 - d) p``.

    The shadows are buffers of this module, so they follow ``.to(device)`` and live in the state dict (and so
    in every training checkpoint: a resumed run continues the same average). Frozen parameters (SimVQ's
    random codebook) and buffers are not averaged: they are taken from the live model when the EMA weights
    are used.

    Args:
        model: the module whose trainable parameters are averaged.
        decay: ``d`` (official 0.999).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (taming-transformers' LitEma),
            so early averages are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("the model has no trainable parameters to average")
        params = dict(model.named_parameters())
        for i, name in enumerate(self.names):
            # buffer names may not contain dots; index them and keep the mapping in self.names
            self.register_buffer(f"shadow_{i}", params[name].detach().clone().float())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def _apply(self, fn, *args, **kwargs):
        # a "true" half precision (bf16-true) casts every floating buffer: averages of tiny updates would be
        # rounded away in 8 mantissa bits, so the shadows stay float32 (float64 is kept as it is)
        module = super()._apply(fn, *args, **kwargs)
        for i in range(len(self.names)):
            shadow = getattr(self, f"shadow_{i}")
            if shadow.dtype in (torch.float16, torch.bfloat16):
                setattr(self, f"shadow_{i}", shadow.float())
        return module

    def shadows(self) -> list[torch.Tensor]:
        return [getattr(self, f"shadow_{i}") for i in range(len(self.names))]

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ValueError(f"the model lacks averaged parameter(s) {missing[:3]}; was the EMA built for another model?")
        return [params[n] for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step after an optimiser step."""
        d = self.current_decay()
        shadows = self.shadows()
        # the shadows keep at least float32 (see _apply); the live weights may be bf16 or float64
        params = [p.detach().to(s.dtype) for p, s in zip(self._params(model), shadows)]
        torch._foreach_lerp_(shadows, params, 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's trainable parameters with the averages."""
        for p, s in zip(self._params(model), self.shadows()):
            p.copy_(s.to(p.dtype))

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run a block with the EMA weights in ``model``; the live weights come back afterwards."""
        live = [p.detach().clone() for p in self._params(model)]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, saved in zip(self._params(model), live):
                    p.copy_(saved)

    @torch.no_grad()
    def averaged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the averaged weights in place of the trainable parameters."""
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, s in zip(self.names, self.shadows()):
            state[name] = s.to(state[name].dtype).clone()
        return state

    def extra_repr(self) -> str:
        return f"decay={self.decay}, warmup={self.warmup}, tensors={len(self.names)}"
