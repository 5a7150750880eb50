"""Codebook usage statistics: one implementation, reduced across ranks under torch.distributed."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn


class UsageStats(NamedTuple):
    """Usage of a codebook since the last reset.

    Attributes:
        utilization: fraction of codes used at least once (0..1).
        perplexity: ``exp`` of the entropy (nats) of the usage distribution; K when usage is uniform.
        dead_codes: number of codes never used.
        used_codes: number of codes used at least once.
        total: number of tokens counted.
        counts: ``(K,)`` int64 counts (summed over ranks).

    Two sample-size diagnostics (properties, also in :meth:`as_dict`): a finite sample of tokens can miss
    codes the model does use, so ``used_codes`` is a lower bound on the codes in use.
    ``sample_coverage`` is the Good-Turing estimate ``1 - f1 / total`` (``f1``: codes seen exactly once) of
    the share of future tokens that fall on codes already seen; ``estimated_used_codes`` is the
    bias-corrected Chao1 estimate ``used + f1 (f1 - 1) / (2 (f2 + 1))`` (``f2``: codes seen twice), capped
    at K, of how many codes the model uses. A coverage near 1 means more tokens would not reveal more codes.
    """

    utilization: float
    perplexity: float
    dead_codes: int
    used_codes: int
    total: int
    counts: torch.Tensor

    @property
    def sample_coverage(self) -> float:
        if self.total == 0:
            return 0.0
        return 1.0 - int((self.counts == 1).sum()) / self.total

    @property
    def estimated_used_codes(self) -> float:
        f1, f2 = int((self.counts == 1).sum()), int((self.counts == 2).sum())
        return float(min(self.counts.numel(), self.used_codes + f1 * (f1 - 1) / (2 * (f2 + 1))))

    def as_dict(self) -> dict:
        return {
            "utilization": self.utilization,
            "perplexity": self.perplexity,
            "dead_codes": self.dead_codes,
            "used_codes": self.used_codes,
            "tokens": self.total,
            "sample_coverage": self.sample_coverage,
            "estimated_used_codes": self.estimated_used_codes,
        }


def stats_from_counts(counts: torch.Tensor) -> UsageStats:
    """Utilisation, perplexity and dead codes from a ``(K,)`` count vector."""
    counts = counts.detach().to("cpu", torch.long)
    size = counts.numel()
    total = int(counts.sum())
    used = int((counts > 0).sum())
    if total > 0:
        p = counts[counts > 0].double() / total
        perplexity = math.exp(float(-(p * p.log()).sum()))
    else:
        perplexity = 0.0
    return UsageStats(used / size, perplexity, size - used, used, total, counts)


class CodebookUsage(nn.Module):
    """Counts how often each code is selected.

    ``update(indices)`` adds the indices of one batch; ``compute()`` returns :class:`UsageStats` over
    everything counted since ``reset()``. Under an initialised ``torch.distributed`` process group the
    counts are summed over all ranks in ``compute()``, so utilisation is measured over the whole data set,
    not one rank's shard. The counts are a persistent buffer: a resumed run continues the same tally.
    """

    def __init__(self, codebook_size: int) -> None:
        super().__init__()
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        self.codebook_size = codebook_size
        self.register_buffer("counts", torch.zeros(codebook_size, dtype=torch.long))

    @torch.no_grad()
    def update(self, indices: torch.Tensor) -> None:
        """Count a batch of indices (any shape; every entry is one code selection)."""
        flat = indices.reshape(-1).to(self.counts.device, torch.long)
        if flat.numel() == 0:
            return
        self.counts.index_add_(0, flat, torch.ones_like(flat))

    def reset(self) -> None:
        self.counts.zero_()

    def compute(self, reduce: bool = True) -> UsageStats:
        """Statistics since the last reset; summed across ranks when ``reduce`` and distributed is on."""
        counts = self.counts.detach().clone()
        if reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        return stats_from_counts(counts)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Checkpoints written by other code bases carry no counters: start those at zero.
        state_dict.setdefault(prefix + "counts", torch.zeros_like(self.counts))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}"
