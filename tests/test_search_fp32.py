"""The fused fp32 search kernel (search="fp32-fused", simvq/quantizers/kernels/fp32_search.c).

Answers are checked against an explicit float64 ``sum((z - c)^2)`` argmin (lowest index on exact ties) and
against the exact path; the kernel's per-token values (smallest, runner-up) against float64 evaluations of the
same fp32 operands through the rounding bound; its packed tokens and codes against torch. Where the kernel
cannot be built (no AVX2/FMA, no compiler), the tests that run it are skipped and the fallback rules are still
checked.
"""

from __future__ import annotations

import ctypes
import os
import subprocess

import pytest
import torch

from simvq.quantizers import native
from simvq.quantizers import search as search_mod
from simvq.quantizers.registry import build_quantizer
from simvq.quantizers.search import nearest_code, nearest_code_info, resolve_search
from test_search_paths import _data, _random, crowded_codebook, reference_argmin  # float64 reference, data

KERNEL = native.fp32_search_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"fp32 kernel unavailable: {native.native_status('fp32')}")


@needs_kernel
@pytest.mark.parametrize(
    "n, k, d",
    [
        (1, 1, 1),  # one token, one code: a tile and a block of padding
        (17, 7, 9),  # one token past a block, one code past a tile, one coordinate past a vector
        (8, 6, 8),  # exactly half a block, one tile, one vector
        (100, 137, 33),
        (70, 500, 3),  # narrow codes: every coordinate in the scalar tail
        (257, 1000, 128),  # the benchmark's width
    ],
)
def test_fp32_path_equals_float64_on_ragged_shapes(n, k, d):
    z, codebook = _random(n, k, d, seed=n + k + d)
    got, info = nearest_code_info(z, codebook, search="fp32-fused")
    assert info.path == "fp32-fused" and info.fallback == 0
    assert torch.equal(got, reference_argmin(z, codebook))


@needs_kernel
@pytest.mark.parametrize("kind", ["random", "clustered", "offset", "duplicates", "ties"])
@pytest.mark.parametrize("threads", [1, 3])
def test_fp32_path_on_every_kind_of_data_and_across_code_blocks(kind, threads, monkeypatch):
    # cache blocks of 12 codes (two tiles) at d = 32: every block boundary is crossed; three threads on two
    # cores take the pieces dynamically
    monkeypatch.setattr(search_mod, "FP32_CODE_BLOCK_BYTES", 12 * 4 * 32)
    monkeypatch.setattr(search_mod, "default_threads", lambda: threads)
    z, codebook = _data(kind)
    got, info = nearest_code_info(z, codebook, search="fp32-fused")
    assert torch.equal(got, reference_argmin(z, codebook)), info
    if kind in ("duplicates", "ties"):  # rivals within the bound are found and re-ranked, not guessed
        assert info.reranked > 0


@needs_kernel
def test_the_kernels_values_hold_within_the_rounding_bound():
    # m1 (smallest value), idx (its code) and m2 (smallest of every other code) against float64 evaluations of
    # ||c'||^2 - 2 z'.c' from the same fp32 operands: each within the bound the search uses
    z, codebook = _random(300, 250, 40, seed=3, scale=0.7, offset=5.0)
    mean = codebook.mean(dim=0)
    cc = codebook - mean
    c_sq = cc.pow(2).sum(dim=1)
    b, csq = KERNEL.codes(codebook, mean, threads=2)
    res = KERNEL.run(z, mean, b, csq, kb_codes=60, threads=2)
    zc = z - mean
    exact = cc.double().pow(2).sum(dim=1)[None, :] - 2 * zc.double() @ cc.double().t()
    bound = search_mod._rounding_bound(40, torch.float32, c_sq.max().sqrt(), zc.norm(dim=1)).double()
    idx = res.idx.long()
    assert float(((res.m1.double() - exact.min(dim=1).values).abs() - bound).max()) <= 0
    assert float(((res.m1.double() - exact.gather(1, idx[:, None])[:, 0]).abs() - bound).max()) <= 0
    others = exact.scatter(1, idx[:, None], float("inf"))
    assert float(((res.m2.double() - others.min(dim=1).values).abs() - bound).max()) <= 0
    assert torch.allclose(res.znorm.double(), zc.double().norm(dim=1), rtol=1e-6)
    assert float((res.m1.double() - exact.min(dim=1).values).abs().max()) > 0  # the data do exercise the rounding


@needs_kernel
@pytest.mark.parametrize("kind", ["random", "duplicates", "ties"])
def test_codes_split_into_ranges_give_the_single_pass_result_bit_for_bit(kind):
    # a few tokens (three blocks): the codes are also split into ranges, one state per range, merged in code
    # order. Every range count and thread count must leave what one pass over all codes on one thread leaves;
    # with duplicated codes (copies a third of the codebook apart) and exact ties the copies and rivals sit in
    # different ranges, so the merge's tie rule (the first code in code order, runner-up equal) is exercised.
    z, codebook = _data(kind, n=40, k=699, d=24, seed=5)
    mean = codebook.mean(dim=0)
    b, csq = KERNEL.codes(codebook, mean)
    one = [t.clone() for t in KERNEL.run(z, mean, b, csq, kb_codes=30, threads=1, parts=1)]
    for parts in (2, 3, 7, b.shape[0]):
        for threads in (1, 2, 3):
            got = KERNEL.run(z, mean, b, csq, kb_codes=30, threads=threads, parts=parts)
            for name, want, have in zip(native.Fp32Result._fields, one, got):
                assert torch.equal(want, have), (name, parts, threads)
    if kind != "random":  # near-ties that only the merge brings together: runner-up equal to the best
        assert bool((one[1] == one[0]).any())
    with pytest.raises(ValueError, match="parts must be between 1 and the number of code tiles"):
        KERNEL.run(z, mean, b, csq, kb_codes=30, threads=1, parts=b.shape[0] + 1)


@needs_kernel
@pytest.mark.parametrize("kind", ["random", "clustered", "offset", "duplicates", "ties"])
def test_a_few_tokens_split_the_codes_and_still_equal_float64(kind, monkeypatch):
    # 20 tokens (two blocks) on three threads: the default split into code ranges of one tile or more
    monkeypatch.setattr(native, "FP32_MIN_PART_TILES", 1)
    monkeypatch.setattr(search_mod, "default_threads", lambda: 3)
    calls = []
    real = KERNEL._search_all
    monkeypatch.setattr(KERNEL, "_search_all", lambda *a: calls.append(a[1:]) or real(*a))
    z, codebook = _data(kind, n=20, k=700, d=32, seed=2)
    got, info = nearest_code_info(z, codebook, search="fp32-fused")
    assert torch.equal(got, reference_argmin(z, codebook)), info
    blocks, threads, _, parts = calls[0]
    assert (blocks, threads) == (2, 3) and parts == -(-3 * native.PIECES_PER_THREAD // 2)


@needs_kernel
def test_the_code_split_is_chosen_only_when_tokens_are_few(monkeypatch):
    calls = []
    real = KERNEL._search_all
    monkeypatch.setattr(KERNEL, "_search_all", lambda *a: calls.append(a[1:]) or real(*a))
    z, codebook = _random(4096, 64 * 6 * 4, 8, seed=1)
    mean = codebook.mean(dim=0)
    b, csq = KERNEL.codes(codebook, mean)
    for n, threads, parts in [(4096, 2, 1), (16, 1, 1), (16, 2, 4), (64, 2, 4), (16 * 16, 2, 1), (16 * 15, 2, 2)]:
        KERNEL.run(z[:n], mean, b, csq, kb_codes=60, threads=threads)
        assert calls[-1][3] == parts, (n, threads)  # four ranges of 64 tiles at most


@needs_kernel
@pytest.mark.parametrize("threads", [1, 3])
def test_the_kernel_lists_every_code_within_a_threshold(threads):
    # 21 tokens (a block and a ragged one), thresholds from the smallest value up to well past it: the pairs
    # listed must hold every code whose float64 value is under thr - B and none over thr + B (B the bound
    # of an fp32 evaluation), with no pair for a padding token and none twice
    z, codebook = _random(21, 500, 24, seed=11, scale=0.8, offset=2.0)
    mean = codebook.mean(dim=0)
    b, csq = KERNEL.codes(codebook, mean)
    res = KERNEL.run(z, mean, b, csq, kb_codes=60, threads=1)
    cc, zc = codebook - mean, z - mean
    exact = cc.double().pow(2).sum(dim=1)[None, :] - 2 * zc.double() @ cc.double().t()
    bound = search_mod._rounding_bound(24, torch.float32, cc.norm(dim=1).max(), zc.norm(dim=1)).double()
    thr = res.m1 + torch.linspace(0, 6, 21)  # a few codes for the first tokens, dozens for the last
    pairs = KERNEL.collect(z, mean, b, csq, thr, threads=threads, cap=21 * 500)
    assert pairs is not None
    rows, cols = pairs
    listed = torch.zeros(21, 500, dtype=torch.long)
    listed.index_put_((rows, cols), torch.ones_like(rows), accumulate=True)
    assert int(listed.max()) == 1 and int(rows.max()) < 21
    must = exact <= thr.double()[:, None] - bound[:, None]
    may = exact <= thr.double()[:, None] + bound[:, None]
    assert bool((listed.bool() >= must).all()) and bool((listed.bool() <= may).all())
    assert int(must.sum()) > 21 * 2  # the thresholds do reach several codes
    assert KERNEL.collect(z, mean, b, csq, thr, threads=threads, cap=int(must.sum()) - 1) is None  # too many
    with pytest.raises(ValueError, match="a float32 threshold per token"):
        KERNEL.collect(z, mean, b, csq, thr[:5], threads=1, cap=10)


@needs_kernel
def test_near_ties_are_settled_from_the_kernels_list_and_dense_copies_by_the_matmul(monkeypatch):
    calls = {"listed": 0, "matmul": 0}
    real_rerank, real_collect = search_mod._rerank, KERNEL.collect

    def rerank(*args):
        calls["matmul"] += 1
        return real_rerank(*args)

    def collect(*args, **kwargs):
        pairs = real_collect(*args, **kwargs)
        calls["listed"] += pairs is not None
        return pairs

    monkeypatch.setattr(search_mod, "_rerank", rerank)
    monkeypatch.setattr(KERNEL, "collect", collect)
    z, codebook = _data("duplicates")  # three copies of every code: every token has two rivals
    got, info = nearest_code_info(z, codebook, search="fp32-fused")
    assert torch.equal(got, reference_argmin(z, codebook)) and info.reranked == len(z)
    assert calls == {"listed": 1, "matmul": 0}
    z, codebook = crowded_codebook(copies=search_mod.FP32_RERANK_PAIRS_PER_TOKEN + 1, tokens=50, seed=3)
    got, info = nearest_code_info(z, codebook, search="fp32-fused")
    assert torch.equal(got, reference_argmin(z, codebook)) and info.reranked == 50
    assert calls == {"listed": 1, "matmul": 1}
    # the list also stays within the memory bound: 600 tokens x 3 copies is more than 2**10 / 8 pairs
    z, codebook = _data("duplicates")
    got, info = nearest_code_info(z, codebook, search="fp32-fused", max_chunk_elements=2**10)
    assert torch.equal(got, reference_argmin(z, codebook)) and info.reranked == len(z)
    assert calls == {"listed": 1, "matmul": 2}


@needs_kernel
def test_packed_operands_match_torch():
    z, codebook = _random(37, 13, 11, seed=4, offset=3.0)
    mean = codebook.mean(dim=0)
    cc = codebook - mean  # torch's centring: the kernel's coordinates must equal it bit for bit
    b, csq = KERNEL.codes(codebook, mean, threads=2)
    nr, mr = KERNEL.codes_per_tile, KERNEL.tokens_per_block
    k_pad = -(-13 // nr) * nr
    padded = torch.zeros(k_pad, 11)
    padded[:13] = cc
    assert torch.equal(b, padded.view(k_pad // nr, nr, 11).transpose(1, 2))
    # the squared norms: the float64 sum of the centred coordinates' squares, rounded once
    want = cc.double().pow(2).sum(dim=1)
    assert float(((csq[:13].double() - want).abs() / want).max()) <= 1.001 * 2.0**-24
    assert bool(torch.isinf(csq[13:]).all())
    KERNEL.run(z, mean, b, csq, kb_codes=6, threads=1)
    blocks = -(-37 // mr)
    apack = KERNEL.workspace("apack", (blocks, 11, mr), torch.float32)
    tokens = torch.zeros(blocks * mr, 11)
    tokens[:37] = z - mean  # torch's own centring, then -2 (exact)
    assert torch.equal(apack, (-2 * tokens).view(blocks, mr, 11).transpose(1, 2))


@needs_kernel
def test_non_finite_and_huge_values_go_to_the_exact_path():
    z, codebook = _random(50, 40, 8, seed=5)
    z[3, 2], z[7, 0] = float("nan"), float("inf")
    got, info = nearest_code_info(z, codebook, search="fp32-fused")
    assert info.fallback == 2
    assert torch.equal(got, nearest_code(z, codebook, search="exact-fp32"))
    bad = codebook.clone()
    bad[5, 5] = float("nan")  # a NaN code: every token to the exact path
    got, info = nearest_code_info(z, bad, search="fp32-fused")
    assert info.fallback == 50 and torch.equal(got, nearest_code(z, bad, search="exact-fp32"))
    # values that could leave the fp32 range: tokens far out fall back, the others are answered, all exact
    z, codebook = _random(40, 30, 8, seed=6)
    z[:10] *= 1e19  # bounds past FP32_FUSED_MAX_BOUND
    got, info = nearest_code_info(z, codebook, search="fp32-fused")
    assert info.fallback == 10
    assert torch.equal(got, reference_argmin(z, codebook))


@needs_kernel
def test_a_crowded_codebook_is_reranked_exactly():
    z, codebook = crowded_codebook(copies=300, tokens=200, seed=7)
    got, info = nearest_code_info(z, codebook, search="fp32-fused")
    assert info.reranked == 200 and info.fallback == 0
    assert torch.equal(got, reference_argmin(z, codebook))
    assert bool((got == 3).all())  # the lowest index of the copies
    # the kernel's own answer is the first code in code order that reached the smallest value
    mean = codebook.mean(dim=0)
    res = KERNEL.run(z, mean, *KERNEL.codes(codebook, mean), kb_codes=60, threads=2)
    assert bool((res.idx == 3).all()) and torch.equal(res.m1, res.m2)


@needs_kernel
def test_simvq_with_the_fp32_kernel_equals_the_exact_path():
    torch.manual_seed(0)
    z = torch.randn(2, 64, 16)
    outs = {}
    for path in ("exact-fp32", "fp32-fused"):
        torch.manual_seed(1)
        quantizer = build_quantizer("simvq", dim=16, codebook_size=512, channel_first=False, search=path)
        outs[path] = quantizer(z).indices
    assert torch.equal(outs["exact-fp32"], outs["fp32-fused"])


@needs_kernel
@pytest.mark.parametrize("tokens", [300, 20])  # token blocks in pieces; a few tokens: the codes split too
def test_a_build_without_openmp_runs_serially_and_gives_the_same_answer(tokens, tmp_path, monkeypatch):
    compiler = native._compiler()
    target = tmp_path / "serial.so"
    proc = subprocess.run([compiler, *native.FP32_FLAG_SETS[1], "-o", str(target), str(native.FP32_SOURCE)], capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-500:]
    serial = native.Fp32SearchKernel(ctypes.CDLL(str(target)))
    assert not serial.openmp and KERNEL.openmp == (native.native_status("fp32") == "available")
    monkeypatch.setattr(search_mod, "fp32_search_kernel", lambda: serial)
    monkeypatch.setattr(search_mod, "default_threads", lambda: 3)  # asked for three, runs on one
    monkeypatch.setattr(native, "FP32_MIN_PART_TILES", 1)
    z, codebook = _random(tokens, 500, 24, seed=8, scale=0.5)
    got, info = nearest_code_info(z, codebook, search="fp32-fused")
    assert info.path == "fp32-fused" and torch.equal(got, reference_argmin(z, codebook))


@needs_kernel
def test_build_is_cached_per_kernel_and_written_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMVQ_KERNEL_DIR", str(tmp_path))
    compiler = native._compiler()
    first = native._build(compiler, "fp32")
    stamp = first.stat().st_mtime_ns
    assert first.name.startswith("fp32_search-")
    assert native._build(compiler, "fp32") == first and first.stat().st_mtime_ns == stamp  # reused
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left


def test_the_kernel_is_built_wherever_it_can_run():
    if os.environ.get("SIMVQ_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        pytest.skip("switched off by SIMVQ_NATIVE")
    if not native.FP32_REQUIRED_CPU_FLAGS <= native._cpu_flags() or native._compiler() is None:
        pytest.skip("this machine cannot build or run the kernel")
    assert KERNEL is not None, native.native_status("fp32")


def test_auto_takes_the_fp32_kernel_on_cpus_without_bf16(monkeypatch):
    monkeypatch.setattr(search_mod, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(search_mod, "fp32_kernel_available", lambda: True)
    least = search_mod.FP32_FUSED_MIN_PRODUCTS
    assert resolve_search("auto", "cpu", torch.float32, 2, least // 32, 16) == "fp32-fused"
    assert resolve_search("auto", "cpu", torch.float32, 2, least // 32 - 1, 16) == "exact-fp32"  # a tiny search
    assert resolve_search("auto", "cpu", torch.float32, 1, 65536, 128) == "fp32-fused"  # one token
    assert resolve_search("auto", "cpu", torch.float32, 1, least) == "fp32-fused"  # no width: counted as 1
    assert resolve_search("auto", "cpu", torch.float32, 1, least - 1) == "exact-fp32"
    assert resolve_search("auto", "cpu", torch.float64, 4096, 4096) == "exact-fp32"
    assert resolve_search("auto", "cuda", torch.float32, 4096, 4096) == "exact-fp32"
    monkeypatch.setattr(search_mod, "fp32_kernel_available", lambda: False)
    assert resolve_search("auto", "cpu", torch.float32, 4096, 4096) == "exact-fp32"
    # where hardware bf16 is present the bf16 rules stand
    monkeypatch.setattr(search_mod, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(search_mod, "fused_kernel_available", lambda: True)
    monkeypatch.setattr(search_mod, "fp32_kernel_available", lambda: pytest.fail("fp32 kernel asked for"))
    assert resolve_search("auto", "cpu", torch.float32, 4096, 4096) == "bf16-fused"


def test_an_unavailable_fp32_kernel_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(search_mod, "fp32_search_kernel", lambda: None)
    with pytest.raises(ValueError, match=r"search='fp32-fused' needs the fused fp32 kernel, which is unavailable"):
        nearest_code(torch.randn(4, 16), torch.randn(5, 16), search="fp32-fused")
    with pytest.raises(ValueError, match="needs the fused fp32 kernel"):  # at construction, before any data
        build_quantizer("simvq", dim=16, codebook_size=64, search="fp32-fused")
    monkeypatch.undo()
    if KERNEL is not None:
        with pytest.raises(ValueError, match="runs fp32 searches on the CPU"):
            nearest_code(torch.randn(4, 16).double(), torch.randn(5, 16).double(), search="fp32-fused")


@needs_kernel
def test_kernel_refuses_mismatched_operands():
    z, codebook = _random(20, 12, 8, seed=9)
    mean = codebook.mean(dim=0)
    b, csq = KERNEL.codes(codebook, mean)
    with pytest.raises(ValueError, match="must match the tokens' width"):
        KERNEL.run(torch.randn(20, 9), torch.zeros(9), b, csq, kb_codes=12, threads=1)
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        KERNEL.run(z.t().contiguous().t(), mean, b, csq, kb_codes=12, threads=1)
    with pytest.raises(ValueError, match="non-empty float32"):
        KERNEL.codes(codebook.double(), mean)
    with pytest.raises(ValueError, match=r"mean must be a float32 tensor of shape \(8,\)"):
        KERNEL.codes(codebook, mean[:7])


def test_a_search_the_model_refuses_leaves_no_run_folder(tmp_path, capsys):
    # the quantizer refuses the setting when the model is built; the run folder is claimed only after that,
    # so the corrected command can use the same folder
    from simvq.cli import main as cli_main

    args = ["train", "--config", "image/digits-tiny", "--out", str(tmp_path / "run"), "--max-steps", "1", "--quiet"]
    assert cli_main([*args, "quantizer.search=fp32-fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "search must be one of" in err
    assert not (tmp_path / "run").exists()
    assert cli_main(args) == 0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


@needs_kernel
def test_buffers_made_under_inference_mode_serve_later_searches():
    # Lightning validates under torch.inference_mode: the kept buffers made there must still be writable after
    KERNEL.release_workspace()
    z, codebook = _random(100, 90, 12, seed=10)
    with torch.inference_mode():
        first = nearest_code(z, codebook, search="fp32-fused")
    assert torch.equal(first, reference_argmin(z, codebook))
    assert torch.equal(nearest_code(z, codebook, search="fp32-fused"), first)
    with torch.inference_mode():
        assert torch.equal(nearest_code(z, codebook, search="fp32-fused"), first)


@needs_kernel
def test_searches_from_several_threads_at_once_keep_their_own_buffers():
    # each calling thread has its own kept buffers (codes, tokens, state, lists) and the kernel releases the
    # GIL: four threads searching different codebooks at once, near-ties and a few tokens among them, must each
    # get the float64 argmin of their own data
    from concurrent.futures import ThreadPoolExecutor

    cases = [
        _data("duplicates", n=300, k=600, d=16, seed=s) if s % 2 else _random(5 + 40 * s, 300 + 97 * s, 8 + 4 * s, seed=s)
        for s in range(8)
    ]
    want = [reference_argmin(z, c) for z, c in cases]

    def search(i):
        z, c = cases[i]
        return [nearest_code(z, c, search="fp32-fused") for _ in range(3)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(search, range(len(cases))))
    for i, runs in enumerate(got):
        for run in runs:
            assert torch.equal(run, want[i]), i
