"""The retrofit experiment: the comparison's trained plain-VQ models swapped to SimVQ and trained on.

At the largest codebook size, for every seed of the comparison: the trained plain-VQ model is retrofitted
with each dead-code strategy (``keep``, ``respread``, ``fresh``; :func:`simvq.retrofit.retrofit`) and
trained on with the comparison's budget; a control trains the same VQ model on as long without the swap.
Which codes are dead is decided on :data:`DEAD_CODE_ITEMS` training items (seeded), never on the held-out
set the utilisation is measured on. The SimVQ reference is the comparison's own SimVQ run at that size and
seed: trained from scratch for as many steps as the continuation (the question it answers: with N more
steps to spend, retrofit the collapsed model or start SimVQ afresh?). Summary, verdict and report section:
:mod:`simvq.compare.retrofit_report`.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from simvq.checkpoints import load_tokenizer
from simvq.compare.execute import Scheduler
from simvq.compare.measure import ensure_eval, ensure_usage
from simvq.compare.plan import PlannedRun, run_key
from simvq.compare.records import load_run
from simvq.compare.retrofit_report import STRATEGY_ROWS
from simvq.compare.spec import CompareSpec
from simvq.config import resolve_config
from simvq.modalities import build_datasets
from simvq.retrofit import retrofit

#: training items run through the model to find its dead codes (and, for ``respread``, to draw new ones from)
DEAD_CODE_ITEMS = 2048


def retrofit_run_count(spec: CompareSpec) -> int:
    """Runs the experiment trains: per seed, one per strategy and the control."""
    return len(spec.seeds) * (len(STRATEGY_ROWS) + 1)


def _training_batches(base: dict, seed: int) -> DataLoader:
    dataset = build_datasets(resolve_config(base))[0]
    if len(dataset) > DEAD_CODE_ITEMS:
        pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:DEAD_CODE_ITEMS]
        dataset = Subset(dataset, pick.tolist())
    return DataLoader(dataset, batch_size=64, shuffle=False)


def run_retrofit_experiment(spec: CompareSpec, base: dict, finished: dict, *, out: Path, scheduler: Scheduler,
                            max_minutes: float | None) -> dict | None:
    """Train every retrofit continuation and control (largest K, every seed with a finished plain-VQ run).

    Returns ``{"size", "seeds", "dead_code_items", "replaced", "per_seed": {seed: {row: record,
    "dead_codes": {strategy: report}}}}`` (records not yet re-measured: see :func:`finish_retrofit_experiment`),
    or None when no plain-VQ model of that size finished.
    """
    size = max(spec.codebook_sizes)
    per_seed, items, slots, replaced = {}, [], [], None
    for seed in spec.seeds:
        source = finished.get(("vq", size, seed))
        if source is None or not source.get("model_dir") or not Path(source["model_dir"]).is_dir():
            continue
        entry = per_seed[seed] = {"dead_codes": {}}
        batches, live = None, None  # the training sample runs through the model once; later strategies reuse what it found
        for row in (*STRATEGY_ROWS, "control"):
            cfg = copy.deepcopy(base)
            cfg["quantizer"] = (dict(source.get("quantizer") or {"name": "vq", "codebook_size": size}) if row == "control"
                                else {"name": "simvq", "codebook_size": size})
            cfg["seed"] = seed
            cfg = resolve_config(cfg)
            kind = "retrofit_control" if row == "control" else "retrofit"
            extra_key = source["key"] if row in ("keep", "control") else f"{source['key']}-{row}-{DEAD_CODE_ITEMS}"
            key = run_key(kind if row in ("keep", "control") else f"retrofit_{row}", size, seed, cfg, spec.budget,
                          extra=extra_key)
            run = PlannedRun("vq" if row == "control" else "simvq", size, size, seed, cfg, key=key, kind=kind)
            rec = load_run(out / "runs" / f"{key}.json")
            if rec is not None:
                entry[row] = rec
                scheduler.bar.done += 1
                continue
            model = load_tokenizer(source["model_dir"])
            if row != "control":
                # respread draws from the sample's features; fresh needs only which codes are live
                counts = live if row == "fresh" else None
                if row != "keep" and counts is None and batches is None:
                    batches = _training_batches(base, seed)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    result = retrofit(model, dead_codes=row, data=None if row == "keep" or counts else batches,
                                      counts=counts, seed=seed)
                live = result.live or live
                replaced = list(result)
                if result.dead_codes:
                    entry["dead_codes"][row] = next(iter(result.dead_codes.values()))
            state = model.state_dict()
            text = (f"plain VQ trained on (retrofit control) K={size} seed {seed}" if row == "control" else
                    f"retrofitted VQ -> SimVQ ({row}), trained on, K={size} seed {seed}")
            extra = {"retrofit_of": source["key"], "steps_before": source.get("steps"), "strategy": row,
                     "replaced": list(replaced or [])}
            if row in entry["dead_codes"]:
                extra["dead_code_report"] = entry["dead_codes"][row]
            items.append((text, dict(run=run, out=out, budget=spec.budget, max_minutes=max_minutes,
                                     init_state={k: v.clone() for k, v in state.items()}, init_strict=True,
                                     usage_images=spec.usage_images, extra=extra)))
            slots.append((seed, row))
    if not per_seed:
        return None
    for (seed, row), rec in zip(slots, scheduler.run_all(items)):
        per_seed[seed][row] = rec
    for entry in per_seed.values():  # runs reused from an earlier invocation carry their own dead-code report
        for row in STRATEGY_ROWS:
            if row not in entry["dead_codes"] and entry[row].get("dead_code_report"):
                entry["dead_codes"][row] = entry[row]["dead_code_report"]
        replaced = replaced or entry["keep"].get("replaced")
    return {"size": size, "seeds": sorted(per_seed), "dead_code_items": DEAD_CODE_ITEMS, "replaced": replaced,
            "per_seed": per_seed}


def finish_retrofit_experiment(retro: dict | None, finished: dict, base: dict, usage_items: int | None,
                               out: Path) -> dict | None:
    """Measure the continuations as the comparison's runs are measured, and add the start and the SimVQ
    reference (``finished``: the comparison's records, already measured)."""
    if not retro:
        return retro
    for seed, entry in retro["per_seed"].items():
        for row in (*STRATEGY_ROWS, "control"):
            entry[row] = ensure_usage(ensure_eval(entry[row], base, out), base, usage_items, out)
        entry["before"] = finished[("vq", retro["size"], seed)]
        if ("simvq", retro["size"], seed) in finished:
            entry["simvq"] = finished[("simvq", retro["size"], seed)]
    return retro


__all__ = ["DEAD_CODE_ITEMS", "finish_retrofit_experiment", "retrofit_run_count", "run_retrofit_experiment"]
