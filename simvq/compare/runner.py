"""``run_compare``: check, plan, execute (resumably), measure, retrofit, report.

Output folder layout::

    OUT/report.md, report.html, results.json, plots/*.png     the report (see simvq.compare.report)
    OUT/runs/<key>.json                                        one finished run (metrics, history, costs)
    OUT/work/<key>/                                            its training folder (checkpoint, model/)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from simvq.compare.execute import Progress, Scheduler, default_jobs, execute_run, packed_jobs, time_slice
from simvq.compare.generation import run_generation
from simvq.compare.measure import ensure_eval, ensure_usage, evaluate_run, measure_usage
from simvq.compare.modality import (
    DEFAULT_AUDIO_CONFIG,
    DEFAULT_CONFIG,
    MODALITY_DEFAULTS,
    compare_modality,
    compare_module,
    data_modality,
)
from simvq.compare.plan import PlannedRun, base_config, check_usage_coverage, code_dim, plan_runs, run_key
from simvq.compare.records import load_run
from simvq.compare.report import write_report
from simvq.compare.retrofit import finish_retrofit_experiment, retrofit_run_count, run_retrofit_experiment
from simvq.compare.spec import DEFAULT, Budget, CompareSpec, parse_budget
from simvq.compare.tuned import check_tunable, run_tuned, tuned_section
from simvq.compare.variants import DEFAULT_QUANTIZERS, VARIANTS, Variant, size_for
from simvq.io import OUTPUT_MARKER, prepare_output_dir, save_file_atomic
from simvq.modalities import build_datasets
from simvq.training import check_trainer_settings

DEFAULT_CODEBOOK_SIZES = MODALITY_DEFAULTS["image"]["codebook_sizes"]
DEFAULT_SEEDS = MODALITY_DEFAULTS["image"]["seeds"]
DEFAULT_BUDGET = MODALITY_DEFAULTS["image"]["budget"]


def prepare_compare_dir(spec: CompareSpec) -> Path:
    """The report folder: new, empty, or an earlier ``simvq compare`` report (its finished runs are reused).

    Never a folder that holds or lies inside the data or the config file. A report folder written before
    output markers existed (it has ``runs/``) is recognised as a compare folder.
    """
    out = Path(spec.out).expanduser()
    if (out / "runs").is_dir() and not (out / OUTPUT_MARKER).exists():
        save_file_atomic(out / OUTPUT_MARKER, json.dumps({"command": "compare"}) + "\n")
    inputs = [p for p in (spec.data, spec.config) if isinstance(p, (str, Path)) and Path(p).expanduser().exists()]
    return prepare_output_dir(out, "compare", inputs=inputs, resume=True)[0]


def check_run_settings(base: dict, runs: list[PlannedRun]) -> None:
    """The trainer settings of every run (``--set trainer.devices=...``) must be usable on this machine: refused
    (a one-line ValueError naming the key) before the report folder is touched."""
    seen = set()
    for trainer in [base["trainer"], *(r.config.get("trainer", base["trainer"]) for r in runs)]:
        key = json.dumps({k: trainer.get(k) for k in ("accelerator", "devices", "num_nodes", "strategy", "precision")},
                         sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            check_trainer_settings(trainer)


def run_compare(spec: CompareSpec | None = None, *, progress: bool = True, jobs: int | None = None, **kwargs) -> dict:
    """Run (or resume) a comparison and write its report. Returns the ``results.json`` content.

    Every argument is checked and the whole plan is built (configs resolved, quantizers constructed) before
    the first run trains, so a bad quantizer name, an impossible size or a missing folder fails in a second,
    not after an hour. Finished runs (``OUT/runs/<key>.json``) are reused.

    Args:
        spec: a :class:`CompareSpec` (or pass its fields as keywords).
        progress: print one line per run (and a step bar within each run when ``jobs == 1``).
        jobs: runs trained at the same time in separate processes (default :func:`default_jobs`).
    """
    spec = spec if spec is not None else CompareSpec(**kwargs)
    spec.check()
    jobs_given = jobs is not None
    jobs = default_jobs() if jobs is None else int(jobs)
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    module = compare_module(spec.modality)
    base = base_config(spec)
    runs, notes = plan_runs(spec, base)
    if spec.tune:
        check_tunable(spec)
    check_run_settings(base, runs)
    out = prepare_compare_dir(spec)
    check_usage_coverage(spec, base, runs)  # reads the held-out split: after the output folder's own checks
    finished: dict[tuple, dict] = {}
    pending = []
    for run in runs:
        rec = load_run(out / "runs" / f"{run.key}.json")
        if rec is not None:
            finished[(run.variant, run.requested_size, run.seed)] = rec
        else:
            pending.append(run)
    if module.BUILD_DATA_FIRST and pending:
        build_datasets(base)
    do_retrofit = spec.retrofit and "vq" in spec.quantizers
    n_retrofit = retrofit_run_count(spec) if do_retrofit else 0
    (out / "runs").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    deadline = t_start + spec.budget.minutes * 60 if spec.budget.minutes else None
    reused = len(finished)
    if not jobs_given and module.PACK_JOBS and jobs > 1:
        # long, equally long runs: keep every core busy to the end (at most three one-thread processes per core)
        jobs = packed_jobs(len([r for r in pending if r.variant != "lc_vq"]), jobs, limit=3 * jobs)
    bar = Progress(len(runs) + n_retrofit, progress)
    bar.done = reused
    if reused and progress:
        print(f"reusing {reused} finished run(s) from {out / 'runs'}", file=sys.stderr)
    scheduler = Scheduler(min(jobs, max(1, len(pending))), bar, progress, spec.modality)
    try:
        # VQGAN-LC takes its k-means features from the trained SimVQ encoders: it runs in a second wave
        waves = [[r for r in pending if r.variant != "lc_vq"], [r for r in pending if r.variant == "lc_vq"]]
        left = len(pending) + n_retrofit
        for wave in waves:
            items = []
            for run in wave:
                kwargs = dict(run=run, out=out, budget=spec.budget, max_minutes=time_slice(deadline, left, jobs),
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
                                            max_minutes=time_slice(deadline, n_retrofit, jobs))
        # --tune N: a study per quantizer, then every run again at its quantizer's best settings
        tuned = run_tuned(spec, base, runs, out=out, scheduler=scheduler, jobs=jobs, progress=progress) if spec.tune else None
    finally:
        scheduler.close()
    # runs reused from an earlier invocation may have measured usage on another number of items (or scored
    # another number of items)
    for r in runs:
        rec = ensure_eval(finished[(r.variant, r.requested_size, r.seed)], r.config, out)
        finished[(r.variant, r.requested_size, r.seed)] = ensure_usage(rec, r.config, spec.usage_images, out)
    retro = finish_retrofit_experiment(retro, finished, base, spec.usage_images, out)
    # one token prior per tokenizer run (same prior config, steps and seed); finished priors are reused
    generation = run_generation(spec, runs, finished, out=out, jobs=jobs, progress=progress) if spec.generation else None
    records = [finished[(r.variant, r.requested_size, r.seed)] for r in runs]
    results = write_report(spec, base, records, notes=notes, retrofit=retro, out=out,
                           wall_time_s=time.perf_counter() - t_start, reused=reused,
                           parallel_runs=min(jobs, max(1, len(pending))) if pending else None,
                           tuned=tuned_section(spec, base, records, tuned) if tuned else None,
                           generation=generation)
    if progress:
        print(f"report written to {out / 'report.md'} ({(time.perf_counter() - t_start) / 60:.1f} min)", file=sys.stderr)
    return results


__all__ = [
    "DEFAULT", "DEFAULT_AUDIO_CONFIG", "DEFAULT_BUDGET", "DEFAULT_CODEBOOK_SIZES", "DEFAULT_CONFIG", "DEFAULT_QUANTIZERS",
    "DEFAULT_SEEDS", "MODALITY_DEFAULTS", "VARIANTS", "Budget", "CompareSpec", "PlannedRun", "Variant", "base_config",
    "code_dim", "compare_modality", "data_modality", "default_jobs", "ensure_eval", "ensure_usage", "evaluate_run",
    "execute_run", "load_run", "measure_usage", "packed_jobs", "parse_budget", "plan_runs", "run_compare", "run_key",
    "size_for",
]
