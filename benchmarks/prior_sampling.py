"""Sampling a 16x16 = 256-token grid with and without the KV cache, timed in the same run.

    python benchmarks/prior_sampling.py [--width 256] [--depth 4] [--n 8] [--codebook-size 1024] [--repeats 2]

Without the cache every step runs the transformer over the whole prefix (256 steps of up to 256 positions);
with it every step runs one position against the cached keys and values. The two paths draw the same
tokens (checked here too); the printed ratio is the speed-up (target >= 5x).
"""

from __future__ import annotations

import argparse
import time

import torch

from simvq.prior.model import TokenPrior
from simvq.prior.sample import sample


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--n", type=int, default=8, help="grids sampled per call")
    parser.add_argument("--codebook-size", type=int, default=1024)
    parser.add_argument("--grid", type=int, default=16, help="grid side (256 tokens at 16)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prior = TokenPrior(codebook_size=args.codebook_size, grid=(args.grid, args.grid), num_classes=10,
                       width=args.width, depth=args.depth, heads=args.heads).eval()
    classes = torch.arange(args.n) % 10

    def timed(use_cache: bool) -> tuple[float, torch.Tensor]:
        best, out = float("inf"), None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = sample(prior, args.n, classes=classes, seed=0, use_cache=use_cache)
            best = min(best, time.perf_counter() - t0)
        return best, out

    sample(prior, 2, seed=0)  # warm-up
    t_cache, a = timed(True)
    t_plain, b = timed(False)
    tokens = args.n * args.grid * args.grid
    print(f"prior: width {args.width}, depth {args.depth}, K {args.codebook_size}, {args.grid}x{args.grid} grid, "
          f"{args.n} samples, {torch.get_num_threads()} threads (best of {args.repeats})")
    print(f"with KV cache:    {t_cache:8.3f} s  ({tokens / t_cache:9.0f} tokens/s)")
    print(f"without KV cache: {t_plain:8.3f} s  ({tokens / t_plain:9.0f} tokens/s)")
    print(f"speed-up: {t_plain / t_cache:.1f}x  (same tokens: {bool(torch.equal(a, b))})")


if __name__ == "__main__":
    main()
