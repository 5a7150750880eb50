"""The comparison report: ``results.json``, ``report.md``, ``report.html`` and a verdict computed from the numbers.

Every figure over seeds is given as ``mean ± sample standard deviation`` (and min-max in results.json);
with one seed the spread is shown as ``n/a``. Comparisons in the verdict say whether a difference is larger
than the seed spread (the sum of both standard deviations) or within it.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
import platform
import re
from pathlib import Path

import torch

#: SimVQ paper, Table (ImageNet-1k 128x128, 50k validation images; REFERENCE.md §2). Published figures, at
#: a scale this CPU comparison does not reach: shown beside ours, never mixed with them.
PUBLISHED_IMAGENET = [
    # method, K, utilisation %, rFID, LPIPS, PSNR, SSIM x100
    ("VQGAN", 65536, 1.4, 3.74, 0.17, 22.20, 70.6),
    ("VQGAN (EMA)", 65536, 4.5, 3.23, 0.15, 22.89, 72.3),
    ("VQGAN-FC (low-dim factorised)", 65536, 100.0, 2.63, 0.13, 23.79, 77.5),
    ("FSQ", 64000, 100.0, 2.80, 0.13, 23.63, 75.8),
    ("LFQ", 65536, 100.0, 2.88, 0.13, 23.60, 77.2),
    ("VQGAN-LC", 65536, 100.0, 2.40, 0.13, 23.98, 77.3),
    ("SimVQ", 1024, 100.0, 3.67, 0.16, 22.34, 70.8),
    ("SimVQ", 8192, 100.0, 2.98, 0.14, 23.23, 74.7),
    ("SimVQ", 65536, 100.0, 2.24, 0.12, 24.15, 78.4),
    ("SimVQ", 262144, 100.0, 1.99, 0.11, 24.68, 80.3),
]

#: SimVQ paper, audio table (LibriTTS test-clean / test-other, 24 kHz; REFERENCE.md §3). Published figures of
#: full-size models trained on LibriTTS with GAN losses: shown beside ours, never mixed with them.
PUBLISHED_LIBRITTS = [
    # method, kbps, utilisation % (clean, other), UTMOS, PESQ, STOI, V/UV F1 (each: test-clean, test-other)
    ("Encodec", 3.0, None, (2.31, 2.09), (2.05, 2.05), (0.90, 0.88), (0.92, 0.89)),
    ("Vocos", 3.0, None, (3.53, 3.06), (2.40, 2.19), (0.92, 0.90), (0.94, 0.91)),
    ("WavTokenizer", 0.9, (100.0, 100.0), (3.74, 3.43), (2.01, 2.26), (0.89, 0.89), (0.92, 0.92)),
    ("SimVQ K=4096", 0.9, (100.0, 100.0), (4.00, 3.51), (2.33, 2.08), (0.91, 0.88), (0.94, 0.91)),
    ("SimVQ K=8192", 0.975, (99.4, 99.4), (4.03, 3.52), (2.42, 2.15), (0.92, 0.88), (0.94, 0.92)),
    ("SimVQ K=65,536", 1.2, (99.4, 99.0), (4.03, 3.52), (2.54, 2.26), (0.93, 0.90), (0.94, 0.92)),
    ("SimVQ K=262,144", 1.35, (95.6, 94.7), (4.03, 3.53), (2.61, 2.31), (0.93, 0.90), (0.95, 0.93)),
]

#: metrics summarised over seeds: (key in the summary, where it comes from, label, format)
SUMMARY_METRICS = [
    ("utilization", "eval", "utilisation (%)", "pct"),
    ("perplexity", "eval", "perplexity", "0f"),
    ("dead_codes", "eval", "dead codes", "0f"),
    ("psnr_official_batch64", "eval", "PSNR (dB, batch-64)", "2f"),
    ("psnr_per_image", "eval", "PSNR (dB, per image)", "2f"),
    ("ssim_x100", "eval", "SSIM x100", "1f"),
    ("lpips_vgg", "eval", "LPIPS (VGG)", "3f"),
    ("lpips_alex", "eval", "LPIPS (AlexNet)", "3f"),
    ("rfid", "eval", "rFID", "2f"),
    ("proxy_fid_random_conv", "eval", "proxy FID (random conv, not rFID)", "3f"),
    ("pesq", "eval", "PESQ (wide-band)", "2f"),
    ("stoi", "eval", "STOI", "3f"),
    ("dnsmos_ovrl", "eval", "DNSMOS OVRL", "2f"),
    ("dnsmos_sig", "eval", "DNSMOS SIG", "2f"),
    ("dnsmos_bak", "eval", "DNSMOS BAK", "2f"),
    ("dnsmos_p808", "eval", "DNSMOS P.808", "2f"),
    ("vuv_f1", "eval", "V/UV F1", "3f"),
    ("mel_distance", "eval", "mel distance (log-mel L1)", "3f"),
    ("utmos", "eval", "UTMOS", "2f"),
    ("bitrate_bps", "run", "bitrate (bit/s)", "0f"),
    ("train_utilization", "history", "train utilisation, last window (%)", "pct"),
    ("final_l1", "history", "final train L1", "4f"),
    ("final_mel", "history", "final train mel loss", "4f"),
    ("final_commitment", "history", "final commitment loss", "4f"),
    ("final_codebook", "history", "final codebook loss", "4f"),
    ("steps", "run", "training steps", "0f"),
    ("steps_per_s", "run", "steps/s", "1f"),
    ("train_time_s", "run", "train wall time (s)", "0f"),
    ("wall_time_s", "run", "run wall time incl. eval (s)", "0f"),
    ("params_total", "run", "parameters", "0f"),
    ("quantizer_params_trainable", "run", "trainable quantizer parameters", "0f"),
    ("peak_memory_mb", "run", "peak memory (MB)", "0f"),
]


USAGE_KEYS = ("utilization", "perplexity", "dead_codes", "used_codes", "tokens")


def merged_eval(record: dict) -> dict:
    """A run's held-out numbers: reconstruction metrics from ``evaluate()``, usage from the larger usage pass."""
    ev = dict(record.get("eval") or {})
    usage = record.get("usage_eval")
    if usage:
        ev.update({k: usage[k] for k in USAGE_KEYS if k in usage})
        if "images" in usage:
            ev["usage_images"] = usage["images"]
        else:
            ev["usage_items"] = usage.get("items")
    return ev


def _value(record: dict, key: str, source: str):
    if source == "eval":
        v = merged_eval(record).get(key)
    elif source == "history":
        hist = [h for h in record.get("history", []) if "step" in h and not h.get("diverged")]
        name = {"train_utilization": "utilization", "final_l1": "l1", "final_commitment": "commitment",
                "final_codebook": "codebook", "final_mel": "mel_loss"}[key]
        v = next((h[name] for h in reversed(hist) if name in h), None)
    else:
        v = record.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def stats(values: list[float]) -> dict:
    """``mean``, sample ``std`` (None for one value), ``min``, ``max``, ``n`` and the values."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "values": []}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values), "values": list(values)}


def summarise(records: list[dict]) -> list[dict]:
    """One entry per (variant, requested size) of the main comparison, metrics aggregated over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("kind", "compare") == "compare":
            groups.setdefault((r["variant"], r["requested_size"]), []).append(r)
    out = []
    for (variant, size), recs in groups.items():
        recs = sorted(recs, key=lambda r: r["seed"])
        ok = [r for r in recs if r.get("status") == "ok"]
        entry = {
            "variant": variant,
            "label": recs[0].get("label", variant),
            "requested_size": size,
            "codebook_size": recs[0]["codebook_size"],
            "seeds": [r["seed"] for r in recs],
            "diverged": [r["seed"] for r in recs if r.get("status") != "ok"],
            "metrics": {},
        }
        for key, source, _, _ in SUMMARY_METRICS:
            vals = [v for v in (_value(r, key, source) for r in ok) if v is not None]
            if vals:
                entry["metrics"][key] = stats(vals)
        out.append(entry)
    return out


# ----- formatting ---------------------------------------------------------------------------------------
def _fmt(v: float | None, kind: str) -> str:
    if v is None:
        return "n/a"
    if kind == "pct":
        return f"{100 * v:.1f}"
    return f"{v:.{kind}}"


def fmt_stat(s: dict | None, kind: str) -> str:
    """``mean ± std`` in the metric's format (``mean`` alone with one seed)."""
    if not s or s.get("mean") is None:
        return "n/a"
    if s.get("std") is None:
        return _fmt(s["mean"], kind)
    return f"{_fmt(s['mean'], kind)} ± {_fmt(s['std'], kind)}"


def _get(summary: list[dict], variant: str, size: int) -> dict | None:
    return next((e for e in summary if e["variant"] == variant and e["requested_size"] == size), None)


def _m(entry: dict | None, key: str) -> dict | None:
    return None if entry is None else entry["metrics"].get(key)


def _beyond_spread(a: dict, b: dict) -> bool:
    spread = (a.get("std") or 0.0) + (b.get("std") or 0.0)
    return abs(a["mean"] - b["mean"]) > spread


def _quality_key(summary: list[dict]) -> str:
    return "psnr_official_batch64"


def _cost_line(sim: dict | None, vq: dict | None, size: int) -> list[str]:
    """The verdict's cost line (SimVQ's trainable quantizer parameters and speed against plain VQ), if known."""
    keys = ("steps_per_s", "quantizer_params_trainable")
    if not all(_m(e, k) for e in (sim, vq) for k in keys):
        return []
    ratio = sim["metrics"]["steps_per_s"]["mean"] / vq["metrics"]["steps_per_s"]["mean"]
    return [
        f"K={size}: cost: SimVQ trains {sim['metrics']['quantizer_params_trainable']['mean']:.0f} quantizer "
        f"parameters (VQ: {vq['metrics']['quantizer_params_trainable']['mean']:.0f}) and runs at {ratio:.2f}x "
        f"plain VQ's steps/s on this machine."
    ]


def verdict(summary: list[dict], retrofit: dict | None, sizes: list[int], modality: str = "image") -> list[str]:
    """Sentences that state who wins on what, by how much, with the spread; all from the numbers."""
    if modality == "audio":
        return audio_verdict(summary, retrofit, sizes)
    lines = []
    q = _quality_key(summary)
    for size in sizes:
        rows = [e for e in summary if e["requested_size"] == size and _m(e, "utilization")]
        if not rows:
            continue
        sim, vq = _get(summary, "simvq", size), _get(summary, "vq", size)
        if _m(sim, "utilization") and _m(vq, "utilization"):
            su, vu = _m(sim, "utilization"), _m(vq, "utilization")
            lines.append(
                f"K={size}: SimVQ uses {fmt_stat(su, 'pct')}% of its codes on held-out data, plain VQ "
                f"{fmt_stat(vu, 'pct')}% ({100 * (su['mean'] - vu['mean']):+.1f} points"
                f"{'' if _beyond_spread(su, vu) else ', within the seed spread'})."
            )
            if _m(sim, q) and _m(vq, q):
                sp, vp = _m(sim, q), _m(vq, q)
                lines.append(
                    f"K={size}: PSNR {fmt_stat(sp, '2f')} dB for SimVQ against {fmt_stat(vp, '2f')} dB for plain VQ "
                    f"({sp['mean'] - vp['mean']:+.2f} dB{'' if _beyond_spread(sp, vp) else ', within the seed spread'})."
                )
        best_u = max(rows, key=lambda e: e["metrics"]["utilization"]["mean"])
        rows_q = [e for e in rows if _m(e, q)]
        if rows_q:
            best_q = max(rows_q, key=lambda e: e["metrics"][q]["mean"])
            ranked = sorted(rows_q, key=lambda e: -e["metrics"][q]["mean"])
            second = ranked[1] if len(ranked) > 1 else None
            text = f"K={size}: best PSNR {best_q['label']} ({fmt_stat(best_q['metrics'][q], '2f')} dB)"
            if second is not None:
                gap = best_q["metrics"][q]["mean"] - second["metrics"][q]["mean"]
                text += (
                    f", {gap:.2f} dB ahead of {second['label']}"
                    f"{'' if _beyond_spread(best_q['metrics'][q], second['metrics'][q]) else ' (within the seed spread)'}"
                )
            text += f"; highest utilisation {best_u['label']} ({fmt_stat(best_u['metrics']['utilization'], 'pct')}%)."
            lines.append(text)
        collapsed = [e["label"] for e in rows if e["metrics"]["utilization"]["mean"] < 0.1]
        if collapsed:
            lines.append(f"K={size}: collapsed (under 10% of codes used): {', '.join(collapsed)}.")
        for v, what in (("simvq_mlp", "the MLP transform"), ("simvq_learn_c", "learning C as well as W")):
            e = _get(summary, v, size)
            if e and _m(e, "utilization") and _m(sim, "utilization"):
                du = e["metrics"]["utilization"]["mean"] - sim["metrics"]["utilization"]["mean"]
                dq = (e["metrics"][q]["mean"] - sim["metrics"][q]["mean"]) if _m(e, q) and _m(sim, q) else None
                lines.append(
                    f"K={size}: {what} changes SimVQ's utilisation by {100 * du:+.1f} points"
                    + (f" and PSNR by {dq:+.2f} dB" if dq is not None else "")
                    + f" ({e['label']}: {fmt_stat(e['metrics']['utilization'], 'pct')}%)."
                )
        lines += _cost_line(sim, vq, size)
    diverged = [f"{e['label']} K={e['requested_size']} seeds {e['diverged']}" for e in summary if e["diverged"]]
    lines.append("Diverged runs (NaN/Inf): " + ("; ".join(diverged) if diverged else "none") + ".")
    if retrofit:
        b, a, c = (merged_eval(retrofit[k]) for k in ("before", "after", "control"))
        if all(k in d for d in (a, b, c) for k in ("utilization", "psnr_official_batch64")):
            lines.append(
                f"Retrofit (K={retrofit['size']}): the trained plain-VQ model used {100 * b['utilization']:.1f}% of its "
                f"codes at {b['psnr_official_batch64']:.2f} dB; swapped to SimVQ (outputs unchanged at the swap) and "
                f"trained {retrofit['after'].get('steps', 0)} more steps it uses "
                f"{100 * a['utilization']:.1f}% at {a['psnr_official_batch64']:.2f} dB, while plain VQ trained as long "
                f"uses {100 * c['utilization']:.1f}% at {c['psnr_official_batch64']:.2f} dB (one seed)."
            )
    return lines


#: audio quality metrics of the verdict: (key, label, format, higher is better)
AUDIO_QUALITY = [
    ("pesq", "PESQ", "2f", True),
    ("stoi", "STOI", "3f", True),
    ("mel_distance", "mel distance", "3f", False),
    ("dnsmos_ovrl", "DNSMOS OVRL", "2f", True),
    ("vuv_f1", "V/UV F1", "3f", True),
]
#: PESQ (wide-band) runs from 1.0 (its floor) to 4.64; below this every reconstruction is poor
PESQ_LOW = 1.5


def _spread_note(a: dict, b: dict) -> str:
    """``", within the seed spread"`` when the difference is smaller than the summed spreads; nothing with
    one seed (the verdict says once that one seed gives no spread)."""
    if (a.get("n") or 0) < 2 and (b.get("n") or 0) < 2:
        return ""
    return "" if _beyond_spread(a, b) else ", within the seed spread"


def audio_verdict(summary: list[dict], retrofit: dict | None, sizes: list[int]) -> list[str]:
    """The audio verdict: utilisation and PESQ / STOI / mel distance / DNSMOS / V/UV F1, all from the numbers."""
    lines = []
    for size in sizes:
        rows = [e for e in summary if e["requested_size"] == size and _m(e, "utilization")]
        if not rows:
            continue
        sim, vq = _get(summary, "simvq", size), _get(summary, "vq", size)
        if _m(sim, "utilization") and _m(vq, "utilization"):
            su, vu = _m(sim, "utilization"), _m(vq, "utilization")
            lines.append(
                f"K={size}: SimVQ uses {fmt_stat(su, 'pct')}% of its codes on held-out speech, plain VQ "
                f"{fmt_stat(vu, 'pct')}% ({100 * (su['mean'] - vu['mean']):+.1f} points{_spread_note(su, vu)}); "
                f"perplexity {fmt_stat(_m(sim, 'perplexity'), '0f')} against {fmt_stat(_m(vq, 'perplexity'), '0f')}."
            )
            parts = []
            for key, label, kind, higher in AUDIO_QUALITY:
                a, b = _m(sim, key), _m(vq, key)
                if not a or not b:
                    continue
                diff = a["mean"] - b["mean"]
                better = "SimVQ" if (diff > 0) == higher else "VQ"
                parts.append(f"{label} {fmt_stat(a, kind)} against {fmt_stat(b, kind)} ({diff:+.{kind[0]}f}"
                             + ("" if diff == 0 else f", {better} better") + f"{_spread_note(a, b)})")
            if parts:
                lines.append(f"K={size}: SimVQ against plain VQ: " + "; ".join(parts) + ".")
        best = []
        for key, label, kind, higher in AUDIO_QUALITY:
            have = [e for e in rows if _m(e, key)]
            if len(have) < 2:
                continue
            ranked = sorted(have, key=lambda e: e["metrics"][key]["mean"], reverse=higher)
            top, second = ranked[0], ranked[1]
            gap = abs(top["metrics"][key]["mean"] - second["metrics"][key]["mean"])
            if f"{gap:.{kind[0]}f}" == f"{0:.{kind[0]}f}":
                ahead = f"level with {second['label']} at this precision"
            else:
                ahead = (f"{gap:.{kind[0]}f} ahead of {second['label']}"
                         f"{_spread_note(top['metrics'][key], second['metrics'][key])}")
            best.append(f"{'best' if higher else 'lowest'} {label} {top['label']} ({fmt_stat(top['metrics'][key], kind)}, {ahead})")
        best_u = max(rows, key=lambda e: e["metrics"]["utilization"]["mean"])
        best.append(f"highest utilisation {best_u['label']} ({fmt_stat(best_u['metrics']['utilization'], 'pct')}%)")
        lines.append(f"K={size}: " + "; ".join(best) + ".")
        collapsed = [f"{e['label']} ({fmt_stat(e['metrics']['utilization'], 'pct')}%)" for e in rows
                     if e["metrics"]["utilization"]["mean"] < 0.1]
        if collapsed:
            lines.append(f"K={size}: collapsed (under 10% of codes used): {', '.join(collapsed)}.")
        for v, what in (("simvq_mlp", "the MLP transform"), ("simvq_learn_c", "learning C as well as W")):
            e = _get(summary, v, size)
            if e and _m(e, "utilization") and _m(sim, "utilization"):
                du = e["metrics"]["utilization"]["mean"] - sim["metrics"]["utilization"]["mean"]
                dq = (e["metrics"]["pesq"]["mean"] - sim["metrics"]["pesq"]["mean"]) if _m(e, "pesq") and _m(sim, "pesq") else None
                lines.append(
                    f"K={size}: {what} changes SimVQ's utilisation by {100 * du:+.1f} points"
                    + (f" and PESQ by {dq:+.2f}" if dq is not None else "")
                    + f" ({e['label']}: {fmt_stat(e['metrics']['utilization'], 'pct')}%)."
                )
        lines += _cost_line(sim, vq, size)
    pesq = [e["metrics"]["pesq"]["max"] for e in summary if _m(e, "pesq")]
    if pesq and max(pesq) < PESQ_LOW:
        lines.append(
            f"Every run's PESQ is below {PESQ_LOW} (highest {max(pesq):.2f}; the scale starts at 1.0): at this budget all "
            "reconstructions are coarse, and differences of a few hundredths in PESQ, STOI or DNSMOS are not a ranking "
            "of the quantizers' quality."
        )
    if summary and all(len(e["seeds"]) < 2 for e in summary):
        lines.append("One seed per run: the differences above carry no seed-spread estimate (add seeds, e.g. "
                     "--seeds 0,1,2, for mean ± spread).")
    diverged = [f"{e['label']} K={e['requested_size']} seeds {e['diverged']}" for e in summary if e["diverged"]]
    lines.append("Diverged runs (NaN/Inf): " + ("; ".join(diverged) if diverged else "none") + ".")
    if retrofit:
        b, a, c = (merged_eval(retrofit[k]) for k in ("before", "after", "control"))
        if all(k in d for d in (a, b, c) for k in ("utilization", "mel_distance")):
            lines.append(
                f"Retrofit (K={retrofit['size']}): the trained plain-VQ model used {100 * b['utilization']:.1f}% of its "
                f"codes at mel distance {b['mel_distance']:.3f}; swapped to SimVQ (outputs unchanged at the swap) and "
                f"trained {retrofit['after'].get('steps', 0)} more steps it uses {100 * a['utilization']:.1f}% at "
                f"{a['mel_distance']:.3f}, while plain VQ trained as long uses {100 * c['utilization']:.1f}% at "
                f"{c['mel_distance']:.3f} (one seed)."
            )
    return lines


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _environment() -> dict:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # other processes on a shared machine slow every run: timings mean little without it
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _usage_set(runs: list[dict]) -> str:
    sizes = sorted({(r["usage_eval"]["images"], r["usage_eval"]["tokens"]) for r in runs if r.get("usage_eval")})
    if not sizes:
        return "the evaluation set"
    if len(sizes) == 1:
        return f"{sizes[0][0]:,} held-out images ({sizes[0][1]:,} tokens)"
    return "held-out images (" + ", ".join(f"{n:,}" for n, _ in sizes) + " depending on the run)"


def _perceptual_key(summary: list[dict]) -> tuple[str, str] | None:
    for key, label in (("rfid", "rFID"), ("lpips_vgg", "LPIPS (VGG)"), ("proxy_fid_random_conv", "proxy FID*")):
        if any(key in e["metrics"] for e in summary):
            return key, label
    return None


def write_report(spec, base: dict, records: list[dict], *, notes: list[str], retrofit: dict | None, out: Path,
                 wall_time_s: float, reused: int, parallel_runs: int | None = None) -> dict:
    """Write ``results.json``, the plots, ``report.md`` and ``report.html`` into ``out``; return the results."""
    from simvq.compare import plots
    from simvq.compare.runner import VARIANTS

    out = Path(out)
    modality = base.get("modality", "image")
    summary = summarise(records)
    sizes = sorted({e["requested_size"] for e in summary})
    lines = verdict(summary, retrofit, sizes, modality=modality)
    results = {
        "version": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "spec": {
            "quantizers": list(spec.quantizers),
            "codebook_sizes": list(spec.codebook_sizes),
            "seeds": list(spec.seeds),
            "budget": spec.budget.text,
            "data": spec.data,
            "config": spec.config if not isinstance(spec.config, dict) else "(dict)",
            "eval_limit": spec.eval_limit,
            **({"modality": "audio", "usage_items": spec.usage_items, "retrofit": spec.retrofit}
               if modality == "audio" else {}),
        },
        "base_config": base,
        "environment": _environment(),
        "wall_time_s": wall_time_s,
        "reused_runs": reused,
        "parallel_runs": parallel_runs,
        "notes": list(notes),
        "summary": summary,
        "verdict": lines,
        "retrofit": _retrofit_summary(retrofit),
        **_published(modality),
        "runs_wall_time_s_sum": sum(r.get("wall_time_s", 0.0) for r in records),
        "runs": [_portable(r, out) for r in records],
    }
    from simvq.checkpoints import save_file_atomic

    save_file_atomic(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    figures = plots.make_all(results, records, retrofit, out / "plots")
    md = render_markdown(results, figures, VARIANTS)
    save_file_atomic(out / "report.md", md)
    save_file_atomic(out / "report.html", markdown_to_html(md, title="simvq compare report"))
    return results


def _published(modality: str) -> dict:
    if modality == "audio":
        keys = ("method", "kbps", "utilization_pct", "utmos", "pesq", "stoi", "vuv_f1")
        return {"published_libritts": {
            "note": "SimVQ paper, LibriTTS test-clean / test-other, 24 kHz models (REFERENCE.md §3); published, not ours",
            "rows": [dict(zip(keys, (row[0], row[1], *(None if v is None else {"test_clean": v[0], "test_other": v[1]}
                                                        for v in row[2:])))) for row in PUBLISHED_LIBRITTS],
        }}
    return {"published_imagenet": [
        dict(zip(("method", "codebook_size", "utilization_pct", "rfid", "lpips", "psnr", "ssim_x100"), row))
        for row in PUBLISHED_IMAGENET
    ]}


def _portable(record: dict, out: Path) -> dict:
    """A run record with its file paths relative to the report folder (the folder can move)."""
    rec = dict(record)
    for key in ("model_dir", "reconstructions", "usage_counts"):
        if rec.get(key):
            try:
                rec[key] = str(Path(rec[key]).resolve().relative_to(Path(out).resolve()))
            except ValueError:
                pass
    return rec


def _retrofit_summary(retrofit: dict | None) -> dict | None:
    if not retrofit:
        return None

    def pick(rec):
        ev = merged_eval(rec)
        keys = ("utilization", "perplexity", "dead_codes", "psnr_official_batch64", "ssim_x100")
        if "pesq" in ev or "mel_distance" in ev:
            keys = ("utilization", "perplexity", "dead_codes", "pesq", "stoi", "mel_distance", "dnsmos_ovrl", "vuv_f1")
        return {"key": rec.get("key"), "steps": rec.get("steps"), "status": rec.get("status"),
                **{k: ev.get(k) for k in keys}}

    before, after, control = pick(retrofit["before"]), pick(retrofit["after"]), pick(retrofit["control"])
    for rec in (after, control):  # the continuations count their own steps; report totals
        if rec["steps"] is not None and before["steps"] is not None:
            rec["steps"] = before["steps"] + rec["steps"]
    return {"codebook_size": retrofit["size"], "seed": retrofit["seed"], "replaced": retrofit.get("replaced"),
            "before": before, "after_retrofit": after, "control_vq_trained_on": control}


def _run_columns(entry: dict, steps_per_s_format: str) -> list[str]:
    """The results table's last columns: steps, steps/s, trainable quantizer parameters, diverged seeds."""
    mt = entry["metrics"]
    return [fmt_stat(mt.get("steps"), "0f"), fmt_stat(mt.get("steps_per_s"), steps_per_s_format),
            _fmt(mt["quantizer_params_trainable"]["mean"], "0f") if "quantizer_params_trainable" in mt else "n/a",
            f"{len(entry['diverged'])}/{len(entry['seeds'])}"]


def _quantizer_lines(keys, variants: dict) -> list[str]:
    return [f"- **{variants[v].label}** (`{v}`): {variants[v].note}." for v in keys if variants.get(v)]


def _retrofit_lines(r: dict | None, quality: list[tuple[str, str, str]]) -> list[str]:
    """The retrofit section (nothing when the experiment did not run); ``quality``: (header, key, format)."""
    if not r:
        return []
    out = ["", "## Retrofit experiment", "",
           f"A plain-VQ model (K={r['codebook_size']}, seed {r['seed']}) from the runs above, its quantizer "
           "swapped by `simvq.retrofit(model)` for a SimVQ layer whose frozen C is the old codebook and whose W "
           "starts at the identity (outputs unchanged at the swap), then trained on; the control trains the "
           "same VQ model on for as many steps without the swap.", ""]
    rows = []
    for name, key in (("trained plain VQ (before)", "before"), ("retrofitted to SimVQ, trained on", "after_retrofit"),
                      ("plain VQ trained on (control)", "control_vq_trained_on")):
        x = r[key]
        rows.append([name, str(x.get("steps")), _fmt(x.get("utilization"), "pct"), _fmt(x.get("perplexity"), "0f"),
                     *(_fmt(x.get(k), f) for _, k, f in quality)])
    out.append(_table(["model", "total steps", "utilisation %", "perplexity", *(h for h, _, _ in quality)], rows))
    return out


def render_markdown(results: dict, figures: dict, variants: dict) -> str:
    if results["base_config"].get("modality") == "audio":
        return render_audio_markdown(results, figures, variants)
    spec, base, summary = results["spec"], results["base_config"], results["summary"]
    m, d, o = base["model"], base["data"], base["optim"]
    sizes = sorted({e["requested_size"] for e in summary})
    order = [v for v in spec["quantizers"]]
    out = ["# simvq compare: does SimVQ fix codebook collapse, and at what cost?", ""]
    out += [
        f"Generated {results['created']} by `simvq compare` in {results['wall_time_s'] / 60:.1f} min "
        f"({results['reused_runs']} run(s) reused from an earlier invocation; the runs' own wall times add up to "
        f"{results['runs_wall_time_s_sum'] / 60:.1f} min, run side by side) on {results['environment']['platform']}, "
        f"torch {results['environment']['torch']}, {results['environment']['cpu_count']} CPU(s)"
        + (f", {results['environment']['cuda']}" if results["environment"]["cuda"] else "")
        + ".",
        "",
        "## Verdict",
        "",
    ]
    out += [f"- {line}" for line in results["verdict"]]
    out += ["", "## Setup", ""]
    pq = _perceptual_key(summary)
    out += [
        (f"- Same model, data, steps and seeds for every quantizer; only the quantizer changes. Budget: {spec['budget']} "
         f"per run; seeds {spec['seeds']}; codebook sizes {spec['codebook_sizes']}."
         if "minutes" not in spec["budget"] else
         f"- Same model, data and seeds for every quantizer; only the quantizer changes. Budget: {spec['budget']}, "
         "split evenly across runs: every run trains for the same wall time, so faster quantizers take more steps "
         f"(see the steps column); seeds {spec['seeds']}; codebook sizes {spec['codebook_sizes']}."),
        f"- Model: Open-MAGVIT2-style CNN tokenizer, ch {m['ch']}, ch_mult {m['ch_mult']}, {m['num_res_blocks']} res "
        f"block(s) per level, code dimension {m['z_channels']} (x{2 ** (len(m['ch_mult']) - 1)} down-sampling).",
        f"- Data: `{d['dataset']}`{' at ' + str(d['path']) if d.get('path') else ''}, {d['image_size']}x{d['image_size']} "
        f"images, {d['channels']} channel(s), batch {d['batch_size']}; reconstruction metrics on the held-out split"
        f"{' (first ' + str(d['eval_limit']) + ' images)' if d.get('eval_limit') else ''}.",
        f"- Loss: L1 x{base['loss']['l1_weight']}"
        + (f" + perceptual x{base['loss']['perceptual_weight']}" if base["loss"]["perceptual_weight"] else "")
        + (f" + GAN x{base['loss']['gan_weight']}" if base["loss"]["gan_weight"] else "")
        + " + quantizer loss"
        + ("" if base["loss"]["perceptual_weight"] and base["loss"]["gan_weight"] else
           f" ({', '.join(x for x, w in (('no perceptual loss', base['loss']['perceptual_weight']), ('no GAN', base['loss']['gan_weight'])) if not w)}: "
           "cheaper, and not what the comparison measures)")
        + f"; Adam lr {o['lr']}, betas {o['betas']}; weight EMA {o['ema_decay'] if o['ema_decay'] else 'off'}.",
        f"- Utilisation = codes used at least once over {_usage_set(results['runs'])} / K (perplexity and dead codes "
        "over the same set): covering K codes needs many tokens, so this set is larger than the one for the "
        "reconstruction metrics. PSNR (batch-64) is the official convention (MSE averaged over a batch of 64, then "
        "PSNR, averaged over batches); per-image PSNR reads higher.",
    ]
    if pq and pq[0] == "proxy_fid_random_conv":
        out.append("- *proxy FID: Frechet distance of features of a fixed random conv net (no Inception weights "
                   "on this machine); comparable between our runs only, not an rFID.")
    out.append(
        "- Figures are mean ± sample standard deviation over seeds. A difference smaller than the sum of both "
        "spreads is reported as within the seed spread."
    )
    for note in results["notes"]:
        out.append(f"- Note: {note}")
    lc = [r.get("lc_codebook") for r in results["runs"] if r.get("lc_codebook")]
    if lc:
        out.append(f"- VQGAN-LC frozen codebook: {lc[0]}.")
    out += ["", "## Results (ours)", ""]
    header = ["quantizer", "K", "utilisation %", "perplexity", "dead codes", "PSNR dB", "SSIM x100"]
    if pq:
        header.append(pq[1])
    header += ["steps", "steps/s", "quantizer params (trainable)", "diverged"]
    rows = []
    for size in sizes:
        for v in order:
            e = _get(summary, v, size)
            if e is None:
                continue
            mt = e["metrics"]
            row = [e["label"], str(e["codebook_size"]), fmt_stat(mt.get("utilization"), "pct"),
                   fmt_stat(mt.get("perplexity"), "0f"), fmt_stat(mt.get("dead_codes"), "0f"),
                   fmt_stat(mt.get("psnr_official_batch64"), "2f"), fmt_stat(mt.get("ssim_x100"), "1f")]
            if pq:
                row.append(fmt_stat(mt.get(pq[0]), "3f"))
            row += _run_columns(e, "1f")
            rows.append(row)
    out.append(_table(header, rows))
    out += ["", "Quantizers:", ""]
    out += _quantizer_lines(order, variants)
    out += _retrofit_lines(results.get("retrofit"), [("PSNR dB", "psnr_official_batch64", "2f"), ("SSIM x100", "ssim_x100", "1f")])
    out += ["", "## Figures", ""]
    for key, caption in (
        ("utilization_over_steps", "Codebook utilisation over training (per logging window of training tokens)"),
        ("codebook_scaling", "Codebook-size scaling: held-out utilisation and PSNR against K (error bars: std over seeds)"),
        ("code_usage", "Sorted code-usage histograms on the held-out set (largest K, first seed)"),
        ("reconstructions", "Reconstructions side by side (largest K, first seed; top row: originals)"),
        ("loss_curves", "Training losses"),
        ("retrofit", "Retrofit experiment"),
    ):
        if figures.get(key):
            out += [f"![{caption}]({figures[key]})", "", f"*{caption}.*", ""]
    out += ["## Published figures (SimVQ paper, ImageNet-1k 128x128; another scale)", "",
            "These are the paper's numbers for full-size models trained 50 epochs on ImageNet with perceptual and GAN "
            "losses. They are not comparable in absolute value with the small CPU runs above. At that scale plain VQ "
            "uses 1.4% of 65,536 codes and SimVQ all of them at every size.", ""]
    out.append(_table(["method", "K", "utilisation %", "rFID", "LPIPS", "PSNR", "SSIM x100"],
                      [[str(x) for x in row[:1]] + [f"{row[1]:,}"] + [f"{row[2]:g}", f"{row[3]:.2f}", f"{row[4]:.2f}",
                                                                         f"{row[5]:.2f}", f"{row[6]:.1f}"]
                       for row in PUBLISHED_IMAGENET]))
    out += ["", "Raw numbers of every run, with training histories: `results.json`.", ""]
    return "\n".join(out)


# ----- the audio report ---------------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _n(count, noun: str) -> str:
    return f"{count} {noun}" + ("" if str(count) == "1" else "s")


def _usage_set_audio(runs: list[dict]) -> str:
    sets = sorted({(r["usage_eval"].get("items"), round(r["usage_eval"].get("seconds") or 0.0, 1), r["usage_eval"]["tokens"])
                   for r in runs if r.get("usage_eval")})
    if not sets:
        return "the held-out set"
    if len(sets) == 1:
        n, sec, tok = sets[0]
        return f"{_n(f'{n:,}', 'held-out utterance')} ({_duration(sec)} of audio, {tok:,} tokens)"
    return "held-out utterances (" + ", ".join(f"{n:,}" for n, _, _ in sets) + " depending on the run)"


def _quality_set_audio(runs: list[dict]) -> str:
    sets = sorted({(r["eval"].get("items"), round(float(r["eval"].get("seconds") or 0.0), 1)) for r in runs if r.get("eval")})
    if not sets:
        return "the held-out utterances"
    if len(sets) == 1:
        n, sec = sets[0]
        return f"the first {_n(f'{n:,}', 'held-out utterance')} ({_duration(sec)})"
    return "the first held-out utterances (" + ", ".join(f"{n:,}" for n, _ in sets) + " depending on the run)"


def _audio_data_text(d: dict) -> str:
    if d["dataset"] == "speech":
        where = f" at {d['path']}" if d.get("path") else ""
        text = (f"`speech`: the built-in espeak-ng corpus{where} (synthetic English speech, "
                f"{_n(d['corpus_sentences'], 'sentence')} x {_n(d['corpus_voices_per_sentence'], 'voice')}; held-out "
                "sentences are never heard in training)")
    else:
        held = (f"evaluation folder {d['eval_path']}" if d.get("eval_path") else
                f"every n-th file held out (data.eval_fraction {d['eval_fraction'] if d['eval_fraction'] is not None else 0.1:g})")
        text = f"`{d['dataset']}` at {d.get('path')} ({held})"
    if d.get("eval_dataset"):
        text += f"; evaluated on `{d['eval_dataset']}`"
    return text


def _pair(v) -> str:
    return "-" if v is None else f"{v[0]:g} / {v[1]:g}"


def render_audio_markdown(results: dict, figures: dict, variants: dict) -> str:
    import math as _math

    spec, base, summary = results["spec"], results["base_config"], results["summary"]
    m, d, o, loss = base["model"], base["data"], base["optim"], base["loss"]
    hop = _math.prod(m["ratios"])
    sizes = sorted({e["requested_size"] for e in summary})
    runs = results["runs"]
    env = results["environment"]
    out = ["# simvq compare (audio): does SimVQ fix codebook collapse on speech, and at what cost?", ""]
    out += [
        f"Generated {results['created']} by `simvq compare` in {results['wall_time_s'] / 60:.1f} min "
        f"({results['reused_runs']} run(s) reused from an earlier invocation; the runs' own wall times add up to "
        f"{results['runs_wall_time_s_sum'] / 60:.1f} min, run side by side) on {env['platform']}, torch {env['torch']}, "
        f"{env['cpu_count']} CPU(s)" + (f", {env['cuda']}" if env["cuda"] else "")
        + (f"; load average at the end {env['load_average_1_5_15min'][0]:.1f} (other processes share the CPU when it "
           f"exceeds {env['cpu_count']})" if env.get("load_average_1_5_15min") else "") + ".",
        "",
        "## Verdict",
        "",
    ]
    out += [f"- {line}" for line in results["verdict"]]
    out += ["", "## Setup", ""]
    gan = loss["gan_weight"] or loss["feature_matching_weight"]
    crepe = sorted({r["eval"].get("vuv_model") for r in runs if r.get("eval", {}).get("vuv_model")})
    unavailable: dict = {}
    for r in runs:
        unavailable.update(r.get("eval_unavailable") or {})
    out += [
        (f"- Same model, data, steps and seeds for every quantizer; only the quantizer changes. Budget: {spec['budget']} "
         f"per run; seeds {spec['seeds']}; codebook sizes {spec['codebook_sizes']}."
         if "minutes" not in spec["budget"] else
         f"- Same model, data and seeds for every quantizer; only the quantizer changes. Budget: {spec['budget']}, "
         "split evenly across runs: every run trains for the same wall time, so faster quantizers take more steps "
         f"(see the steps column); seeds {spec['seeds']}; codebook sizes {spec['codebook_sizes']}."),
        f"- Model: audio tokenizer `{m['preset']}` at {m['sample_rate']} Hz: causal SEANet encoder ({m['n_filters']} "
        f"filters, strides {list(reversed(m['ratios']))}: hop {hop} = {m['sample_rate'] / hop:g} tokens/s, "
        f"{m['lstm_layers']}-layer LSTM), {m['dimension']}-d tokens, Vocos decoder ({_n(m['backbone_layers'], 'ConvNeXt block')} "
        f"of width {m['backbone_dim']}, inverse-STFT head n_fft {m['n_fft']})"
        + (f"; encoder initialised N(0, gain²/fan_in) with gain {m['encoder_init_gain']:g}" if m.get("encoder_init_gain") else "")
        + ".",
        f"- Data: {_audio_data_text(d)}; training on random {d['segment_seconds']:g} s crops, batch {d['batch_size']}.",
        f"- Loss: {loss['mel_weight']:g} x log-mel L1 + {loss['quantizer_weight']:g} x quantizer loss"
        + (f" + MPD/MRD GAN (weight {loss['gan_weight']:g}) with feature matching" if gan else
           " (GAN terms off for every quantizer alike: the discriminators triple a CPU step)")
        + f"; Adam lr {o['lr']:g}, betas {o['betas']}, warm-up {o['warmup_steps']} steps, gradient clipping "
        f"{o['grad_clip'] if o['grad_clip'] else 'off'}; weight EMA {o['ema_decay'] if o['ema_decay'] else 'off'} "
        "(evaluation uses the EMA weights).",
        f"- Utilisation = codes used at least once over {_usage_set_audio(runs)} / K (perplexity and dead codes over the "
        "same tokens): covering K codes needs many tokens, so this set is larger than the one for the quality metrics.",
        f"- Quality over {_quality_set_audio(runs)}, each reconstructed whole and passed through 16-bit PCM "
        "(`simvq.evaluation.evaluate`): PESQ wide-band at 16 kHz (1.0-4.64), STOI (0-1), DNSMOS P.835 OVRL (1-5; the "
        "`speechmos` ONNX models), V/UV F1 of CREPE voicing (threshold 0.21"
        + (f"; model {', '.join(crepe)}" if crepe else "")
        + "), mel distance (mean L1 of natural-log mel spectrograms; lower is better). Bitrate = tokens/s x log2 K.",
    ]
    if crepe and all(c.endswith("tiny") for c in crepe):
        out.append("- V/UV F1 uses CREPE `tiny` on a CPU (the paper's is `full`, ~50x slower here; set "
                   "SIMVQ_CREPE_MODEL=full to use it): comparable between our runs, not with the paper's numbers.")
    for name, reason in sorted(unavailable.items()):
        out.append(f"- Not computed: {name}: {reason.rstrip('.')}.")
    out.append(
        "- Figures are mean ± sample standard deviation over seeds; with one seed a single value. A difference "
        "smaller than the sum of both spreads is reported as within the seed spread."
    )
    if results.get("parallel_runs"):
        out.append(f"- Timing: {_n(results['parallel_runs'], 'run')} trained side by side as one-thread processes on "
                   f"{env['cpu_count']} CPU core(s); steps/s and wall times are per run under that sharing (and under "
                   "any other load on the machine), so they compare runs of one report, not machines.")
    for note in results["notes"]:
        out.append(f"- Note: {note}")
    lc = [r.get("lc_codebook") for r in runs if r.get("lc_codebook")]
    if lc:
        out.append(f"- VQGAN-LC frozen codebook: {lc[0]}.")
    out += ["", "## Results (ours)", ""]
    has_utmos = any("utmos" in e["metrics"] for e in summary)
    header = ["quantizer", "K", "utilisation %", "perplexity", "dead codes", "PESQ", "STOI", "DNSMOS OVRL",
              "V/UV F1" + (f" ({', '.join(crepe)})" if crepe else ""), "mel distance"]
    if has_utmos:
        header.append("UTMOS")
    header += ["kbps", "steps", "steps/s", "quantizer params (trainable)", "diverged"]
    rows = []
    for size in sizes:
        for v in spec["quantizers"]:
            e = _get(summary, v, size)
            if e is None:
                continue
            mt = e["metrics"]
            row = [e["label"], str(e["codebook_size"]), fmt_stat(mt.get("utilization"), "pct"),
                   fmt_stat(mt.get("perplexity"), "0f"), fmt_stat(mt.get("dead_codes"), "0f"),
                   fmt_stat(mt.get("pesq"), "2f"), fmt_stat(mt.get("stoi"), "3f"), fmt_stat(mt.get("dnsmos_ovrl"), "2f"),
                   fmt_stat(mt.get("vuv_f1"), "3f"), fmt_stat(mt.get("mel_distance"), "3f")]
            if has_utmos:
                row.append(fmt_stat(mt.get("utmos"), "2f"))
            row += [_fmt(mt["bitrate_bps"]["mean"] / 1000, "3f") if "bitrate_bps" in mt else "n/a",
                    *_run_columns(e, "2f")]
            rows.append(row)
    out.append(_table(header, rows))
    out += ["", "More per run in `results.json` (DNSMOS SIG/BAK/P.808, periodicity and pitch errors, wall times, "
            "peak memory, training histories).", "", "Quantizers:", ""]
    out += _quantizer_lines(spec["quantizers"], variants)
    out += _retrofit_lines(results.get("retrofit"), [("PESQ", "pesq", "2f"), ("STOI", "stoi", "3f"), ("mel distance", "mel_distance", "3f")])
    out += ["", "## Figures", ""]
    window = base["trainer"]["log_every"] * d["batch_size"] * _math.ceil(round(d["segment_seconds"] * m["sample_rate"]) / hop)
    visible = ", ".join(f"{min(1.0, window / k) * 100:.0f}% of K = {k}" for k in sizes)
    for key, caption in (
        ("utilization_over_steps", "Codebook utilisation over training: codes used per logging window of "
                                   f"{base['trainer']['log_every']} steps ({window:,} training tokens, so at most "
                                   f"{visible} can show)"),
        ("quality", "Held-out utilisation and quality per quantizer (largest K; error bars: std over seeds)"),
        ("code_usage", "Sorted code-usage histograms on the held-out set (largest K, first seed)"),
        ("spectrograms", "Log-mel spectrograms of held-out utterances: original and each quantizer's reconstruction "
                         "(largest K, first seed)"),
        ("loss_curves", "Training losses"),
        ("codebook_scaling", "Codebook-size scaling: held-out utilisation, PESQ and mel distance against K"),
        ("retrofit", "Retrofit experiment"),
    ):
        if figures.get(key):
            out += [f"![{caption}]({figures[key]})", "", f"*{caption}.*", ""]
    out += ["## Published figures (SimVQ paper, LibriTTS at 24 kHz; another scale, not ours)", "",
            "The paper's audio table (LibriTTS test-clean / test-other): 24 kHz models with 512-d tokens and a "
            "768-wide Vocos decoder, trained with MPD/MRD(/DAC) GAN losses on LibriTTS and evaluated on real recorded "
            "speech. They are not comparable in absolute value with the small CPU runs above"
            + (" (no UTMOS here: its weights are not available offline; DNSMOS is a different MOS predictor)"
               if not has_utmos else "")
            + ". At that scale SimVQ uses 95-100% of its codes at every size.", ""]
    out.append(_table(["method", "kbps", "utilisation % (clean / other)", "UTMOS", "PESQ", "STOI", "V/UV F1"],
                      [[row[0], f"{row[1]:g}", _pair(row[2]), _pair(row[3]), _pair(row[4]), _pair(row[5]), _pair(row[6])]
                       for row in PUBLISHED_LIBRITTS]))
    out += ["", "Raw numbers of every run, with training histories: `results.json`.", ""]
    return "\n".join(out)


# ----- a small Markdown -> HTML writer (the subset the report uses) -------------------------------------
def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"(?<![*\w])\*([^*]+)\*(?![*\w])", r"<em>\1</em>", text)
    return text


def markdown_to_html(md: str, *, title: str) -> str:
    """Headings, paragraphs, bullet lists, pipe tables, images, code spans, bold and italics."""
    body, lines, i = [], md.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        m = re.match(r"(#{1,6}) (.*)", line)
        if m:
            n = len(m.group(1))
            body.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
            i += 1
            continue
        m = re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line.strip())
        if m:
            body.append(f'<p><img src="{html.escape(m.group(2))}" alt="{html.escape(m.group(1))}" style="max-width:100%"></p>')
            i += 1
            continue
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, rest = rows[0], [r for r in rows[1:] if not all(set(c) <= set("-:") for c in r)]
            t = ["<table>", "<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"]
            t += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest]
            body.append("\n".join(t + ["</table>"]))
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            body.append("<ul>\n" + "\n".join(items) + "\n</ul>")
            continue
        para = []
        while i < len(lines) and lines[i].strip() and not re.match(r"(#{1,6} |\||- |!\[)", lines[i]):
            para.append(lines[i])
            i += 1
        body.append(f"<p>{_inline(' '.join(para))}</p>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
             "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #bbb;padding:3px 7px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}code{background:#f3f3f3;padding:0 3px}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


__all__ = ["PUBLISHED_IMAGENET", "PUBLISHED_LIBRITTS", "audio_verdict", "render_audio_markdown", "fmt_stat", "merged_eval", "markdown_to_html", "render_markdown", "stats", "summarise", "verdict",
           "write_report"]
