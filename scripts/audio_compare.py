"""SimVQ against plain VQ (and the other quantizers) on the built-in speech corpus with the CPU audio preset
(docs/audio.md).

    python scripts/audio_compare.py train --quantizer simvq --out runs/audio-compare   # one run per quantizer
    python scripts/audio_compare.py train --quantizer vq --out runs/audio-compare      # (can run side by side)
    python scripts/audio_compare.py report --out runs/audio-compare --images docs/images

``train`` trains ``audio/speech-small`` with the given quantizer for a fixed number of steps (a time guard
stops it early and the report says so), then evaluates the exported EMA model: codebook usage over every
evaluation utterance, PESQ / STOI / DNSMOS / V/UV F1 / mel distance over the first ``--quality-limit``
utterances. ``report`` prints a table of every run in ``--out`` and writes the plots (training utilisation,
spectrograms of the runs named by ``--spectrograms``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

CONFIG = "audio/speech-small"
#: quantizers this script trains (the library's single-codebook quantizers; VQGAN-LC needs a trained donor)
QUANTIZERS = ["simvq", "vq", "ema_vq", "factorized_vq", "fsq", "lfq"]


def train_one(args) -> None:
    from simvq.evaluation import evaluate
    from simvq.training import train

    run = Path(args.out) / args.quantizer
    overrides = [f"quantizer.name={args.quantizer}", *args.overrides]
    t0 = time.perf_counter()
    result = train(CONFIG, out_dir=run, max_steps=args.max_steps, max_minutes=args.max_minutes, progress=False, overrides=overrides)
    train_wall = time.perf_counter() - t0
    summary = {
        "quantizer": args.quantizer,
        "overrides": overrides,
        "steps": result.steps,
        "max_steps": args.max_steps,
        "train_wall_time_s": train_wall,
        "steps_per_s": result.steps_per_s,
        "diverged": result.diverged,
        "history": result.history,
    }
    if result.model_dir is not None:
        t1 = time.perf_counter()
        summary["usage"] = evaluate(result.model_dir, metrics=False)
        summary["quality"] = evaluate(result.model_dir, limit=args.quality_limit)
        summary["eval_wall_time_s"] = time.perf_counter() - t1
    (run / "compare.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1, default=str))


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simvq.checkpoints import load_tokenizer
    from simvq.config import load_config
    from simvq.data import build_datasets
    from simvq.losses.spectral import MelSpectrogram, safe_log

    out = Path(args.out)
    order = {q: i for i, q in enumerate(QUANTIZERS)}
    found = sorted((d.name for d in out.iterdir() if (d / "compare.json").is_file()), key=lambda q: order.get(q, len(order)))
    runs = {q: json.loads((out / q / "compare.json").read_text()) for q in found}
    keys = ["steps", "train_wall_time_s"]
    rows = []
    for q, r in runs.items():
        u, m = r.get("usage", {}), r.get("quality", {})
        rows.append({
            "quantizer": q, "steps": r["steps"], "train_min": r["train_wall_time_s"] / 60,
            "util_%": 100 * u.get("utilization", float("nan")), "used_codes": u.get("used_codes"), "codebook_size": u.get("codebook_size"),
            "perplexity": u.get("perplexity"), "tokens": u.get("tokens"), "quality_util_%": 100 * m.get("utilization", float("nan")),
            "pesq": m.get("pesq"), "stoi": m.get("stoi"), "dnsmos_ovrl": m.get("dnsmos_ovrl"), "dnsmos_p808": m.get("dnsmos_p808"),
            "vuv_f1": m.get("vuv_f1"), "vuv_model": m.get("vuv_model"),
            "mel": m.get("mel_distance"), "utterances": m.get("utterances"), "kbps": (m.get("bitrate_bps") or 0) / 1000,
        })
    for row in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    images = Path(args.images)
    images.mkdir(parents=True, exist_ok=True)
    # utilisation over training (per logging window)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for q, r in runs.items():
        h = [e for e in r["history"] if "utilization" in e]
        ax.plot([e["step"] for e in h], [100 * e["utilization"] for e in h], label=q)
    ax.set_xlabel("step")
    ax.set_ylabel("codes used in the window (%)")
    ax.set_title(f"K = 4096, windows of {args.window} training steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(images / f"audio_usage{args.tag}.png", dpi=90)
    plt.close(fig)
    # spectrograms: original vs each reconstruction for three evaluation utterances
    models = {q: load_tokenizer(out / q / "model") for q in args.spectrograms if q in runs}
    config = load_config(out / next(iter(runs)) / "config.yaml")
    _, eval_set = build_datasets(config)
    mel = MelSpectrogram(sample_rate=16000, n_fft=1024, hop_length=256, n_mels=80)
    picks = [0, len(eval_set) // 2, len(eval_set) - 1]
    fig, axes = plt.subplots(len(picks), 1 + len(models), figsize=(4 * (1 + len(models)), 2.3 * len(picks)), squeeze=False)
    with torch.no_grad():
        for r, i in enumerate(picks):
            x = eval_set[i][None]
            specs = [("original", x)] + [(q, m(x)[0].clamp(-1, 1)) for q, m in models.items()]
            ref = safe_log(mel(x))[0]
            for c, (name, wave) in enumerate(specs):
                s = safe_log(mel(wave))[0]
                axes[r][c].imshow(s.numpy(), origin="lower", aspect="auto", vmin=float(ref.min()), vmax=float(ref.max()), cmap="magma")
                axes[r][c].set_yticks([])
                axes[r][c].set_xticks([])
                if r == 0:
                    axes[r][c].set_title(name)
    fig.tight_layout()
    fig.savefig(images / f"audio_spectrograms{args.tag}.png", dpi=80)
    plt.close(fig)
    (out / "report.json").write_text(json.dumps(rows, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--quantizer", choices=QUANTIZERS, required=True)
    t.add_argument("--out", default="runs/audio-compare")
    t.add_argument("--max-steps", type=int, default=300)
    t.add_argument("--max-minutes", type=float, default=20.0)
    t.add_argument("--quality-limit", type=int, default=30)
    t.add_argument("overrides", nargs="*")
    r = sub.add_parser("report")
    r.add_argument("--out", default="runs/audio-compare")
    r.add_argument("--images", default="docs/images")
    r.add_argument("--tag", default="", help="suffix of the plot file names")
    r.add_argument("--window", type=int, default=20, help="steps per logging window (for the plot title)")
    r.add_argument("--spectrograms", nargs="+", default=["simvq", "vq"], help="runs shown in the spectrogram figure")
    args = p.parse_args()
    train_one(args) if args.cmd == "train" else report(args)


if __name__ == "__main__":
    main()
