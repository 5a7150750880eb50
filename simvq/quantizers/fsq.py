"""Finite Scalar Quantization (Mentzer et al. 2023, "FSQ: VQ-VAE Made Simple", arXiv 2309.15505).

Each of the ``len(levels)`` channels is bounded with ``tanh`` and rounded to one of ``levels[i]`` integers;
the implicit codebook is the grid of all combinations, ``prod(levels)`` codes, so no code can die and there
is no loss term. Channel ``i`` takes the integer values ``-(L_i // 2) .. (L_i - 1) - L_i // 2`` (symmetric
for odd ``L_i``, one more negative value for even ``L_i``), divided by ``L_i // 2`` so the codes lie in
``[-1, 1]``. Indices are the mixed-radix number of the per-channel level indices, channel 0 least
significant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from simvq.quantizers.base import Quantizer, TokenResult, call_in_dtype, straight_through
from simvq.quantizers.fsq_levels import FSQ_LEVELS
from simvq.quantizers.registry import register_quantizer

# Widens the tanh range a little so that the outermost integers are reached after rounding. The paper
# scales by ``(1 - eps)``, which makes ``atanh`` undefined for ``L = 2``; ``(1 + eps)`` rounds to the same
# ``L`` integers for every ``2 <= L <= 1000`` (the overshoot ``eps * (L - 1) / 2`` stays below 0.5).
_BOUND_EPS = 1e-3
_MAX_LEVEL = 1000


def _check_levels(levels) -> list[int]:
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or len(levels) == 0:
        raise ValueError(f"levels must be a non-empty list of integers >= 2 (e.g. [8, 5, 5, 5]), got {levels!r}")
    out = []
    for level in levels:
        if not isinstance(level, int) or isinstance(level, bool) or not 2 <= level <= _MAX_LEVEL:
            raise ValueError(
                f"every FSQ level must be an integer in [2, {_MAX_LEVEL}] (e.g. [8, 5, 5, 5]), got {list(levels)!r}"
            )
        out.append(level)
    return out


# Levels that approximate each power-of-two codebook size 2**8 .. 2**18: the FSQ paper's Table 1 rows and their
# extensions by 8-level channels (simvq/quantizers/fsq_levels.py)
FSQ_RECOMMENDED_LEVELS: dict[int, list[int]] = FSQ_LEVELS


def fsq_levels_for(codebook_size: int) -> list[int]:
    """Recommended FSQ levels for a target codebook size (:data:`FSQ_RECOMMENDED_LEVELS`).

    Accepts a power of two from ``2**8`` to ``2**18`` or the exact size of a recommended set (e.g. 1000 for
    ``[8, 5, 5, 5]``). The FSQ codebook has ``prod(levels)`` codes, which is close to but
    not equal to the power of two (``2**16 -> [8, 8, 8, 5, 5, 5]``, 64,000 codes).
    """
    if not isinstance(codebook_size, int) or isinstance(codebook_size, bool):
        raise TypeError(f"codebook_size must be an integer, got {codebook_size!r}")
    if codebook_size in FSQ_RECOMMENDED_LEVELS:
        return list(FSQ_RECOMMENDED_LEVELS[codebook_size])
    for levels in FSQ_RECOMMENDED_LEVELS.values():
        if math.prod(levels) == codebook_size:
            return list(levels)
    options = ", ".join(f"2**{k.bit_length() - 1} -> {v}" for k, v in FSQ_RECOMMENDED_LEVELS.items())
    raise ValueError(
        f"no recommended FSQ levels for codebook_size={codebook_size}; supported sizes: {options}. "
        "For other sizes pass levels=[...] explicitly (codebook_size = prod(levels))"
    )


@register_quantizer("fsq")
class FSQ(Quantizer):
    """Finite scalar quantizer with an implicit ``prod(levels)``-code grid.

    Args:
        levels: number of values per channel, e.g. ``[8, 5, 5, 5]`` (1000 codes); see
            :func:`fsq_levels_for` for the paper's recommended sets.
        dim: input channel size; when it differs from ``len(levels)``, linear projections
            ``dim -> len(levels)`` before and ``len(levels) -> dim`` after the rounding are added.
            Default ``len(levels)`` (no projections, as in the paper).
        channel_first, check_finite: see :class:`~simvq.quantizers.base.Quantizer`.

    Output: ``quantized`` has the input's shape; ``loss`` and all its parts are zero.
    """

    def __init__(
        self,
        *,
        levels: Sequence[int] = (8, 5, 5, 5),
        dim: int | None = None,
        channel_first: bool = True,
        check_finite: bool = True,
    ) -> None:
        levels = _check_levels(levels)
        num_channels = len(levels)
        dim = num_channels if dim is None else dim
        super().__init__(
            dim=dim, codebook_size=math.prod(levels), channel_first=channel_first, check_finite=check_finite
        )
        self.levels = levels
        self.num_channels = num_channels
        # integer buffers: casting the module (bf16-true) must not round the levels
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        # mixed-radix place values (1, L0, L0*L1, ...) for the index of each channel
        basis = [math.prod(levels[:i]) for i in range(num_channels)]
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.long), persistent=False)
        needs_projection = dim != num_channels
        self.project_in = nn.Linear(dim, num_channels) if needs_projection else nn.Identity()
        self.project_out = nn.Linear(num_channels, dim) if needs_projection else nn.Identity()

    @classmethod
    def build_kwargs(cls, kwargs: dict) -> dict:
        """Factory keywords -> constructor keywords: ``codebook_size`` becomes :func:`fsq_levels_for` levels."""
        if "codebook_size" not in kwargs:
            return kwargs
        size = kwargs.pop("codebook_size")
        levels = fsq_levels_for(size) if size is not None else None
        if "levels" in kwargs and levels is not None and math.prod(kwargs["levels"]) != math.prod(levels):
            raise ValueError(
                f"fsq got codebook_size={size} and levels={kwargs['levels']} (prod {math.prod(kwargs['levels'])}); "
                "pass only one of them"
            )
        if levels is not None:
            kwargs.setdefault("levels", levels)
        return kwargs

    # ----- the scalar quantizer in the len(levels)-channel space ----------------------------------------
    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash ``(N, len(levels))`` values so that rounding yields the ``L`` integers ``-(L//2) .. L-1-L//2``.

        ``tanh(z + shift) * half - offset`` with ``half = (L - 1)(1 + eps) / 2``. For even ``L`` the grid is
        not symmetric about 0, so the output is moved down by ``offset = 0.5`` and the tanh shifted by
        ``atanh(offset / half)`` to keep ``bound(0) = 0``.
        """
        levels = self._levels.to(z.dtype)
        half = (levels - 1) * (1 + _BOUND_EPS) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def _half_width(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.div(self._levels, 2, rounding_mode="floor").to(dtype)

    def quantize_grid(self, z: torch.Tensor) -> torch.Tensor:
        """Bounded, rounded (straight-through) and normalised codes for ``(N, len(levels))`` values."""
        bounded = self.bound(z)
        return straight_through(bounded, bounded.round()) / self._half_width(z.dtype)

    def grid_codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """``(N, len(levels))`` normalised grid codes -> ``(N,)`` int64 indices (mixed radix)."""
        half = self._half_width(codes.dtype)
        digits = (codes * half + half).round().long()  # per-channel level index in [0, L)
        return (digits * self._basis).sum(dim=-1)

    def indices_to_grid_codes(self, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(N,)`` indices -> ``(N, len(levels))`` normalised grid codes (the inverse of the above)."""
        digits = torch.div(indices.long().unsqueeze(-1), self._basis, rounding_mode="floor") % self._levels
        half = self._half_width(dtype)
        return (digits.to(dtype) - half) / half

    # ----- Quantizer interface ----------------------------------------------------------------------
    @property
    def codebook(self) -> torch.Tensor:
        """All ``prod(levels)`` implicit codes in index order, projected to ``dim``: ``(K, dim)``."""
        indices = torch.arange(self.codebook_size, device=self._basis.device)
        return self.codes_from_indices(indices)

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return call_in_dtype(self.project_out, self.indices_to_grid_codes(indices, self.compute_dtype()))

    def quantize_tokens(self, z: torch.Tensor) -> TokenResult:
        # fp32 (fp64) throughout: rounding boundaries must not move under bf16/fp16 autocast or bf16 weights
        z = z.to(self.compute_dtype(z))
        with torch.autocast(device_type=z.device.type, enabled=False):
            codes = self.quantize_grid(call_in_dtype(self.project_in, z))
            indices = self.grid_codes_to_indices(codes.detach())
            out = call_in_dtype(self.project_out, codes)
        zero = out.new_zeros(())
        return TokenResult(out, indices, zero, zero, zero, zero)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, {super().extra_repr()}"
