"""Residual vector quantization (SoundStream, Zeghidour et al. 2021; EnCodec; RQ-VAE).

Level 0 quantizes the input, every further level quantizes what the previous levels left over, and the
output is the sum of the levels' codes. As in SoundStream / EnCodec, the residual handed to the next level
is detached: the input receives the straight-through gradient of level 0 only (identity), and each level's
losses train that level. Every level is any :class:`~simvq.quantizers.base.Quantizer` with the same
``dim`` and ``codebook_size``. (FSQ / LFQ levels work, but their fixed grids are not rescaled per level as
in the "residual FSQ" variants, so deeper levels see residuals much smaller than their grid step.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from simvq.quantizers.base import Quantizer, TokenResult
from simvq.quantizers.registry import build_quantizer, register_quantizer
from simvq.usage import CodebookUsage, UsageStats


class _FirstLevelUsage(CodebookUsage):
    """The stack's ``usage``: counts only the first column of ``(..., levels)`` indices (level 0's codes);
    :meth:`reset` resets every level's counter too, so per-level statistics cover the same window."""

    def __init__(self, codebook_size: int, level_usages: Sequence[CodebookUsage]) -> None:
        super().__init__(codebook_size)
        self._level_usages = list(level_usages)  # plain list: the levels own (and save) these modules

    @torch.no_grad()
    def update(self, indices: torch.Tensor) -> None:
        super().update(indices[..., 0])

    def reset(self) -> None:
        super().reset()
        for usage in self._level_usages:
            usage.reset()


@register_quantizer("residual")
class ResidualQuantizer(Quantizer):
    """A stack of quantizers, each quantizing the residual of the ones before it.

    Build it from ready quantizers, ``ResidualQuantizer(quantizers=[q0, q1, ...])``, or by name,
    ``ResidualQuantizer(num_quantizers=8, quantizer="ema_vq", dim=128, codebook_size=1024, **kwargs)``
    (``kwargs`` go to every level through :func:`~simvq.quantizers.registry.build_quantizer`).

    Args:
        quantizers: the levels, all with the same ``dim`` and ``codebook_size``.
        num_quantizers: number of levels when built by name (also checked against ``quantizers``).
        quantizer: name of the level quantizer when built by name (default ``"ema_vq"``, SoundStream's EMA
            codebooks; pass e.g. ``dead_code_threshold=2.0`` for its code resets).
        channel_first, check_finite: see :class:`~simvq.quantizers.base.Quantizer`.
        **level_kwargs: keywords of the level quantizer (``dim``, ``codebook_size``, ...).

    Output: ``indices`` end with a dimension of ``num_quantizers`` levels; ``loss`` and each unweighted
    part are the sums over levels. ``usage`` counts level 0; ``levels[i].usage`` counts level ``i``, and
    :meth:`level_usage` returns every level's statistics. ``usage.reset()`` resets all levels' counters.
    :attr:`codebook` is the ``(num_quantizers, K, dim)`` stack of the level codebooks: a token's code is
    the sum of one row per level, which :meth:`decode_indices` computes.
    """

    def __init__(
        self,
        *,
        quantizers: Sequence[Quantizer] | None = None,
        num_quantizers: int | None = None,
        quantizer: str = "ema_vq",
        channel_first: bool = True,
        check_finite: bool = True,
        **level_kwargs,
    ) -> None:
        if quantizers is None:
            if not isinstance(num_quantizers, int) or isinstance(num_quantizers, bool) or num_quantizers < 1:
                raise ValueError(
                    "num_quantizers must be a positive integer when the levels are built by name, "
                    f"got {num_quantizers!r}"
                )
            if quantizer == "residual":
                raise ValueError("quantizer='residual' cannot be nested inside a ResidualQuantizer")
            level_kwargs.setdefault("check_finite", False)  # the stack checks its input once
            quantizers = [build_quantizer(quantizer, **level_kwargs) for _ in range(num_quantizers)]
        else:
            if level_kwargs:
                raise TypeError(
                    f"ResidualQuantizer got both quantizers and level keywords {sorted(level_kwargs)}; "
                    "configure the quantizers you pass, or build the levels by name"
                )
            quantizers = list(quantizers)
            if not quantizers or not all(isinstance(q, Quantizer) for q in quantizers):
                raise TypeError("quantizers must be a non-empty list of Quantizer modules")
            if num_quantizers is not None and num_quantizers != len(quantizers):
                raise ValueError(f"num_quantizers={num_quantizers} but {len(quantizers)} quantizers were given")
            if any(isinstance(q, ResidualQuantizer) for q in quantizers):
                raise ValueError("a ResidualQuantizer cannot contain another ResidualQuantizer")
        dims = {q.dim for q in quantizers}
        sizes = {q.codebook_size for q in quantizers}
        if len(dims) != 1 or len(sizes) != 1:
            raise ValueError(
                f"all levels need the same dim and codebook_size, got dims {sorted(dims)} and sizes {sorted(sizes)}"
            )
        super().__init__(
            dim=dims.pop(), codebook_size=sizes.pop(), channel_first=channel_first, check_finite=check_finite
        )
        self.levels = nn.ModuleList(quantizers)
        self.usage = _FirstLevelUsage(self.codebook_size, [level.usage for level in self.levels])

    @property
    def num_quantizers(self) -> int:
        return len(self.levels)

    @property
    def index_levels(self) -> int:
        return len(self.levels)

    @property
    def codebook(self) -> torch.Tensor:
        """``(num_quantizers, K, dim)``: the level codebooks, stacked (see the class docstring)."""
        dtype = self.compute_dtype()
        return torch.stack([level.codebook.to(dtype) for level in self.levels])

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``(N, num_quantizers)`` indices -> ``(N, dim)``: the sum of each level's code."""
        dtype = self.compute_dtype()
        return sum(level.codes_from_indices(indices[:, i]).to(dtype) for i, level in enumerate(self.levels))

    def quantize_tokens(self, z: torch.Tensor) -> TokenResult:
        residual = z.to(self.compute_dtype(z))
        quantized = 0.0
        all_indices, losses = [], []
        for level in self.levels:
            res = level.quantize_tokens(residual)
            level.usage.update(res.indices)
            quantized = quantized + res.quantized.to(residual.dtype)
            all_indices.append(res.indices)
            losses.append(torch.stack([res.loss, res.commitment_loss, res.codebook_loss, res.aux_loss]).to(residual.dtype))
            # the next level sees a constant: the input's gradient is level 0's straight-through
            residual = (residual - res.quantized).detach()
        loss, commitment, codebook, aux = torch.stack(losses).sum(0).unbind()
        return TokenResult(quantized, torch.stack(all_indices, dim=1), loss, commitment, codebook, aux)

    def level_usage(self, reduce: bool = True) -> list[UsageStats]:
        """Usage of every level since the last ``usage.reset()``: ``[stats of level 0, level 1, ...]``.

        Each entry is that level's :class:`~simvq.usage.UsageStats` (utilisation, perplexity, dead codes),
        summed across ranks when ``reduce`` and ``torch.distributed`` is initialised.
        """
        return [level.usage.compute(reduce) for level in self.levels]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_quantizers={self.num_quantizers}"
