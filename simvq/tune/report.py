"""The outputs of a study: ``best.yaml``, ``trials.csv``, plots (Optuna's matplotlib views) and ``report.md``."""

from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path

import yaml

from simvq.io import save_file_atomic
from simvq.tune.study import TuneSettings, trial_config


def _feasible(trial) -> bool:
    return all(c <= 0 for c in trial.user_attrs.get("constraint", [0.0]))


def best_trial(study, s: TuneSettings):
    """The best complete trial, feasible ones first (``None`` when no trial completed)."""
    import optuna

    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    if not done:
        return None
    sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
    return max(done, key=lambda t: (_feasible(t), sign * t.value))


def trial_params(trial, s: TuneSettings) -> dict:
    """A trial's sampled values as config values (categorical labels mapped back to lists)."""
    by_key = {p.key: p for p in s.params}
    return {k: (by_key[k].value_of(v) if k in by_key else v) for k, v in trial.params.items()}


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def _raw(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def write_trials_csv(study, s: TuneSettings, path: Path) -> None:
    keys = [p.key for p in s.params]
    metric_names = ["psnr", "utilization", "fid"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["number", "state", "value", "duration_s", "steps", *keys, *metric_names, "feasible", "note"])
    for t in study.get_trials(deepcopy=False):
        duration = t.duration.total_seconds() if t.duration is not None else None
        metrics = t.user_attrs.get("metrics", {})
        params = trial_params(t, s)
        w.writerow([t.number, t.state.name, _raw(t.value), _raw(duration and round(duration, 3)),
                    t.user_attrs.get("steps", ""), *[_raw(params.get(k)) for k in keys],
                    *[_raw(metrics.get(m)) for m in metric_names], _feasible(t), t.user_attrs.get("diverged", "")])
    save_file_atomic(path, buf.getvalue())


def write_best_yaml(trial, s: TuneSettings, path: Path) -> dict:
    config = trial_config(s.base, trial_params(trial, s))
    header = (f"# simvq tune: best trial {trial.number} of the study in this folder ({s.objective} {trial.value:.6g} after "
              f"{s.steps} steps; evaluated on {_scored_on(s)}).\n"
              f"# Train it: simvq train --config {path} --out runs/tuned\n")
    save_file_atomic(path, header + yaml.safe_dump(config, sort_keys=False))
    return config


def _scored_on(s: TuneSettings) -> str:
    if s.validation is None:
        return f"{s.eval_limit} held-out items"
    start, stop = s.validation
    return (f"{min(s.eval_limit, stop - start)} validation items, training-split items {start}..{stop - 1} "
            f"(data.train_limit {start}: trials never train on them)")


def write_plots(study, folder: Path, target_name: str = "Objective Value") -> dict[str, str]:
    """PNG plots; returns ``{file: None}`` for each written and ``{name: reason}`` for each skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as views

    folder.mkdir(parents=True, exist_ok=True)
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    plots = {
        "history.png": (views.plot_optimization_history, 1),
        "intermediate.png": (views.plot_intermediate_values, 1),
        "slice.png": (views.plot_slice, 1),
        "importance.png": (views.plot_param_importances, 2),
    }
    written = {}
    for name, (fn, need) in plots.items():
        if len(done) < need:
            written[name] = f"needs at least {need} complete trials"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                named = fn is not views.plot_intermediate_values  # the one view without a target name
                out = fn(study, target_name=target_name) if named else fn(study)
            fig = out.flat[0].figure if hasattr(out, "flat") else out.figure
            # bbox "tight": Optuna puts legends and colour bars outside the axes
            fig.savefig(folder / name, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written[name] = None
        except Exception as err:  # noqa: BLE001 - a plot Optuna cannot draw for this study is reported, not fatal
            written[name] = f"{type(err).__name__}: {' '.join(str(err).split())}"
    return written


def write_report(study, s: TuneSettings, out: Path, plots: dict, best) -> None:
    keys = [p.key for p in s.params]
    lines = [f"# simvq tune: {s.quantizer}", ""]
    settings = (f"Objective **{s.objective}** ({study.direction.name.lower()}"
                + (f", weights {s.weights}" if s.objective == "weighted" else "") + f"), {s.steps} training steps per trial "
                f"in {s.segments} segment(s), evaluated on {_scored_on(s)}"
                + (f", constraint utilisation >= {s.min_utilization}" if s.min_utilization is not None else "") + ".")
    lines += [settings, ""]
    if best is None:
        lines += ["No trial completed yet: no best settings.", ""]
    else:
        feasible = "" if _feasible(best) else " (NO trial met the constraint; this is the best infeasible one)"
        lines += [f"## Best: trial {best.number}, {s.objective} {best.value:.4g}{feasible}", ""]
        lines += [f"- `{k}`: {'null' if v is None else _fmt(v)}" for k, v in trial_params(best, s).items()]
        m = best.user_attrs.get("metrics", {})
        lines += ["", ("Held-out" if s.validation is None else "Validation") + " metrics: " + ", ".join(f"{k} {_fmt(v)}" for k, v in m.items()), "",
                  "Train it: `simvq train --config best.yaml`; its model from the search: "
                  f"`{Path(best.user_attrs.get('dir', '')).name}/model` under `trials/`.", ""]
    lines += ["## Trials", "", "| # | state | value | steps | " + " | ".join(f"`{k}`" for k in keys) + " | utilisation | s |",
              "|" + "---|" * (len(keys) + 6)]
    for t in study.get_trials(deepcopy=False):
        p = trial_params(t, s)
        dur = t.duration.total_seconds() if t.duration is not None else None
        util = t.user_attrs.get("metrics", {}).get("utilization")
        lines.append(f"| {t.number} | {t.state.name.lower()} | {_fmt(t.value)} | {t.user_attrs.get('steps', '')} | "
                     + " | ".join(_fmt(p.get(k)) for k in keys) + f" | {_fmt(util)} | {_fmt(dur)} |")
    lines += ["", "## Plots", ""]
    for name, reason in plots.items():
        lines.append(f"![{name}](plots/{name})" if reason is None else f"- {name}: not drawn ({reason})")
    save_file_atomic(out / "report.md", "\n".join(lines) + "\n")


def write_outputs(study, s: TuneSettings) -> dict:
    """Write every output into ``s.out``; returns ``{"best": trial or None, "best_config": dict or None, ...}``."""
    out = Path(s.out)
    best = best_trial(study, s)
    best_config = write_best_yaml(best, s, out / "best.yaml") if best is not None else None
    write_trials_csv(study, s, out / "trials.csv")
    plots = write_plots(study, out / "plots", target_name=f"held-out {s.objective}")
    write_report(study, s, out, plots, best)
    return {"best": best, "best_config": best_config, "plots": plots}


__all__ = ["best_trial", "trial_params", "write_outputs"]
