"""What defines a comparison: the arguments, their defaults per modality and their checks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from simvq.compare.generation import check_spec as check_generation
from simvq.compare.modality import compare_modality, preset_defaults
from simvq.compare.variants import VARIANTS


class _Default:
    """The "not given" marker of :class:`CompareSpec` fields whose default depends on the modality."""

    def __repr__(self) -> str:
        return "DEFAULT"

    def __reduce__(self):  # one marker, also after pickling to a worker process
        return "DEFAULT"


DEFAULT = _Default()


@dataclass(frozen=True)
class Budget:
    """Training length of every run: ``steps`` each, or ``minutes`` in total split evenly across runs."""

    steps: int | None = None
    minutes: float | None = None

    @property
    def text(self) -> str:
        return f"{self.steps} steps" if self.steps is not None else f"{self.minutes:.3g} minutes in total"


def parse_budget(text) -> Budget:
    """``"500"`` / ``500`` -> 500 steps per run; ``"5m"``, ``"5min"``, ``"90s"`` -> a total time budget."""
    if isinstance(text, Budget):
        return text
    if isinstance(text, bool):
        raise ValueError(f"budget must be a step count (e.g. 500) or a duration (e.g. 5m), got {text!r}")
    if isinstance(text, int):
        if text < 1:
            raise ValueError(f"budget must be at least 1 step, got {text}")
        return Budget(steps=text)
    s = str(text).strip().lower()
    m = re.fullmatch(r"(\d+)(?:\s*steps?)?", s)
    if m:
        return parse_budget(int(m.group(1)))
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*(m|min|mins|minutes?|s|sec|secs|seconds?|h|hours?)", s)
    if m:
        value = float(m.group(1))
        unit = m.group(2)[0]
        minutes = value / 60 if unit == "s" else value * 60 if unit == "h" else value
        if not minutes > 0:
            raise ValueError(f"budget must be a positive duration, got {text!r}")
        return Budget(minutes=minutes)
    raise ValueError(
        f"budget {text!r} is neither a step count (e.g. 500: steps per run) nor a duration (e.g. 5m or 90s: "
        "total time, split across runs)"
    )


def _int_list(values, what: str) -> list[int]:
    if isinstance(values, str):
        values = [v for v in re.split(r"[,\s]+", values.strip()) if v]
    out = []
    for v in values:
        try:
            iv = int(v)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be whole numbers, got {v!r}") from None
        if isinstance(v, float) and v != iv:
            raise ValueError(f"{what} must be whole numbers, got {v!r}")
        out.append(iv)
    if not out:
        raise ValueError(f"give at least one value for {what}")
    if len(set(out)) != len(out):
        raise ValueError(f"{what} lists a value twice: {out}")
    return out


def _name_list(values) -> list[str]:
    if isinstance(values, str):
        values = [v for v in re.split(r"[,\s]+", values.strip()) if v]
    names = [str(v) for v in values]
    if not names:
        raise ValueError(f"give at least one quantizer; choose from {', '.join(VARIANTS)}")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown quantizer(s) {', '.join(map(repr, unknown))}; choose from {', '.join(VARIANTS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a quantizer is listed twice: {names}")
    return names


def _size_limits(value) -> dict:
    """``{variant: largest K or None}`` from a dict or ``"ibq=4096,vq=none"``."""
    if isinstance(value, str):
        pairs = [p for p in re.split(r"[,\s]+", value.strip()) if p]
        if any("=" not in p for p in pairs):
            raise ValueError(f"--size-limit takes VARIANT=K pairs (e.g. ibq=4096, or ibq=none to lift a limit), got {value!r}")
        value = dict(p.split("=", 1) for p in pairs)
    if not isinstance(value, dict):
        raise ValueError(f"size_limits must be a dict or 'variant=K,...', got {value!r}")
    out = {}
    for name, limit in value.items():
        if name not in VARIANTS:
            raise ValueError(f"--size-limit names an unknown quantizer {name!r}; known: {', '.join(VARIANTS)}")
        if limit is None or str(limit).strip().lower() == "none":
            out[name] = None
            continue
        try:
            out[name] = int(limit)
        except (TypeError, ValueError):
            raise ValueError(f"--size-limit {name}={limit!r}: the limit must be a whole codebook size or 'none'") from None
        if out[name] < 2:
            raise ValueError(f"--size-limit {name}={limit}: the limit must be >= 2")
    return out


@dataclass
class CompareSpec:
    """Everything that defines a comparison (validated by :meth:`check` before any training).

    The modality (image or audio) is the base config's ``modality``; without a config it follows ``data``
    (``speech`` or a folder of wav/flac files: audio; otherwise images). Arguments left at ``DEFAULT`` take
    that modality's default (:data:`~simvq.compare.modality.MODALITY_DEFAULTS`), or a named preset's own
    (:func:`~simvq.compare.modality.preset_defaults`: ``compare/scaling`` has its sizes, quantizers, seed and budget).

    Args:
        quantizers: variant keys (see :data:`VARIANTS`), a list or a comma-separated string (default: the nine
            of ``DEFAULT_QUANTIZERS`` for images; simvq, vq, ema_vq, fsq, lfq for audio).
        codebook_sizes: requested sizes ``K``; FSQ maps each through ``fsq_levels_for`` (the closest
            recommended grid, e.g. 1024 -> 1000 codes), LFQ needs powers of two (default 1024, 8192 for
            images; 4096 for audio).
        seeds: training seeds; two or more give mean +- spread for every figure (default 0, 1 for images;
            0 for audio).
        budget: steps per run (``"300"``) or a total duration (``"5m"``) split evenly across runs (default
            150 steps for images, 300 for audio).
        data: None (the preset's data), a built-in set (``photos``, ``fashion``, ``digits``; ``speech``), a
            folder of images, a folder holding Fashion-MNIST IDX files, or a folder of wav/flac files.
        config: the base training config: a preset name, a YAML path or a dict (default
            ``compare/default``, or ``compare/audio`` for audio data); its ``quantizer`` section is replaced
            per run.
        out: the report folder.
        retrofit: run the retrofit experiment (needs ``vq`` among the quantizers; default on for images,
            off for audio).
        eval_limit: reconstruction metrics on at most this many held-out items (None: ``data.eval_limit``;
            for audio 30 utterances when the config sets none: DNSMOS and CREPE are slow on a CPU).
        usage_items: utilisation, perplexity and dead codes on up to this many held-out items (None: the
            whole held-out split; default 2048 images, every held-out utterance); more than the metrics,
            since covering K codes needs many tokens. ``usage_images`` is the same setting's older name.
        overrides: ``key.sub=value`` strings applied to the base config.
        generation: train one token prior per run and add the generation section (default off; on for
            ``compare/generation``); see :mod:`simvq.compare.generation`.
        prior_config: the prior preset or YAML of every prior (default ``prior/compare-cpu``);
            prior_overrides: ``key.sub=value`` strings applied to it. Both need ``generation``.
        tune: trials per quantizer of an Optuna study before the comparison is run again at each quantizer's
            best settings (0: no tuning; see :mod:`simvq.compare.tuned`).
        tune_budget: training steps per trial (default half the comparison's steps per run).
        size_limits: ``{variant: largest K}``: runs of that quantizer above that size are skipped with a note
            in the report (a dict, or ``"ibq=4096,vq=none"``; ``none`` lifts a default limit). Default limits
            keep default runs within their time and apply only when ``quantizers`` is not given: the image
            default runs today's baselines (ibq, vq_cosine, vq_rotation, vq_kmeans) at K = 1,024 only;
            ``compare/scaling`` on a CPU runs IBQ up to K = 4,096.
    """

    quantizers: list = DEFAULT  # type: ignore[assignment]
    codebook_sizes: list = DEFAULT  # type: ignore[assignment]
    seeds: list = DEFAULT  # type: ignore[assignment]
    budget: Budget | str | int = DEFAULT  # type: ignore[assignment]
    data: str | None = None
    config: str | dict | None = None
    out: str | Path = "compare-report"
    retrofit: bool = DEFAULT  # type: ignore[assignment]
    eval_limit: int | None = DEFAULT  # type: ignore[assignment]
    usage_items: int | None = DEFAULT  # type: ignore[assignment]
    overrides: list = field(default_factory=list)
    quantizers_given: bool = False  # the user named the quantizers (then an unrepresentable size is an error)
    usage_images: int | None = DEFAULT  # type: ignore[assignment]
    generation: bool = DEFAULT  # type: ignore[assignment]  # one token prior per run (simvq.compare.generation)
    prior_config: str | dict = DEFAULT  # type: ignore[assignment]  # default prior/compare-cpu
    prior_overrides: list = DEFAULT  # type: ignore[assignment]  # key=value on the prior config
    modality: str = ""  # filled by check(): "image" or "audio"
    tune: int = 0
    tune_budget: int | None = None
    size_limits: dict | str = DEFAULT  # type: ignore[assignment]

    def check(self) -> "CompareSpec":
        """Validate and normalise every argument; raises ValueError / FileNotFoundError with the fix."""
        if self.usage_images is not DEFAULT:
            if self.usage_items is not DEFAULT and self.usage_items != self.usage_images:
                raise ValueError(f"usage_items ({self.usage_items!r}) and its older name usage_images "
                                 f"({self.usage_images!r}) disagree; give one of them")
            self.usage_items = self.usage_images
        self.overrides = list(self.overrides or [])
        self.modality = compare_modality(self.config, self.data, self.overrides)
        defaults = preset_defaults(self.modality, self.config)  # a named preset may bring its own (compare/scaling)
        for name in ("quantizers", "codebook_sizes", "seeds", "budget", "retrofit", "usage_items"):
            if getattr(self, name) is DEFAULT:
                value = defaults[name]
                setattr(self, name, list(value) if isinstance(value, tuple) else value)
        if self.eval_limit is DEFAULT:
            self.eval_limit = None  # base_config applies the modality's default when the config sets none
        self.quantizers = _name_list(self.quantizers)
        self.codebook_sizes = _int_list(self.codebook_sizes, "codebook sizes")
        if any(k < 2 for k in self.codebook_sizes):
            raise ValueError(f"codebook sizes must be >= 2, got {self.codebook_sizes}")
        self.seeds = _int_list(self.seeds, "seeds")
        if any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be >= 0, got {self.seeds}")
        self.budget = parse_budget(self.budget)
        if self.eval_limit is not None and (isinstance(self.eval_limit, bool) or not isinstance(self.eval_limit, int)
                                            or self.eval_limit < 1):
            raise ValueError(f"eval_limit must be a positive integer, got {self.eval_limit!r}")
        if self.usage_items is not None and (isinstance(self.usage_items, bool) or not isinstance(self.usage_items, int)
                                             or self.usage_items < 1):
            raise ValueError(f"usage_items must be a positive integer or None (all), got {self.usage_items!r}")
        self.usage_images = self.usage_items
        if isinstance(self.tune, bool) or not isinstance(self.tune, int) or self.tune < 0:
            raise ValueError(f"--tune must be a whole number of trials per quantizer (0: no tuning), got {self.tune!r}")
        if self.tune_budget is not None and (isinstance(self.tune_budget, bool) or not isinstance(self.tune_budget, int)
                                             or self.tune_budget < 1):
            raise ValueError(f"--tune-budget must be a positive number of training steps per trial, got {self.tune_budget!r}")
        if self.tune and self.tune_budget is None and self.budget.steps is None:
            raise ValueError("--tune with a time --budget needs --tune-budget STEPS (training steps per trial)")
        if self.tune_budget is not None and not self.tune:
            raise ValueError("--tune-budget sets the steps of a tuning trial; it needs --tune N")
        given = {} if self.size_limits is DEFAULT else _size_limits(self.size_limits)
        # a default limit keeps a default run within its time; quantizers the user named run at every size asked
        preset = {k: v for k, v in defaults.get("size_limits", {}).items() if not self.quantizers_given}
        self.size_limits = {**preset, **given}  # None: no limit (kept, so that a second check() keeps it lifted)
        self.retrofit = bool(self.retrofit)
        check_generation(self, defaults, DEFAULT)
        self.out = Path(self.out)
        if self.out.exists() and not self.out.is_dir():
            raise FileExistsError(f"--out {self.out} exists and is not a folder; choose another report folder")
        return self


__all__ = ["DEFAULT", "Budget", "CompareSpec", "parse_budget"]
