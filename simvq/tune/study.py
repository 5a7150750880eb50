"""``tune(...)``: an Optuna study over one quantizer's training settings on the user's config and data.

Each trial trains ``config`` (its quantizer section set to ``quantizer``, the sampled keys applied) for
``steps`` steps in ``segments`` parts; after each part the exported model is evaluated on at most
``eval_limit`` held-out items and the objective is reported to the pruner. Training resumes exactly from the
trial's checkpoint between parts (``simvq.training.train`` with a larger ``max_steps``), so a pruned trial has
trained only the parts before it was stopped. The study lives in ``out/study.db`` (SQLite) or in ``storage``
(any Optuna RDB URL, e.g. PostgreSQL for several machines); rerunning resumes it.

Optuna is imported here only (``pip install optuna``); the rest of simvq works without it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import multiprocessing
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from simvq.config import apply_overrides, config_source_file, get, load_config, load_raw_config
from simvq.io import prepare_output_dir
from simvq.tune.objective import (
    DEFAULT_WEIGHTS,
    OBJECTIVES,
    check_available,
    direction,
    metrics_of,
    needed_metrics,
    score,
)
from simvq.tune.space import Param, default_space_file, load_space, parse_space, set_key

STUDY_NAME = "simvq-tune"
FINISHED = ("COMPLETE", "PRUNED")
PRUNERS = ("median", "hyperband", "none")
_UNSET = object()


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ValueError("simvq tune needs Optuna: pip install optuna") from None
    return optuna


def parse_budget(text: str | float | None) -> float | None:
    """``"30m"``, ``"90s"``, ``"2h"`` or seconds -> seconds (None stays None)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--budget {text!r}: give a time such as 30m, 90s or 2h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


@dataclass
class TuneSettings:
    """Everything a trial needs, in plain values (sent to worker processes as is)."""

    base: dict                      # the raw config (overrides applied, quantizer section set, trainer.max_steps)
    quantizer: str
    params: list[Param]
    objective: str
    weights: dict
    steps: int
    segments: int
    eval_limit: int
    min_utilization: float | None
    out: str
    storage: str
    study_name: str
    seed: int
    pruner: object = None           # None: the median pruner
    threads: int | None = None
    startup_trials: int = 10        # random trials before TPE models the results
    validation: tuple | None = None  # (start, stop): score on these training-split items (never trained on)
    fingerprint: str = ""
    extra: dict = field(default_factory=dict)


def trial_config(base: dict, assignments: dict) -> dict:
    """The validated config of one trial: ``base`` with each ``key: value`` of ``assignments`` set."""
    raw = copy.deepcopy(base)
    for key, value in assignments.items():
        set_key(raw, key, value)
    if "quantizer.levels" in assignments:
        raw["quantizer"].pop("codebook_size", None)  # FSQ: the levels fix the codebook size
    return load_config(raw)


def _base_config(config, overrides, quantizer: str, steps: int) -> dict:
    raw = apply_overrides(load_raw_config(config), overrides)
    q = raw.get("quantizer") or {}
    if q.get("name", "simvq") != quantizer:
        # another family: its own defaults, the user's codebook size
        resolved = load_config(raw)
        q = {"name": quantizer, "codebook_size": resolved["quantizer"].get("codebook_size")}
        if q["codebook_size"] is None:
            q.pop("codebook_size")
    raw["quantizer"] = {**q, "name": quantizer}
    raw.setdefault("trainer", {})["max_steps"] = steps
    raw["trainer"].pop("max_epochs", None)
    return raw


def validate_space(base: dict, params: list[Param]) -> None:
    """Resolve a config with each end of each range (each choice) set: a key the schema lacks, or a value it
    refuses, is a ValueError naming the search-space entry. A conditional entry is checked with its condition
    met (so a ``when`` key the schema lacks is refused too)."""
    for p in params:
        condition = {key: accepted[0] for key, accepted in p.when}
        for value in p.examples():
            try:
                trial_config(base, {**condition, p.key: value})
            except (ValueError, TypeError) as err:
                raise ValueError(f"search space entry {p.key} = {value!r}: {err}") from None


def sample(params: list[Param], trial, base: dict) -> dict:
    """One trial's assignments, define-by-run: an entry whose ``when`` does not hold (against the values
    sampled so far, else the base config's) is not sampled and leaves the config as it is."""
    assignments: dict = {}
    for p in params:
        if p.when:
            values = {}
            for key, _ in p.when:
                value = assignments[key] if key in assignments else get(base, key, _UNSET)
                if value is not _UNSET:
                    values[key] = value
            if not p.active(values):
                continue
        assignments[p.key] = p.suggest(trial)
    return assignments


def make_pruner(name: str, steps: int, segments: int):
    """``median`` (default: from the third trial, stop a trial below the median at the same step), ``hyperband``
    (Optuna's HyperbandPruner over the segment ends) or ``none``."""
    optuna = _optuna()
    if name == "median":
        return _default_pruner(optuna)
    if name == "hyperband":
        ends = segment_ends(steps, segments)
        return optuna.pruners.HyperbandPruner(min_resource=ends[0], max_resource=ends[-1], reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"pruner {name!r}: choose one of {', '.join(PRUNERS)}")


def carve_validation(base: dict, items: int) -> tuple[int, int]:
    """``(start, stop)``: the last ``items`` items of the training split, scored instead of the held-out split;
    trials train on the first ``start`` (``data.train_limit``). ValueError, with the reason, when the data
    cannot give such a slice: no ``data.train_limit``, a training split that ``train_limit`` does not cut to a
    prefix (random crops), or training items unlike the held-out ones."""
    import torch

    from simvq.modalities import modality_of

    if isinstance(items, bool) or not isinstance(items, int) or items < 1:
        raise ValueError(f"validation items must be a positive integer, got {items!r}")
    config = load_config(base)
    data = config["data"]
    what = f"the training split of data.dataset {data.get('dataset')!r}"
    if "train_limit" not in data:
        raise ValueError(f"a validation slice needs data.train_limit, which the {config.get('modality', 'image')} data "
                         "section lacks; score on the held-out split instead")
    modality = modality_of(config)
    full, held = modality.build_datasets(config)
    n = len(full)
    if items >= n:
        raise ValueError(f"a validation slice of {items} items leaves no training data: {what} has {n} items")
    short_config = copy.deepcopy(config)
    short_config["data"]["train_limit"] = n - items
    short = modality.build_datasets(short_config)[0]
    try:
        same_prefix = len(short) == n - items and torch.equal(short[n - items - 1], full[n - items - 1])
        like_held = tuple(full[n - 1].shape) == tuple(held[0].shape)
    except (TypeError, IndexError, AttributeError):  # items that are not plain tensors by index (random crops)
        same_prefix = like_held = False
    if not same_prefix:
        raise ValueError(f"{what} is not cut to a prefix by data.train_limit (e.g. random crops), so no slice of it "
                         "stays unseen by training; score on the held-out split instead")
    if not like_held:
        raise ValueError(f"{what} yields items unlike the held-out ones; score on the held-out split instead")
    return n - items, n


_VALIDATION_DATA: dict = {}


def validation_data(s: TuneSettings):
    """The validation slice of ``s`` as a Dataset (built once per process), or None for the held-out split."""
    if s.validation is None:
        return None
    from torch.utils.data import Subset

    from simvq.modalities import modality_of

    start, stop = s.validation
    config = load_config(s.base)
    config["data"]["train_limit"] = stop
    key = json.dumps([config["data"], config.get("seed"), start, stop], sort_keys=True, default=str)
    if key not in _VALIDATION_DATA:
        full = modality_of(config).build_datasets(config)[0]
        _VALIDATION_DATA.clear()
        _VALIDATION_DATA[key] = Subset(full, range(start, stop))
    return _VALIDATION_DATA[key]


def _fingerprint(base: dict, s: TuneSettings) -> str:
    what = {"config": base, "quantizer": s.quantizer, "space": [asdict(p) for p in s.params], "objective": s.objective,
            **({"validation": list(s.validation)} if s.validation is not None else {}),
            "weights": s.weights if s.objective == "weighted" else None, "steps": s.steps, "segments": s.segments,
            "eval_limit": s.eval_limit, "min_utilization": s.min_utilization}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _constraints(trial) -> list[float]:
    # <= 0 is feasible (Optuna's convention); a trial that never reported counts as infeasible
    return list(trial.user_attrs.get("constraint", [1.0]))


def _sampler(optuna, s: TuneSettings, *, offset: int = 0):
    """TPE, seeded with ``seed + offset``: a resumed study (offset = trials already in it) or another worker
    (offset by its index) must not replay the first sampler's random start-up points."""
    return optuna.samplers.TPESampler(seed=s.seed + offset, n_startup_trials=s.startup_trials,
                                      constraints_func=_constraints if s.min_utilization is not None else None)


def _default_pruner(optuna):
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)


def segment_ends(steps: int, segments: int) -> list[int]:
    """Where training pauses for an intermediate evaluation: ``segments`` near-equal parts, the last at ``steps``."""
    return sorted({max(1, math.ceil(steps * i / segments)) for i in range(1, segments + 1)})


def run_trial(trial, s: TuneSettings) -> float:
    """Train and evaluate one trial (the Optuna objective)."""
    optuna = _optuna()
    from simvq.evaluation import evaluate
    from simvq.training import train

    assignments = sample(s.params, trial, s.base)
    config = trial_config(s.base, assignments)
    validation = validation_data(s)
    trial_dir = Path(s.out) / "trials" / f"trial-{trial.number:04d}"
    trial.set_user_attr("dir", str(trial_dir))
    value = math.nan
    for end in segment_ends(s.steps, s.segments):
        result = train(config, out_dir=trial_dir, max_steps=end, progress=False)
        trial.set_user_attr("steps", int(result.steps))
        if result.diverged or result.model_dir is None:
            trial.set_user_attr("diverged", result.diverged_reason or "no finite weights")
            raise optuna.TrialPruned(f"diverged at step {result.steps}")
        ev = evaluate(result.model_dir, validation, limit=min(s.eval_limit, len(validation)) if validation is not None
                      else s.eval_limit, progress=False)
        metrics = metrics_of(ev)
        value = score(ev, s.objective, s.weights)
        trial.set_user_attr("metrics", metrics)
        if s.min_utilization is not None:
            trial.set_user_attr("constraint", [s.min_utilization - metrics.get("utilization", 0.0)])
        if not math.isfinite(value):
            trial.set_user_attr("diverged", f"objective {value} at step {result.steps}")
            raise optuna.TrialPruned(f"objective {value}")
        trial.report(value, end)
        if end < s.steps and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {end} ({s.objective} {value:.4g})")
    return value


def _fail_stale_trials(study, optuna) -> int:
    """Trials left RUNNING by a killed process (local SQLite study only: no other process runs it) -> FAIL."""
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for t in stale:
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    return len(stale)


def _finished(study, optuna) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def _optimize(s: TuneSettings, n_trials: int | None, total: int | None, timeout: float | None, worker: int = 0) -> None:
    optuna = _optuna()
    if s.threads:
        import torch

        torch.set_num_threads(s.threads)
    existing = len(optuna.load_study(study_name=s.study_name, storage=s.storage).get_trials(deepcopy=False))
    study = optuna.load_study(study_name=s.study_name, storage=s.storage,
                              sampler=_sampler(optuna, s, offset=existing + 7919 * worker),
                              pruner=s.pruner if s.pruner is not None else _default_pruner(optuna))
    callbacks = []
    if total is not None:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        callbacks.append(optuna.study.MaxTrialsCallback(total, states=states))
    study.optimize(lambda t: run_trial(t, s), n_trials=n_trials, timeout=timeout, callbacks=callbacks,
                   catch=(), gc_after_trial=True)


def _worker(s: TuneSettings, n_trials, total, timeout, worker: int) -> None:
    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _optimize(s, n_trials, total, timeout, worker)


def tune(
    config,
    *,
    quantizer: str,
    out,
    space: str | Path | dict | None = None,
    trials: int | None = 20,
    budget: str | float | None = None,
    objective: str = "psnr",
    weights: dict | None = None,
    min_utilization: float | None = None,
    jobs: int = 1,
    steps: int | None = None,
    segments: int = 3,
    eval_limit: int | None = None,
    overrides: list[str] | None = None,
    storage: str | None = None,
    study_name: str = STUDY_NAME,
    seed: int = 0,
    pruner=None,
    validation: int | None = None,
    progress: bool = True,
):
    """Search ``quantizer``'s training settings on ``config``; returns the study (outputs written by
    :func:`simvq.tune.report.write_outputs`).

    Args:
        config: preset name, YAML path or dict (the user's model, data and training setup).
        quantizer: the family to tune (``simvq``, ``vq``, ``ema_vq``, ``fsq``, ``lfq``, ...); replaces the
            config's quantizer section unless it names the same family (then that section is the start).
        out: the study folder (``study.db``, ``trials/``, ``best.yaml``, ``trials.csv``, plots, ``report.md``).
        space: a search-space YAML path or mapping (default: the family's shipped space).
        trials: finished (complete or pruned) trials the study should hold; a rerun adds only the missing ones.
        budget: stop starting trials after this time (``"30m"``); with ``trials=None`` the only limit.
        objective: ``psnr`` / ``utilization`` (maximised), ``fid`` (minimised) or ``weighted``:
            ``sum(weights[m] * m)`` maximised (``weights`` default ``{"psnr": 1, "utilization": 10}``).
        min_utilization: a constraint (Optuna ``constraints_func`` of the TPE sampler; the best trial is the best
            feasible one).
        jobs: trials run side by side in separate processes sharing the study.
        steps, segments: training steps per trial (default the config's ``trainer.max_steps``) and the number
            of evaluations the pruner sees.
        eval_limit: held-out items per evaluation (default the config's ``data.eval_limit``, else 256).
        storage: an Optuna RDB URL (e.g. ``postgresql://...``) instead of ``sqlite:///out/study.db``.
        pruner: ``"median"`` (default: ``MedianPruner(n_startup_trials=2)``), ``"hyperband"``, ``"none"`` or any
            Optuna pruner.
        validation: score trials on this many items carved from the end of the training split (trials train
            without them) instead of the held-out split (see :func:`carve_validation`).
    """
    optuna = _optuna()
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if trials is None and budget is None:
        raise ValueError("give a number of trials (--trials) or a time budget (--budget)")
    if trials is not None and (isinstance(trials, bool) or int(trials) < 1):
        raise ValueError(f"trials must be a positive integer, got {trials!r}")
    if min_utilization is not None and not 0 < min_utilization <= 1:
        raise ValueError(f"--min-utilization must lie in (0, 1], got {min_utilization}")
    if not isinstance(segments, int) or segments < 1:
        raise ValueError(f"segments must be a positive integer, got {segments!r}")
    if jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs}")
    timeout = parse_budget(budget)
    if isinstance(pruner, str) and pruner not in PRUNERS:
        raise ValueError(f"pruner {pruner!r}: choose one of {', '.join(PRUNERS)}")
    weights = dict(weights) if weights is not None else dict(DEFAULT_WEIGHTS)

    # ----- everything is checked before the folder is touched -----------------------------------------------
    user = load_config(apply_overrides(load_raw_config(config), overrides))
    from simvq.training import check_trainer_settings

    check_trainer_settings(user["trainer"])
    if storage is not None:
        check_storage(storage, out)
    steps = int(steps if steps is not None else user["trainer"]["max_steps"] or 0)
    if steps < 1:
        raise ValueError("give the training steps per trial (--steps): the config sets no trainer.max_steps")
    if eval_limit is None:
        eval_limit = user["data"].get("eval_limit") or 256
    if pruner is None or isinstance(pruner, str):
        pruner = make_pruner(pruner or "median", steps, segments)
    base = _base_config(config, overrides, quantizer, steps)
    carved = None
    if validation is not None:
        carved = carve_validation(base, validation)
        base["data"] = {**(base.get("data") or {}), "train_limit": carved[0]}
    if isinstance(space, dict):
        params = parse_space(space)
        space_file = None
    else:
        space_file = Path(space) if space is not None else default_space_file(quantizer)
        params = load_space(space_file)
    validate_space(base, params)
    inputs = [p for p in (config_source_file(config), space_file if space is not None else None) if p is not None]
    if storage is not None or not (Path(out).expanduser() / "study.db").is_file():
        _probe_objective(base, params, objective, weights, min_utilization)  # a new study: before writing anything
    out_dir, _ = prepare_output_dir(out, "tune", inputs=inputs, resume=True)
    local = storage is None
    storage_url = storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    s = TuneSettings(base=base, quantizer=quantizer, params=params, objective=objective, weights=weights, steps=steps,
                     segments=segments, eval_limit=int(eval_limit), min_utilization=min_utilization, out=str(out_dir),
                     storage=storage_url, study_name=study_name, seed=seed, pruner=pruner, validation=carved,
                     startup_trials=max(2, min(10, (trials or 30) // 3)))
    s.fingerprint = _fingerprint(base, s)

    optuna.logging.set_verbosity(optuna.logging.INFO if progress else optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=storage_url, direction=direction(objective),
                                load_if_exists=True, sampler=_sampler(optuna, s))
    held = study.user_attrs.get("fingerprint")
    if held is not None and held != s.fingerprint:
        what = study.user_attrs.get("describes", "another setup")
        raise ValueError(
            f"{out_dir} holds a study of {what}, not of this config/quantizer/space/objective/steps; use another --out "
            "(nothing was changed)"
        )
    if held is None:
        if study.get_trials(deepcopy=False):
            raise ValueError(f"study {study_name!r} in {storage_url} was not made by simvq tune; use another --study-name")
        study.set_user_attr("fingerprint", s.fingerprint)
        study.set_user_attr("describes", f"quantizer {quantizer} on {config if not isinstance(config, dict) else 'a config dict'} "
                            f"({objective}, {steps} steps)")
        study.set_user_attr("settings", {"quantizer": quantizer, "objective": objective, "weights": weights,
                                         "steps": steps, "segments": segments, "eval_limit": int(eval_limit),
                                         "min_utilization": min_utilization, "seed": seed,
                                         "validation": list(carved) if carved else None})
    if local:
        stale = _fail_stale_trials(study, optuna)
        if stale and progress:
            print(f"simvq tune: {stale} trial(s) interrupted earlier marked failed; they are rerun")

    done = _finished(study, optuna)
    remaining = None if trials is None else max(0, int(trials) - done)
    if progress:
        print(f"simvq tune: {quantizer}, {done} trial(s) finished, {remaining if remaining is not None else 'unbounded'} "
              f"to run ({steps} steps each, {objective}); study: {storage_url}")
    if remaining != 0:
        if jobs == 1:
            _optimize(s, remaining, trials, timeout)
        else:
            s.threads = max(1, (os.cpu_count() or 1) // jobs)
            ctx = multiprocessing.get_context("spawn")
            procs = [ctx.Process(target=_worker, args=(s, remaining, trials, timeout, i)) for i in range(jobs)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            bad = [p.exitcode for p in procs if p.exitcode]
            if bad:
                raise RuntimeError(f"{len(bad)} tuning worker process(es) failed (exit codes {bad}); rerun to resume")
    return optuna.load_study(study_name=study_name, storage=storage_url), s


def check_storage(storage: str, out) -> None:
    """A ValueError naming ``--storage`` when Optuna could not use the URL: not a URL, a database kind
    SQLAlchemy has no driver for, an SQLite file in a folder that does not exist (unless it is the study folder
    ``out``, made later), or a server that refuses the connection. Nothing is created: an SQLite file is not
    opened (that would create it), other databases are only connected to."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    fix = "give an Optuna RDB URL such as sqlite:///path/to/study.db or postgresql://user:pw@host/db, or leave " \
          "--storage out to keep the study in OUT/study.db"
    try:
        url = make_url(storage)
        url.get_dialect()
    except Exception as err:  # noqa: BLE001 - sqlalchemy's ArgumentError, NoSuchModuleError, a missing driver...
        detail = " ".join(str(err).split())[:200]
        raise ValueError(f"--storage {storage!r} is not a database URL SQLAlchemy can use ({detail}); {fix}") from None
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            return
        path = Path(database).expanduser()
        folder = path.parent.resolve()
        if path.is_dir():
            raise ValueError(f"--storage {storage!r}: {path} is a folder, not a database file; {fix}")
        if not folder.is_dir() and folder != Path(out).expanduser().resolve():
            raise ValueError(f"--storage {storage!r}: the folder {path.parent} does not exist; create it first, or {fix}")
        if folder.is_dir() and not os.access(folder if not path.exists() else path, os.W_OK):
            raise ValueError(f"--storage {storage!r}: {path if path.exists() else folder} is not writable; {fix}")
        return
    try:
        engine = sqlalchemy.create_engine(url)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as err:  # noqa: BLE001 - wrong host, credentials, database name...
        detail = " ".join(str(err).split())[:200]
        raise ValueError(f"--storage {storage!r}: cannot open the database ({detail}); check the URL, or "
                         f"{fix}") from None


def _probe_objective(base: dict, params: list[Param], objective: str, weights: dict, min_utilization) -> None:
    """Evaluate an untrained model on one held-out item: the objective's metrics must be in the result."""
    names = needed_metrics(objective, weights, min_utilization)
    if names == ["utilization"]:
        return
    from simvq.evaluation import evaluate
    from simvq.modalities import modality_of

    config = trial_config(base, {})
    model = modality_of(config).task(config).build_model()
    result = evaluate(model, config=config, limit=1, progress=False, distributed=False)
    check_available(result, names, config.get("modality", "image"))


__all__ = ["PRUNERS", "STUDY_NAME", "TuneSettings", "carve_validation", "check_storage", "make_pruner", "parse_budget", "run_trial",
           "sample", "segment_ends", "trial_config", "tune", "validate_space", "validation_data"]
