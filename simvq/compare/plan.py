"""The plan: the resolved base config and every run (variant x codebook size x seed), checked before training.

Runs are keyed by ``<variant>-K<size>-seed<seed>-<hash>`` where the hash covers the whole training config
and the budget, so changing anything that changes a run's meaning makes new runs instead of silently
reusing old ones.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass

from simvq.compare.modality import MODALITY_DEFAULTS, compare_module, raw_config
from simvq.compare.records import RESULT_VERSION
from simvq.compare.spec import Budget, CompareSpec, parse_budget
from simvq.compare.variants import VARIANTS, size_for
from simvq.config import load_config, resolve_config
from simvq.modalities import modality_of
from simvq.quantizers import build_quantizer


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


def code_dim(config: dict) -> int:
    """The code (token) dimension of a resolved config (the modality's)."""
    return modality_of(config).code_dim(config)


def base_config(spec: CompareSpec) -> dict:
    """The resolved base training config (model, data, optimiser) shared by every run."""
    if not spec.modality:
        spec.check()
    preset_is_default = spec.config is None
    module = compare_module(spec.modality)
    source = MODALITY_DEFAULTS[spec.modality]["config"] if spec.config is None else spec.config
    ignored = [o for o in spec.overrides if str(o).split("=", 1)[0].strip().split(".")[0] == "quantizer"]
    if ignored:  # every run's quantizer section is the variant's own: such a setting would be silently dropped
        raise ValueError(f"--set {ignored[0]}: each run's quantizer settings come from --quantizers and --codebook-sizes "
                         "(the variants of docs/compare.md), so a quantizer.* override would be ignored; drop it")
    raw = raw_config(source, spec.overrides)
    quantizer = raw.setdefault("quantizer", {"name": "simvq"})
    if isinstance(quantizer, dict) and not {"codebook_size", "levels"} & set(quantizer):
        # every run replaces the quantizer section; the base config only needs a valid one
        quantizer["codebook_size"] = spec.codebook_sizes[0]
    first = load_config(raw)
    if spec.data is not None:
        for section, change in module.data_changes(str(spec.data), first, preset_is_default).items():
            if change:
                raw.setdefault(section, {}).update(change)
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
    module.check_data(config["data"])
    return config


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_key(variant: str, size: int, seed: int, config: dict, budget: Budget, extra: str = "") -> str:
    cfg = copy.deepcopy(config)
    # the step/time limits come from the budget; the rest of the trainer section changes what is trained
    cfg["trainer"].pop("max_steps", None)
    cfg["trainer"].pop("max_minutes", None)
    if compare_module(modality_of(cfg).name).EVAL_LIMIT_REEVALUATES:
        cfg["data"].pop("eval_limit", None)  # a new --eval-limit re-evaluates finished runs (measure.ensure_eval)
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
            limit = spec.size_limits.get(name)
            if limit is not None and requested > limit:
                notes.append(f"{variant.label} skipped at K={requested}: above its size limit {limit} for this run "
                             f"(--size-limit {name}=none runs it)")
                continue
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


def check_usage_coverage(spec: CompareSpec, base: dict, runs: list[PlannedRun]) -> None:
    """ValueError, before anything trains, when the usage measurement reads fewer held-out tokens than the
    largest codebook has codes: utilisation could not reach 100% even if every token chose another code.
    (Not part of :func:`plan_runs`, which reads no data: it builds the held-out split to count it.)

    The message names the ``--usage-items`` that would be enough, or says that the held-out split is too
    small. Modalities whose compare module has no ``usage_coverage`` (items of varying length) are not checked.
    """
    measure = getattr(compare_module(spec.modality), "usage_coverage", None)
    if measure is None or not runs:
        return
    largest = max(runs, key=lambda r: r.codebook_size)
    have = measure(base, spec.usage_items)
    if have["tokens"] >= largest.codebook_size or not have["tokens_per_item"]:
        return
    noun = compare_module(spec.modality).NOUN
    need = -(-largest.codebook_size // have["tokens_per_item"])  # ceil
    fix = (f"pass --usage-items {need} or more" if need <= have["split"] else
           f"the held-out split has only {have['split']:,} {noun}: use a smaller K, larger {noun} or more held-out data")
    raise ValueError(
        f"{VARIANTS[largest.variant].label} at K={largest.codebook_size:,} cannot be covered by the usage measurement: "
        f"{have['items']:,} held-out {noun} x {have['tokens_per_item']:,} tokens = {have['tokens']:,} tokens, fewer than "
        f"K codes; it needs at least {need:,} {noun} ({fix})"
    )


__all__ = ["PlannedRun", "base_config", "check_usage_coverage", "code_dim", "plan_runs", "run_key"]
