"""The nearest-code search paths ("exact-fp32", "fp32-fused", "bf16-candidates", "bf16-fused", "auto") against a
float64 reference (the fused kernels' own checks: tests/test_search_fused.py, tests/test_search_fp32.py).

The reference is an explicit ``sum((z - c)^2)`` in float64 over every (token, code) pair, argmin with the
lowest index on exact ties; it shares no code with the search.
"""

from __future__ import annotations

import pytest
import torch

from simvq.quantizers import search as search_mod
from simvq.quantizers.registry import build_quantizer
from simvq.quantizers.search import (
    BF16_MIN_DIM,
    BF16_MIN_DISTANCES,
    SEARCH_PATHS,
    nearest_code,
    nearest_code_info,
    resolve_search,
)

FUSED = search_mod.fused_kernel_available()
FP32_FUSED = search_mod.fp32_kernel_available()
PATHS = ("exact-fp32", "bf16-candidates", "auto") + (("bf16-fused",) if FUSED else ()) + (("fp32-fused",) if FP32_FUSED else ())


def reference_argmin(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    z, codebook = z.double(), codebook.double()
    dist = (z[:, None, :] - codebook[None]).pow(2).sum(-1)
    return dist.argmin(dim=1)  # first index of the minimum on exact ties


def _data(kind: str, n: int = 600, k: int = 700, d: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    if kind == "clustered":  # 8 tight clusters of codes; tokens drawn around the same centres
        centres = 3 * torch.randn(8, d, generator=g)
        codes = centres[torch.randint(8, (k,), generator=g)] + 0.05 * torch.randn(k, d, generator=g)
        tokens = centres[torch.randint(8, (n,), generator=g)] + 0.05 * torch.randn(n, d, generator=g)
        return tokens, codes
    if kind == "offset":  # a common offset of norm 1,000 with a spread of 0.1
        u = torch.randn(d, generator=g)
        u = 1000 * u / u.norm()
        return u + 0.1 * torch.randn(n, d, generator=g), u + 0.1 * torch.randn(k, d, generator=g)
    if kind == "duplicates":  # every code appears three times (indices i, i + k/3, i + 2k/3)
        base = torch.randn(k // 3, d, generator=g)
        return torch.randn(n, d, generator=g), torch.cat([base, base, base])
    if kind == "ties":  # tokens exactly halfway between two codes (dyadic values: the midpoint is exact)
        codes = torch.randint(-8, 8, (k, d), generator=g).float()
        first, second = torch.randint(k, (n,), generator=g), torch.randint(k, (n,), generator=g)
        return (codes[first] + codes[second]) / 2, codes
    raise AssertionError(kind)


def _random(n, k, d, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return offset + torch.randn(n, d, generator=g), offset + scale * torch.randn(k, d, generator=g)


def crowded_codebook(copies: int, tokens: int, seed: int):
    """Tokens and a codebook of 3 far codes followed by ``copies`` copies of one code: every token is equally
    near all copies (more candidates than any list holds once ``copies`` > MAX_CANDIDATES)."""
    g = torch.Generator().manual_seed(seed)
    codebook = torch.cat([10 + torch.randn(3, 16, generator=g), torch.randn(1, 16, generator=g).expand(copies, 16)])
    return torch.randn(tokens, 16, generator=g), codebook


@pytest.fixture
def bf16_matmul_rows(monkeypatch):
    """The row count of every bf16 ``torch.mm`` the search runs (one per token chunk and code chunk)."""
    rows = []
    real_mm = torch.mm

    def counting_mm(a, b, **kwargs):
        if a.dtype == torch.bfloat16:
            rows.append(a.shape[0])
        return real_mm(a, b, **kwargs)

    monkeypatch.setattr(search_mod.torch, "mm", counting_mm)
    return rows


@pytest.mark.parametrize("kind", ["random", "clustered", "offset", "duplicates", "ties"])
@pytest.mark.parametrize("path", PATHS)
def test_every_path_equals_the_float64_argmin(kind, path):
    z, codebook = _data(kind)
    got, info = nearest_code_info(z, codebook, search=path)
    ref = reference_argmin(z, codebook)
    assert torch.equal(got, ref), f"{int((got != ref).sum())} of {len(ref)} tokens differ ({kind}, {info})"
    assert info.path in ("exact-fp32", "fp32-fused", "bf16-candidates", "bf16-fused")
    if path != "auto":
        assert info.path == path


@pytest.mark.parametrize(
    "budget, n, k",
    [
        (1, 10, 70),  # one token x one code per step
        (37, 60, 150),  # one code per step, token chunks of 37 (ragged)
        (120 * 150, 120, 301),  # code chunks of 150 = 2 blocks of 64 + a tail of 22, then a ragged chunk of 1
        (2**25, 120, 301),  # one chunk
    ],
)
def test_bf16_path_across_token_and_code_chunks(budget, n, k):
    z, codebook = _data("random", n=n, k=k, d=16, seed=budget)
    got = nearest_code(z, codebook, search="bf16-candidates", max_chunk_elements=budget)
    assert torch.equal(got, reference_argmin(z, codebook))


def test_bf16_path_falls_back_to_the_exact_path_and_stays_exact():
    # 2,000 copies of one code (over 16 reduction blocks and MAX_CANDIDATES) after 3 far codes: every token
    # is equally near all copies, so none can be settled from the candidates and all take the exact path
    z, codebook = crowded_codebook(2000, 50, seed=3)
    got, info = nearest_code_info(z, codebook, search="bf16-candidates")
    assert info.fallback == 50
    assert torch.equal(got, reference_argmin(z, codebook))
    assert got.tolist() == [3] * 50  # the lowest index among the copies


def test_bf16_path_gives_up_on_a_crowded_codebook_after_its_first_token_chunk(bf16_matmul_rows):
    # every token ties with 300 copies of one code: the first chunk (256 tokens at this budget) all falls back,
    # so the bf16 pass stops there and its reranking is not attempted for the other chunks
    z, codebook = crowded_codebook(300, 768, seed=4)
    calls = bf16_matmul_rows
    got, info = nearest_code_info(z, codebook, search="bf16-candidates", max_chunk_elements=256 * 303)
    assert calls == [256]  # one bf16 matmul: the first token chunk, then the exact path for all
    assert info.fallback == 768
    assert torch.equal(got, reference_argmin(z, codebook))
    # a chunk with few fallbacks keeps going: random data, same budget, every chunk through the bf16 matmul
    calls.clear()
    z, codebook = _data("random", n=768, k=303, d=16, seed=6)
    got, info = nearest_code_info(z, codebook, search="bf16-candidates", max_chunk_elements=256 * 303)
    assert calls == [256] * 3 and info.fallback < 64
    assert torch.equal(got, reference_argmin(z, codebook))


def test_bf16_path_reranks_and_most_random_tokens_settle_without_fallback():
    z, codebook = _data("random", n=500, k=1024, d=64, seed=5)
    got, info = nearest_code_info(z, codebook, search="bf16-candidates")
    assert torch.equal(got, reference_argmin(z, codebook))
    assert info.reranked > 0  # the bf16 bound leaves several candidates for some tokens
    assert info.fallback < 50


def test_bf16_path_on_degenerate_inputs():
    # all-zero tokens and codes (outputs exactly the row shift), a single code, fp64 and bf16 inputs
    assert nearest_code(torch.zeros(5, 8), torch.zeros(7, 8), search="bf16-candidates").tolist() == [0] * 5
    z, codebook = _data("random", n=40, k=1, d=8)
    assert nearest_code(z, codebook, search="bf16-candidates").tolist() == [0] * 40
    z, codebook = _data("random", n=80, k=90, d=8, seed=1)
    ref = reference_argmin(z, codebook)
    assert torch.equal(nearest_code(z.double(), codebook.double(), search="bf16-candidates"), ref)
    zb, cb = z.bfloat16(), codebook.bfloat16()
    assert torch.equal(nearest_code(zb, cb, search="bf16-candidates"), reference_argmin(zb, cb))


def test_bf16_error_bound_covers_the_bf16_matmul():
    # the bound assumes round-to-nearest bf16 inputs and outputs and fp32 accumulation inside the matmul:
    # check it against the float64 distance on data with a large offset and mixed scales
    g = torch.Generator().manual_seed(7)
    z = 50 + torch.randn(300, 48, generator=g) * torch.logspace(-2, 1, 48)
    codebook = 50 + torch.randn(200, 48, generator=g) * torch.logspace(-2, 1, 48)
    mean = codebook.mean(dim=0)
    zc, cc = z - mean, codebook - mean
    c_sq = cc.pow(2).sum(dim=1)
    a, b_t, err = search_mod._bf16_operands(zc, cc, c_sq, zc.norm(dim=1))
    y = torch.mm(a, b_t).double()
    # a @ b_t = S + ||c'||^2 - 2 z'.c' = D + (S - ||z'||^2): the true distance plus a per-token constant
    row_constant = a[:, -2].double() + a[:, -1].double() - zc.double().pow(2).sum(dim=1)
    exact = (z.double()[:, None] - codebook.double()[None]).pow(2).sum(-1) + row_constant[:, None]
    u_out = 2.0**-8 / (1 - 2.0**-8)
    assert bool((y >= 0).all())  # the shift keeps every output non-negative (int16 order = bf16 order)
    slack = err[:, None] + u_out * y - (y - exact).abs()
    assert float(slack.min()) >= 0
    assert float((y - exact).abs().max()) > 0.01 * float(err.min())  # the data does exercise the rounding


def test_resolve_search_rules(monkeypatch):
    monkeypatch.setattr(search_mod, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(search_mod, "fused_kernel_available", lambda: False)
    n = 1024
    assert resolve_search("auto", "cpu", torch.float32, n, BF16_MIN_DISTANCES // n) == "bf16-candidates"
    assert resolve_search("auto", "cpu", torch.float32, n, BF16_MIN_DISTANCES // n - 1) == "exact-fp32"
    assert resolve_search("auto", "cpu", torch.float64, n, 10**6) == "exact-fp32"
    # narrow codes stay on the exact path (the bf16 path is slower there), wide ones take the bf16 path
    assert resolve_search("auto", "cpu", torch.float32, n, 10**6, BF16_MIN_DIM - 1) == "exact-fp32"
    assert resolve_search("auto", "cpu", torch.float32, n, 10**6, BF16_MIN_DIM) == "bf16-candidates"
    assert resolve_search("auto", "meta", torch.float32, n, 10**6) == "exact-fp32"
    monkeypatch.setattr(search_mod, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(search_mod, "fp32_kernel_available", lambda: False)
    assert resolve_search("auto", "cpu", torch.float32, n, 10**6) == "exact-fp32"
    for path in ("exact-fp32", "bf16-candidates"):
        assert resolve_search(path, "cpu", torch.float64, 1, 3) == path
    with pytest.raises(ValueError, match="needs the fused bf16 kernel"):  # asked for where it cannot run
        resolve_search("bf16-fused", "cpu", torch.float32, 1, 3)
    assert set(SEARCH_PATHS) == {"auto", "exact-fp32", "fp32-fused", "bf16-candidates", "bf16-fused", "bf16-triton"}
    # where the fused kernel builds, "auto" takes it from BF16_FUSED_MIN_DISTANCES up, for any width
    monkeypatch.setattr(search_mod, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(search_mod, "fused_kernel_available", lambda: True)
    fused_min = search_mod.BF16_FUSED_MIN_DISTANCES
    assert resolve_search("auto", "cpu", torch.float32, 16, fused_min // 16) == "bf16-fused"
    assert resolve_search("auto", "cpu", torch.float32, 16, fused_min // 16 - 1) == "exact-fp32"
    assert resolve_search("auto", "cpu", torch.float32, n, 10**6, 2) == "bf16-fused"
    assert resolve_search("bf16-fused", "cpu", torch.float64, 1, 3) == "bf16-fused"  # an explicit choice stands
    assert resolve_search("auto", "cpu", torch.float64, n, 10**6) == "exact-fp32"
    assert resolve_search("auto", "cuda", torch.float32, n, 10**6) == "exact-fp32"
    # a small search never builds the kernel
    monkeypatch.setattr(search_mod, "fused_kernel_available", lambda: pytest.fail("kernel built for a small search"))
    assert resolve_search("auto", "cpu", torch.float32, 8, 8) == "exact-fp32"


@pytest.mark.parametrize("bad", ["fast", "bf16", "", None, 1, "AUTO"])
def test_bad_search_value_is_a_clear_value_error(bad):
    with pytest.raises(ValueError, match="search must be one of 'auto', 'exact-fp32', 'fp32-fused', 'bf16-candidates', 'bf16-fused'"):
        nearest_code(torch.zeros(3, 4), torch.zeros(5, 4), search=bad)
    for name in ("simvq", "vq", "ema_vq", "factorized_vq", "lc_vq"):
        with pytest.raises(ValueError, match="search must be one of"):
            build_quantizer(name, dim=4, codebook_size=8, search=bad)


@pytest.mark.parametrize("name", ["simvq", "vq", "ema_vq", "factorized_vq", "lc_vq"])
def test_quantizers_thread_the_search_setting(name, monkeypatch):
    calls = []
    original = search_mod.nearest_code_info

    def spy(*args, **kwargs):
        calls.append(kwargs.get("search"))
        return original(*args, **kwargs)

    monkeypatch.setattr(search_mod, "nearest_code_info", spy)
    torch.manual_seed(0)
    z = torch.randn(2, 6, 16)
    outs = {}
    for path in ("exact-fp32", "bf16-candidates"):
        torch.manual_seed(1)
        quantizer = build_quantizer(name, dim=16, codebook_size=300, channel_first=False, search=path)
        assert quantizer.search == path
        outs[path] = quantizer(z).indices
    assert calls == ["exact-fp32", "bf16-candidates"]
    assert torch.equal(outs["exact-fp32"], outs["bf16-candidates"])


def test_folded_simvq_keeps_the_search_setting():
    quantizer = build_quantizer("simvq", dim=8, codebook_size=16, search="exact-fp32")
    assert quantizer.fold().search == "exact-fp32"


def test_finite_check_is_one_sum_but_still_exact():
    # the quantizers' input check sums first; finite values whose sum overflows must still pass, and a
    # single NaN or Inf must still be caught
    from simvq.quantizers.base import NonFiniteInputError

    quantizer = build_quantizer("vq", dim=4, codebook_size=8, channel_first=False)
    huge = torch.full((1, 3, 4), 3e38)  # finite; the sum overflows to inf
    assert not torch.isfinite(huge.sum())
    quantizer(huge)
    for bad in (float("nan"), float("inf"), -float("inf")):
        z = torch.zeros(1, 3, 4)
        z[0, 1, 2] = bad
        with pytest.raises(NonFiniteInputError):
            quantizer(z)


def test_bf16_path_on_cpu_uses_cache_sized_chunks_up_to_32768_codes(bf16_matmul_rows):
    # default budget on CPU: 2**23 distances for the bf16 path while that holds whole rows for >= 256 tokens
    # (K = 8,192: chunks of 1,024 tokens), else the general 2**25 (K = 65,536: chunks of 512 tokens)
    rows = bf16_matmul_rows
    g = torch.Generator().manual_seed(8)
    z = torch.randn(2048, 16, generator=g)
    for k, expected in ((8192, [1024, 1024]), (65536, [512] * 4)):
        rows.clear()
        codebook = torch.randn(k, 16, generator=g)
        got, info = nearest_code_info(z, codebook, search="bf16-candidates")
        assert rows == expected
        assert info.fallback < 20
        assert torch.equal(got, nearest_code(z, codebook, search="exact-fp32"))
    rows.clear()
    nearest_code_info(z, torch.randn(8192, 16, generator=g), search="bf16-candidates", max_chunk_elements=2**25)
    assert rows == [2048]  # a budget the caller gives is kept
