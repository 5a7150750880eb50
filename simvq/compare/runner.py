"""Plan, check and run the comparison; every finished run is a JSON file, so a rerun trains nothing twice.

A *run* is one (quantizer variant, codebook size, seed) trained with the same base config (model, data,
optimiser, steps) through :func:`simvq.training.train` and evaluated on held-out data through
:func:`simvq.evaluation.evaluate`. Runs are keyed by ``<variant>-K<size>-seed<seed>-<hash>`` where the hash
covers the whole training config and the budget, so changing anything that changes a run's meaning makes
new runs instead of silently reusing old ones.

Output folder layout::

    OUT/report.md, report.html, results.json, plots/*.png     the report (see simvq.compare.report)
    OUT/runs/<key>.json                                        one finished run (metrics, history, costs)
    OUT/work/<key>/                                            its training folder (checkpoint, model/)
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("simvq.compare")

#: the compare preset (a normal training config; its quantizer section is replaced per run)
DEFAULT_CONFIG = "compare/default"
DEFAULT_CODEBOOK_SIZES = (1024, 8192)
DEFAULT_SEEDS = (0, 1)
DEFAULT_BUDGET = "150"
#: the audio compare preset (``audio/speech-small`` sized for a 2-core CPU)
DEFAULT_AUDIO_CONFIG = "compare/audio"
RESULT_VERSION = 1


class _Default:
    """The "not given" marker of :class:`CompareSpec` fields whose default depends on the modality."""

    def __repr__(self) -> str:
        return "DEFAULT"

    def __reduce__(self):  # one marker, also after pickling to a worker process
        return "DEFAULT"


DEFAULT = _Default()


@dataclass(frozen=True)
class Variant:
    """One quantizer setting of the comparison.

    Attributes:
        key: the name used on the command line (``--quantizers simvq,vq``).
        label: the name in tables and plots.
        quantizer: the config's ``quantizer`` section without ``codebook_size``.
        sizes: how a requested codebook size maps to the quantizer: ``"any"``, ``"fsq"`` (through
            :func:`simvq.quantizers.factory.fsq_levels_for`) or ``"pow2"`` (LFQ: ``2**bits``).
        note: one line for the report.
    """

    key: str
    label: str
    quantizer: dict
    sizes: str = "any"
    note: str = ""


VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        Variant("simvq", "SimVQ", {"name": "simvq"}, note="frozen random C, learned linear W (official setting)"),
        Variant("vq", "VQ", {"name": "vq"}, note="plain VQ-VAE codebook trained by the codebook loss"),
        Variant("ema_vq", "EMA VQ", {"name": "ema_vq"}, note="codebook as an exponential moving average"),
        Variant(
            "factorized_vq",
            "Factorised VQ",
            {"name": "factorized_vq", "codebook_dim": 4},
            note="low-dimensional (4-d) l2-normalised codebook between two projections (ViT-VQGAN)",
        ),
        Variant(
            "lc_vq",
            "VQGAN-LC",
            {"name": "lc_vq"},
            note="frozen codebook of k-means centroids of encoder features + learned projector",
        ),
        Variant("fsq", "FSQ", {"name": "fsq"}, sizes="fsq", note="finite scalar quantization, levels from the FSQ paper"),
        Variant("lfq", "LFQ", {"name": "lfq"}, sizes="pow2", note="lookup-free quantization with entropy loss"),
        Variant(
            "simvq_mlp",
            "SimVQ (MLP)",
            {"name": "simvq", "transform": "mlp"},
            note="non-linear reparameterisation: Linear-GELU-Linear instead of W",
        ),
        Variant(
            "simvq_learn_c",
            "SimVQ (C+W learned)",
            {"name": "simvq", "learnable_codebook": True},
            note="both C and W trained (the paper predicts C dominates and usage drops)",
        ),
    )
}
DEFAULT_QUANTIZERS = tuple(VARIANTS)

#: what an unset argument means, per modality of the base config. Audio: K = 4096 (the paper's smallest
#: audio codebook), one seed and five quantizers, sized so the default audio compare finishes in about a
#: quarter of an hour on a 2-core CPU (docs/compare.md); utilisation over every held-out utterance.
MODALITY_DEFAULTS: dict[str, dict] = {
    "image": dict(config=DEFAULT_CONFIG, quantizers=DEFAULT_QUANTIZERS, codebook_sizes=DEFAULT_CODEBOOK_SIZES,
                  seeds=DEFAULT_SEEDS, budget=DEFAULT_BUDGET, usage_items=2048, eval_limit=None, retrofit=True),
    "audio": dict(config=DEFAULT_AUDIO_CONFIG, quantizers=("simvq", "vq", "ema_vq", "fsq", "lfq"),
                  codebook_sizes=(4096,), seeds=(0,), budget="300", usage_items=None, eval_limit=30, retrofit=False),
}

#: --data names of the built-in data sets -> (config data.dataset, natural channels, image size)
BUILTIN_DATA = {
    "photos": ("photos", 3, 32),
    "fashion": ("fashion_mnist", 1, 32),
    "fashion_mnist": ("fashion_mnist", 1, 32),
    "digits": ("digits", 1, 16),
}
#: --data names of the built-in audio data sets -> config data.dataset
BUILTIN_AUDIO_DATA = {
    "speech": "speech",  # the espeak-ng corpus of simvq.data.speech (built on first use in ~/.cache/simvq)
}


# ----- arguments ---------------------------------------------------------------------------------------
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


@dataclass
class CompareSpec:
    """Everything that defines a comparison (validated by :meth:`check` before any training).

    The modality (image or audio) is the base config's ``modality``; without a config it follows ``data``
    (``speech`` or a folder of wav/flac files: audio; otherwise images). Arguments left at ``DEFAULT`` take
    that modality's default (:data:`MODALITY_DEFAULTS`).

    Args:
        quantizers: variant keys (see :data:`VARIANTS`), a list or a comma-separated string (default: all
            nine for images; simvq, vq, ema_vq, fsq, lfq for audio).
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
    modality: str = ""  # filled by check(): "image" or "audio"

    def check(self) -> "CompareSpec":
        """Validate and normalise every argument; raises ValueError / FileNotFoundError with the fix."""
        if self.usage_images is not DEFAULT:
            if self.usage_items is not DEFAULT and self.usage_items != self.usage_images:
                raise ValueError(f"usage_items ({self.usage_items!r}) and its older name usage_images "
                                 f"({self.usage_images!r}) disagree; give one of them")
            self.usage_items = self.usage_images
        self.overrides = list(self.overrides or [])
        self.modality = compare_modality(self.config, self.data, self.overrides)
        defaults = MODALITY_DEFAULTS[self.modality]
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
        self.retrofit = bool(self.retrofit)
        self.out = Path(self.out)
        if self.out.exists() and not self.out.is_dir():
            raise FileExistsError(f"--out {self.out} exists and is not a folder; choose another report folder")
        return self


# ----- modality ----------------------------------------------------------------------------------------
def _count_files(path: Path, suffixes: tuple[str, ...], stop: int = 1) -> int:
    """Files under ``path`` (recursively) whose name ends with one of ``suffixes``; stops counting at ``stop``."""
    n = 0
    for root, _, names in os.walk(path, followlinks=True):
        for name in names:
            if name.lower().endswith(suffixes) and not name.startswith("."):
                n += 1
                if n >= stop:
                    return n
    return n


def data_modality(data: str | None) -> str | None:
    """``"image"``, ``"audio"`` or ``"mixed"`` for a ``--data`` value (None: no ``--data``).

    Raises FileNotFoundError for a missing folder or a folder that holds neither audio nor image files, and
    NotADirectoryError for a file.
    """
    if data is None:
        return None
    text = str(data)
    if text in BUILTIN_DATA:
        return "image"
    if text in BUILTIN_AUDIO_DATA:
        return "audio"
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"--data {text!r} is not a built-in data set ({', '.join([*BUILTIN_DATA, *BUILTIN_AUDIO_DATA])}) and no "
            "such folder exists; give an existing folder of images or of wav/flac files, a folder of Fashion-MNIST "
            "IDX files, or a built-in name"
        )
    if not path.is_dir():
        raise NotADirectoryError(f"--data {text!r} is a file; give a folder of images (JPEG/PNG), of audio (wav/flac) "
                                 "or of IDX files")
    if any(re.fullmatch(r"train-images-idx3-ubyte(\.gz)?", p.name) for p in path.iterdir()):
        return "image"
    from simvq.data.audio import AUDIO_EXTENSIONS
    from simvq.data.images import IMAGE_EXTENSIONS

    audio = _count_files(path, tuple(AUDIO_EXTENSIONS))
    images = _count_files(path, tuple(IMAGE_EXTENSIONS))
    if audio and images:
        return "mixed"
    if audio:
        return "audio"
    if images:
        return "image"
    raise FileNotFoundError(
        f"--data {text!r} holds no audio (wav/flac) and no image (JPEG/PNG) files (searched recursively); "
        "give a folder with your recordings or images"
    )


def _raw_config(source: str | dict, overrides: list) -> dict:
    from simvq.config import apply_overrides, find_config, load_yaml

    raw = copy.deepcopy(source) if isinstance(source, dict) else load_yaml(find_config(source))
    return apply_overrides(raw, list(overrides))


def compare_modality(config: str | dict | None, data: str | None, overrides: list | None = None) -> str:
    """The comparison's modality: the config's ``modality``, or without a config the data's (default image).

    Raises ValueError when ``data`` is of another modality than the config (e.g. a folder of wav files with
    an image config), before anything trains.
    """
    kind = data_modality(data)
    if config is None:
        modality_set = [o for o in overrides or [] if str(o).split("=", 1)[0].strip() == "modality"]
        if modality_set:
            raise ValueError("--set modality=... cannot change the default preset's modality; pass --config "
                             f"{DEFAULT_AUDIO_CONFIG} (audio) or {DEFAULT_CONFIG} (images) instead")
        if kind == "mixed":
            raise ValueError(
                f"--data {data!r} holds both audio (wav/flac) and image files; pass --config {DEFAULT_AUDIO_CONFIG} "
                f"to compare audio tokenizers on its audio files or --config {DEFAULT_CONFIG} for its images"
            )
        return kind or "image"
    modality = _raw_config(config, overrides or []).get("modality", "image")
    if modality not in MODALITY_DEFAULTS:
        raise ValueError(f"simvq compare supports image and audio configs; the config's modality is {modality!r}")
    if kind is not None and kind != "mixed" and kind != modality:
        name = config if isinstance(config, str) else "the given config"
        what = "audio data" if kind == "audio" else "image data"
        fix = DEFAULT_AUDIO_CONFIG if kind == "audio" else DEFAULT_CONFIG
        raise ValueError(
            f"--data {data!r} is {what} but {name} is an {modality} config (modality: {modality}); "
            f"use an {kind} config, e.g. --config {fix}, or {modality} data"
        )
    return modality


def size_for(variant: Variant, requested: int) -> tuple[dict, int]:
    """``(quantizer keywords for this size, actual codebook size)``; ValueError when it cannot be done."""
    q = dict(variant.quantizer)
    if variant.sizes == "fsq":
        from simvq.quantizers.factory import fsq_levels_for

        levels = fsq_levels_for(requested)  # ValueError lists the sizes it knows
        q["levels"] = levels
        return q, math.prod(levels)
    if variant.sizes == "pow2" and requested & (requested - 1):
        lower = 1 << (requested.bit_length() - 1)
        raise ValueError(f"LFQ needs a power-of-two codebook size (2**bits); {requested} is not one, use {lower} or {lower * 2}")
    q["codebook_size"] = requested
    return q, requested


def _data_section(data: str | None, base: dict, preset_is_default: bool) -> dict:
    """The ``data`` (and channel) changes that ``--data`` implies."""
    if data is None:
        return {}
    if base.get("modality", "image") == "audio":
        return _audio_data_section(data, base)
    text = str(data)
    if text in BUILTIN_DATA:
        dataset, channels, size = BUILTIN_DATA[text]
        change = {"dataset": dataset, "path": None, "eval_path": None}
        if preset_is_default or dataset == "fashion_mnist":
            change["image_size"] = size if preset_is_default else max(base["data"]["image_size"], size)
        change["channels"] = channels if preset_is_default else base["model"]["in_channels"]
        return change
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"--data {text!r} is not a built-in data set ({', '.join(BUILTIN_DATA)}) and no such folder exists; "
            "give an existing image folder, a folder of Fashion-MNIST IDX files, or a built-in name"
        )
    if not path.is_dir():
        raise NotADirectoryError(f"--data {text!r} is a file; give a folder of images (JPEG/PNG) or of IDX files")
    names = [p.name for p in path.iterdir()]
    idx = any(re.fullmatch(r"train-images-idx3-ubyte(\.gz)?", n) for n in names)
    channels = 3 if preset_is_default else base["model"]["in_channels"]
    if idx:
        if not any(re.fullmatch(r"t10k-images-idx3-ubyte(\.gz)?", n) for n in names):
            raise FileNotFoundError(f"{path} holds train-images-idx3-ubyte but no t10k-images-idx3-ubyte (the held-out split)")
        return {"dataset": "fashion_mnist", "path": str(path), "channels": 1 if preset_is_default else channels,
                "image_size": max(32, base["data"]["image_size"])}
    from simvq.data.images import list_images

    if not list_images(path):  # raises for an empty folder with the reason
        raise FileNotFoundError(f"no JPEG/PNG images under {path}")
    return {"dataset": "folder", "path": str(path), "eval_path": None, "channels": channels}


def _audio_data_section(data: str, base: dict) -> dict:
    """``--data`` of an audio comparison: ``speech`` (the built-in corpus) or a folder of wav/flac files.

    A folder's held-out split is ``data.eval_fraction`` of its files (every n-th in sorted order) unless the
    config names an evaluation folder (``data.eval_path``).
    """
    text = str(data)
    if text in BUILTIN_AUDIO_DATA:
        return {"dataset": BUILTIN_AUDIO_DATA[text], "path": None, "eval_path": None}
    if text in BUILTIN_DATA:
        raise ValueError(f"--data {text!r} is an image data set but the config is an audio config; use --data speech "
                         f"or a folder of wav/flac files, or an image config (e.g. --config {DEFAULT_CONFIG})")
    path = Path(text).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"--data {text!r}: no such folder of wav/flac files (or built-in audio data set: "
                                f"{', '.join(BUILTIN_AUDIO_DATA)})")
    return {"dataset": "folder", "path": str(path)}


def _check_audio_files(data: dict) -> None:
    """A folder's train/held-out split exists (checked before training; scanning reads only file headers)."""
    if data.get("dataset") != "folder":
        return
    from simvq.data.audio import audio_file_splits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bad files are skipped (and reported again when the runs read the folder)
        try:
            train, evals = audio_file_splits(data)
        except ValueError as err:
            raise ValueError(f"{err}; a folder needs at least two readable wav/flac files (one is held out), or set "
                             "data.eval_path to a separate evaluation folder") from None
    log.info("audio folder %s: %d training and %d held-out files", data.get("path"), len(train), len(evals))


def code_dim(config: dict) -> int:
    """The code (token) dimension of a resolved config: ``model.z_channels`` (images), ``model.dimension`` (audio)."""
    m = config["model"]
    return int(m["dimension"] if config.get("modality", "image") == "audio" else m["z_channels"])


def base_config(spec: CompareSpec) -> dict:
    """The resolved base training config (model, data, optimiser) shared by every run."""
    from simvq.config import load_config

    if not spec.modality:
        spec.check()
    preset_is_default = spec.config is None
    source = MODALITY_DEFAULTS[spec.modality]["config"] if spec.config is None else spec.config
    raw = _raw_config(source, spec.overrides)
    raw.setdefault("quantizer", {"name": "simvq"})
    first = load_config(raw)
    change = _data_section(spec.data, first, preset_is_default)
    if change:
        raw.setdefault("data", {})
        raw["data"].update(change)
        model = raw.setdefault("model", {})
        if preset_is_default and "channels" in change:
            model["in_channels"] = change["channels"]
            model["out_channels"] = change["channels"]
    eval_limit = spec.eval_limit
    if eval_limit is None and first["data"].get("eval_limit") is None:
        eval_limit = MODALITY_DEFAULTS[spec.modality]["eval_limit"]
    if eval_limit is not None:
        raw.setdefault("data", {})["eval_limit"] = eval_limit
    trainer = raw.setdefault("trainer", {})
    # the compare records its own history and report; per-run loggers and sample grids would only cost time
    trainer.update(loggers=[], sample_every=0, eval_every=0)
    # the budget alone decides how long each run trains (a preset's own step/epoch/time caps would not be
    # the same for every run of a time budget, and would silently cut a step budget short)
    budget = parse_budget(spec.budget)
    trainer.update(max_steps=budget.steps, max_epochs=None, max_minutes=None)
    config = load_config(raw)
    if config["modality"] == "audio":
        _check_audio_files(config["data"])
    return config


@dataclass
class PlannedRun:
    """One training run of the plan."""

    variant: str
    requested_size: int
    codebook_size: int
    seed: int
    config: dict
    key: str = ""
    kind: str = "compare"  # "compare", "retrofit" or "retrofit_control"


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_key(variant: str, size: int, seed: int, config: dict, budget: Budget, extra: str = "") -> str:
    cfg = copy.deepcopy(config)
    # the step/time limits come from the budget; the rest of the trainer section changes what is trained
    cfg["trainer"].pop("max_steps", None)
    cfg["trainer"].pop("max_minutes", None)
    if cfg.get("modality") == "audio":
        # what is scored does not change what is trained: a new --eval-limit re-evaluates finished audio runs
        # (ensure_eval) instead of training them again
        cfg["data"].pop("eval_limit", None)
    return f"{variant}-K{size}-seed{seed}-{_hash([RESULT_VERSION, cfg, budget.steps, budget.minutes, extra])}"


def plan_runs(spec: CompareSpec, base: dict | None = None) -> tuple[list[PlannedRun], list[str]]:
    """All runs of the comparison and notes on sizes a quantizer cannot take.

    A size that FSQ or LFQ cannot represent is an error when the user named that quantizer, and is
    skipped with a note when it came from the default list.
    """
    spec.check()
    base = base_config(spec) if base is None else base
    runs, notes = [], []
    for name in spec.quantizers:
        variant = VARIANTS[name]
        for requested in spec.codebook_sizes:
            try:
                qcfg, actual = size_for(variant, requested)
            except ValueError as err:
                if spec.quantizers_given:
                    raise ValueError(f"--quantizers {name} cannot run at codebook size {requested}: {err}") from None
                notes.append(f"{variant.label} skipped at K={requested}: {err}")
                continue
            for seed in spec.seeds:
                cfg = copy.deepcopy(base)
                cfg["quantizer"] = dict(qcfg)
                cfg["seed"] = seed
                runs.append(PlannedRun(name, requested, actual, seed, cfg))
    from simvq.config import resolve_config

    from simvq.quantizers import build_quantizer

    checked = set()
    for r in runs:  # a bad quantizer keyword or size surfaces here, before anything trains
        r.config = resolve_config(r.config)
        q = dict(r.config["quantizer"])
        sig = json.dumps(q, sort_keys=True, default=str)
        if sig not in checked:  # the quantizer alone: cheap, and it is the only part that differs per run
            checked.add(sig)
            build_quantizer(q.pop("name"), dim=code_dim(r.config), **q)
        r.key = run_key(r.variant, r.requested_size, r.seed, r.config, spec.budget)
    return runs, notes


# ----- execution -------------------------------------------------------------------------------------
def _atomic_json(path: Path, obj) -> None:
    from simvq.checkpoints import save_file_atomic

    save_file_atomic(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def load_run(path: Path) -> dict | None:
    """A finished run's record, or None when the file is missing, unreadable or from another version."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if record.get("version") != RESULT_VERSION or record.get("status") not in ("ok", "diverged"):
        return None
    return record


@contextmanager
def initial_weights(state_dict: dict, *, strict: bool, modality: str = "image"):
    """Make :func:`simvq.training.train` start from ``state_dict`` (used by the retrofit and VQGAN-LC runs).

    ``train()`` builds its model from the config through the modality's task; this temporarily registers a
    task that loads ``state_dict`` into the freshly built model (``strict=False``: only the given keys,
    e.g. a frozen codebook). The EMA copy is made from the loaded weights; a resumed run then overwrites
    them with its checkpoint, as it should.
    """
    from simvq.training import tasks

    if modality not in tasks.TASKS:
        tasks.get_task({"modality": modality})  # imports (and registers) the modality's task
    original = tasks.TASKS[modality]
    if not isinstance(original, type):
        raise TypeError("initial_weights needs the modality's task to be a Task class")

    class _StartFrom(original):  # type: ignore[misc, valid-type]
        def build_model(self):
            model = super().build_model()
            missing, unexpected = model.load_state_dict(state_dict, strict=False)
            missing = [k for k in missing if not k.endswith("usage.counts")]
            if unexpected or (strict and missing):
                raise ValueError(f"initial weights do not fit the model: missing {missing}, unexpected {unexpected}")
            return model

    tasks.register_task(modality, _StartFrom)
    try:
        yield
    finally:
        tasks.register_task(modality, original)


@contextmanager
def _quiet_lightning():
    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for lg, _ in saved:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _is_divergence(err: BaseException) -> bool:
    text = str(err).lower()
    return any(s in text for s in ("nan", " inf", "non-finite", "not finite"))


def _encoder_features(model_dir: Path, config: dict, count: int, max_passes: int = 32) -> torch.Tensor:
    """``(count, dim)`` encoder output vectors of a trained model on training items (for k-means).

    Items are training crops (images ``(B, dim, h, w)`` or audio ``(B, dim, T)`` features); when one pass over a
    small training set gives fewer than ``count`` vectors, further passes draw other crops (other seeds).
    """
    from simvq.checkpoints import load_tokenizer
    from simvq.data import build_datasets

    model = load_tokenizer(model_dir).eval()
    train_set, _ = build_datasets(config)
    feats, seen = [], 0
    g = torch.Generator().manual_seed(int(config["seed"]))
    order = torch.randperm(len(train_set), generator=g).tolist()
    n = len(order)
    with torch.no_grad():
        for rep in range(max_passes):
            i = 0
            while seen < count and i < n:
                batch = torch.stack([train_set[(j, j + rep * n)] for j in order[i : i + 64]])
                i += 64
                z = model.encoder(batch)
                flat = z.movedim(1, -1).reshape(-1, z.shape[1])
                feats.append(flat)
                seen += flat.shape[0]
            if seen >= count:
                break
    return torch.cat(feats)[:count]


def lc_codebook(run: PlannedRun, donor: dict | None) -> tuple[dict | None, str]:
    """VQGAN-LC's frozen codebook: k-means centroids of encoder features, when a trained encoder exists.

    The encoder is the SimVQ run's of the same size and seed (a trained encoder of this data, as VQGAN-LC
    uses a pretrained backbone); without one the LC quantizer keeps its documented fallback, a random
    frozen matrix.
    """
    if donor is None or not donor.get("model_dir") or not Path(donor["model_dir"]).is_dir():
        return None, "random frozen matrix (no SimVQ encoder of the same size and seed to take features from)"
    from simvq.quantizers.lc import kmeans_init

    k = run.codebook_size
    feats = _encoder_features(Path(donor["model_dir"]), run.config, max(4 * k, 8192))
    # k-means++ seeding is k sequential passes: at large k, random seeding + Lloyd keeps CPU runs short
    init = "kmeans++" if k <= 2048 else "random"
    centroids = kmeans_init(feats, k, iters=10, seed=run.seed, init=init)
    return (
        {"quantize.embedding.weight": centroids},
        f"k-means ({init} seeding, 10 Lloyd iterations) of {feats.shape[0]} encoder features of the trained "
        "SimVQ run with the same K and seed",
    )


def _param_counts(model) -> dict:
    q = model.quantize
    return {
        "params_total": int(sum(p.numel() for p in model.parameters())),
        "params_trainable": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "quantizer_params": int(sum(p.numel() for p in q.parameters())),
        "quantizer_params_trainable": int(sum(p.numel() for p in q.parameters() if p.requires_grad)),
    }


def _save_reconstructions(model, eval_set, work: Path, count: int = 8, *, modality: str = "image") -> dict:
    """Reconstructions for the report's side-by-side figure: the first ``count`` held-out images, or for
    audio three held-out utterances (first, middle, last; at most 6 s each) for the spectrogram figure."""
    if modality == "audio":
        return _save_audio_reconstructions(model, eval_set, work)
    n = min(count, len(eval_set))
    x = torch.stack([eval_set[i] for i in range(n)])
    with torch.no_grad():
        x_hat, _ = model(x)
    recon = work / "reconstructions.pt"
    torch.save({"original": x, "reconstruction": x_hat.clamp(-1, 1)}, recon)
    return {"reconstructions": str(recon)}


def _save_audio_reconstructions(model, eval_set, work: Path, count: int = 3, max_seconds: float = 6.0) -> dict:
    n = len(eval_set)
    picks = sorted({round(i * (n - 1) / max(count - 1, 1)) for i in range(min(count, n))})
    limit = int(max_seconds * model.sample_rate)
    originals, recons = [], []
    with torch.no_grad():
        for i in picks:
            x = eval_set[i][..., :limit]
            x_hat, _ = model(x[None])
            originals.append(x[0])
            recons.append(x_hat[0, 0, : x.shape[-1]].clamp(-1, 1))
    recon = work / "reconstructions.pt"
    torch.save({"original": originals, "reconstruction": recons, "indices": picks,
                "sample_rate": int(model.sample_rate)}, recon)
    return {"reconstructions": str(recon)}


def measure_usage(model_dir: str | Path, config: dict, images: int | None, work: Path) -> dict:
    """Codebook usage over up to ``images`` held-out items (images or utterances), and the per-code counts
    for the figures.

    Covering K codes needs many tokens (at K = 8192, 65,536 tokens are 8 per code, and a code drawn by 1 in
    10,000 tokens is missed half the time), so utilisation is measured on a larger held-out set than the
    reconstruction metrics, in an encoder-and-quantizer pass that costs a fraction of a full evaluation.
    The counting is the quantizer's own CodebookUsage; ``evaluate()`` reports only the aggregates.
    """
    from simvq.checkpoints import load_tokenizer
    from simvq.data import build_datasets, eval_loader

    cfg = copy.deepcopy(config)
    cfg["data"]["eval_limit"] = images
    _, dataset = build_datasets(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_tokenizer(model_dir).eval().to(device)
    usage = model.quantize.usage
    usage.reset()
    samples = 0
    with torch.no_grad():
        for batch in eval_loader(dataset, batch_size=cfg["data"]["eval_batch_size"]):
            model.encode(batch.to(device))
            samples += batch.shape[0] * batch.shape[-1]
    stats = usage.compute()
    work.mkdir(parents=True, exist_ok=True)
    path = work / "usage_counts.pt"
    torch.save(stats.counts.cpu(), path)
    measured = {**stats.as_dict(), "items": len(dataset)}
    if config.get("modality", "image") == "audio":
        measured["seconds"] = samples / float(config["model"]["sample_rate"])
    else:
        measured["images"] = len(dataset)
    return {"usage_counts": str(path), "usage_eval": measured}


def ensure_usage(record: dict, config: dict, images: int | None, out: Path) -> dict:
    """Add (or redo, when measured on another number of items) a finished run's usage measurement."""
    if record.get("status") != "ok" or not record.get("model_dir") or not Path(record["model_dir"]).is_dir():
        return record
    if record.get("usage_eval") and record.get("usage_request", -1) == images:
        return record
    record.update(measure_usage(record["model_dir"], config, images, out / "work" / record["key"]))
    record["usage_request"] = images
    _atomic_json(out / "runs" / f"{record['key']}.json", record)
    return record


def evaluate_run(model_dir: str | Path, config: dict, work: Path) -> dict:
    """``evaluate()`` of a trained model on the run's held-out split, and the reconstructions for the figures.

    Returns the record fields: ``eval`` (the scalar metrics), ``eval_unavailable`` (audio metrics that
    could not run, with the reason), ``eval_request`` (the ``data.eval_limit`` used), parameter counts,
    ``bitrate_bps`` (audio: tokens/s x log2 of the actual codebook size) and ``reconstructions``.
    """
    from simvq.checkpoints import load_tokenizer
    from simvq.data import build_datasets
    from simvq.evaluation import evaluate

    _, eval_set = build_datasets(config)  # once, for the evaluation and the figures' artifacts
    metrics = evaluate(model_dir, eval_set, progress=False)
    fields = {"eval": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and k != "model_dir"}}
    model = load_tokenizer(model_dir).eval()
    fields.update(_param_counts(model))
    modality = config.get("modality", "image")
    if modality == "audio":
        fields["eval_unavailable"] = dict(metrics.get("unavailable") or {})
        fields["eval_request"] = config["data"].get("eval_limit")
        fields["tokens_per_second"] = float(model.tokens_per_second)
        fields["bitrate_bps"] = float(model.tokens_per_second) * math.log2(int(model.quantize.codebook_size))
    fields.update(_save_reconstructions(model, eval_set, work, modality=modality))
    return fields


def ensure_eval(record: dict, config: dict, out: Path) -> dict:
    """Re-evaluate a finished audio run whose evaluation used another ``--eval-limit`` (no retraining)."""
    if config.get("modality", "image") != "audio" or record.get("status") != "ok":
        return record
    if not record.get("model_dir") or not Path(record["model_dir"]).is_dir():
        return record
    if "eval_request" in record and record["eval_request"] == config["data"].get("eval_limit"):
        return record
    record.update(evaluate_run(record["model_dir"], config, out / "work" / record["key"]))
    _atomic_json(out / "runs" / f"{record['key']}.json", record)
    return record


HISTORY_KEYS = ("step", "loss", "l1", "mel_loss", "quant_loss", "commitment", "codebook", "aux", "utilization", "perplexity",
                "dead_codes", "time_s", "diverged", "reason")


def execute_run(run: PlannedRun, *, out: Path, budget: Budget, max_minutes: float | None, progress,
                init_state: dict | None = None, init_strict: bool = False, extra: dict | None = None,
                lc_donor: dict | None = None, threads: int | None = None, usage_images: int | None = None) -> dict:
    """Train and evaluate one run; write ``out/runs/<key>.json`` and return the record.

    ``lc_donor``: the finished SimVQ record whose encoder provides VQGAN-LC's k-means features.
    ``threads``: torch CPU threads for this run (parallel workers use one each).
    ``usage_images``: held-out items (images or utterances) for the utilisation measurement (see
    :func:`measure_usage`).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    extra = dict(extra or {})
    if run.variant == "lc_vq" and run.kind == "compare":
        init_state, extra["lc_codebook"] = lc_codebook(run, lc_donor)
    from simvq.training import train

    work = out / "work" / run.key
    record = {
        "version": RESULT_VERSION,
        "key": run.key,
        "kind": run.kind,
        "variant": run.variant,
        "label": VARIANTS[run.variant].label if run.variant in VARIANTS else run.variant,
        "requested_size": run.requested_size,
        "codebook_size": run.codebook_size,
        "seed": run.seed,
        "quantizer": run.config["quantizer"],
        "budget": budget.text,
    }
    record.update(extra)
    t0 = time.perf_counter()
    steps = budget.steps
    with _quiet_lightning():
        ctx = initial_weights(init_state, strict=init_strict, modality=run.config["modality"]) if init_state else _null()
        try:
            with ctx:
                result = train(run.config, out_dir=work, max_steps=steps, max_minutes=max_minutes, progress=progress,
                               resume=True)
        except (ValueError, FloatingPointError, RuntimeError) as err:
            if not _is_divergence(err):
                raise
            record.update(status="diverged", diverged=True, diverged_reason=str(err), model_dir=None,
                          wall_time_s=time.perf_counter() - t0, history=[], eval={})
            _atomic_json(out / "runs" / f"{run.key}.json", record)
            return record
    record.update(
        steps=result.steps,
        train_time_s=result.wall_time_s,
        steps_per_s=result.steps_per_s,
        peak_memory_mb=result.peak_memory_mb,
        diverged=bool(result.diverged),
        diverged_reason=result.diverged_reason,
        history=[{k: h[k] for k in HISTORY_KEYS if k in h} for h in result.history],
        model_dir=str(result.model_dir) if result.model_dir else None,
    )
    if result.model_dir is not None:
        record.update(evaluate_run(result.model_dir, run.config, work))
        record.update(measure_usage(result.model_dir, run.config, usage_images, work))
        record["usage_request"] = usage_images
    else:
        record["eval"] = {}
    record["wall_time_s"] = time.perf_counter() - t0
    record["status"] = "diverged" if record["diverged"] else "ok"
    _atomic_json(out / "runs" / f"{run.key}.json", record)
    return record


@contextmanager
def _null():
    yield


class Progress:
    """Lines on stderr: ``[3/38] SimVQ K=8192 seed 1: utilisation 97.1%, PSNR 24.3 dB, 14 s (about 6 min left)``."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.done = 0
        self.trained_time = 0.0
        self.trained = 0

    def start(self, text: str) -> None:
        if self.enabled:
            print(f"  starting {text}", file=sys.stderr, flush=True)

    def finish(self, text: str, seconds: float | None = None) -> None:
        self.done += 1
        if seconds is not None:
            self.trained += 1
            self.trained_time += seconds
        if self.enabled:
            eta = ""
            if self.trained and self.done < self.total:
                eta = f" (about {(self.total - self.done) * self.trained_time / self.trained / 60:.1f} min left)"
            print(f"[{self.done}/{self.total}] {text}{eta}", file=sys.stderr, flush=True)


def _summary_line(record: dict) -> str:
    from simvq.compare.report import merged_eval

    ev = merged_eval(record)
    if record.get("status") == "diverged":
        return f"diverged: {record.get('diverged_reason', '')[:100]}"
    util = ev.get("utilization")
    psnr = ev.get("psnr_official_batch64")
    if util is not None and "pesq" in ev:
        return (f"utilisation {util * 100:.1f}%, PESQ {ev['pesq']:.2f}, STOI {ev.get('stoi', float('nan')):.3f}, "
                f"mel distance {ev.get('mel_distance', float('nan')):.3f}, {record.get('wall_time_s', 0):.0f} s")
    return (
        f"utilisation {util * 100:.1f}%, PSNR {psnr:.2f} dB, {record.get('wall_time_s', 0):.0f} s"
        if util is not None and psnr is not None
        else "no evaluation"
    )


def default_jobs() -> int:
    """Parallel runs: one per CPU core, at most 4; 1 on an accelerator (one GPU trains one run at a time)."""
    if torch.cuda.is_available():
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def packed_jobs(runs: int, cores: int, limit: int) -> int:
    """Parallel one-thread processes for ``runs`` equally long runs on ``cores`` CPU cores.

    With ``w`` runs at once on ``c`` cores a wave takes ``max(1, w / c)`` run-lengths: 5 runs on 2 cores take 3
    run-lengths two at a time (the last run alone leaves a core idle) but 2.5 all at once. When every run fits
    within ``limit`` processes they all start together (equal CPU shares, so their steps/s compare fairly);
    otherwise the count with the shortest total time, ties to fewer processes (less memory).
    """
    cores = max(1, int(cores))
    if runs <= cores:
        return cores
    if runs <= limit:
        return runs
    best, best_time = cores, None
    for jobs in range(cores, max(cores, limit) + 1):
        time_needed, left = 0.0, runs
        while left > 0:
            wave = min(jobs, left)
            time_needed += max(1.0, wave / cores)
            left -= wave
        if best_time is None or time_needed < best_time - 1e-9:
            best, best_time = jobs, time_needed
    return best


class _Scheduler:
    """Runs ``execute_run`` calls inline (jobs=1) or in a pool of spawned worker processes (one thread each).

    Tiny CPU models scale badly over threads but perfectly over processes, so two one-thread runs side by
    side finish about twice as fast as one two-thread run.
    """

    def __init__(self, jobs: int, bar: Progress, progress: bool) -> None:
        self.jobs = jobs
        self.bar = bar
        self.progress = progress
        self.pool = None
        if jobs > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"))

    def run_all(self, items: list[tuple[str, dict]]) -> list[dict]:
        """``items``: (description, execute_run keyword arguments); returns the records in item order."""
        if self.pool is None:
            records = []
            for text, kwargs in items:
                self.bar.start(text)
                t0 = time.perf_counter()
                rec = execute_run(progress="steps" if self.progress else False, **kwargs)
                self.bar.finish(f"{text}: {_summary_line(rec)}", time.perf_counter() - t0)
                records.append(rec)
            return records
        from concurrent.futures import as_completed

        futures = {}
        for i, (text, kwargs) in enumerate(items):
            futures[self.pool.submit(execute_run, progress=False, threads=1, **kwargs)] = (i, text, time.perf_counter())
        if items:
            self.bar.start(f"{len(items)} run(s) on {self.jobs} parallel workers")
        records: list = [None] * len(items)
        for fut in as_completed(futures):
            i, text, t0 = futures[fut]
            rec = fut.result()  # a worker's exception surfaces here with its traceback
            records[i] = rec
            # a run's own wall time over the workers, not its time in the queue, predicts what is left
            self.bar.finish(f"{text}: {_summary_line(rec)}", rec.get("wall_time_s", time.perf_counter() - t0) / self.jobs)
        return records

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def run_compare(spec: CompareSpec | None = None, *, progress: bool = True, jobs: int | None = None, **kwargs) -> dict:
    """Run (or resume) a comparison and write its report. Returns the ``results.json`` content.

    Every argument is checked and the whole plan is built (configs resolved, models constructed on the meta
    device) before the first run trains, so a bad quantizer name, an impossible size or a missing folder
    fails in a second, not after an hour. Finished runs (``OUT/runs/<key>.json``) are reused.

    Args:
        spec: a :class:`CompareSpec` (or pass its fields as keywords).
        progress: print one line per run (and a step bar within each run when ``jobs == 1``).
        jobs: runs trained at the same time in separate processes (default :func:`default_jobs`).
    """
    from simvq.compare.report import write_report

    spec = spec if spec is not None else CompareSpec(**kwargs)
    spec.check()
    jobs_given = jobs is not None
    jobs = default_jobs() if jobs is None else int(jobs)
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    base = base_config(spec)
    runs, notes = plan_runs(spec, base)
    out = Path(spec.out)
    if base["modality"] == "audio" and any(load_run(out / "runs" / f"{r.key}.json") is None for r in runs):
        # the built-in corpus is synthesised on first use: once here, not by parallel workers at the same time
        from simvq.data import build_datasets

        build_datasets(base)
    do_retrofit = spec.retrofit and "vq" in spec.quantizers
    (out / "runs").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    deadline = t_start + spec.budget.minutes * 60 if spec.budget.minutes else None
    finished: dict[tuple, dict] = {}
    pending = []
    for run in runs:
        rec = load_run(out / "runs" / f"{run.key}.json")
        if rec is not None:
            finished[(run.variant, run.requested_size, run.seed)] = rec
        else:
            pending.append(run)
    reused = len(finished)
    if not jobs_given and base["modality"] == "audio" and jobs > 1:
        # audio runs are long and equally long: keep every core busy to the end (at most three one-thread
        # processes per core; the speech-small preset needs about 1 GB each)
        jobs = packed_jobs(len([r for r in pending if r.variant != "lc_vq"]), jobs, limit=3 * jobs)
    bar = Progress(len(runs) + (2 if do_retrofit else 0), progress)
    bar.done = reused
    if reused and progress:
        print(f"reusing {reused} finished run(s) from {out / 'runs'}", file=sys.stderr)
    scheduler = _Scheduler(min(jobs, max(1, len(pending))), bar, progress)
    try:
        # VQGAN-LC takes its k-means features from the trained SimVQ encoders: it runs in a second wave
        waves = [[r for r in pending if r.variant != "lc_vq"], [r for r in pending if r.variant == "lc_vq"]]
        left = len(pending) + (2 if do_retrofit else 0)
        for wave in waves:
            items = []
            for run in wave:
                kwargs = dict(run=run, out=out, budget=spec.budget, max_minutes=_time_slice(deadline, left, jobs),
                              usage_images=spec.usage_images)
                if run.variant == "lc_vq":
                    kwargs["lc_donor"] = finished.get(("simvq", run.requested_size, run.seed))
                items.append((f"{VARIANTS[run.variant].label} K={run.codebook_size} seed {run.seed}", kwargs))
            for run, rec in zip(wave, scheduler.run_all(items)):
                finished[(run.variant, run.requested_size, run.seed)] = rec
            left -= len(wave)
        retro = None
        if do_retrofit:
            retro = run_retrofit_experiment(spec, base, finished, out=out, scheduler=scheduler,
                                            max_minutes=_time_slice(deadline, 2, jobs))
    finally:
        scheduler.close()
    # runs reused from an earlier invocation may have measured usage on another number of items (or, for
    # audio, scored another number of utterances)
    for r in runs:
        rec = ensure_eval(finished[(r.variant, r.requested_size, r.seed)], r.config, out)
        finished[(r.variant, r.requested_size, r.seed)] = ensure_usage(rec, r.config, spec.usage_images, out)
    if retro:
        for part in ("after", "control"):
            retro[part] = ensure_eval(retro[part], base, out)  # only the data section is used
            retro[part] = ensure_usage(retro[part], base, spec.usage_images, out)
        retro["before"] = finished[("vq", retro["size"], retro["seed"])]
    records = [finished[(r.variant, r.requested_size, r.seed)] for r in runs]
    results = write_report(spec, base, records, notes=notes, retrofit=retro, out=out,
                           wall_time_s=time.perf_counter() - t_start, reused=reused,
                           parallel_runs=min(jobs, max(1, len(pending))) if pending else None)
    if progress:
        print(f"report written to {out / 'report.md'} ({(time.perf_counter() - t_start) / 60:.1f} min)", file=sys.stderr)
    return results


def _time_slice(deadline: float | None, runs_left: int, jobs: int = 1) -> float | None:
    """Training minutes per run: what is left, split evenly over the runs still to do (80% training, the
    rest for setup and evaluation), with ``jobs`` runs in parallel."""
    if deadline is None:
        return None
    left = max(deadline - time.perf_counter(), 0.0) / 60
    return max(0.8 * left * jobs / max(runs_left, 1), 0.05)


def run_retrofit_experiment(spec: CompareSpec, base: dict, finished: dict, *, out: Path, scheduler: _Scheduler,
                            max_minutes: float | None) -> dict | None:
    """Retrofit the trained plain-VQ model (largest K, first seed) and train on; a VQ control trains on too.

    Both continuations get the same budget as the original runs, so the retrofit's "after" numbers are
    compared with plain VQ trained equally long, not only with the collapsed start.
    """
    from simvq.checkpoints import load_tokenizer
    from simvq.config import resolve_config
    from simvq.retrofit import retrofit

    size = max(spec.codebook_sizes)
    seed = spec.seeds[0]
    source = finished.get(("vq", size, seed))
    if source is None or not source.get("model_dir") or not Path(source["model_dir"]).is_dir():
        return None
    model = load_tokenizer(source["model_dir"])
    vq_state = {k: v.clone() for k, v in model.state_dict().items()}
    replaced = retrofit(model)
    simvq_state = {k: v.clone() for k, v in model.state_dict().items()}
    experiments, items, kinds = {}, [], []
    for kind, qcfg, state in (
        ("retrofit", {"name": "simvq", "codebook_size": size}, simvq_state),
        ("retrofit_control", dict(source.get("quantizer") or {"name": "vq", "codebook_size": size}), vq_state),
    ):
        cfg = copy.deepcopy(base)
        cfg["quantizer"] = qcfg
        cfg["seed"] = seed
        cfg = resolve_config(cfg)
        key = run_key(kind, size, seed, cfg, spec.budget, extra=source["key"])
        run = PlannedRun("simvq" if kind == "retrofit" else "vq", size, size, seed, cfg, key=key, kind=kind)
        rec = load_run(out / "runs" / f"{key}.json")
        if rec is not None:
            experiments[kind] = rec
            scheduler.bar.done += 1
            continue
        text = ("retrofitted VQ -> SimVQ, trained on" if kind == "retrofit" else "plain VQ trained on (control)") + f" K={size}"
        kwargs = dict(run=run, out=out, budget=spec.budget, max_minutes=max_minutes, init_state=state, init_strict=True,
                      usage_images=spec.usage_images,
                      extra={"retrofit_of": source["key"], "steps_before": source.get("steps"), "replaced": list(replaced)})
        items.append((text, kwargs))
        kinds.append(kind)
    for kind, rec in zip(kinds, scheduler.run_all(items)):
        experiments[kind] = rec
    return {"size": size, "seed": seed, "before": source, "after": experiments["retrofit"],
            "control": experiments["retrofit_control"], "replaced": list(replaced)}


__all__ = [
    "BUILTIN_AUDIO_DATA",
    "BUILTIN_DATA",
    "Budget",
    "DEFAULT",
    "DEFAULT_AUDIO_CONFIG",
    "MODALITY_DEFAULTS",
    "code_dim",
    "compare_modality",
    "data_modality",
    "ensure_eval",
    "evaluate_run",
    "CompareSpec",
    "DEFAULT_BUDGET",
    "DEFAULT_CODEBOOK_SIZES",
    "DEFAULT_CONFIG",
    "DEFAULT_QUANTIZERS",
    "DEFAULT_SEEDS",
    "PlannedRun",
    "VARIANTS",
    "Variant",
    "base_config",
    "execute_run",
    "initial_weights",
    "load_run",
    "parse_budget",
    "plan_runs",
    "run_compare",
    "default_jobs",
    "packed_jobs",
    "ensure_usage",
    "measure_usage",
    "lc_codebook",
    "run_key",
    "size_for",
]
