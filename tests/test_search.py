"""nearest_code against a naive float64 full-matrix argmin (the independent reference)."""

from __future__ import annotations

import pytest
import torch

from simvq.quantizers.search import REDUCE_BLOCK, _chunk_sizes, _row_min, nearest_code


def naive_argmin(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full (N, K) matrix of explicit sum((z - c)^2) in float64; returns (argmin, sorted distances)."""
    d = (z.double()[:, None, :] - codebook.double()[None, :, :]).pow(2).sum(-1)
    return d.argmin(dim=1), d.sort(dim=1).values


def assert_matches_reference(got: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor) -> None:
    ref, sorted_d = naive_argmin(z, codebook)
    # fp32 rounding can only flip tokens whose best and second-best codes are nearly tied; everywhere
    # else the indices must be identical, and the chosen code must always be (nearly) the nearest one
    margin = sorted_d[:, 1] - sorted_d[:, 0] if codebook.shape[0] > 1 else torch.full_like(sorted_d[:, 0], 1.0)
    clear = margin > 1e-4 * (1 + sorted_d[:, 0])
    assert clear.float().mean() > 0.95, "test data too tie-heavy to be meaningful"
    assert torch.equal(got[clear], ref[clear])
    d_got = (z.double() - codebook.double()[got]).pow(2).sum(-1)
    assert torch.all(d_got <= sorted_d[:, 0] + 1e-4 * (1 + sorted_d[:, 0]))


@pytest.mark.parametrize(
    "n, k, d, budget",
    [
        (1, 1, 3, 2**25),  # a single code: every token maps to 0
        (37, 5, 2, 2**25),
        (300, 257, 16, 2**25),  # default budget, one chunk
        (20, 33, 16, 1),  # budget 1: one token x one code per step
        (30, 57, 16, 7),  # odd token chunk (7), one code per step
        (300, 257, 16, 1000),  # several code chunks per token chunk, ragged last chunk
        (1000, 257, 16, 1000),  # token chunks of 333 (ragged) x code chunks of 3 (ragged)
        (1000, 64, 8, 64 * 300),  # whole rows of codes, token chunks of 300 (ragged last chunk)
    ],
)
def test_matches_naive_argmin(n, k, d, budget):
    g = torch.Generator().manual_seed(n * 1000 + k + budget)
    z = torch.randn(n, d, generator=g)
    codebook = torch.randn(k, d, generator=g)
    got = nearest_code(z, codebook, max_chunk_elements=budget)
    assert got.dtype == torch.long and got.shape == (n,)
    assert_matches_reference(got, z, codebook)


def test_chunk_sizes_respect_budget_and_force_both_splits():
    for n, k, budget in [(300, 257, 1000), (10, 10**6, 2**20), (5000, 100, 2**25), (3, 3, 1), (1000, 64, 64 * 300)]:
        tc, cc = _chunk_sizes(n, k, budget)
        assert 1 <= tc <= n and 1 <= cc <= k
        assert tc * cc <= max(budget, 1)
    # the small budget used above really splits both the tokens and the codes
    tc, cc = _chunk_sizes(1000, 257, 1000)
    assert tc < 1000 and cc < 257
    assert 1000 % tc and 257 % cc  # ragged last chunks on both axes
    assert _chunk_sizes(1000, 64, 64 * 300) == (300, 64)


@pytest.mark.parametrize("budget", [2**25, 1, 5, 64])
def test_exact_ties_lowest_index_wins(budget):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    # codes 0..5 then the same six codes again (6..11) and once more (12..17): every token's nearest code
    # appears three times with bit-identical distances; the lowest index must win, across chunk borders too
    codebook = torch.cat([base, base, base])
    z = base[torch.tensor([5, 0, 3, 3, 1, 4, 2])] + 0.01 * torch.randn(7, 4, generator=g)
    got = nearest_code(z, codebook, max_chunk_elements=budget)
    ref, _ = naive_argmin(z, base)
    assert torch.equal(got, ref)
    assert int(got.max()) < 6


@pytest.mark.parametrize("budget", [2**25, 700, 1000])
def test_exact_ties_across_reduction_blocks(budget):
    # 100 distinct codes repeated three times: K = 300 spans several REDUCE_BLOCK blocks plus a ragged tail;
    # budget 700 gives code chunks of 100 (one block + a tail), 1000 gives chunks of 142
    g = torch.Generator().manual_seed(1)
    base = torch.randn(100, 8, generator=g)
    codebook = torch.cat([base, base, base])
    pick = torch.randint(0, 100, (7,), generator=g)
    z = base[pick] + 0.01 * torch.randn(7, 8, generator=g)
    got = nearest_code(z, codebook, max_chunk_elements=budget)
    assert torch.equal(got, naive_argmin(z, base)[0])


@pytest.mark.parametrize("width", [1, REDUCE_BLOCK - 1, REDUCE_BLOCK, 3 * REDUCE_BLOCK, 3 * REDUCE_BLOCK + 5])
def test_row_min_equals_min_with_lowest_index(width):
    g = torch.Generator().manual_seed(width)
    # small integers make many exact ties, inside a block, across blocks and between blocks and the tail
    dist = torch.randint(0, 4, (50, width), generator=g).float()
    val, idx = _row_min(dist)
    ref_val = dist.min(dim=1).values
    first = torch.tensor([int((row == m).nonzero()[0]) for row, m in zip(dist, ref_val)])
    assert torch.equal(val, ref_val)
    assert torch.equal(idx, first)
    # works on the non-contiguous views the search passes in (a slice of a wider buffer)
    buffer = torch.full((50, width + 7), -1.0)
    buffer[:, :width] = dist
    val2, idx2 = _row_min(buffer[:, :width])
    assert torch.equal(val2, ref_val) and torch.equal(idx2, first)


def test_ties_between_distinct_codes_equidistant_from_token():
    # token at the origin, codes (1,0), (0,1), (-1,0): all at squared distance 1 (exactly representable)
    codebook = torch.tensor([[2.0, 2.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    z = torch.zeros(3, 2)
    for budget in (1, 2, 3, 2**25):
        assert nearest_code(z, codebook, max_chunk_elements=budget).tolist() == [1, 1, 1]


def test_bf16_autocast_searches_in_fp32():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(500, 32, generator=g)
    codebook = torch.randn(700, 32, generator=g)
    fp32 = nearest_code(z, codebook)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under_autocast = nearest_code(z, codebook, max_chunk_elements=4096)
    assert torch.equal(under_autocast, fp32)
    # a bf16 matmul would pick different codes for some tokens: the check above has teeth
    d_bf16 = codebook.bfloat16().float().pow(2).sum(1) - 2 * (z.bfloat16() @ codebook.bfloat16().t()).float()
    assert not torch.equal(d_bf16.argmin(1), fp32)


def test_low_precision_inputs_are_upcast():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(200, 16, generator=g).bfloat16()
    codebook = torch.randn(50, 16, generator=g).bfloat16()
    got = nearest_code(z, codebook, max_chunk_elements=100)
    assert_matches_reference(got, z.float(), codebook.float())


def test_precomputed_norms_are_used():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(50, 8, generator=g)
    codebook = torch.randn(20, 8, generator=g)
    norms = codebook.pow(2).sum(1)
    assert torch.equal(nearest_code(z, codebook, codebook_sq_norms=norms), nearest_code(z, codebook))
    # huge norm on code 3 makes it unreachable, proving the argument is read
    norms[3] = 1e9
    assert int((nearest_code(z, codebook, codebook_sq_norms=norms) == 3).sum()) == 0


def test_empty_inputs():
    out = nearest_code(torch.zeros(0, 4), torch.randn(9, 4))
    assert out.shape == (0,) and out.dtype == torch.long


def test_shape_errors():
    with pytest.raises(ValueError, match="same d"):
        nearest_code(torch.zeros(3, 4), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        nearest_code(torch.zeros(3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="max_chunk_elements"):
        nearest_code(torch.zeros(3, 4), torch.zeros(5, 4), max_chunk_elements=0)


def test_no_gradient_graph():
    z = torch.randn(10, 4, requires_grad=True)
    codebook = torch.randn(6, 4, requires_grad=True)
    out = nearest_code(z, codebook)
    assert not out.requires_grad
