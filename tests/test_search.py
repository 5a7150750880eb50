"""nearest_code against a naive float64 full-matrix argmin (the independent reference)."""

from __future__ import annotations

import pytest
import torch

from simvq.quantizers.search import (
    REDUCE_BLOCK,
    _chunk_sizes,
    _plain_row_min,
    _rounding_bound,
    _row_min,
    nearest_code,
)


def naive_argmin(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit sum((z - c)^2) in float64 over all (token, code) pairs; returns (argmin, sorted distances).

    Computed in token chunks of at most 2**23 pair-coordinates, so the reference fits in memory at any size.
    """
    z, codebook = z.double(), codebook.double()
    step = max(1, 2**23 // (codebook.shape[0] * codebook.shape[1]))
    d = torch.cat([(z[i : i + step, None, :] - codebook[None]).pow(2).sum(-1) for i in range(0, len(z), step)])
    return d.argmin(dim=1), d.sort(dim=1).values


def assert_matches_reference(got: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor) -> None:
    """The search is exact: the same indices as the float64 argmin, lowest index on exact ties."""
    ref, _ = naive_argmin(z, codebook)
    assert torch.equal(got, ref), f"{int((got != ref).sum())} of {len(ref)} tokens differ from the float64 argmin"


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


@pytest.mark.parametrize("row_min", [_row_min, _plain_row_min])
@pytest.mark.parametrize("width", [1, REDUCE_BLOCK - 1, REDUCE_BLOCK, 3 * REDUCE_BLOCK, 3 * REDUCE_BLOCK + 5])
def test_row_min_equals_min_with_lowest_index_and_flags_rivals(row_min, width):
    g = torch.Generator().manual_seed(width)
    # small integers make many exact ties, inside a block, across blocks and between blocks and the tail
    dist = torch.randint(0, 40, (200, width), generator=g).float()
    tol = torch.randint(0, 3, (200,), generator=g).float()
    ref_val = dist.min(dim=1).values
    first = torch.tensor([int((row == m).nonzero()[0]) for row, m in zip(dist, ref_val)])
    # a rival: any other entry within tol of the row minimum, counted by hand
    rivals = torch.tensor([int((row <= m + t).sum()) > 1 for row, m, t in zip(dist, ref_val, tol)])
    assert rivals.any() and not rivals.all() or width == 1
    buffer = torch.full((200, width + 7), -1.0)
    buffer[:, :width] = dist
    # also on the non-contiguous views the search passes in (a slice of a wider buffer)
    for view in (dist, buffer[:, :width]):
        val, idx, rival = row_min(view, tol)
        assert torch.equal(val, ref_val)
        assert torch.equal(idx, first)
        assert torch.equal(rival, rivals)


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


def offset_data(kind: str, offset: float, spread: float, n: int = 2048, k: int = 512, d: int = 64, seed: int = 0):
    """Tokens and codes sharing a common offset of norm ``offset`` (random direction); see the cases below."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=g, dtype=torch.float64)
    shift = offset * direction / direction.norm()
    if kind == "random":  # codes and tokens: independent Gaussians of std ``spread`` per coordinate
        codes = spread * torch.randn(k, d, generator=g, dtype=torch.float64)
        tokens = spread * torch.randn(n, d, generator=g, dtype=torch.float64)
    elif kind == "clustered":  # 8 tight clusters of codes; tokens next to codes, so near-ties are common
        centres = spread * torch.randn(8, d, generator=g, dtype=torch.float64)
        codes = centres[torch.randint(0, 8, (k,), generator=g)] + 0.01 * spread * torch.randn(k, d, generator=g, dtype=torch.float64)
        tokens = codes[torch.randint(0, k, (n,), generator=g)] + 0.005 * spread * torch.randn(n, d, generator=g, dtype=torch.float64)
    elif kind == "duplicates":  # every code four times; tokens near codes; the lowest copy must win
        base = spread * torch.randn(k // 4, d, generator=g, dtype=torch.float64)
        codes = base.repeat(4, 1)
        tokens = base[torch.randint(0, k // 4, (n,), generator=g)] + 0.1 * spread * torch.randn(n, d, generator=g, dtype=torch.float64)
    else:
        raise ValueError(kind)
    return (tokens + shift).float(), (codes + shift).float()


@pytest.mark.parametrize("budget", [None, 5000])
@pytest.mark.parametrize("kind", ["random", "clustered", "duplicates"])
@pytest.mark.parametrize("offset", [0.0, 1.0, 30.0, 100.0, 1e3])
def test_exact_under_a_common_offset(offset, kind, budget):
    # without centring, fp32 ||c||^2 - 2 z.c loses the spread's digits under the offset: the former search
    # gave 6 / 56 / 1836 of these 2048 random tokens a non-nearest code at offsets 30 / 100 / 1e3, and
    # 1918 / 2012 / 2016 of the clustered ones
    z, codebook = offset_data(kind, offset, spread=0.1)
    got = nearest_code(z, codebook, max_chunk_elements=budget)
    assert_matches_reference(got, z, codebook)
    if kind == "duplicates":
        assert int(got.max()) < codebook.shape[0] // 4  # the lowest of the four copies, every time


@pytest.mark.parametrize("spread", [1e-2, 1e-3])
def test_exact_with_tiny_spread_under_large_offset(spread):
    # offset 1e3 and spread 1e-3: the differences sit 6 decimal digits below the coordinates, close to fp32's
    # resolution of the inputs themselves; the search must still return the float64 argmin of those inputs
    z, codebook = offset_data("random", 1e3, spread=spread, n=1024, k=300, d=32, seed=7)
    assert_matches_reference(nearest_code(z, codebook), z, codebook)
    assert_matches_reference(nearest_code(z, codebook, max_chunk_elements=999), z, codebook)


def test_all_codes_equal_gives_index_zero():
    # the worst case of the re-ranking (every code is a rival of every token) stays exact and bounded
    codebook = torch.full((300, 8), 3.0)
    z = torch.randn(100, 8)
    assert nearest_code(z, codebook, max_chunk_elements=64).tolist() == [0] * 100


def test_float64_inputs_search_in_float64():
    # codes 1e3 + j * 1e-9 are distinct in float64 but all round to 1000.0 in float32
    codebook = 1e3 + 1e-9 * torch.arange(50, dtype=torch.float64).unsqueeze(1).repeat(1, 4)
    pick = torch.randint(0, 50, (200,), generator=torch.Generator().manual_seed(0))
    z = codebook[pick] + 2e-10
    assert codebook.float().unique().numel() == 1
    assert torch.equal(nearest_code(z, codebook), pick)


def test_rounding_bound_covers_the_fp32_error():
    # the certificate's premise, checked against float64: |evaluated - exact| <= B for every (token, code)
    for offset in (0.0, 30.0, 1e3):
        z, codebook = offset_data("random", offset, spread=1.0, n=512, k=256, d=128, seed=3)
        mean = codebook.mean(0)
        zc, cc = z - mean, codebook - mean
        evaluated = (cc.pow(2).sum(1) - 2 * zc @ cc.t()).double() + zc.double().pow(2).sum(1, keepdim=True)
        exact = (z.double()[:, None] - codebook.double()[None]).pow(2).sum(-1)
        bound = _rounding_bound(128, torch.float32, cc.norm(dim=1).max(), zc.norm(dim=1)).double()
        err = (evaluated - exact).abs()
        # ||z'||^2 is added in float64 here and is not part of the search's comparison; allow its rounding
        slack = 1e-6 * zc.double().pow(2).sum(1, keepdim=True)
        assert torch.all(err <= bound[:, None] + slack)
        assert float((err / bound[:, None]).max()) > 1e-3  # the bound is not vacuous by orders of magnitude


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_exact_when_reduced_precision_matmuls_are_allowed(precision):
    # TF32 / bf16 matmul inputs (where the backend uses them) widen the bound; the answer stays exact
    z, codebook = offset_data("clustered", 30.0, spread=0.1, n=512, k=256, seed=4)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        got = nearest_code(z, codebook)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert_matches_reference(got, z, codebook)
