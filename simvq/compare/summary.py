"""Run records -> one summary entry per (quantizer, codebook size), every number as mean ± spread over seeds."""

from __future__ import annotations

import math

from simvq.compare.records import merged_eval

#: metrics summarised over seeds: (key in the summary, where it comes from, label, format)
SUMMARY_METRICS = [
    ("utilization", "eval", "utilisation (%)", "pct"),
    ("perplexity", "eval", "perplexity", "0f"),
    ("dead_codes", "eval", "dead codes", "0f"),
    ("tokens", "eval", "held-out tokens counted for usage", "0f"),
    ("sample_coverage", "eval", "Good-Turing coverage of the usage sample", "3f"),
    ("estimated_used_codes", "eval", "codes in use, Chao1 estimate", "0f"),
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
        levels = [merged_eval(r).get("level_utilization") for r in ok]
        if levels and all(isinstance(x, list) and len(x) == len(levels[0]) for x in levels):  # residual stacks
            entry["metrics"]["level_utilization"] = [stats([x[i] for x in levels]) for i in range(len(levels[0]))]
        out.append(entry)
    return out


# ----- formatting ---------------------------------------------------------------------------------------
def fmt(v: float | None, kind: str) -> str:
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
        return fmt(s["mean"], kind)
    return f"{fmt(s['mean'], kind)} ± {fmt(s['std'], kind)}"


def get(summary: list[dict], variant: str, size: int) -> dict | None:
    return next((e for e in summary if e["variant"] == variant and e["requested_size"] == size), None)


def metric(entry: dict | None, key: str) -> dict | None:
    return None if entry is None else entry["metrics"].get(key)


def beyond_spread(a: dict, b: dict) -> bool:
    spread = (a.get("std") or 0.0) + (b.get("std") or 0.0)
    return abs(a["mean"] - b["mean"]) > spread


__all__ = ["SUMMARY_METRICS", "beyond_spread", "fmt", "fmt_stat", "get", "metric", "stats", "summarise"]
