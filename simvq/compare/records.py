"""Run records: one JSON file per finished run (written atomically), and what a record's numbers are."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from simvq.io import save_file_atomic

#: the record format; records of another version are trained again
RESULT_VERSION = 1
#: the training-history keys a record keeps
HISTORY_KEYS = ("step", "loss", "l1", "mel_loss", "quant_loss", "commitment", "codebook", "aux", "utilization",
                "perplexity", "dead_codes", "time_s", "diverged", "reason")
#: the numbers the usage measurement provides (over its larger held-out set)
USAGE_KEYS = ("utilization", "perplexity", "dead_codes", "used_codes", "tokens", "sample_coverage", "estimated_used_codes",
              "level_utilization")


def json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def save_record(out: Path, record: dict) -> None:
    """Write ``out/runs/<key>.json`` atomically (a crash never leaves half a record)."""
    save_file_atomic(Path(out) / "runs" / f"{record['key']}.json", json.dumps(record, indent=1, default=json_default) + "\n")


def load_run(path: Path) -> dict | None:
    """A finished run's record, or None when the file is missing, unreadable or from another version."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if record.get("version") != RESULT_VERSION or record.get("status") not in ("ok", "diverged"):
        return None
    return record


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


__all__ = ["HISTORY_KEYS", "RESULT_VERSION", "USAGE_KEYS", "json_default", "load_run", "merged_eval", "save_record"]
