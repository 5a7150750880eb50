"""The fused bf16 search kernel (search="bf16-fused", simvq/quantizers/kernels/bf16_search.c).

Answers are checked against an explicit float64 ``sum((z - c)^2)`` argmin (lowest index on exact ties) and
against the exact path; the kernel's values against float64 distances through the error bound; its operand
packing against torch's own bf16 rounding. Where the kernel cannot be built (no AVX512-BF16, no compiler),
the tests that run it are skipped and the fallback rules are still checked.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from simvq.quantizers import native
from simvq.quantizers import search as search_mod
from simvq.quantizers.registry import build_quantizer
from simvq.quantizers.search import nearest_code, nearest_code_info
from test_search_paths import _random, crowded_codebook, reference_argmin  # the float64 reference, data

KERNEL = native.bf16_search_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"fused kernel unavailable: {native.native_status()}")


@needs_kernel
@pytest.mark.parametrize(
    "n, k, d",
    [
        (1, 1, 16),  # one token, one code: a whole tile of padding
        (33, 11, 16),  # one token past a block, one code past a tile
        (100, 137, 33),  # odd width: the last coordinate pair is half padding
        (70, 500, 3),  # narrow codes
        (257, 1000, 128),  # the benchmark's width
    ],
)
def test_fused_path_equals_float64_on_ragged_shapes(n, k, d):
    z, codebook = _random(n, k, d, seed=n + k + d)
    got, info = nearest_code_info(z, codebook, search="bf16-fused")
    assert info.path == "bf16-fused"
    assert torch.equal(got, reference_argmin(z, codebook))


@needs_kernel
def test_fused_path_across_token_chunks_and_code_blocks(monkeypatch):
    # token chunks of 64 (first chunk 32) and cache blocks of 20 codes (2 tiles): every boundary is crossed
    monkeypatch.setattr(search_mod, "FUSED_TOKEN_CHUNK", 64)
    monkeypatch.setattr(search_mod, "FUSED_FIRST_CHUNK", 32)
    monkeypatch.setattr(search_mod, "FUSED_CODE_BLOCK_BYTES", 20 * 4 * 8)  # d = 16: 8 pairs of 4 bytes per code
    z, codebook = _random(300, 257, 16, seed=1, scale=0.3)
    got, info = nearest_code_info(z, codebook, search="bf16-fused")
    assert torch.equal(got, reference_argmin(z, codebook))
    assert info.fallback == 0


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_path_gives_the_same_answer_on_any_thread_count(threads, monkeypatch):
    monkeypatch.setattr(search_mod, "default_threads", lambda: threads)
    z, codebook = _random(1000, 700, 32, seed=2, scale=0.5)
    assert torch.equal(nearest_code(z, codebook, search="bf16-fused"), reference_argmin(z, codebook))


@needs_kernel
def test_fused_path_keeps_the_list_short_when_every_code_is_a_new_minimum():
    # codes ordered from far to near the (single) token: each one is a new running minimum and is kept, so
    # the list of MAX_CANDIDATES fills many times and must drop what the falling threshold excludes
    k = 20 * search_mod.MAX_CANDIDATES
    direction = torch.zeros(16)
    direction[0] = 1
    codebook = torch.linspace(1000, 1, k)[:, None] * direction + 0.01 * torch.randn(k, 16)
    z = torch.zeros(40, 16)
    got, info = nearest_code_info(z, codebook, search="bf16-fused")
    assert info.fallback == 0
    assert torch.equal(got, reference_argmin(z, codebook))


@needs_kernel
def test_a_list_filled_before_the_true_minimum_appears_does_not_overflow():
    # a collapsed VQ codebook: thousands of unused codes near the origin come first, within the bound of each
    # other, then the few trained codes the tokens are near; the lists fill with the near-origin codes while
    # the threshold is still high, and must not send the tokens to the exact path once it falls
    g = torch.Generator().manual_seed(11)
    unused = 1e-4 * torch.randn(5000, 16, generator=g)
    trained = 0.5 * torch.randn(30, 16, generator=g)
    codebook = torch.cat([unused, trained])
    z = trained[torch.randint(30, (600,), generator=g)] + 0.05 * torch.randn(600, 16, generator=g)
    got, info = nearest_code_info(z, codebook, search="bf16-fused")
    assert info.fallback == 0
    assert torch.equal(got, reference_argmin(z, codebook))
    # tokens at the origin: every unused code is a genuine candidate, more than a list holds -> exact path
    z0 = 1e-5 * torch.randn(40, 16, generator=g)
    got, info = nearest_code_info(z0, codebook, search="bf16-fused")
    assert info.fallback == 40
    assert torch.equal(got, reference_argmin(z0, codebook))


@needs_kernel
def test_fused_path_sends_ties_beyond_the_list_to_the_exact_path():
    # 2,000 copies of one code after 3 far codes: more candidates than the list holds, so every token
    # overflows and is searched again by the exact path, which picks the lowest index
    z, codebook = crowded_codebook(2000, 50, seed=3)
    got, info = nearest_code_info(z, codebook, search="bf16-fused")
    assert info.fallback == 50
    assert got.tolist() == [3] * 50


@needs_kernel
def test_fused_path_gives_up_on_a_crowded_codebook_after_its_first_chunk(monkeypatch):
    calls = []
    real_run = KERNEL.run

    def counting_run(z, *args, **kwargs):
        calls.append(z.shape[0])
        return real_run(z, *args, **kwargs)

    monkeypatch.setattr(KERNEL, "run", counting_run)
    z, codebook = crowded_codebook(300, 3000, seed=4)
    got, info = nearest_code_info(z, codebook, search="bf16-fused")
    assert calls == [3000]  # 3,000 x 303 distances: under FUSED_FIRST_CHUNK_DISTANCES, one call
    assert info.fallback == 3000
    assert torch.equal(got, reference_argmin(z, codebook))
    monkeypatch.setattr(search_mod, "FUSED_FIRST_CHUNK_DISTANCES", 3000 * 303)
    calls.clear()
    got, info = nearest_code_info(z, codebook, search="bf16-fused")
    assert calls == [search_mod.FUSED_FIRST_CHUNK]  # the first chunk only, then the exact path for all
    assert info.fallback == 3000
    assert torch.equal(got, reference_argmin(z, codebook))
    calls.clear()
    z, codebook = _random(3000, 303, 16, seed=6)
    got, info = nearest_code_info(z, codebook, search="bf16-fused")
    assert calls == [1024, 1976]  # a first chunk with few fallbacks: the rest follows
    assert torch.equal(got, reference_argmin(z, codebook))


@needs_kernel
def test_fused_path_on_degenerate_inputs():
    assert nearest_code(torch.zeros(5, 8), torch.zeros(7, 8), search="bf16-fused").tolist() == [0] * 5
    z, codebook = _random(80, 90, 8, seed=1)
    zb, cb = z.bfloat16(), codebook.bfloat16()  # bf16 inputs are searched in fp32
    assert torch.equal(nearest_code(zb, cb, search="bf16-fused"), reference_argmin(zb, cb))
    # a common offset of norm 1,000 with a spread of 0.1: centring keeps the answer exact
    u = torch.randn(24)
    z, codebook = _random(200, 300, 24, seed=2, scale=1.0, offset=0.0)
    z, codebook = 1000 * u / u.norm() + 0.1 * z, 1000 * u / u.norm() + 0.1 * codebook
    assert torch.equal(nearest_code(z, codebook, search="bf16-fused"), reference_argmin(z, codebook))
    # values whose squares leave the fp32 range go to the exact path instead of overflowing in the kernel
    z, codebook = _random(20, 30, 8, seed=3)
    got, info = nearest_code_info(z * 1e19, codebook * 1e19, search="bf16-fused")
    assert info.fallback == 20
    assert torch.equal(got, nearest_code(z * 1e19, codebook * 1e19, search="exact-fp32"))
    # non-finite tokens (a NaN, an inf) go to the exact path, the others are searched as usual
    z, codebook = _random(70, 50, 8, seed=4)
    z[3, 2], z[40, 0] = float("nan"), float("inf")
    got, info = nearest_code_info(z, codebook, search="bf16-fused")
    assert info.fallback == 2
    assert torch.equal(got, nearest_code(z, codebook, search="exact-fp32"))
    codebook[7, 1] = float("nan")  # a non-finite code: every token to the exact path
    got, info = nearest_code_info(z, codebook, search="bf16-fused")
    assert info.fallback == 70
    assert torch.equal(got, nearest_code(z, codebook, search="exact-fp32"))
    # ties exactly halfway between two dyadic codes
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(-8, 8, (300, 16), generator=g).float()
    first, second = torch.randint(300, (400,), generator=g), torch.randint(300, (400,), generator=g)
    z = (codes[first] + codes[second]) / 2
    assert torch.equal(nearest_code(z, codes, search="bf16-fused"), reference_argmin(z, codes))


@needs_kernel
def test_kernel_values_stay_within_the_error_bound():
    # run the kernel with a margin so wide that it keeps every code (K < MAX_CANDIDATES), and compare each
    # kept fp32 value v = ||c'||^2 - 2 z~.c~ with the float64 distance minus ||z'||^2
    g = torch.Generator().manual_seed(7)
    z = 50 + torch.randn(96, 48, generator=g) * torch.logspace(-2, 1, 48)
    codebook = 50 + torch.randn(100, 48, generator=g) * torch.logspace(-2, 1, 48)
    mean = codebook.mean(dim=0)
    zc = z - mean
    nr = KERNEL.codes_per_tile
    k_pad = -(-100 // nr) * nr
    # the codes centred, squared and rounded by the kernel's own pass, as the search does
    b, dc, csq = KERNEL.pack(codebook, k_pad, scale=-2.0, layout="codes", mean=mean, squares=True, threads=2)
    c_max, dc_max = float(csq[:100].max().sqrt()), float(dc.max())
    bound = search_mod._bf16_error_coefficients(48, c_max, dc_max)
    big = torch.finfo(torch.float32).max
    state = KERNEL.state(96, 48, 128)
    for buffer in state:
        buffer.fill_(-1)  # stale values: the kernel writes every one it reads
    # a margin so wide that every code is kept: the coefficients of the bound times 1e30
    KERNEL.run(z, mean, b, csq, [c * 1e30 for c in bound[:4]] + list(bound[4:]), state, kb_codes=64, threads=2)
    # the kernel's packing and bound, against torch's bf16 rounding and the bound evaluated in torch
    rounded = zc.bfloat16()
    assert torch.equal(state.apack, rounded.view(torch.int32).view(3, 32, 24).transpose(1, 2))
    dz = (zc.double() - rounded.double()).norm(dim=1)
    assert torch.allclose(state.zres.double(), dz, rtol=1e-6)
    assert torch.allclose(state.zsq.double(), zc.double().pow(2).sum(1), rtol=1e-6)
    err, _, _ = search_mod._bf16_product_error(48, state.zsq.double().sqrt(), c_max, state.zres, dc_max)
    assert torch.allclose(state.limit / 2, 1e30 * err, rtol=1e-12)
    # the threshold margin covers 2 E and the fp32 rounding of a sum as large as any value
    zn = state.zsq.double().sqrt() * bound[4]
    reach = state.limit / 2 + 2 * bound[5] * zn + bound[5] ** 2
    assert bool((state.twoe.double() >= state.limit + 2.0**-24 * reach).all())
    err, _, _ = search_mod._bf16_product_error(48, zc.norm(dim=1), c_max, dz.float(), dc_max)
    run_min, count, idx, val, dropped = state.run_min, state.count, state.cand_idx, state.cand_val, state.dropped
    assert bool((dropped == big).all())  # nothing refused: the lists never filled
    assert count.tolist() == [100] * 96  # every code kept, each once
    v = torch.empty(96, 100, dtype=torch.float64)
    idx, val = idx[:100].t(), val[:100].t()  # slot-major lists: (cap, rows)
    v.scatter_(1, idx.long(), val.double())
    exact = (z.double()[:, None] - codebook.double()[None]).pow(2).sum(-1) - zc.double().pow(2).sum(1)[:, None]
    gap = (v - exact).abs()
    assert float((err[:, None] - gap).min()) >= 0
    assert float(gap.max()) > 0.01 * float(err.min())  # the data does exercise the rounding
    # the running minimum comes from the scan's sums, the kept values from the same sums in another order
    # (evaluated again when kept): each within E of the exact value
    assert bool(((run_min.double() - exact.min(dim=1).values).abs() <= err).all())
    assert bool(((run_min.double() - v.min(dim=1).values).abs() <= 2 * err).all())


@needs_kernel
@pytest.mark.parametrize("kb_codes", [4096, 20])
def test_kept_codes_carry_their_own_values_in_one_pass_and_in_several(kb_codes):
    # codes kept at the end of one pass over all codes (kb_codes 4,096) or of each of several (20 codes each):
    # every kept value is its own code's value within E, each code is kept once, and the nearest code is
    # kept, on data with duplicate and near-duplicate codes side by side (tiles with several codes under a
    # token's threshold)
    g = torch.Generator().manual_seed(11)
    base = torch.randn(150, 24, generator=g)
    codebook = torch.cat([base, base[:40], base[40:80] + 1e-3 * torch.randn(40, 24, generator=g)])
    codebook = codebook[torch.randperm(230, generator=g)]
    codebook[1] = codebook[0]  # a duplicate inside the first tile
    z = torch.cat([codebook[:96] + 0.3 * torch.randn(96, 24, generator=g), torch.randn(64, 24, generator=g)])
    packed = KERNEL.codes(codebook, threads=2)
    c_max, dc_max = math.sqrt(packed.c_sq_max), packed.dc_max
    bound = search_mod._bf16_error_coefficients(24, c_max, dc_max)
    state = KERNEL.state(160, 24, 128)
    KERNEL.run(z, packed.mean, packed.b, packed.csq, bound, state, kb_codes=kb_codes, threads=2)
    zc = z - packed.mean
    exact = (z.double()[:, None] - codebook.double()[None]).pow(2).sum(-1) - zc.double().pow(2).sum(1)[:, None]
    err, _, _ = search_mod._bf16_product_error(24, zc.norm(dim=1), c_max, state.zres[:160], dc_max)
    nearest = reference_argmin(z, codebook)
    several = 0
    for i in range(160):
        c = int(state.count[i])
        idx, val = state.cand_idx[:c, i].long(), state.cand_val[:c, i].double()
        assert len(set(idx.tolist())) == c  # each code kept once
        assert bool(((val - exact[i, idx]).abs() <= err[i]).all()), i
        assert int(nearest[i]) in idx.tolist()
        several += c > 1
    assert several > 10  # the data does keep several codes for many tokens


@needs_kernel
@pytest.mark.parametrize("d", [1, 16, 37, 70])
def test_pack_matches_torch_bf16_rounding(d):
    # both tile layouts, plain and centred, against torch's bf16 rounding (to nearest even) laid out by hand;
    # d = 70: a partial group of 16 pairs in the in-register transposes; 45 rows: partial tiles
    g = torch.Generator().manual_seed(d)
    x = torch.randn(45, d, generator=g) * torch.logspace(-3, 3, d)
    pairs, mean = (d + 1) // 2, x.mean(dim=0)
    for layout, tile, rows, scale in (("codes", KERNEL.codes_per_tile, 50, -2.0), ("tokens", KERNEL.tokens_per_block, 64, 1.0)):
        for centre in (None, mean):
            y = x if centre is None else x - centre  # the same fp32 differences as torch's x - mean
            padded = torch.zeros(rows, 2 * pairs)
            padded[:45, :d] = y
            rounded = padded.bfloat16()
            out, resid, sq = KERNEL.pack(x, rows, scale=scale, layout=layout, mean=centre, squares=centre is not None, threads=3)
            assert out.shape == (rows // tile, pairs, tile)
            # tile t, pair p, row r of the tile -> row t * tile + r, coordinates 2 p and 2 p + 1
            got = torch.empty(rows, pairs, dtype=torch.int32).copy_(out.transpose(1, 2).reshape(rows, pairs)).view(torch.bfloat16)
            assert torch.equal(got.float(), rounded.float() * scale)  # values (the padding is +0, torch's -2 * 0 is -0)
            assert torch.allclose(resid.double(), (y.double() - rounded[:45, :d].double()).norm(dim=1), rtol=1e-5)
            if centre is None:
                assert sq is None
            else:
                assert torch.allclose(sq[:45].double(), y.double().pow(2).sum(dim=1), rtol=1e-5)
                assert bool(torch.isinf(sq[45:]).all())  # padding rows: never a candidate
    with pytest.raises(ValueError, match="multiple of"):
        KERNEL.pack(x, 64, scale=-2.0, layout="codes")


@needs_kernel
@pytest.mark.parametrize(("k", "d", "threads"), [(1, 5, 3), (45, 37, 2), (300, 16, 1), (301, 130, 2)])
def test_codes_operands_against_float64_and_pack(k, d, threads):
    # the codes' operands in one call: the mean summed in double (the data's sums are exact in double, so it
    # is float64's mean rounded once), the rows packed as pack() packs them, the two maxima of the bound
    g = torch.Generator().manual_seed(k + d)
    x = 3 + torch.randn(k, d, generator=g) * torch.logspace(-3, 2, d)
    packed = KERNEL.codes(x, threads=threads)
    assert torch.equal(packed.mean, x.double().mean(dim=0).float())
    k_pad = -(-k // KERNEL.codes_per_tile) * KERNEL.codes_per_tile
    b, resid, sq = KERNEL.pack(x, k_pad, scale=-2.0, layout="codes", mean=packed.mean, squares=True)
    assert torch.equal(packed.b, b) and torch.equal(packed.csq, sq)
    assert packed.c_sq_max == float(sq[:k].max()) and packed.dc_max == float(resid.max())
    assert packed.c_sq_max == pytest.approx(float((x.double() - x.double().mean(0)).pow(2).sum(1).max()), rel=1e-5)
    x[k // 2, d // 2] = float("nan")
    assert math.isnan(KERNEL.codes(x, threads=threads).c_sq_max)  # a NaN code: the search's exact path decides


def test_unavailable_kernel_falls_back_and_says_why(monkeypatch):
    monkeypatch.setattr(search_mod, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(search_mod, "fused_kernel_available", lambda: False)
    assert search_mod.resolve_search("auto", "cpu", torch.float32, 4096, 4096, 64) == "bf16-candidates"
    monkeypatch.setattr(search_mod, "bf16_search_kernel", lambda: None)
    with pytest.raises(ValueError, match=r"search='bf16-fused' needs the fused bf16 kernel, which is unavailable"):
        nearest_code(torch.randn(4, 16), torch.randn(5, 16), search="bf16-fused")
    with pytest.raises(ValueError, match="needs the fused bf16 kernel"):  # at construction, before any data
        build_quantizer("simvq", dim=16, codebook_size=64, search="bf16-fused")
    monkeypatch.undo()
    if KERNEL is not None:
        with pytest.raises(ValueError, match="runs fp32 searches on the CPU"):
            nearest_code(torch.randn(4, 16).double(), torch.randn(5, 16).double(), search="bf16-fused")


def test_the_kernel_is_built_wherever_it_can_run():
    # the kernel tests skip where it is unavailable: on a CPU that has what it needs, with a compiler and the
    # kernel not switched off, that must not hide a broken build
    if os.environ.get("SIMVQ_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        pytest.skip("switched off by SIMVQ_NATIVE")
    if not native.REQUIRED_CPU_FLAGS <= native._cpu_flags() or native._compiler() is None:
        pytest.skip("this machine cannot build or run the kernel")
    assert KERNEL is not None, native.native_status()


def _status_in_subprocess(env: dict) -> str:
    code = "from simvq.quantizers import native; print(native.native_status())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_switch_off_and_a_failing_compiler_are_reported(tmp_path):
    assert _status_in_subprocess({"SIMVQ_NATIVE": "0"}) == "turned off by SIMVQ_NATIVE=0"
    if KERNEL is None:
        pytest.skip(f"fused kernel unavailable here: {native.native_status()}")
    # a compiler that fails: no library, a clear reason, nothing left behind in the cache folder
    status = _status_in_subprocess({"CC": "false", "SIMVQ_KERNEL_DIR": str(tmp_path / "k")})
    assert status.startswith("build or load failed: false failed")
    assert list((tmp_path / "k").iterdir()) == []


@needs_kernel
def test_build_is_cached_per_source_and_written_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMVQ_KERNEL_DIR", str(tmp_path))
    compiler = native._compiler()
    first = native._build(compiler)
    stamp = first.stat().st_mtime_ns
    assert native._build(compiler) == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.Bf16SearchKernel(__import__("ctypes").CDLL(str(first))).tokens_per_block == KERNEL.tokens_per_block


@needs_kernel
def test_a_build_without_openmp_runs_serially_and_gives_the_same_answer(tmp_path, monkeypatch):
    # a compiler without OpenMP gets the second flag set: the parallel regions run once, on the calling thread
    compiler = native._compiler()
    target = tmp_path / "serial.so"
    proc = subprocess.run([compiler, *native.FLAG_SETS[1], "-o", str(target), str(native.SOURCE)], capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-500:]
    serial = native.Bf16SearchKernel(__import__("ctypes").CDLL(str(target)))
    assert not serial.openmp
    monkeypatch.setattr(search_mod, "bf16_search_kernel", lambda: serial)
    monkeypatch.setattr(search_mod, "default_threads", lambda: 3)  # asked for three, runs on one
    z, codebook = _random(700, 1100, 40, seed=12, scale=0.5)
    got, info = nearest_code_info(z, codebook, search="bf16-fused")
    assert info.path == "bf16-fused" and info.fallback == 0
    assert torch.equal(got, reference_argmin(z, codebook))
    packed, reference = serial.codes(codebook, threads=3), KERNEL.codes(codebook, threads=2)
    assert torch.equal(packed.b, reference.b) and torch.equal(packed.mean, reference.mean)


@needs_kernel
def test_workspace_is_reused_grows_and_can_be_released():
    KERNEL.release_workspace()
    z, codebook = _random(500, 600, 16, seed=9)
    nearest_code(z, codebook, search="bf16-fused")
    buffers = KERNEL._local.buffers
    first = buffers["codes"].data_ptr()
    nearest_code(z[:100], codebook[:300], search="bf16-fused")  # smaller: the same memory
    assert buffers["codes"].data_ptr() == first
    got = nearest_code(z, torch.cat([codebook, codebook + 1]), search="bf16-fused")  # larger: grows
    assert buffers["codes"].numel() >= 1200 * 8  # int32 pairs of bf16
    assert torch.equal(got, reference_argmin(z, torch.cat([codebook, codebook + 1])))
    state = KERNEL.state(64, 16, 8)
    assert KERNEL.state(64, 16, 8) is state and KERNEL.state(96, 16, 8) is not state  # the last one, reused
    KERNEL.release_workspace()
    assert "buffers" not in KERNEL._local.__dict__ and "state" not in KERNEL._local.__dict__


def test_cli_reports_an_unavailable_fused_path_in_one_line(tmp_path, monkeypatch, capsys):
    from simvq.cli import main as cli_main

    monkeypatch.setattr(search_mod, "fused_kernel_available", lambda: False)
    monkeypatch.setattr(search_mod, "native_status", lambda: "turned off by SIMVQ_NATIVE=0")
    args = ["train", "--config", "image/digits-tiny", "--out", str(tmp_path / "run"), "--max-steps", "1", "--quiet"]
    assert cli_main([*args, "quantizer.search=bf16-fused"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "use 'auto'" in err and "SIMVQ_NATIVE=0" in err


@needs_kernel
def test_kernel_run_refuses_mismatched_buffers():
    # the C code trusts the layout it is given: a mismatch must be a clear error, never a stray memory access
    z, codebook = _random(40, 30, 16, seed=8)
    mean = codebook.mean(dim=0)
    b, dc, csq = KERNEL.pack(codebook, 30, scale=-2.0, layout="codes", mean=mean, squares=True)
    bound = search_mod._bf16_error_coefficients(16, float(csq.max().sqrt()), float(dc.max()))
    with pytest.raises(ValueError, match="must match the tokens' width"):
        KERNEL.run(z, mean, b, csq, bound, KERNEL.state(64, 18, 8), kb_codes=64, threads=1)  # width 18, not 16
    with pytest.raises(ValueError, match="state for n tokens"):
        KERNEL.run(z, mean, b, csq, bound, KERNEL.state(32, 16, 8), kb_codes=64, threads=1)  # 32 rows, 40 tokens
    state = KERNEL.state(64, 16, 8)
    token_major = state._replace(cand_idx=state.cand_idx.t().contiguous(), cand_val=state.cand_val.t().contiguous())
    with pytest.raises(ValueError, match="must match the tokens' width"):  # lists (rows, cap), not (cap, rows)
        KERNEL.run(z, mean, b, csq, bound, token_major, kb_codes=64, threads=1)
    out = torch.empty(40, dtype=torch.long)
    finish = native.Finish(codebook, out, torch.empty(39, dtype=torch.int32))
    with pytest.raises(ValueError, match="for every token"):
        KERNEL.run(z, mean, b, csq, bound, KERNEL.state(64, 16, 8), kb_codes=64, threads=1, finish=finish)
    finish = finish._replace(near=torch.empty(40, dtype=torch.int32))
    KERNEL.run(z, mean, b, csq, bound, KERNEL.state(64, 16, 8), kb_codes=64, threads=1, finish=finish)
    assert torch.equal(out, reference_argmin(z, codebook))  # no -1 / -2 on this data
