"""Retrofit measured on third-party quantizer classes, as users have them.

For each real class (taming-transformers' ``VectorQuantizer2``; vector-quantize-pytorch's ``VectorQuantize``
with a Euclidean and with a cosine-similarity codebook) and each seed: a small autoencoder (the
``simvq compare`` default model: Fashion-MNIST 32x32, 16x16 tokens of 4 dimensions) with that quantizer is
trained until its codebook collapses; then

- control: the same model trained on for N more steps,
- ``simvq.retrofit(model, dead_codes=S)`` for S in keep / respread / fresh (dead codes found on 2,048
  training images), then trained on for N steps,
- with ``--scratch``, SimVQ from scratch in that class's interface (``TamingSimVQ`` /
  ``VectorQuantizeSimVQ``), trained N steps,

and each is measured on the first 512 held-out images: utilisation (codes used at least once / K: 131,072
tokens, 16 per code at K = 8,192) and PSNR (uint8 images, data range 1: the mean over batches of 64 of the
batch PSNR, and the mean of per-image PSNRs).
Everything is seeded; one torch thread, CPU.

    python scripts/retrofit_third_party.py --out-json docs/retrofit-third-party/results.json \\
        --out-md docs/retrofit-third-party/results.md

One kind and seed per process, then merged (the same numbers; for a machine with several cores):

    for k in taming_vq2 vqpytorch_euclidean vqpytorch_cosine; do for s in 0 1; do
        python scripts/retrofit_third_party.py --kinds $k --seeds $s --out-json /tmp/$k-$s.json --out-md /tmp/$k-$s.md &
    done; done; wait
    python scripts/retrofit_third_party.py --merge /tmp/*-[01].json --out-json results.json --out-md results.md

needs ``pip install --no-deps taming-transformers-rom1504`` (scripts/install.sh does it) and
vector-quantize-pytorch.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from simvq.config import load_config, resolve_config
from simvq.io import check_output, save_file_atomic
from simvq.modalities import build_datasets
from simvq.modalities.image.metrics import psnr_batch, psnr_per_image
from simvq.modalities.image.model import Decoder, Encoder
from simvq.quantizers import SimVQ
from simvq.retrofit import TamingSimVQ, VectorQuantizeSimVQ, retrofit

KINDS = ("taming_vq2", "vqpytorch_euclidean", "vqpytorch_cosine")
STRATEGIES = ("keep", "respread", "fresh")


class AutoEncoder(nn.Module):
    """Encoder -> third-party quantizer (called on ``(B, 4, 16, 16)``) -> decoder."""

    def __init__(self, model_cfg: dict, quantize: nn.Module) -> None:
        super().__init__()
        arch = {k: model_cfg[k] for k in ("ch", "ch_mult", "num_res_blocks", "z_channels", "norm_groups")}
        self.encoder = Encoder(in_channels=model_cfg["in_channels"], **arch)
        self.quantize = quantize
        self.decoder = Decoder(out_channels=model_cfg["out_channels"], **arch)

    def forward(self, x):
        out = self.quantize(self.encoder(x))
        if isinstance(self.quantize, (VectorQuantizeSimVQ,)) or type(self.quantize).__name__ == "VectorQuantize":
            quantized, indices, loss = out[:3]
        else:  # taming convention: (z_q, loss, (perplexity, min_encodings, indices))
            quantized, loss, (_, _, indices) = out
        return self.decoder(quantized), loss, indices


def make_quantizer(kind: str, size: int, dim: int) -> nn.Module:
    if kind == "taming_vq2":
        from taming.modules.vqvae.quantize import VectorQuantizer2

        return VectorQuantizer2(size, dim, beta=0.25, legacy=False)
    from vector_quantize_pytorch import VectorQuantize

    return VectorQuantize(dim=dim, codebook_size=size, accept_image_fmap=True, use_cosine_sim=kind == "vqpytorch_cosine")


def make_simvq(kind: str, size: int, dim: int) -> nn.Module:
    """A SimVQ from scratch in the class's interface, with its loss weights."""
    if kind == "taming_vq2":
        return TamingSimVQ(quantizer=SimVQ(dim=dim, codebook_size=size, commitment_weight=0.25))
    layer = SimVQ(dim=dim, codebook_size=size, commitment_weight=1.0, channel_first=False,
                  l2_normalize=kind == "vqpytorch_cosine")
    return VectorQuantizeSimVQ(quantizer=layer, project_in=nn.Identity(), project_out=nn.Identity(),
                               accept_image_fmap=True)


def train(model: nn.Module, loader_seed: int, train_set, steps: int, batch_size: int, lr: float) -> None:
    """``steps`` Adam steps of L1 reconstruction + quantizer loss on shuffled training images."""
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(loader_seed)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=gen, drop_last=True)
    done = 0
    while done < steps:
        for x in loader:
            x_hat, qloss, _ = model(x)
            loss = F.l1_loss(x_hat, x) + qloss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    model.eval()


@torch.no_grad()
def measure(model: nn.Module, eval_set, size: int, psnr_items: int) -> dict:
    model.eval()
    counts = torch.zeros(size, dtype=torch.long)
    batches, per_image, seen = [], [], 0
    for x in DataLoader(eval_set, batch_size=64, shuffle=False):
        parts = []
        for chunk in x.split(16):  # small pieces: the third-party searches hold a (tokens, K) distance matrix
            chunk_hat, _, indices = model(chunk)
            counts += torch.bincount(indices.reshape(-1).long(), minlength=size)
            parts.append(chunk_hat)
        x_hat = torch.cat(parts)
        if seen < psnr_items:
            take = min(psnr_items - seen, x.shape[0])
            batches.append(psnr_batch(x[:take], x_hat[:take]))
            per_image.append(psnr_per_image(x[:take], x_hat[:take]))
            seen += take
    return {"utilization": float((counts > 0).float().mean()), "tokens": int(counts.sum()),
            "psnr_batch64": sum(batches) / len(batches), "psnr_per_image": float(torch.cat(per_image).mean())}


def _stats(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "values": values}


def _fmt(s: dict, scale: float, digits: int) -> str:
    text = f"{scale * s['mean']:.{digits}f}"
    return text + (f" ± {scale * s['std']:.{digits}f}" if s["std"] is not None else "")


ROW_LABELS = {"start": "collapsed start", "control": "control: trained on", "keep": "retrofit `keep` + N",
              "respread": "retrofit `respread` + N", "fresh": "retrofit `fresh` + N", "simvq": "SimVQ from scratch, N"}


def markdown(results: dict) -> str:
    a = results["settings"]
    lines = [
        f"K = {a['codebook_size']}, {a['steps_collapse']} steps to the collapsed start, N = {a['steps_more']} more "
        f"steps; seeds {a['seeds']}; held-out utilisation over {a['usage_items']:,} test images, PSNR (dB, batch-64 / "
        f"per image) over the first {a['psnr_items']}; mean ± sample std over the seeds.",
        "",
        "| quantizer | model | utilisation % | PSNR dB (batch-64) | PSNR dB (per image) |",
        "|---|---|---|---|---|",
    ]
    for kind, entry in results["kinds"].items():
        if "refused" in entry:
            lines.append(f"| {kind} | retrofit refused: {entry['refused']} | | | |")
            continue
        for row, label in ROW_LABELS.items():
            s = entry["summary"].get(row)
            if s:
                lines.append(f"| {kind} | {label} | {_fmt(s['utilization'], 100, 1)} | {_fmt(s['psnr_batch64'], 1, 2)} "
                             f"| {_fmt(s['psnr_per_image'], 1, 2)} |")
    lines.append("")
    for kind, entry in results["kinds"].items():  # the target: utilisation above 50%, PSNR at least the control's
        summary = entry.get("summary", {})
        if "control" not in summary:
            continue
        control = summary["control"]["psnr_batch64"]
        met = []
        for row in STRATEGIES:
            if row in summary and summary[row]["utilization"]["mean"] > 0.5:
                diff = summary[row]["psnr_batch64"]["mean"] - control["mean"]
                spread = (summary[row]["psnr_batch64"]["std"] or 0.0) + (control["std"] or 0.0)
                if diff >= 0:
                    met.append(f"`{row}` ({diff:+.2f} dB" + (", within the seed spread)" if abs(diff) <= spread else ")"))
        lines.append(f"- {kind}: target (utilisation above 50% with PSNR batch-64 at least the control's) met by "
                     + (", ".join(met) if met else "no strategy") + ".")
    return "\n".join(lines) + "\n"


def summarise(entry: dict, seeds: list[int]) -> None:
    """``entry["summary"]``: each row's metrics as mean ± sample std over the seeds that have it."""
    entry["summary"] = {row: {m: _stats([entry["runs"][str(s)][row][m] for s in seeds])
                              for m in ("utilization", "psnr_batch64", "psnr_per_image")}
                        for row in ROW_LABELS if all(row in entry["runs"][str(s)] for s in seeds)}


def merge(args) -> int:
    """One results file from several made with the same settings (other kinds or other seeds)."""
    parts = [json.loads(open(path, encoding="utf-8").read()) for path in args.merge]
    settings = [{k: v for k, v in part["settings"].items() if k not in ("platform", "seeds")} for part in parts]
    if any(s != settings[0] for s in settings):
        raise SystemExit("--merge: the files were made with different settings")
    out_json = check_output(args.out_json, force=args.force)
    out_md = check_output(args.out_md, force=args.force)
    seeds = sorted({seed for part in parts for seed in part["settings"]["seeds"]})
    results = {"settings": {**parts[0]["settings"], "seeds": seeds}, "kinds": {},
               "wall_time_s": sum(p["wall_time_s"] for p in parts), "merged_from": [str(path) for path in args.merge]}
    for part in parts:
        for kind, entry in part["kinds"].items():
            target = results["kinds"].setdefault(kind, {"runs": {}})
            target["runs"].update(entry["runs"])
            if "refused" in entry:
                target["refused"] = entry["refused"]
    for kind, entry in results["kinds"].items():
        if "refused" not in entry:
            summarise(entry, sorted(int(s) for s in entry["runs"]))
    save_file_atomic(out_json, json.dumps(results, indent=1) + "\n")
    save_file_atomic(out_md, markdown(results))
    print(markdown(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-json", required=True)
    p.add_argument("--out-md", required=True)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--codebook-size", type=int, default=8192)
    p.add_argument("--steps-collapse", type=int, default=150)
    p.add_argument("--steps-more", type=int, default=150)
    p.add_argument("--usage-items", type=int, default=512)
    p.add_argument("--psnr-items", type=int, default=512)
    p.add_argument("--dead-code-items", type=int, default=2048)
    p.add_argument("--scratch", action="store_true", help="add SimVQ trained from scratch for N steps")
    p.add_argument("--merge", nargs="+", help="combine the results.json files of earlier runs (one kind each)")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args)
    kinds = [k for k in args.kinds.split(",") if k]
    if set(kinds) - set(KINDS):
        raise SystemExit(f"--kinds: unknown {sorted(set(kinds) - set(KINDS))}; choose from {', '.join(KINDS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out_json = check_output(args.out_json, force=args.force)
    out_md = check_output(args.out_md, force=args.force)
    torch.set_num_threads(1)
    cfg = resolve_config(load_config("compare/default", [f"data.eval_limit={args.usage_items}"]))
    train_set, eval_set = build_datasets(cfg)
    model_cfg, size, dim = cfg["model"], args.codebook_size, cfg["model"]["z_channels"]
    batch_size, lr = cfg["data"]["batch_size"], cfg["optim"]["lr"]
    results = {"settings": {"codebook_size": size, "seeds": seeds, "steps_collapse": args.steps_collapse,
                            "steps_more": args.steps_more, "usage_items": len(eval_set), "psnr_items": args.psnr_items,
                            "dead_code_items": args.dead_code_items, "batch_size": batch_size, "lr": lr,
                            "model": model_cfg, "torch": torch.__version__, "platform": platform.platform()},
               "kinds": {}}
    t_all = time.perf_counter()
    for kind in kinds:
        entry = results["kinds"][kind] = {"runs": {}}
        for seed in seeds:
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            base = AutoEncoder(model_cfg, make_quantizer(kind, size, dim))
            train(base, seed, train_set, args.steps_collapse, batch_size, lr)
            runs = entry["runs"][str(seed)] = {"start": measure(base, eval_set, size, args.psnr_items)}
            pick = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))[: args.dead_code_items]
            dead_data = DataLoader(Subset(train_set, pick.tolist()), batch_size=64)
            live = None  # which codes the sample uses: found once (respread), reused by fresh
            for row in ("control", *STRATEGIES):
                model = copy.deepcopy(base)
                if row != "control":
                    counts = live if row == "fresh" else None
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)
                        result = retrofit(model, dead_codes=row, data=None if row == "keep" or counts else dead_data,
                                          counts=counts, seed=seed)
                    live = result.live or live
                    if list(result) != ["quantize"]:
                        entry["refused"] = result.skipped.get("quantize", "no quantizer replaced")
                        break
                    runs.setdefault("dead_codes", {})[row] = result.dead_codes.get("quantize")
                torch.manual_seed(seed + 1000)
                train(model, seed + 1000, train_set, args.steps_more, batch_size, lr)
                runs[row] = measure(model, eval_set, size, args.psnr_items)
            if "refused" in entry:
                break
            if args.scratch:
                torch.manual_seed(seed)
                scratch = AutoEncoder(model_cfg, make_simvq(kind, size, dim))
                train(scratch, seed + 1000, train_set, args.steps_more, batch_size, lr)
                runs["simvq"] = measure(scratch, eval_set, size, args.psnr_items)
            runs["wall_time_s"] = time.perf_counter() - t0
            print(f"{kind} seed {seed}: " + ", ".join(f"{r} {100 * runs[r]['utilization']:.1f}% {runs[r]['psnr_batch64']:.2f} dB"
                  for r in ROW_LABELS if r in runs) + f" ({runs['wall_time_s']:.0f} s)", file=sys.stderr, flush=True)
        if "refused" not in entry:
            summarise(entry, seeds)
    results["wall_time_s"] = time.perf_counter() - t_all
    save_file_atomic(out_json, json.dumps(results, indent=1) + "\n")
    save_file_atomic(out_md, markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
