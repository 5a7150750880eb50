"""Time of each nearest-code search path against the exact path, per shape, on this machine's CPU.

For every shape (tokens N x codes K x width d) it times ``simvq.nearest_code`` with each path, alternated call
by call in one process (a machine whose speed drifts shifts every path alike), and prints per path the median
time and the median of the per-round ratios to ``search="exact-fp32"`` (below 1: faster), whether its answer
equals the exact path's on every token, and which path ``search="auto"`` takes for the shape. These ratios set
the thresholds of ``resolve_search`` (docs/benchmarks.md).

With ``--split`` the fused fp32 kernel is also timed with its code ranges switched off
("fp32-fused, unsplit"): a search of a few tokens then runs on as many threads as it has token blocks of 16.

    python benchmarks/search_paths.py --split
    python benchmarks/search_paths.py --shapes 1x65536x128,16x65536x128 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from simvq.quantizers import native
from simvq.quantizers import search as search_mod
from simvq.quantizers.search import nearest_code, resolve_search

DEFAULT_SHAPES = (
    "1x1x4,1x4096x128,1x65536x128,16x65536x128,48x65536x128,64x65536x128,128x128x16,"
    "256x65536x128,1024x1024x16,2048x8192x4,4096x1024x128"
)
UNSPLIT = "fp32-fused, unsplit"


def _available_paths() -> list[str]:
    paths = ["exact-fp32"]
    if search_mod.fp32_kernel_available():
        paths.append("fp32-fused")
    if search_mod.cpu_has_fast_bf16():
        paths.append("bf16-candidates")
        if search_mod.fused_kernel_available():
            paths.append("bf16-fused")
    return paths


def _shapes(text: str) -> list[tuple[int, int, int]]:
    """``"1x65536x128,16x1024x8"`` -> ``[(1, 65536, 128), (16, 1024, 8)]``."""
    shapes = []
    for item in (s.strip() for s in text.split(",")):
        try:
            n, k, d = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"a shape is TOKENSxCODESxWIDTH, e.g. 16x65536x128, got {item!r}") from None
        if min(n, k, d) < 1:
            raise argparse.ArgumentTypeError(f"every size of a shape must be at least 1, got {item!r}")
        shapes.append((n, k, d))
    return shapes


def _call(z, codebook, path):
    if path == UNSPLIT:
        saved = native.FP32_MIN_PART_TILES
        native.FP32_MIN_PART_TILES = 1 << 62  # no code tile count reaches two ranges
        try:
            return nearest_code(z, codebook, search="fp32-fused")
        finally:
            native.FP32_MIN_PART_TILES = saved
    return nearest_code(z, codebook, search=path)


def measure(shape, paths, rounds, min_seconds):
    """Per path: (median ms, median ratio to exact-fp32, agrees with exact-fp32)."""
    n, k, d = shape
    g = torch.Generator().manual_seed(n * 31 + k * 7 + d)
    z, codebook = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    want = nearest_code(z, codebook, search="exact-fp32")
    agree = {p: bool(torch.equal(_call(z, codebook, p), want)) for p in paths}  # also warms every path up
    # calls per round so that each timed sample lasts about min_seconds (tiny searches are below timer noise)
    t0 = time.perf_counter()
    _call(z, codebook, "exact-fp32")
    reps = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-6)))
    times = {p: [] for p in paths}
    for r in range(rounds):
        for p in paths if r % 2 == 0 else reversed(paths):
            t0 = time.perf_counter()
            for _ in range(reps):
                _call(z, codebook, p)
            times[p].append((time.perf_counter() - t0) / reps)
    exact = times["exact-fp32"]
    return {
        p: (1e3 * statistics.median(t), statistics.median(a / b for a, b in zip(t, exact)), agree[p])
        for p, t in times.items()
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=_shapes, default=_shapes(DEFAULT_SHAPES), help="comma-separated TOKENSxCODESxWIDTH")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=7, help="alternated rounds per shape (the median is reported)")
    parser.add_argument("--min-seconds", type=float, default=0.02, help="shortest timed sample (repeats tiny calls)")
    parser.add_argument("--split", action="store_true", help="also time the fp32 kernel without code ranges")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    paths = _available_paths()
    if args.split and "fp32-fused" in paths:
        paths.append(UNSPLIT)
    print(f"threads={torch.get_num_threads()} rounds={args.rounds} torch={torch.__version__} paths={', '.join(paths)}")
    print("time per call (ms, median over rounds); in brackets the median ratio to exact-fp32; * an answer "
          "differing from exact-fp32")
    print("| tokens x codes x width | auto takes | " + " | ".join(paths) + " |")
    print("|---|---|" + "---|" * len(paths))
    with torch.inference_mode():
        for shape in args.shapes:
            got = measure(shape, paths, args.rounds, args.min_seconds)
            auto = resolve_search("auto", "cpu", torch.float32, *shape)
            cells = [f"{ms:.3g} ({ratio:.2f}x){'' if ok else ' *'}" for ms, ratio, ok in got.values()]
            print(f"| {' x '.join(f'{v:,}' for v in shape)} | {auto} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
