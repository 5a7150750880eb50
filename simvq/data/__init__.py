"""Resumable, rank-aware data loaders shared by every modality (the data sets live in each modality's package).

Training batches are a pure function of ``(seed, step, rank)``: :class:`StepBatchSampler` walks an endless
sequence of per-epoch permutations and hands every sample its own augmentation seed. A run resumed at step
``s`` therefore sees exactly the batches an uninterrupted run sees from step ``s`` on, with any number of
loader workers, and ranks of a distributed run read disjoint samples without a DistributedSampler.

Training data sets take ``(index, augmentation_seed)`` items; evaluation data sets take plain indices and
are deterministic.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

#: augmentation seeds and permutations come from numpy's PCG64 seeded with (seed, stream, counter) tuples
_PERM_STREAM = 1
_AUG_STREAM = 2


def sample_seed(seed: int, position: int) -> int:
    """The augmentation seed of the sample at global ``position`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, _AUG_STREAM, position]).generate_state(1, np.uint64)[0] >> 1)


class StepBatchSampler:
    """Endless batch sampler whose batch at ``step`` depends only on ``(seed, step, rank, world_size)``.

    Global sample position ``p = step * batch_size * world_size + rank * batch_size + j`` reads item
    ``perm_e[p mod n]`` of epoch ``e = p // n``, where ``perm_e`` is a permutation seeded by ``(seed, e)``.
    Yields lists of ``(item_index, augmentation_seed)`` pairs.

    Args:
        num_items: size of the training set ``n``.
        batch_size: samples per batch on this rank.
        seed: run seed.
        rank, world_size: this process's share of a distributed run.
        start_step: first step to yield (a resumed run starts where it stopped).
        shuffle: permute every epoch (False: items in order, for tests).
    """

    def __init__(
        self,
        *,
        num_items: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        shuffle: bool = True,
    ) -> None:
        if num_items < 1:
            raise ValueError(f"the training set is empty (num_items={num_items}); check the data section")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start_step = int(start_step)
        self.shuffle = bool(shuffle)
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def steps_per_epoch(self) -> float:
        return self.num_items / self.global_batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, _PERM_STREAM, epoch])))
                self._perm = rng.permutation(self.num_items)
            else:
                self._perm = np.arange(self.num_items)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def batch(self, step: int) -> list[tuple[int, int]]:
        """The ``(item, augmentation_seed)`` pairs of this rank's batch at ``step``."""
        first = step * self.global_batch_size + self.rank * self.batch_size
        out = []
        for p in range(first, first + self.batch_size):
            epoch, offset = divmod(p, self.num_items)
            out.append((int(self._permutation(epoch)[offset]), sample_seed(self.seed, p)))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


def train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """An endless, resumable training loader (see :class:`StepBatchSampler`)."""
    sampler = StepBatchSampler(
        num_items=len(dataset), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, start_step=start_step
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def eval_loader(
    dataset: Dataset, *, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0
) -> DataLoader:
    """A deterministic loader over this rank's contiguous shard of ``dataset`` (no padding, no repeats).

    Shards differ by at most one batch; metrics that count (usage, sums of errors) are reduced across ranks
    by their owners, so nothing is counted twice.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("the evaluation set is empty; check the data section (eval_path, eval_fraction, eval_limit)")
    per = math.ceil(n / world_size)
    indices = list(range(rank * per, min(n, (rank + 1) * per)))
    subset = torch.utils.data.Subset(dataset, indices)
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers, drop_last=False)


__all__ = ["StepBatchSampler", "eval_loader", "sample_seed", "train_loader"]
