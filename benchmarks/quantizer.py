"""Speed and peak memory of SimVQ against vector-quantize-pytorch's SimVQ and a plain matmul.

For every codebook size K it times one forward + backward pass over ``--tokens`` tokens of width ``--dim``:
  ours     simvq.SimVQ(search=--search) (exact search on centred codes; the selected codes transformed, or, on the
           CPU with at least as many tokens as codes, the whole codebook transformed once and gathered)
  peer     vector_quantize_pytorch.SimVQ(rotation_trick=False) (torch.cdist over the full N x K matrix)
  matmul   torch.mm of (N, d) @ (d, K) in fp32 into a preallocated output: the search's FLOPs at the plain matmul rate
  matmul_bf16  the same torch.mm in bf16 (the precision of the "bf16-candidates", "bf16-fused" and "bf16-triton"
           paths)
and, separately, the search alone (simvq.nearest_code) against the same torch.mm. The search case also
reports the path "auto" chose, how many tokens it re-ranked or sent back to the exact path, and checks that
its indices equal those of search="exact-fp32" on every token (printed as the agreement).

Each case's time is the minimum over its repeats in a process of its own, so two cases compared were measured
at different moments. On a shared machine whose speed drifts, the ratios are also measured alternated, call
by call, in one process: ours against the peer (in the peer's process, after its memory is read) and the
search against the same-shape matmul in its precision (in the search's process); printed as the ratio of the
two minima and the median of the per-round ratios, with the number of rounds.

Peak memory is the extra memory of the measured call over what the set-up (module, inputs) already holds:
on CUDA ``torch.cuda.max_memory_allocated``; on CPU every case runs in a fresh subprocess and reads its
peak resident set (VmHWM after a reset, else ``ru_maxrss``) minus the value after set-up, so a full N x K
distance matrix shows.

    python benchmarks/quantizer.py --device cpu --tokens 4096 --dim 128 --sizes 1024,8192,65536,262144

Targets: >= 1.2x faster than the peer at K = 1024, >= 1x at 8192, >= 2.5x at K >= 65536; peak memory at
K = 262144 <= 1/4 of the peer's; search >= 85% of the best plain matmul rate in the precision used; 100%
agreement with the exact path.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from simvq.quantizers.search import SEARCH_PATHS

CASES = ("ours", "peer", "matmul", "matmul_bf16", "search")
# the search paths whose matmul runs in bf16: measured against the bf16 matmul rate
BF16_PATHS = ("bf16-candidates", "bf16-fused", "bf16-triton")


def _proc_status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # reported in kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> float:
    """Start a new peak-RSS window; returns the baseline in MiB.

    Linux resets the high-water mark VmHWM to the current RSS when "5" is written to /proc/self/clear_refs,
    so imports and set-up that peaked higher do not hide the measured call. Without it, fall back to
    ru_maxrss (a lifetime peak: the growth it shows is then a lower bound).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_mib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss_mib() -> float:
    hwm = _proc_status_mib("VmHWM")
    # ru_maxrss is in KiB on Linux
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup(case: str, num_codes: int, tokens: int, dim: int, device: torch.device, search: str = "auto"):
    """Build the module and inputs for one case; returns a zero-argument callable doing the measured work."""
    gen = torch.Generator().manual_seed(0)
    if case == "ours":
        from simvq import SimVQ

        quantizer = SimVQ(dim=dim, codebook_size=num_codes, channel_first=False, search=search).to(device)
        z = torch.randn(1, tokens, dim, generator=gen).to(device).requires_grad_(True)

        def step():
            out = quantizer(z)
            (out.quantized.sum() + out.loss).backward()

        return step
    if case == "peer":
        from vector_quantize_pytorch import SimVQ as PeerSimVQ

        quantizer = PeerSimVQ(dim=dim, codebook_size=num_codes, rotation_trick=False).to(device)
        z = torch.randn(1, tokens, dim, generator=gen).to(device).requires_grad_(True)

        def step():
            quantized, _, loss = quantizer(z)
            (quantized.sum() + loss).backward()

        return step
    if case in ("matmul", "matmul_bf16"):
        dtype = torch.bfloat16 if case == "matmul_bf16" else torch.float32
        a = torch.randn(tokens, dim, generator=gen).to(device, dtype)
        b = torch.randn(dim, num_codes, generator=gen).to(device, dtype)
        # into a preallocated output: the matmul's own rate, without the allocator's first-touch page faults
        out = torch.empty(tokens, num_codes, dtype=dtype, device=device)
        return lambda: torch.mm(a, b, out=out)
    if case == "search":
        # the codebook of a freshly initialised SimVQ (what "ours" searches), tokens at unit scale
        from simvq import SimVQ

        torch.manual_seed(0)
        codebook = SimVQ(dim=dim, codebook_size=num_codes).codebook.detach().to(device)
        z = torch.randn(tokens, dim, generator=gen).to(device)
        return lambda: _search_with_check(z, codebook, search)
    raise ValueError(f"unknown case {case!r}; choose from {CASES}")


_LAST_SEARCH: dict = {}


def _search_with_check(z, codebook, search):
    from simvq.quantizers.search import nearest_code_info

    indices, info = nearest_code_info(z, codebook, search=search)
    _LAST_SEARCH.update(z=z, codebook=codebook, indices=indices, info=info)
    return indices


def _search_report() -> dict:
    """Path, re-rank and fallback counts of the last timed search, and its agreement with the exact path."""
    from simvq.quantizers.search import nearest_code

    info = _LAST_SEARCH["info"]
    exact = nearest_code(_LAST_SEARCH["z"], _LAST_SEARCH["codebook"], search="exact-fp32")
    agree = float((exact == _LAST_SEARCH["indices"]).double().mean())
    return {"path": info.path, "reranked": info.reranked, "fallback": info.fallback, "agreement": agree}


def measure(
    case: str, num_codes: int, tokens: int, dim: int, device: torch.device, repeats: int, search: str = "auto"
) -> dict:
    """Minimum wall time over ``repeats`` runs (after one warm-up) and the peak extra memory in MiB."""
    step = _setup(case, num_codes, tokens, dim, device, search)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = _reset_peak_rss()
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        step()
        _sync(device)
        if i > 0:  # the first run warms kernels and the allocator
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = _peak_rss_mib() - base
    result = {"case": case, "K": num_codes, "time_s": min(times), "peak_mib": peak}
    if case == "search":
        result.update(_search_report())
        # against the same-shape matmul in the search's precision, after the peak is read (the matmul's output
        # is not the search's memory)
        mm_case = "matmul_bf16" if result["path"] in BF16_PATHS else "matmul"
        mm_step = _setup(mm_case, num_codes, tokens, dim, device)
        result.update(_alternated(mm_step, step, device, _rounds(repeats, min(times), 1.0, 200)))
    if case == "peer":
        # ours against the peer, alternated (after the peer's peak is read)
        ours_step = _setup("ours", num_codes, tokens, dim, device, search)
        result.update(_alternated(step, ours_step, device, _rounds(repeats, min(times), 2.0, 50)))
    if case == "ours":
        from simvq.quantizers.search import resolve_search

        result["path"] = resolve_search(search, device, torch.float32, tokens, num_codes, dim)
    return result


PEAK_SIDE = 8192


def _square_matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square ``PEAK_SIDE``^3 matmul in ``dtype``: the rate the hardware reaches on a large
    product (mean of ten after three warm-ups)."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(PEAK_SIDE, PEAK_SIDE, generator=gen).to(device, dtype)
    b = torch.randn(PEAK_SIDE, PEAK_SIDE, generator=gen).to(device, dtype)
    out = torch.empty(PEAK_SIDE, PEAK_SIDE, dtype=dtype, device=device)
    for _ in range(3):
        torch.mm(a, b, out=out)
    _sync(device)
    start = time.perf_counter()
    for _ in range(10):
        torch.mm(a, b, out=out)
    _sync(device)
    return 2 * PEAK_SIDE**3 * 10 / (time.perf_counter() - start)


def _alternated(reference_step, step, device, rounds: int) -> dict:
    """``step`` against ``reference_step``, alternated call by call in one process for ``rounds`` rounds.

    Separate processes see the machine at different moments; on a shared, noisy machine that alone moved the
    search's share of the matmul rate by 2x between runs. Alternating the two calls exposes both to the same
    conditions. Returns the ratio of the two minima and the median of the per-round ratios (reference time /
    step time: above 1, ``step`` is faster).
    """
    reference_step()
    _sync(device)
    pairs = []
    for _ in range(rounds):
        times = []
        for fn in (reference_step, step):
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        pairs.append(times)
    return {
        "paired_rounds": rounds,
        "paired_min_ratio": min(p[0] for p in pairs) / min(p[1] for p in pairs),
        "paired_median_ratio": statistics.median(ref / t for ref, t in pairs),
    }


def _rounds(repeats: int, slower_s: float, budget_s: float, most: int) -> int:
    """At least ``repeats`` rounds, else as many as fit ``budget_s`` of the slower call, at most ``most``."""
    return max(repeats, min(most, int(budget_s / max(slower_s, 1e-6))))


def _measure_in_subprocess(case: str, num_codes: int, args) -> dict | None:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--one-case",
        case,
        "--sizes",
        str(num_codes),
        "--tokens",
        str(args.tokens),
        "--dim",
        str(args.dim),
        "--device",
        args.device,
        "--repeats",
        str(args.repeats),
        "--search",
        args.search,
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  [{case} K={num_codes} failed: {proc.stderr.strip().splitlines()[-1:]}]", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _peer_available() -> str | None:
    try:
        import vector_quantize_pytorch  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means the peer is skipped
        return f"vector-quantize-pytorch not importable ({type(err).__name__}: {err}); peer columns skipped"
    return None


def _fmt(value, fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else fmt.format(value * scale)


def _fmt_ratio(num, den) -> str:
    return f"{num / den:.2f}x" if num is not None and den else "-"


def _fmt_paired(res: dict | None, percent: bool = True) -> str:
    if not res or "paired_min_ratio" not in res:
        return "-"
    lo, med, n = res["paired_min_ratio"], res["paired_median_ratio"], res["paired_rounds"]
    return f"{100 * lo:.0f}% / {100 * med:.0f}% ({n})" if percent else f"{lo:.2f}x / {med:.2f}x ({n})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens N per forward pass")
    parser.add_argument("--dim", type=int, default=128, help="code dimension d")
    parser.add_argument("--sizes", default="1024,8192,65536,262144", help="comma-separated codebook sizes K")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (minimum is reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--search", choices=SEARCH_PATHS, default="auto",
        help="search path of ours",
    )
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated cases to measure (default: all of {','.join(CASES)})"
    )
    parser.add_argument("--one-case", choices=CASES, help=argparse.SUPPRESS)  # internal: one case per process
    args = parser.parse_args(argv)

    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if not sizes or min(sizes) < 1 or args.tokens < 1 or args.dim < 1 or args.repeats < 1:
        parser.error("--sizes, --tokens, --dim and --repeats must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.one_case:
        print(json.dumps(measure(args.one_case, sizes[0], args.tokens, args.dim, device, args.repeats, args.search)))
        return 0

    peer_note = _peer_available()
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(wanted) - set(CASES))
    if unknown or not wanted:
        parser.error(f"--cases takes a comma-separated subset of {','.join(CASES)}, got {args.cases!r}")
    cases = [c for c in CASES if c in wanted and not (c == "peer" and peer_note)]
    print(
        f"device={args.device} threads={torch.get_num_threads()} tokens={args.tokens} dim={args.dim} "
        f"repeats={args.repeats} search={args.search} torch={torch.__version__}"
    )
    if peer_note:
        print(f"note: {peer_note}")
    results: dict[tuple[str, int], dict | None] = {}
    for k in sizes:
        for case in cases:
            if device.type == "cpu":
                res = _measure_in_subprocess(case, k, args)
            else:
                res = measure(case, k, args.tokens, args.dim, device, args.repeats, args.search)
                torch.cuda.empty_cache()
            results[(case, k)] = res
            if res:
                print(f"  measured {case:7s} K={k:>7d}: {res['time_s'] * 1e3:9.1f} ms, peak +{res['peak_mib']:8.1f} MiB",
                      flush=True)

    def get(case, k, key):
        res = results.get((case, k))
        return res[key] if res else None

    flops = {k: 2.0 * args.tokens * k * args.dim for k in sizes}
    print()
    print("forward + backward (time: minimum over repeats; memory: peak extra MiB during the call)")
    header = (
        "| K | ours ms | peer ms | time peer/ours | time peer/ours, alternated: min / median of pairs | ours MiB "
        "| peer MiB | memory peer/ours | matmul GFLOP/s | matmul time / ours time | path |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for k in sizes:
        t_ours, t_peer, t_mm = get("ours", k, "time_s"), get("peer", k, "time_s"), get("matmul", k, "time_s")
        m_ours, m_peer = get("ours", k, "peak_mib"), get("peer", k, "peak_mib")
        cells = [
            str(k),
            _fmt(t_ours, "{:.1f}", 1e3),
            _fmt(t_peer, "{:.1f}", 1e3),
            _fmt_ratio(t_peer, t_ours),
            _fmt_paired(results.get(("peer", k)), percent=False),
            _fmt(m_ours, "{:.0f}"),
            _fmt(m_peer, "{:.0f}"),
            # a peak below 1 MiB is measurement noise on CPU: floor the denominator there
            _fmt_ratio(m_peer, None if m_ours is None else max(m_ours, 1.0)),
            _fmt(flops[k] / t_mm / 1e9 if t_mm else None, "{:.1f}"),
            _fmt(100 * t_mm / t_ours if t_mm and t_ours else None, "{:.0f}%"),
            get("ours", k, "path") or "-",
        ]
        print("| " + " | ".join(cells) + " |")
    print()
    best_fp32 = max((flops[k] / t for k in sizes if (t := get("matmul", k, "time_s"))), default=None)
    best_bf16 = max((flops[k] / t for k in sizes if (t := get("matmul_bf16", k, "time_s"))), default=None)
    print("search alone: simvq.nearest_code vs torch.mm (N x d) @ (d x K) of the same FLOPs")
    print(
        f"best plain matmul rate in this run: fp32 {_fmt(best_fp32, '{:.1f}', 1e-9)} GFLOP/s, "
        f"bf16 {_fmt(best_bf16, '{:.1f}', 1e-9)} GFLOP/s"
    )
    if device.type == "cuda" and "search" in cases:
        # the tensor cores' rate: the same-shape matmuls above have an inner dimension of only d
        peak = _square_matmul_rate(device, torch.bfloat16)
        print(f"tensor-core rate: bf16 torch.mm {PEAK_SIDE}^3 {peak / 1e12:.0f} TFLOP/s; the search's fraction of it:")
        for k in sizes:
            t_s = get("search", k, "time_s")
            print(f"  K = {k}: {_fmt(100 * flops[k] / t_s / peak if t_s else None, '{:.1f}%')}")
    print(
        "| K | path | nearest_code ms | GFLOP/s | fp32 mm GFLOP/s | bf16 mm GFLOP/s | % of best mm rate in its precision "
        "| same-shape mm, alternated: min / median of pairs | re-ranked | fallback | agreement with exact "
        "| search MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k in sizes:
        t_s, t_mm, t_bf = get("search", k, "time_s"), get("matmul", k, "time_s"), get("matmul_bf16", k, "time_s")
        path = get("search", k, "path")
        best = best_bf16 if path in BF16_PATHS else best_fp32
        agreement = get("search", k, "agreement")
        cells = [
            str(k),
            path or "-",
            _fmt(t_s, "{:.1f}", 1e3),
            _fmt(flops[k] / t_s / 1e9 if t_s else None, "{:.1f}"),
            _fmt(flops[k] / t_mm / 1e9 if t_mm else None, "{:.1f}"),
            _fmt(flops[k] / t_bf / 1e9 if t_bf else None, "{:.1f}"),
            _fmt(100 * flops[k] / t_s / best if t_s and best else None, "{:.0f}%"),
            _fmt_paired(results.get(("search", k))),
            _fmt(get("search", k, "reranked"), "{:.0f}"),
            _fmt(get("search", k, "fallback"), "{:.0f}"),
            _fmt(None if agreement is None else 100 * agreement, "{:.2f}%"),
            _fmt(get("search", k, "peak_mib"), "{:.0f}"),
        ]
        print("| " + " | ".join(cells) + " |")
    print()
    print(
        "targets: time peer/ours >= 1.2x at K = 1024, >= 1x at 8192, >= 2.5x at K >= 65536; memory peer/ours "
        ">= 4x at K = 262144; search >= 85% of the best matmul rate in its precision; agreement 100%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
