"""What a trial is scored by: one number from the held-out :func:`simvq.evaluation.evaluate` result."""

from __future__ import annotations

import math

# objective -> (direction, the evaluate() keys that can provide it, first found wins)
METRICS = {
    "psnr": ("maximize", ("psnr_official_batch64",)),
    "utilization": ("maximize", ("utilization",)),
    "fid": ("minimize", ("rfid", "proxy_fid_random_conv")),
}
OBJECTIVES = (*METRICS, "weighted")
DEFAULT_WEIGHTS = {"psnr": 1.0, "utilization": 10.0}


def parse_weights(text: str | None) -> dict[str, float]:
    """``"psnr=1,utilization=10,fid=-0.1"`` -> a dict (ValueError for an unknown metric or a bad number)."""
    if text is None:
        return dict(DEFAULT_WEIGHTS)
    out = {}
    for part in str(text).split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in METRICS:
            raise ValueError(f"--weights {text!r}: each term must be METRIC=NUMBER with METRIC one of {', '.join(METRICS)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"--weights {text!r}: {value!r} is not a number") from None
    return out


def direction(objective: str) -> str:
    return "maximize" if objective == "weighted" else METRICS[objective][0]


def needed_metrics(objective: str, weights: dict[str, float], min_utilization: float | None) -> list[str]:
    names = [k for k, w in weights.items() if w] if objective == "weighted" else [objective]
    if min_utilization is not None and "utilization" not in names:
        names.append("utilization")
    return names


def metric_key(result: dict, name: str) -> str | None:
    """The evaluate() key that provides metric ``name`` in ``result`` (None when the modality has none)."""
    return next((k for k in METRICS[name][1] if isinstance(result.get(k), (int, float))), None)


def check_available(result: dict, names: list[str], modality: str) -> None:
    """ValueError when this modality's evaluation does not produce a needed metric."""
    missing = [n for n in names if metric_key(result, n) is None]
    if missing:
        have = sorted(n for n in METRICS if metric_key(result, n) is not None)
        raise ValueError(
            f"the {modality} evaluation does not produce {', '.join(missing)} (keys {', '.join(k for n in missing for k in METRICS[n][1])}); "
            f"objectives available here: {', '.join([*have, 'weighted'])}"
        )


def metrics_of(result: dict) -> dict[str, float]:
    """``{"psnr": .., "utilization": .., "fid": ..}`` for the metrics ``result`` holds."""
    out = {}
    for name in METRICS:
        key = metric_key(result, name)
        if key is not None:
            out[name] = float(result[key])
    return out


def score(result: dict, objective: str, weights: dict[str, float]) -> float:
    """The trial value: the metric itself, or ``sum(weight * metric)`` (maximised) for ``weighted``."""
    values = metrics_of(result)
    if objective != "weighted":
        return values.get(objective, math.nan)
    return float(sum(w * values.get(name, math.nan) for name, w in weights.items() if w))


__all__ = ["DEFAULT_WEIGHTS", "METRICS", "OBJECTIVES", "check_available", "direction", "metrics_of",
           "needed_metrics", "parse_weights", "score"]
