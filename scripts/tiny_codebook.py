"""SimVQ with a tiny codebook (K = 32; vector-quantize-pytorch #212 reports 7% of it used), and why it dips first.

Setup (docs/quantizers.md): scikit-learn's digits (1,797 images of 8 x 8 values in [0, 1]), one token per image,
a linear encoder 64 -> 16 and decoder 16 -> 64, SimVQ(dim 16, K 32) with its defaults, Adam (lr 1e-3; the
quantizer's W, b at --quantizer-lr), batches of 256, loss MSE + the quantizer's loss. Utilisation: the codes used
on all 1,797 images in eval mode, over K. Along the way it records, at a few steps, the codes used in the batch
and how far the batch's features sit from the codebook: the distance between the features' mean and the codes'
mean, in units of the codes' rms spread around their mean.

    python scripts/tiny_codebook.py                                # seeds 0-2, 1,000 steps, quantizer lr 1e-3 and 1e-2
    python scripts/tiny_codebook.py --steps 300 --json out.json    # also the figures as JSON

Runs on one thread (these matrices are 16-64 columns wide); ~2 s per 1,000-step run.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

TRACE_STEPS = (0, 25, 50, 100, 200, 300, 500)


def run(seed: int, steps: int, quantizer_lr: float, *, k: int = 32, dim: int = 16) -> dict:
    """One training run; its utilisation, held-in MSE and the feature/codebook trace."""
    from sklearn.datasets import load_digits

    from simvq import SimVQ

    x_all = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    torch.manual_seed(seed)
    enc, dec = torch.nn.Linear(64, dim), torch.nn.Linear(dim, 64)
    q = SimVQ(dim=dim, codebook_size=k, channel_first=False)
    opt = torch.optim.Adam([{"params": [*enc.parameters(), *dec.parameters()]},
                            {"params": list(q.parameters()), "lr": quantizer_lr}], lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    trace = []
    for step in range(steps):
        x = x_all[torch.randint(len(x_all), (256,), generator=g)]
        z = enc(x)
        out = q(z)
        if step in TRACE_STEPS:
            with torch.no_grad():
                codes = q.codebook
                spread = (codes - codes.mean(0)).pow(2).sum(1).mean().sqrt()
                offset = (z.mean(0) - codes.mean(0)).norm() / spread
            trace.append({"step": step, "codes_in_batch": len(torch.unique(out.indices)), "offset": round(float(offset), 3)})
        loss = (dec(out.quantized) - x).pow(2).mean() + out.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    q.eval()
    with torch.no_grad():
        indices = q(enc(x_all)).indices
        mse = (dec(q.decode_indices(indices)) - x_all).pow(2).mean()
    return {"seed": seed, "steps": steps, "quantizer_lr": quantizer_lr, "utilization": len(torch.unique(indices)) / k,
            "mse": float(mse), "trace": trace}


def _numbers(text: str, kind):
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative numbers, got {text!r}")
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=lambda t: _numbers(t, int), default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--quantizer-lr", type=lambda t: _numbers(t, float), default=[1e-3, 1e-2],
                        help="learning rates of SimVQ's W, b to compare (the rest trains at 1e-3)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--force", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.json:
        from simvq.io import check_output

        try:
            check_output(args.json, option="--json", force=args.force)
        except (ValueError, OSError) as err:
            parser.error(str(err))
    torch.set_num_threads(1)
    results = [run(seed, args.steps, lr) for lr in args.quantizer_lr for seed in args.seeds]
    print(f"K = 32, d = 16, {args.steps} steps; utilisation (codes used / 32) and MSE on all 1,797 images; "
          "trace: step: offset of the features from the codebook (codes in the batch)")
    for r in results:
        trace = "  ".join(f"{t['step']}: {t['offset']:.2f} ({t['codes_in_batch']})" for t in r["trace"])
        print(f"quantizer lr {r['quantizer_lr']:g} seed {r['seed']}: {100 * r['utilization']:.1f}%, MSE {r['mse']:.3f} | {trace}")
    if args.json:
        from simvq.io import save_file_atomic

        save_file_atomic(args.json, json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
