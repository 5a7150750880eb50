"""Prior run configuration: YAML presets in ``simvq/configs/prior/``, ``key.sub=value`` overrides, validation.

Sections (every key has a default, so a preset only states its differences)::

    seed: 0
    model:   width, depth, heads, positions (rope | learned), rope_base, dropout, label_dropout,
             ffn_multiple_of, conditional (use the data set's labels when it has them)
    data:    batch_size, eval_batch_size, encode_batch_size, train_limit, eval_limit
             (limits: "tokenizer" = the tokenizer config's own value; null = all; an integer = the first N),
             frames, crops (audio tokenizers only: a prior item is a window of ``frames`` tokens, grid
             ``(1, frames)``; ``crops`` random training crops per training clip)
    optim:   lr, betas, weight_decay, warmup_steps, schedule (cosine | constant), min_lr_ratio, grad_clip
    trainer: max_steps, log_every, checkpoint_every, accelerator, num_threads
    eval:    samples, seed, batch_size, temperature, top_k, top_p, cfg_scale, classifier_steps

The saved ``config.yaml`` of a trained prior adds ``tokenizer`` (folder and config hash) and the sizes read
from it (``model.codebook_size``, ``model.grid``, ``model.num_classes``).
"""

from __future__ import annotations

import copy
from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "prior"

DEFAULTS: dict = {
    "seed": 0,
    "model": {
        "width": 256,
        "depth": 4,
        "heads": 4,
        "positions": "rope",
        "rope_base": 10000.0,
        "dropout": 0.0,
        "label_dropout": 0.1,
        "ffn_multiple_of": 64,
        "conditional": True,
    },
    "data": {
        "batch_size": 32,
        "eval_batch_size": 64,
        "encode_batch_size": 256,
        "train_limit": "tokenizer",
        "eval_limit": "tokenizer",
        "frames": None,   # audio: tokens per window (required for an audio tokenizer, unset for images)
        "crops": 1,       # audio: random training crops per training clip
    },
    "optim": {
        "lr": 1.0e-3,
        "betas": [0.9, 0.95],
        "weight_decay": 0.05,
        "warmup_steps": 50,
        "schedule": "cosine",
        "min_lr_ratio": 0.1,
        "grad_clip": 1.0,
    },
    "trainer": {
        "max_steps": 1000,
        "log_every": 50,
        "checkpoint_every": 200,
        "accelerator": "cpu",
        "num_threads": None,
    },
    "eval": {
        "samples": 500,
        "seed": 0,
        "batch_size": 250,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "cfg_scale": 1.0,
        "classifier_steps": 800,
    },
}
# what fixes the model's shape: a resumed run must agree on these
RUN_KEYS = ("seed", "model")
SIZE_KEYS = ("codebook_size", "grid", "num_classes")  # filled from the tokenizer, not set by users


def list_prior_presets() -> list[str]:
    return sorted(f"prior/{p.stem}" for p in PRESET_DIR.glob("*.yaml"))


def find_prior_config(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = str(name_or_path).removesuffix(".yaml")
    name = name.removeprefix("prior/")
    preset = PRESET_DIR / f"{name}.yaml"
    if preset.is_file():
        return preset
    raise FileNotFoundError(
        f"no prior config file or preset called {str(name_or_path)!r}; give a YAML path or one of: "
        f"{', '.join(list_prior_presets())}"
    )


def _merge(base: dict, update: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        name = f"{where}{key}"
        # "tokenizer" and the model sizes are written by training into a prior's saved config.yaml
        allowed = name == "tokenizer" or (where == "model." and key in SIZE_KEYS)
        if key not in base and not allowed:
            known = ", ".join(sorted(base))
            raise ValueError(f"unknown prior config key {name!r}; known keys{' in ' + where[:-1] if where else ''}: {known}")
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value, f"{name}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _num(cfg, dotted, *, kind=float, low=None, high=None, low_open=False, allow_none=False, high_open=False):
    section, key = dotted.split(".") if "." in dotted else (None, dotted)
    value = cfg[section][key] if section else cfg[key]
    if value is None and allow_none:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else (f"< {high}" if high_open else f"<= {high}")
        what = "an integer" if kind is int else "a number"
        rng = " and ".join(x for x in (lo, hi) if x)
        raise ValueError(f"prior config {dotted} must be {what}{' ' + rng if rng else ''}{' or null' if allow_none else ''}, got {value!r}")
    if section:
        cfg[section][key] = float(value) if kind is float else value


def validate_prior_config(cfg: dict) -> dict:
    """Check every value; raises ValueError naming the key, the allowed range and the value given."""
    from simvq.prior.model import POSITIONS

    _num(cfg, "seed", kind=int)
    m = cfg["model"]
    for key in ("width", "depth", "heads", "ffn_multiple_of"):
        _num(cfg, f"model.{key}", kind=int, low=1)
    if m["width"] % m["heads"] or (m["width"] // m["heads"]) % 2:
        raise ValueError(f"prior config model.width ({m['width']}) must split into model.heads ({m['heads']}) heads of even size")
    if m["positions"] not in POSITIONS:
        raise ValueError(f"prior config model.positions must be one of {POSITIONS}, got {m['positions']!r}")
    _num(cfg, "model.rope_base", low=0, low_open=True)
    _num(cfg, "model.dropout", low=0, high=1, high_open=True)
    _num(cfg, "model.label_dropout", low=0, high=1, high_open=True)
    if not isinstance(m["conditional"], bool):
        raise ValueError(f"prior config model.conditional must be true or false, got {m['conditional']!r}")
    for key in ("batch_size", "eval_batch_size", "encode_batch_size"):
        _num(cfg, f"data.{key}", kind=int, low=1)
    _num(cfg, "data.frames", kind=int, low=1, allow_none=True)
    _num(cfg, "data.crops", kind=int, low=1)
    for key in ("train_limit", "eval_limit"):
        if cfg["data"][key] != "tokenizer":
            _num(cfg, f"data.{key}", kind=int, low=1, allow_none=True)
    o = cfg["optim"]
    _num(cfg, "optim.lr", low=0, low_open=True)
    _num(cfg, "optim.weight_decay", low=0)
    _num(cfg, "optim.warmup_steps", kind=int, low=0)
    _num(cfg, "optim.min_lr_ratio", low=0, high=1)
    _num(cfg, "optim.grad_clip", low=0, low_open=True, allow_none=True)
    if not (isinstance(o["betas"], (list, tuple)) and len(o["betas"]) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o["betas"])):
        raise ValueError(f"prior config optim.betas must be two numbers in [0, 1), got {o['betas']!r}")
    if o["schedule"] not in ("cosine", "constant"):
        raise ValueError(f"prior config optim.schedule must be 'cosine' or 'constant', got {o['schedule']!r}")
    _num(cfg, "trainer.max_steps", kind=int, low=1)
    _num(cfg, "trainer.log_every", kind=int, low=1)
    _num(cfg, "trainer.checkpoint_every", kind=int, low=1)
    _num(cfg, "trainer.num_threads", kind=int, low=1, allow_none=True)
    if cfg["trainer"]["accelerator"] not in ("cpu", "cuda", "gpu", "mps", "auto"):
        raise ValueError(f"prior config trainer.accelerator must be cpu, cuda, gpu, mps or auto, got {cfg['trainer']['accelerator']!r}")
    _num(cfg, "eval.samples", kind=int, low=1)
    _num(cfg, "eval.seed", kind=int)
    _num(cfg, "eval.batch_size", kind=int, low=1)
    _num(cfg, "eval.temperature", low=0, low_open=True)
    _num(cfg, "eval.top_k", kind=int, low=0)
    _num(cfg, "eval.top_p", low=0, high=1, low_open=True)
    _num(cfg, "eval.cfg_scale", low=0)
    _num(cfg, "eval.classifier_steps", kind=int, low=1)
    return cfg


def load_prior_config(source: str | Path | dict = "prior/fashion-cpu", overrides: list[str] | None = None) -> dict:
    """A validated prior config from a preset name, a YAML path or a dict, with ``key.sub=value`` overrides."""
    from simvq.config import apply_overrides, load_yaml

    if isinstance(source, dict):
        raw = copy.deepcopy(source)
    else:
        raw = load_yaml(find_prior_config(source))
    raw = apply_overrides(raw, overrides)
    raw = _floats(raw)
    return validate_prior_config(_merge(DEFAULTS, raw))


def _floats(obj):
    # YAML 1.1 reads "1e-3" as a string; every such value here is a number
    if isinstance(obj, dict):
        return {k: _floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_floats(v) for v in obj]
    if isinstance(obj, str) and obj[:1] in "+-.0123456789" and "e" in obj.lower():
        try:
            return float(obj)
        except ValueError:
            return obj
    return obj


def run_key(cfg: dict) -> dict:
    """The part of a config a resumed run must share with the interrupted one."""
    return {k: cfg.get(k) for k in RUN_KEYS}


__all__ = ["DEFAULTS", "find_prior_config", "list_prior_presets", "load_prior_config", "run_key", "validate_prior_config"]
