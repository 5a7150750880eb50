"""Executing the plan: train one run and measure it, inline or in parallel worker processes."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path

import torch

import simvq.training as training
from simvq.compare.lc import lc_codebook
from simvq.compare.measure import evaluate_run, measure_usage
from simvq.compare.modality import compare_module
from simvq.compare.plan import PlannedRun
from simvq.compare.records import HISTORY_KEYS, RESULT_VERSION, merged_eval, save_record
from simvq.compare.spec import Budget
from simvq.compare.variants import VARIANTS


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
    with _quiet_lightning():
        # a NaN/Inf loss or non-finite quantizer input ends the run with result.diverged; anything else is a bug
        # or a user error and propagates with its traceback
        result = training.train(run.config, out_dir=work, max_steps=budget.steps, max_minutes=max_minutes,
                                progress=progress, resume=True, init_state=init_state, init_strict=init_strict)
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
    save_record(out, record)
    return record


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


def _summary_line(record: dict, modality: str) -> str:
    if record.get("status") == "diverged":
        return f"diverged: {record.get('diverged_reason', '')[:100]}"
    ev = merged_eval(record)
    util = ev.get("utilization")
    quality = compare_module(modality).progress_text(ev)
    if util is None or quality is None:
        return "no evaluation"
    return f"utilisation {util * 100:.1f}%, {quality}, {record.get('wall_time_s', 0):.0f} s"


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


class Scheduler:
    """Runs ``execute_run`` calls inline (jobs=1) or in a pool of spawned worker processes (one thread each).

    Tiny CPU models scale badly over threads but perfectly over processes, so two one-thread runs side by
    side finish about twice as fast as one two-thread run.
    """

    def __init__(self, jobs: int, bar: Progress, progress: bool, modality: str) -> None:
        self.jobs = jobs
        self.modality = modality
        self.bar = bar
        self.progress = progress
        self.pool = None
        if jobs > 1:
            self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"))

    def run_all(self, items: list[tuple[str, dict]]) -> list[dict]:
        """``items``: (description, execute_run keyword arguments); returns the records in item order."""
        if self.pool is None:
            records = []
            for text, kwargs in items:
                self.bar.start(text)
                t0 = time.perf_counter()
                rec = execute_run(progress="steps" if self.progress else False, **kwargs)
                self.bar.finish(f"{text}: {_summary_line(rec, self.modality)}", time.perf_counter() - t0)
                records.append(rec)
            return records
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
            self.bar.finish(f"{text}: {_summary_line(rec, self.modality)}", rec.get("wall_time_s", time.perf_counter() - t0) / self.jobs)
        return records

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def time_slice(deadline: float | None, runs_left: int, jobs: int = 1) -> float | None:
    """Training minutes per run: what is left, split evenly over the runs still to do (80% training, the
    rest for setup and evaluation), with ``jobs`` runs in parallel."""
    if deadline is None:
        return None
    left = max(deadline - time.perf_counter(), 0.0) / 60
    return max(0.8 * left * jobs / max(runs_left, 1), 0.05)


__all__ = ["Progress", "Scheduler", "default_jobs", "execute_run", "packed_jobs", "time_slice"]
