"""``simvq compare --tune N``: each quantizer gets its own settings before the comparison is run again.

Each variant of the comparison first gets an Optuna study (:func:`simvq.tune.tune`) of ``N`` trials, every
study on the same short budget (``--tune-budget`` steps per trial, default half the comparison's steps) at
one codebook size (the largest the variant can take) and the first seed, with the tune defaults: TPE, the
median pruner over 3 segments, objective held-out PSNR (the modality's quality metric) maximised. Trials are
scored on a validation slice carved from the end of the training split (trials train without it, see
:func:`simvq.tune.study.carve_validation`) so the held-out split the report's numbers come from plays no part
in the search; data that cannot give such a slice falls back to the held-out split, and the report says so.

The variant's search space is its family's shipped space (``simvq/configs/tune/spaces/<family>.yaml``, else
the learning rate alone: ``simvq/configs/tune/lr-only.yaml``) without the keys that define the variant
(``quantizer.transform`` of SimVQ (MLP), FSQ's ``levels``, ...). VQGAN-LC is not tuned: its frozen codebook
comes from the trained SimVQ encoders. Then every run of the comparison (each size and seed) is trained
again with its variant's best settings, and the report shows both results side by side with a line on
whether the verdict (the best quantizer on the quality metric and on utilisation, per codebook size) changed.

Studies live in ``OUT/tune/<variant>/`` (``study.db``, ``best.yaml``, ``report.md``, plots), tuned runs in
``OUT/runs/`` like the others (kind ``tuned``): rerunning the same command resumes both.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import yaml

from simvq.compare.execute import time_slice
from simvq.compare.measure import ensure_eval, ensure_usage
from simvq.compare.modality import compare_module
from simvq.compare.plan import PlannedRun, run_key
from simvq.compare.records import load_run, merged_eval
from simvq.compare.summary import beyond_spread, fmt_stat, get, metric, summarise
from simvq.compare.variants import VARIANTS, size_for
from simvq.config import resolve_config
from simvq.tune.space import SPACE_DIR, set_key
from simvq.tune.study import segment_ends

#: the study settings every variant gets (the tune defaults)
OBJECTIVE = "psnr"
SEGMENTS = 3
SAMPLER_SEED = 0
FALLBACK_SPACE = SPACE_DIR.parent / "lr-only.yaml"
#: variants whose runs are not tuned, and why
NOT_TUNED = {"lc_vq": "its frozen codebook comes from the trained SimVQ encoders, which a trial does not have"}


def check_tunable(spec) -> None:
    """ValueError, before anything trains, when the studies' objective (PSNR) is not the comparison's quality
    metric: the modality's evaluation may not produce it at all."""
    from simvq.tune.objective import METRICS

    key, label = compare_module(spec.modality).VERDICT["quality"][0][:2]
    if key not in METRICS[OBJECTIVE][1]:
        raise ValueError(f"--tune scores trials on {OBJECTIVE}, but the {spec.modality} comparison is judged on {label}; "
                         f"drop --tune and tune each quantizer with simvq tune --objective utilization (docs/tune.md)")


def trial_steps(spec) -> int:
    """Steps per trial: ``--tune-budget``, else half the comparison's steps (a time budget needs it given)."""
    if spec.tune_budget is not None:
        return int(spec.tune_budget)
    return max(1, spec.budget.steps // 2)  # spec.check() refuses a time budget without tune_budget


def variant_space(variant: str) -> tuple[dict, Path]:
    """The variant's search space as a mapping (its family's, less the keys the variant fixes) and its file."""
    v = VARIANTS[variant]
    family = v.quantizer["name"]
    path = SPACE_DIR / f"{family}.yaml"
    path = path if path.is_file() else FALLBACK_SPACE
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    fixed = {f"quantizer.{k}" for k in v.quantizer if k != "name"} | {"quantizer.levels", "quantizer.codebook_size"}
    return {k: d for k, d in raw.items() if k not in fixed}, path


def _study_size(spec, variant: str) -> int | None:
    """The largest requested size the variant can take (None: none)."""
    for size in sorted(spec.codebook_sizes, reverse=True):
        try:
            size_for(VARIANTS[variant], size)
        except ValueError:
            continue
        return size
    return None


def _study_config(spec, base: dict, variant: str, size: int) -> dict:
    cfg = copy.deepcopy(base)
    cfg["quantizer"] = dict(size_for(VARIANTS[variant], size)[0])
    cfg["seed"] = spec.seeds[0]
    return cfg


def validation_items(spec, base: dict) -> tuple[int | None, str]:
    """``(items, what the trials are scored on)``: a validation slice of ``data.eval_limit`` items carved from
    the training split when the data allow it, else None and the held-out caveat."""
    from simvq.tune.study import carve_validation

    items = int(base["data"].get("eval_limit") or 256)
    try:
        start, stop = carve_validation(base, items)
    except ValueError as err:
        return None, (f"the held-out split the results below come from ({err}): the tuned numbers are optimistic by "
                      "whatever the search fitted to those items")
    return items, (f"a validation slice of {items} items carved from the end of the training split (items "
                   f"{start}..{stop - 1}; trials train on the first {start}), so the held-out split reported below "
                   "played no part in the search")


def run_study(config: dict, *, variant: str, out: str, trials: int, steps: int, eval_limit: int,
              validation: int | None, threads: int | None = None) -> dict:
    """One variant's study (resumed if ``out`` holds it) and its outputs; returns a plain summary of the best."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from simvq.tune import best_trial, tune, write_outputs
    from simvq.tune.report import trial_params

    t0 = time.perf_counter()
    space, _ = variant_space(variant)
    before = _finished_trials(out)
    study, settings = tune(config, quantizer=config["quantizer"]["name"], out=out, space=space, trials=trials,
                           objective=OBJECTIVE, steps=steps, segments=SEGMENTS, eval_limit=eval_limit, seed=SAMPLER_SEED,
                           validation=validation, progress=False)
    if before != _finished_trials(out) or not (Path(out) / "report.md").is_file():
        write_outputs(study, settings)  # a resumed study with nothing new keeps its outputs
    best = best_trial(study, settings)
    states = [t.state.name for t in study.trials]
    return {
        "variant": variant, "folder": str(out), "space": sorted(space), "trials": len(states),
        "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
        "trained_steps": sum(int(t.user_attrs.get("steps", 0)) for t in study.trials),
        "study_wall_time_s": time.perf_counter() - t0,  # this invocation's (small when resumed)
        "trial_time_s": sum(t.duration.total_seconds() for t in study.trials if t.duration is not None),
        "best": None if best is None else {"trial": best.number, "value": best.value, "params": trial_params(best, settings),
                                           "metrics": dict(best.user_attrs.get("metrics", {}))},
    }


def _finished_trials(out) -> int | None:
    """Complete or pruned trials in the study of folder ``out`` (None: no study yet)."""
    import optuna

    from simvq.tune.study import FINISHED, STUDY_NAME

    db = Path(out) / "study.db"
    if not db.is_file():
        return None
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{db.resolve()}")
    return sum(t.state.name in FINISHED for t in study.get_trials(deepcopy=False))


def run_tuned(spec, base: dict, runs: list[PlannedRun], *, out: Path, scheduler, jobs: int, progress: bool) -> dict:
    """Tune each variant, then train every run of the plan with its variant's best settings (both resumable).
    Returns ``{"studies": {variant: summary}, "records": [tuned record per run], ...}`` for :func:`tuned_section`."""
    t0 = time.perf_counter()
    steps = trial_steps(spec)
    eval_limit = int(base["data"].get("eval_limit") or 256)
    validation, scored_on = validation_items(spec, base)
    variants = [v for v in spec.quantizers if v not in NOT_TUNED]
    sizes = {v: _study_size(spec, v) for v in variants}
    jobs_for = []
    for v in variants:
        if sizes[v] is None:
            continue
        kwargs = dict(variant=v, out=str(out / "tune" / v), trials=spec.tune, steps=steps, eval_limit=eval_limit,
                      validation=validation)
        jobs_for.append((v, _study_config(spec, base, v, sizes[v]), kwargs))
    if progress:
        print(f"tuning {len(jobs_for)} quantizer(s): {spec.tune} trial(s) of {steps} steps each", file=sys.stderr)
    studies = {}
    if scheduler.pool is not None:
        futures = [(v, scheduler.pool.submit(run_study, cfg, threads=1, **kw)) for v, cfg, kw in jobs_for]
        for v, fut in futures:
            studies[v] = fut.result()
    else:
        for v, cfg, kw in jobs_for:
            studies[v] = run_study(cfg, **kw)
    for v, s in studies.items():
        s["size"] = sizes[v]
        if progress:
            best = s["best"]
            found = "no trial completed" if best is None else f"best trial {best['trial']}: PSNR {best['value']:.2f}"
            print(f"  tuned {VARIANTS[v].label}: {s['complete']} complete / {s['pruned']} pruned, {found}", file=sys.stderr)
    tuning_s = time.perf_counter() - t0

    # every run of the comparison again, at its variant's best settings
    planned, same = [], {}
    for r in runs:
        best = (studies.get(r.variant) or {}).get("best")
        if best is None:
            same[r.key] = r
            continue
        cfg = copy.deepcopy(r.config)
        for key, value in best["params"].items():
            set_key(cfg, key, value)
        cfg = resolve_config(cfg)
        planned.append(PlannedRun(r.variant, r.requested_size, r.codebook_size, r.seed, cfg,
                                  key=run_key(r.variant, r.requested_size, r.seed, cfg, spec.budget, extra="tuned"),
                                  kind="tuned"))
    done = {p.key: load_run(out / "runs" / f"{p.key}.json") for p in planned}
    pending = [p for p in planned if done[p.key] is None]
    deadline = time.perf_counter() + spec.budget.minutes * 60 if spec.budget.minutes else None
    items = [(f"tuned {VARIANTS[p.variant].label} K={p.codebook_size} seed {p.seed}",
              dict(run=p, out=out, budget=spec.budget, max_minutes=time_slice(deadline, len(pending), jobs),
                   usage_images=spec.usage_images)) for p in pending]
    scheduler.bar.total += len(items)
    for p, rec in zip(pending, scheduler.run_all(items)):
        done[p.key] = rec
    records = []
    for p in planned:
        rec = ensure_eval(done[p.key], p.config, out)
        records.append(ensure_usage(rec, p.config, spec.usage_images, out))
    return {"studies": studies, "records": records, "untuned_runs": sorted(same), "steps": steps,
            "scored_on": scored_on, "validation": validation, "eval_limit": eval_limit,
            "tuning_wall_time_s": tuning_s, "wall_time_s": time.perf_counter() - t0}


# ----- the report section --------------------------------------------------------------------------------
def _ranked(rows: list[dict], key: str, higher: bool) -> list[dict]:
    return sorted([e for e in rows if metric(e, key)], key=lambda e: e["metrics"][key]["mean"], reverse=higher)


def verdict_change(shared: list[dict], tuned: list[dict], sizes: list[int], quality: tuple) -> tuple[list[str], bool]:
    """Per size, the best quantizer on the quality metric and on utilisation with shared and with tuned settings;
    ``(lines, changed)``."""
    key, label, kind, higher, unit = quality
    lines, changed = [], False
    for size in sizes:
        for mkey, mlabel, mkind, mhigher in ((key, label, kind, higher), ("utilization", "utilisation", "pct", True)):
            a = _ranked([e for e in shared if e["requested_size"] == size], mkey, mhigher)
            b = _ranked([e for e in tuned if e["requested_size"] == size], mkey, mhigher)
            if not a or not b:
                continue
            moved = a[0]["variant"] != b[0]["variant"]
            changed |= moved
            margin = ""
            if len(b) > 1 and not beyond_spread(b[0]["metrics"][mkey], b[1]["metrics"][mkey]):
                margin = f"; tuned, {b[1]['label']} is within the seed spread of it"
            pct = "%" if mkind == "pct" else unit
            lines.append(f"K={size}, best {mlabel}: {a[0]['label']} ({fmt_stat(a[0]['metrics'][mkey], mkind)}{pct}) with "
                         f"shared settings, {b[0]['label']} ({fmt_stat(b[0]['metrics'][mkey], mkind)}{pct}) tuned"
                         f" ({'changed' if moved else 'unchanged'}{margin}).")
    return lines, changed


def tuned_section(spec, base: dict, shared_records: list[dict], state: dict) -> dict:
    """The report's tuned part: settings, best settings per variant, the side-by-side table, the verdict change."""
    modality = base.get("modality", "image")
    quality = compare_module(modality).VERDICT["quality"][0]
    key, label, kind, _, unit = quality
    shared = summarise(shared_records)
    by_key = {r["key"]: r for r in shared_records}
    tuned_records = [{**r, "kind": "compare"} for r in state["records"]]
    tuned_records += [{**by_key[k]} for k in state["untuned_runs"] if k in by_key]
    tuned = summarise(tuned_records)
    sizes = sorted({e["requested_size"] for e in shared})
    change, changed = verdict_change(shared, tuned, sizes, quality)
    studies = state["studies"]
    untuned = sorted({VARIANTS[v].label for v in spec.quantizers if v not in studies or studies[v]["best"] is None})
    seed = spec.seeds[0]
    lines = [
        f"Each quantizer first got its own Optuna study of {spec.tune} trial(s), the same budget for all: "
        f"{state['steps']} training steps per trial in {len(segment_ends(state['steps'], SEGMENTS))} segment(s) (the "
        f"median pruner sees the score after each), at the largest "
        f"codebook size it can take, seed {seed}, TPE sampler seed {SAMPLER_SEED}. Objective: {label} maximised "
        f"(no utilisation constraint), scored on {state['scored_on']}. Then every run above was trained again with "
        f"its quantizer's best settings (same budget, sizes and seeds).",
        f"The trials took {sum(s['trial_time_s'] for s in state['studies'].values()) / 60:.1f} min and the tuned runs "
        f"{sum(r.get('wall_time_s', 0.0) for r in state['records']) / 60:.1f} min (each summed over its runs, which may "
        "have run side by side). Studies: `tune/<quantizer>/` (report.md, best.yaml, trials.csv, plots; rerunning "
        "resumes them).",
    ]
    if untuned:
        lines.append(f"Not tuned (shared settings in both columns): {', '.join(untuned)}"
                     + (f"; VQGAN-LC because {NOT_TUNED['lc_vq']}" if "lc_vq" in spec.quantizers else "") + ".")
    for v in spec.quantizers:
        s = studies.get(v)
        if not s or s["best"] is None:
            continue
        b = s["best"]
        params = ", ".join(f"`{k}` {_short(x)}" for k, x in b["params"].items())
        lines.append(f"{VARIANTS[v].label} (K={s['size']}): best of trial {b['trial']} ({s['complete']} complete, "
                     f"{s['pruned']} pruned; {label} {b['value']:.2f}{unit} on the tuning items): {params}.")
    header = ["quantizer", "K", "utilisation % shared", "utilisation % tuned", f"{label} shared", f"{label} tuned",
              "diverged (shared, tuned)"]
    rows = []
    for size in sizes:
        for v in spec.quantizers:
            a, b = get(shared, v, size), get(tuned, v, size)
            if a is None or b is None:
                continue
            rows.append([a["label"], str(a["codebook_size"]), fmt_stat(metric(a, "utilization"), "pct"),
                         fmt_stat(metric(b, "utilization"), "pct"), fmt_stat(metric(a, key), kind),
                         fmt_stat(metric(b, key), kind), f"{len(a['diverged'])}/{len(a['seeds'])}, "
                         f"{len(b['diverged'])}/{len(b['seeds'])}"])
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                       *("| " + " | ".join(r) + " |" for r in rows)])
    summary_line = ("Tuning changed the verdict: " if changed else "Tuning did not change the verdict: ") + (
        "the best quantizer on " + label + " or on utilisation differs at some K (see the tuned section)." if changed
        else f"the best quantizer on {label} and on utilisation is the same at every K with shared and with tuned "
             f"settings ({spec.tune} trial(s) of {state['steps']} steps per quantizer).")
    return {
        "trials": spec.tune, "steps_per_trial": state["steps"], "segments": SEGMENTS, "seed": seed,
        "objective": OBJECTIVE, "scored_on": state["scored_on"], "validation_items": state["validation"],
        "studies": studies, "summary": tuned, "changed": changed, "verdict_line": summary_line,
        "change_lines": change, "lines": lines, "table": table,
        "tuning_wall_time_s": state["tuning_wall_time_s"], "wall_time_s": state["wall_time_s"],
        "runs": [{"key": r.get("key"), "variant": r["variant"], "requested_size": r["requested_size"], "seed": r["seed"],
                  "quantizer": r.get("quantizer"), "status": r.get("status"), "steps": r.get("steps"),
                  "eval": {k: v for k, v in merged_eval(r).items() if isinstance(v, (int, float))}}
                 for r in state["records"]],
    }


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "null" if value is None else str(value)


__all__ = ["FALLBACK_SPACE", "NOT_TUNED", "check_tunable", "run_study", "run_tuned", "trial_steps", "tuned_section",
           "validation_items", "variant_space", "verdict_change"]
