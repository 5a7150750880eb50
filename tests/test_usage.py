"""CodebookUsage against hand-computed statistics, state dicts, and the cross-rank sum under DDP (gloo)."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simvq import CodebookUsage
from simvq.usage import stats_from_counts


def test_hand_computed_statistics():
    usage = CodebookUsage(4)
    usage.update(torch.tensor([[0, 0], [1, 0]]))  # any shape: counts (3, 1, 0, 0)
    stats = usage.compute()
    assert stats.counts.tolist() == [3, 1, 0, 0]
    assert stats.total == 4 and stats.used_codes == 2 and stats.dead_codes == 2
    assert stats.utilization == 0.5
    # p = (3/4, 1/4); H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.215762 + 0.346574 = 0.562335 nats;
    # perplexity = exp(0.562335) = 1.754765
    assert stats.perplexity == pytest.approx(1.754765, abs=1e-6)
    assert stats.as_dict() == {
        "utilization": 0.5,
        "perplexity": stats.perplexity,
        "dead_codes": 2,
        "used_codes": 2,
        "tokens": 4,
        # one singleton (code 1) in 4 tokens: Good-Turing coverage 1 - 1/4; Chao1 2 + 1 * 0 / (2 * (0 + 1)) = 2
        "sample_coverage": 0.75,
        "estimated_used_codes": 2.0,
    }


def test_chao1_by_hand_and_its_cap():
    # counts: f1 = 3 singletons, f2 = 1 doubleton, 5 used codes of K = 20, N = 3 + 2 + 5 = 10
    counts = torch.tensor([1, 1, 1, 2, 5] + [0] * 15)
    stats = stats_from_counts(counts)
    assert stats.total == 10 and stats.used_codes == 5
    assert stats.sample_coverage == pytest.approx(1 - 3 / 10)
    assert stats.estimated_used_codes == pytest.approx(5 + 3 * 2 / (2 * 2))  # 6.5
    many = stats_from_counts(torch.tensor([1] * 9 + [0]))  # 9 singletons: 9 + 72 / 2 = 45 -> capped at K = 10
    assert many.estimated_used_codes == 10.0 and many.sample_coverage == 0.0


def test_sample_size_diagnostics_on_a_skewed_codebook():
    # every one of K codes is in use, but with Zipf frequencies: a small sample misses many of them.
    # Chao1 recovers most of the missing codes and Good-Turing predicts the missed mass.
    K, n = 4096, 20000
    g = torch.Generator().manual_seed(0)
    p = 1.0 / torch.arange(1, K + 1, dtype=torch.float64)  # Zipf
    p = p / p.sum()
    idx = torch.multinomial(p, n, replacement=True, generator=g)
    stats = stats_from_counts(torch.bincount(idx, minlength=K))
    assert stats.used_codes < 0.9 * K  # the sample alone says "under 90% used"
    assert abs(stats.estimated_used_codes - K) < 0.5 * (K - stats.used_codes)
    seen = stats.counts > 0
    missed_mass = float(p[~seen].sum())  # the true probability of the codes the sample missed
    assert 1 - stats.sample_coverage == pytest.approx(missed_mass, abs=0.01)


def test_uniform_and_single_code():
    usage = CodebookUsage(5)
    usage.update(torch.arange(5).repeat(3))
    stats = usage.compute()
    assert stats.utilization == 1.0 and stats.dead_codes == 0
    assert stats.perplexity == pytest.approx(5.0)  # uniform usage: perplexity = K
    usage.reset()
    usage.update(torch.full((10,), 2))
    stats = usage.compute()
    assert stats.perplexity == pytest.approx(1.0) and stats.utilization == pytest.approx(0.2)
    assert stats.dead_codes == 4


def test_accumulates_and_resets():
    usage = CodebookUsage(3)
    usage.update(torch.tensor([2]))
    usage.update(torch.tensor([2, 1]))
    usage.update(torch.zeros(0, dtype=torch.long))  # empty batch counts nothing
    assert usage.compute().counts.tolist() == [0, 1, 2]
    usage.reset()
    stats = usage.compute()
    assert stats.counts.tolist() == [0, 0, 0]
    assert stats.total == 0 and stats.utilization == 0.0 and stats.perplexity == 0.0 and stats.dead_codes == 3


def test_stats_from_counts_matches_definition():
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 5, (50,), generator=g)
    stats = stats_from_counts(counts)
    p = [int(c) / int(counts.sum()) for c in counts if c > 0]
    assert stats.perplexity == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)), rel=1e-12)
    assert stats.utilization == pytest.approx(len(p) / 50)


def test_state_dict_round_trip_and_missing_counts():
    usage = CodebookUsage(4)
    usage.update(torch.tensor([3, 3, 1]))
    state = usage.state_dict()
    assert set(state) == {"counts"}
    restored = CodebookUsage(4)
    restored.load_state_dict(state, strict=True)
    assert restored.compute().counts.tolist() == [0, 1, 0, 2]
    # a checkpoint from another code base carries no counter: tolerated with strict=True, starts at zero
    restored.load_state_dict({}, strict=True)
    assert restored.compute().counts.tolist() == [0, 0, 0, 0]
    # a counter of the wrong size is still an error
    with pytest.raises(RuntimeError, match="size mismatch"):
        CodebookUsage(5).load_state_dict(state)


def test_invalid_size():
    with pytest.raises(ValueError, match="codebook_size"):
        CodebookUsage(0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        usage = CodebookUsage(4)
        usage.update(torch.tensor([0, 0, 1]) if rank == 0 else torch.tensor([1, 3]))
        stats = usage.compute()
        local = usage.compute(reduce=False)
        torch.save(
            {"counts": stats.counts, "utilization": stats.utilization, "local": local.counts, "own": usage.counts.clone()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_ddp_counts_are_summed_across_ranks(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # rank 0 saw (0, 0, 1), rank 1 saw (1, 3): the whole data set used codes 0, 1, 3
    for r in (r0, r1):
        assert r["counts"].tolist() == [2, 2, 0, 1]
        assert r["utilization"] == 0.75
    # reduce=False and the stored buffer stay local (compute() must not overwrite the rank's own tally)
    assert r0["local"].tolist() == [2, 1, 0, 0] and r1["local"].tolist() == [0, 1, 0, 1]
    assert r0["own"].tolist() == [2, 1, 0, 0] and r1["own"].tolist() == [0, 1, 0, 1]
