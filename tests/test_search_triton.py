"""The Triton search kernel (search="bf16-triton", simvq/quantizers/triton_search.py).

Where CUDA is available the tests run the compiled kernel on the GPU, with bf16 operands on the tensor cores:
they then check the error bound's assumption about the tensor cores' accumulation against float64 on the
hardware that runs them. Elsewhere they run it in Triton's interpreter on the CPU (TRITON_INTERPRET=1, set by
tests/conftest.py before Triton is imported; operands as fp32 tensors holding the bf16 values).

References: an explicit float64 ``sum((z - c)^2)`` argmin (lowest index on exact ties) and, for the kernel's
own values, the float64 products of the same bf16 operands.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from simvq.quantizers import search as search_mod  # noqa: E402
from simvq.quantizers import triton_search as ts  # noqa: E402
from simvq.quantizers.registry import build_quantizer  # noqa: E402
from simvq.quantizers.search import (  # noqa: E402
    MAX_TRITON_CODES,
    nearest_code,
    nearest_code_info,
    resolve_search,
)

from test_search_paths import _data, crowded_codebook, reference_argmin  # noqa: E402


@pytest.fixture
def device():
    """The device the kernel runs on: CUDA (compiled), else the CPU under Triton's interpreter."""
    if ts.interpreting():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("no GPU, and TRITON_INTERPRET was not set before Triton was imported")
    return torch.device("cuda")


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


def _operands(z, codebook, device):
    """The kernel's inputs, built here from their definition: centred on the codes' mean, bf16-rounded,
    codes times -2; fp32 holding the bf16 values under the interpreter."""
    operand = torch.float32 if device.type == "cpu" else torch.bfloat16
    mean = codebook.mean(dim=0)
    zc, cc = z - mean, codebook - mean
    pad = ts.padded_width(z.shape[1]) - z.shape[1]
    zb = torch.nn.functional.pad(zc.bfloat16(), (0, pad)).to(operand)
    cb = torch.nn.functional.pad(-2 * cc.bfloat16(), (0, pad)).to(operand)
    return zb, cb, cc.pow(2).sum(dim=1), zc, cc


@pytest.mark.parametrize("kind", ["random", "clustered", "offset", "duplicates", "ties"])
def test_equals_the_float64_argmin(kind, device):
    z, codebook = _data(kind)
    got, info = nearest_code_info(*_on(device, z, codebook), search="bf16-triton")
    ref = reference_argmin(z, codebook)
    assert torch.equal(got.cpu(), ref), f"{int((got.cpu() != ref).sum())} of {len(ref)} tokens differ ({kind}, {info})"
    assert info.path == "bf16-triton"
    assert info.fallback == 0 or kind == "duplicates"


@pytest.mark.parametrize(
    "n, k, d",
    [
        (1, 1, 1),  # one token, one code, width padded to 16
        (130, 129, 8),  # a ragged token block and a tile of one code
        (77, 1000, 40),  # width not a power of two
        (50, 300, 200),  # width 256 after padding: half the token block, still held for the whole scan
        (40, 260, 300),  # wider than 256: the width read in pieces of 64 per tile
    ],
)
def test_shapes_and_widths(n, k, d, device):
    z, codebook = _data("random", n=n, k=k, d=d, seed=n + k + d)
    got = nearest_code(*_on(device, z, codebook), search="bf16-triton")
    assert torch.equal(got.cpu(), reference_argmin(z, codebook))


@pytest.mark.parametrize("splits", [2, 5, 64])
def test_split_code_ranges_and_token_chunks(splits, device, monkeypatch):
    # code ranges of whole tiles per program (the last shorter or absent), and token chunks of one token block
    monkeypatch.setattr(ts, "default_splits", lambda *args: splits)
    z, codebook = _data("clustered", n=300, k=1100, d=24, seed=splits)
    block = ts.token_block(24)
    # one token block per chunk, and the fp32 re-evaluation in groups of at most 4,096 codes (32 tiles)
    budget = 2 * ts.LIST_CAP * block
    got, info = nearest_code_info(*_on(device, z, codebook), search="bf16-triton", max_chunk_elements=budget)
    assert torch.equal(got.cpu(), reference_argmin(z, codebook)) and info.fallback == 0


def test_reevaluation_groups_hold_whole_tokens():
    per_row = torch.tensor([3, 0, 5, 2, 4])  # entries per token, row-major: 0-3, -, 3-8, 8-10, 10-14
    assert search_mod._row_groups(per_row, 6) == [(0, 3), (3, 8), (8, 14)]
    assert search_mod._row_groups(per_row, 14) == [(0, 14)]
    assert search_mod._row_groups(per_row, 4) == [(0, 3), (3, 8), (8, 10), (10, 14)]  # a token over the budget: alone
    assert search_mod._row_groups(torch.zeros(3, dtype=torch.long), 4) == []


@pytest.mark.parametrize("splits", [1, 3])
def test_the_kernel_keeps_every_tile_within_the_margin_and_its_minima_are_the_products(splits, device):
    # against float64 products of the same bf16 operands: each split's minimum, each recorded tile's smallest
    # value, and every code within the margin of the final minimum lying in a recorded tile
    g = torch.Generator().manual_seed(11)
    n, k, d = 150, 1500, 32
    z = torch.randn(n, d, generator=g)
    codebook = torch.randn(k, d, generator=g) * 0.3
    zb, cb, csq, _, _ = _operands(*_on(device, z, codebook), device)
    margin = (0.5 + torch.rand(n, generator=g)).to(device)  # wide: several tiles per token, in several splits
    run_min, count, tiles, tile_min = (t.cpu() for t in ts.scan(zb, cb, csq, margin, splits))
    assert run_min.shape[0] == splits
    v = csq.cpu().double()[None, :] + zb.cpu().double() @ cb.cpu().double().t()  # (n, k), exact products
    per_split = -(-(-(-k // ts.BLOCK_K)) // splits) * ts.BLOCK_K
    tol = 1e-4 * float(v.abs().max())  # fp32 accumulation of 32 terms: far inside this
    for s in range(splits):
        assert float((run_min[s].double() - v[:, s * per_split : (s + 1) * per_split].amin(dim=1)).abs().max()) < tol
    final = run_min.amin(dim=0).double()
    margin = margin.cpu().double()
    assert int(count.max()) <= ts.LIST_CAP and float(count.float().mean()) > 2
    for r in range(n):
        recorded = {}
        for s in range(splits):
            for j in range(int(count[s, r])):
                recorded[int(tiles[s, r, j])] = float(tile_min[s, r, j])
        for t, value in recorded.items():
            assert abs(value - float(v[r, t * ts.BLOCK_K : (t + 1) * ts.BLOCK_K].min())) < tol
        needed = set(((v[r] <= final[r] + margin[r] - tol).nonzero().squeeze(1) // ts.BLOCK_K).tolist())
        assert needed <= set(recorded), f"token {r}: tiles {sorted(needed - set(recorded))} not recorded"


def test_the_error_bound_covers_the_kernel_against_the_true_distance(device):
    # large offset and mixed scales: the smallest value of every tile of 128 codes, per token (an infinite
    # margin records them all), against the float64 distance less ||z'||^2, within the bound the path uses
    # (with the tensor cores' accumulation unit on a GPU)
    g = torch.Generator().manual_seed(7)
    n, k, d = 200, 640, 48
    z = 50 + torch.randn(n, d, generator=g) * torch.logspace(-2, 1, d)
    codebook = 50 + torch.randn(k, d, generator=g) * torch.logspace(-2, 1, d)
    zd, cd = _on(device, z, codebook)
    zb, cb, csq, zc, cc = _operands(zd, cd, device)
    dz_norm = (zc - zb[:, :d].float()).norm(dim=1)
    dc_max = (cc - (cb[:, :d].float() / -2)).norm(dim=1).max()
    err, _, _ = search_mod._bf16_product_error(
        d, zc.norm(dim=1), csq.max().sqrt(), dz_norm, dc_max, search_mod.TENSOR_CORE_ACC_ROUNDOFF
    )
    _, count, tiles, tile_min = ts.scan(zb, cb, csq, torch.full((n,), float("inf"), device=device), 1)
    true = (z.double()[:, None] - codebook.double()[None]).pow(2).sum(-1) - zc.cpu().double().pow(2).sum(1)[:, None]
    per_tile = k // ts.BLOCK_K
    assert count.cpu().eq(per_tile).all() and tiles[0, :, :per_tile].cpu().eq(torch.arange(per_tile)).all()
    gap = (tile_min[0, :, :per_tile].cpu().double() - true.unflatten(1, (per_tile, ts.BLOCK_K)).amin(dim=2)).abs()
    assert bool((gap <= err.cpu()[:, None]).all()), float((gap - err.cpu()[:, None]).max())
    assert float(gap.max()) > 0.01 * float(err.min())  # the data does exercise the rounding


def test_overflowing_lists_and_crowded_codebooks_go_to_the_exact_path(device, monkeypatch):
    # codes ever nearer the token along the index: every tile sets a new minimum and is recorded, so a
    # code range of more than LIST_CAP tiles (one range here) overflows the token's list
    monkeypatch.setattr(ts, "default_splits", lambda *args: 1)
    tiles = ts.LIST_CAP + 6
    k = tiles * ts.BLOCK_K
    codebook = torch.zeros(k, 4)
    codebook[:, 0] = torch.linspace(100, 1, k)
    z = torch.zeros(3, 4)
    got, info = nearest_code_info(*_on(device, z, codebook), search="bf16-triton")
    assert info.fallback == 3 and got.cpu().tolist() == [k - 1] * 3
    # 5,000 copies of one code keep 40 tiles per token (over MAX_TRITON_CODES): the exact path, lowest copy
    z, codebook = crowded_codebook(5000, 20, seed=3)
    assert 5000 > MAX_TRITON_CODES
    got, info = nearest_code_info(*_on(device, z, codebook), search="bf16-triton")
    assert info.fallback == 20 and got.cpu().tolist() == [3] * 20


def test_gives_up_after_a_crowded_first_chunk(device, monkeypatch):
    calls = []
    real_scan = ts.scan

    def counting_scan(zb, *args):
        calls.append(zb.shape[0])
        return real_scan(zb, *args)

    monkeypatch.setattr(ts, "scan", counting_scan)
    block = ts.token_block(16)
    z, codebook = crowded_codebook(5000, 3 * block, seed=4)
    budget = 2 * ts.LIST_CAP * block  # one token block per chunk
    got, info = nearest_code_info(*_on(device, z, codebook), search="bf16-triton", max_chunk_elements=budget)
    # the first chunk fell back whole (over BF16_GIVE_UP_FRACTION of it): the kernel scanned nothing more
    assert calls == [block] and info.fallback == 3 * block
    assert got.cpu().tolist() == [3] * (3 * block)
    calls.clear()
    z, codebook = _data("random", n=3 * block, k=500, d=16, seed=6)
    got, info = nearest_code_info(*_on(device, z, codebook), search="bf16-triton", max_chunk_elements=budget)
    assert calls == [block] * 3 and info.fallback == 0
    assert torch.equal(got.cpu(), reference_argmin(z, codebook))


def test_non_finite_and_extreme_inputs(device):
    z, codebook = _data("random", n=60, k=200, d=16, seed=8)
    z[3, 2], z[10, 0] = float("nan"), float("inf")
    got, info = nearest_code_info(*_on(device, z, codebook), search="bf16-triton")
    assert info.fallback == 2
    assert torch.equal(got.cpu(), nearest_code(z, codebook, search="exact-fp32"))
    finite = torch.ones(60, dtype=torch.bool)
    finite[[3, 10]] = False
    assert torch.equal(got.cpu()[finite], reference_argmin(z[finite], codebook))
    bad_codes = codebook.clone()
    bad_codes[5, 1] = float("nan")
    got, info = nearest_code_info(*_on(device, z[finite], bad_codes), search="bf16-triton")
    assert info.fallback == 58 and torch.equal(got.cpu(), nearest_code(z[finite], bad_codes, search="exact-fp32"))
    # values past the fp32 range go to the exact path (which answers them as it does without the kernel);
    # values near it stay on the kernel
    z, codebook = _data("random", n=30, k=50, d=8, seed=9)
    got, info = nearest_code_info(*_on(device, z * 1e19, codebook * 1e19), search="bf16-triton")
    assert info.fallback == 30
    assert torch.equal(got.cpu(), nearest_code(z * 1e19, codebook * 1e19, search="exact-fp32"))
    got, info = nearest_code_info(*_on(device, z * 1e17, codebook * 1e17), search="bf16-triton")
    assert info.fallback == 0 and torch.equal(got.cpu(), reference_argmin(z * 1e17, codebook * 1e17))
    # all-equal codes (every value the same: every tile within the margin), bf16 inputs, one code
    assert nearest_code(*_on(device, torch.zeros(5, 8), torch.zeros(7, 8)), search="bf16-triton").cpu().tolist() == [0] * 5
    zb, cb = z.bfloat16(), codebook.bfloat16()
    assert torch.equal(nearest_code(*_on(device, zb, cb), search="bf16-triton").cpu(), reference_argmin(zb, cb))
    assert nearest_code(*_on(device, z, codebook[:1]), search="bf16-triton").cpu().tolist() == [0] * 30


def test_simvq_with_the_triton_path_matches_the_exact_path(device):
    torch.manual_seed(0)
    exact = build_quantizer("simvq", dim=32, codebook_size=600, search="exact-fp32").to(device)
    triton_q = build_quantizer("simvq", dim=32, codebook_size=600, search="bf16-triton").to(device)
    triton_q.load_state_dict(exact.state_dict())
    z = torch.randn(2, 32, 9, 9, device=device)
    assert torch.equal(exact(z).indices, triton_q(z).indices)


def test_where_it_cannot_run_one_clear_error(device, monkeypatch):
    z, codebook = _on(device, torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="fp32 searches"):
        nearest_code(z.double(), codebook, search="bf16-triton")
    interpreting = ts.interpreting()
    monkeypatch.setattr(ts, "interpreting", lambda: not interpreting)
    with pytest.raises(ValueError, match="CUDA|CPU tensors"):
        nearest_code(z, codebook, search="bf16-triton")  # CPU tensors without the interpreter, or the reverse
    if device.type == "cpu":  # no GPU and no interpreter: the quantizer is refused when it is built
        with pytest.raises(ValueError, match="CUDA is not available here"):
            build_quantizer("simvq", dim=8, codebook_size=16, search="bf16-triton")
    monkeypatch.setattr(ts, "_IMPORT_ERROR", "triton is not importable (ImportError: x); pip install triton")
    with pytest.raises(ValueError, match="pip install triton"):
        build_quantizer("simvq", dim=8, codebook_size=16, search="bf16-triton")


def test_a_gpu_without_bf16_tensor_cores_is_named(monkeypatch):
    monkeypatch.setattr(ts, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (7, 5))
    assert "(compute capability 8.0 or newer), this GPU has 7.5" in ts.triton_status("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    assert ts.triton_status("cuda") is None


def test_auto_never_picks_the_triton_path(monkeypatch):
    # not measured on a GPU yet: "auto" keeps the exact path on accelerators
    for device in ("cuda", "cpu"):
        for n, k in ((1, 3), (4096, 262144)):
            assert resolve_search("auto", device, torch.float32, n, k, 128) != "bf16-triton"
    assert resolve_search("bf16-triton", "cuda", torch.float32, 1, 3) == "bf16-triton"



_COMPILE = """
import json, subprocess, sys, tempfile
from pathlib import Path
import triton
from simvq.quantizers import triton_search as ts
tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
out = {}
for arch in (90, 80):
    for dim in (8, 40, 128, 200, 300):
        kernel = ts.compile_for(arch, dim)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"]); f.flush()
            usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        out[f"{arch}/{dim}"] = {"ptx": kernel.asm["ptx"], "usage": usage}
print(json.dumps(out))
"""


def test_the_kernel_compiles_for_hopper_and_ampere_tensor_cores():
    # ahead of time, with no GPU (Triton's compiler and the ptxas it ships; a process of its own, without
    # TRITON_INTERPRET): the H100/H200 build must issue wgmma (Hopper's tensor-core instruction), the A100
    # build mma.sync, both fed by asynchronous copies to shared memory, and neither may spill registers
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    builds = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(builds) == 10
    for name, build in builds.items():
        ptx, usage = build["ptx"], build["usage"]
        if name.startswith("90/"):
            assert "wgmma.mma_async" in ptx, name
        else:
            assert "mma.sync" in ptx and "wgmma" not in ptx, name
        assert "cp.async" in ptx, name  # operand tiles copied to shared memory ahead of use
        if usage:  # cuobjdump ships with Triton's CUDA backend
            assert "STACK:0 " in usage and "LOCAL:0 " in usage, f"{name}: {usage}"  # no spilled registers
