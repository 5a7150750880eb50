"""Generation in ``simvq compare --generation``: one token prior per tokenizer run, every prior alike.

Each finished tokenizer run of the comparison gets a prior with the same prior config, steps and seed
(``--prior-config``, default ``prior/compare-cpu``, and ``--prior-set key=value``), trained on that tokenizer's
tokens and measured by :func:`simvq.prior.metrics.evaluate_prior`: held-out bits/token and bits/image, gFID or
its labelled proxy (features of one classifier trained once and shared by every prior of the report, its
accuracy beside it), precision / recall and class accuracy. Resumable like the rest of the comparison::

    OUT/generation/classifier/<key>/     the proxy classifier (trained once per report folder)
    OUT/generation/<run key>-<hash>/     a prior's run folder (tokens, checkpoint, model, samples.png)
    OUT/generation/<run key>-<hash>.json its finished record (reused by a later invocation)
    OUT/plots/generation_<quantizer>.png the sample grid of each quantizer (largest K, first seed)

The hash covers the prior config and the record format, so another prior config trains new priors.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import multiprocessing as mp
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from simvq.compare.summary import beyond_spread, fmt_stat, stats
from simvq.compare.variants import VARIANTS
from simvq.io import save_file_atomic
from simvq.modalities import get_modality

#: the prior of ``--generation`` when no ``--prior-config`` is given
DEFAULT_PRIOR_CONFIG = "prior/compare-cpu"
#: the prior-record format; records of another version are made again
GENERATION_VERSION = 1
#: samples per class in a class-conditional sample grid (one row per class)
GRID_COLUMNS = 8

#: (key, label, format, lower is better) of the numbers summarised over seeds; the gFID key is filled in
_METRICS = [
    ("bits_per_token", "bits/token", "3f", True),
    ("bits_per_image", "bits/image", "0f", True),
    ("precision", "precision", "2f", False),
    ("recall", "recall", "2f", False),
    ("class_accuracy", "class accuracy %", "pct", False),
    ("prior_train_time_s", "prior train s", "0f", True),
    ("wall_time_s", "prior wall s", "0f", True),
]
_FID_LABELS = {"gfid": ("gFID", "gFID (Inception)"),
               "proxy_gfid_classifier": ("proxy gFID*", "proxy gFID* (classifier features, not a gFID)"),
               "proxy_gfid_random_conv": ("proxy gFID†", "proxy gFID† (random conv features, not a gFID)")}


# ----- the arguments ----------------------------------------------------------------------------------------
def check_spec(spec, defaults: dict, default_marker) -> None:
    """Fill and check ``spec.generation``, ``spec.prior_config`` and ``spec.prior_overrides`` (in place).

    Raises ValueError / FileNotFoundError before anything trains: prior options without ``--generation``, a
    modality without 2-D token grids, an unknown prior preset, a bad prior key or value.
    """
    # check() runs more than once: a value it filled in before (the default) is not one the user gave
    given = [flag for flag, value, default in (("--prior-config", spec.prior_config, defaults.get("prior_config", DEFAULT_PRIOR_CONFIG)),
                                               ("--prior-set", spec.prior_overrides, None))
             if value is not default_marker and value not in (None, [], (), default)]
    for name, fallback in (("generation", False), ("prior_config", DEFAULT_PRIOR_CONFIG), ("prior_overrides", ())):
        if getattr(spec, name) is default_marker:
            setattr(spec, name, defaults.get(name, fallback))
    if not isinstance(spec.generation, bool):
        raise ValueError(f"generation must be true or false, got {spec.generation!r}")
    if isinstance(spec.prior_overrides, str):
        spec.prior_overrides = [spec.prior_overrides]
    spec.prior_overrides = [str(o) for o in spec.prior_overrides or []]
    bad = [o for o in spec.prior_overrides if "=" not in o]
    if bad:
        raise ValueError(f"--prior-set {bad[0]!r} is not key=value; write e.g. --prior-set trainer.max_steps=400")
    if not spec.generation:
        if given:
            raise ValueError(f"{' and '.join(given)} only apply with --generation; add --generation (or drop them)")
        return
    if not get_modality(spec.modality).token_grid:
        raise ValueError(f"--generation trains priors over 2-D token grids; {spec.modality} tokenizers have none "
                         "(drop --generation)")
    prior_config(spec)  # an unknown preset or key fails here, before any training


def prior_config(spec) -> dict:
    """The resolved prior config every prior of the comparison uses."""
    from simvq.prior.config import load_prior_config

    return load_prior_config(spec.prior_config, list(spec.prior_overrides))


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def prior_key(run_key: str, config: dict) -> str:
    """``<tokenizer run key>-prior-<hash of the prior config and the record format>``."""
    return f"{run_key}-prior-{_hash([GENERATION_VERSION, config])}"


def _tokenizer_dir(out: Path, record: dict) -> Path | None:
    """A finished run's tokenizer folder (the report folder may have moved since the record was written)."""
    for candidate in (Path(out) / "work" / record["key"] / "model", Path(record.get("model_dir") or "")):
        if (candidate / "model.safetensors").is_file():
            return candidate
    return None


def _load_record(path: Path) -> dict | None:
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("version") == GENERATION_VERSION and rec.get("status") == "ok" else None


# ----- one prior (runs in a worker process) -----------------------------------------------------------------
def class_rows(images, classes, num_classes: int, columns: int = GRID_COLUMNS):
    """Images reordered into one row per class (the first ``columns`` samples of each class), and the row count.

    ``classes`` gives each image's requested class; classes with fewer samples leave their row short (filled
    with the next class's images would mislead), so rows hold ``min(columns, fewest per class)`` images.
    """
    import torch

    per = [torch.nonzero(classes == c).flatten() for c in range(num_classes)]
    width = min([columns] + [len(p) for p in per])
    order = torch.cat([p[:width] for p in per])
    return images[order], width


def train_and_measure(*, tokenizer_dir: str, prior_dir: str, config: dict, classifier_dir: str, record: dict,
                      record_path: str, threads: int | None = 1) -> dict:
    """Train (or resume) one prior, evaluate it, write its sample grid and its record; return the record."""
    import torch

    from simvq.prior.metrics import evaluate_prior
    from simvq.prior.sample import save_image_grid
    from simvq.prior.train import train_prior

    if threads is not None:  # a worker process: its own threads and loggers (no Lightning banners)
        import lightning.pytorch  # noqa: F401  (importing it sets its loggers to INFO: quiet them after)

        torch.set_num_threads(threads)
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    result = train_prior(tokenizer_dir, prior_dir, config, progress=False)
    train_s = time.perf_counter() - t0
    # bits/token: training measured it on the same held-out grids with the same weights
    ev = evaluate_prior(prior_dir, classifier_dir=classifier_dir, held_out=result.metrics, return_images=True)
    images, indices = ev.pop("_images"), ev.pop("_indices")
    n = len(images)
    if ev["num_classes"]:
        classes = torch.arange(n) % ev["num_classes"]
        grid, width = class_rows(images, classes, ev["num_classes"])
    else:
        grid, width = images[: GRID_COLUMNS * GRID_COLUMNS], GRID_COLUMNS
    grid_path = Path(prior_dir) / "samples.png"
    save_image_grid(grid, grid_path, nrow=width, scale=2)
    del indices
    record = dict(record)
    ev.pop("prior", None)
    ev.pop("tokenizer", None)
    record.update(ev)
    record.update(
        prior_steps=int(result.config["trainer"]["max_steps"]),
        prior_parameters=result.parameters,
        prior_train_time_s=train_s,
        prior_final_loss=next((h.get("loss") for h in reversed(result.history) if h.get("loss") is not None), None),
        prior_history=result.history,
        samples_png=str(grid_path),
        wall_time_s=time.perf_counter() - t0,
        status="ok",
    )
    save_file_atomic(record_path, json.dumps(record, indent=1, default=str) + "\n")
    return record


# ----- all priors of a comparison -------------------------------------------------------------------------
def run_generation(spec, runs, finished: dict, *, out: Path, jobs: int = 1, progress: bool = True) -> dict:
    """Train and measure one prior per finished tokenizer run of ``runs``; return the report's generation part.

    ``finished`` maps ``(variant, requested size, seed)`` to the tokenizer run records. Diverged tokenizer runs
    get no prior (a note says so). Finished priors (``OUT/generation/<key>.json``) are reused.
    """
    from simvq.checkpoints import load_model_dir
    from simvq.prior.metrics import load_or_train_classifier

    t0 = time.perf_counter()
    out = Path(out)
    gen_dir = out / "generation"
    gen_dir.mkdir(parents=True, exist_ok=True)
    config = prior_config(spec)
    classifier_dir = gen_dir / "classifier"
    notes, records, todo = [], {}, []
    for run in runs:
        rec = finished.get((run.variant, run.requested_size, run.seed))
        tok = _tokenizer_dir(out, rec) if rec and rec.get("status") == "ok" else None
        label = f"{VARIANTS[run.variant].label} K={run.codebook_size} seed {run.seed}"
        if tok is None:
            notes.append(f"{label}: no prior (the tokenizer run "
                         f"{'diverged' if rec and rec.get('status') == 'diverged' else 'left no model folder'})")
            continue
        key = prior_key(run.key, config)
        path = gen_dir / f"{key}.json"
        found = _load_record(path)
        if found is not None:
            records[_run_id(run)] = found
            continue
        base = {"version": GENERATION_VERSION, "key": key, "tokenizer_key": run.key, "variant": run.variant,
                "label": VARIANTS[run.variant].label, "requested_size": run.requested_size,
                "codebook_size": run.codebook_size, "seed": run.seed}
        todo.append((run, label, dict(tokenizer_dir=str(tok), prior_dir=str(gen_dir / key), config=copy.deepcopy(config),
                                      classifier_dir=str(classifier_dir), record=base, record_path=str(path))))
    # the smaller codebooks first: a comparison cut short still has every quantizer at the first sizes
    todo.sort(key=lambda item: item[0].requested_size)
    classifier_info = None
    if todo or records:
        # one classifier for every prior of the report, trained here once before the workers start
        first = todo[0][2]["tokenizer_dir"] if todo else _tokenizer_dir(out, finished[next(iter(records))])
        _, tok_config = load_model_dir(first)
        _, classifier_info = load_or_train_classifier(tok_config, steps=config["eval"]["classifier_steps"],
                                                      cache_dir=classifier_dir, progress=progress)
    if progress and records:
        print(f"reusing {len(records)} finished prior(s) from {gen_dir}", file=sys.stderr)
    total, done = len(todo) + len(records), len(records)
    workers = max(1, min(int(jobs), len(todo)))

    def finish(run, label, rec):
        nonlocal done
        done += 1
        records[_run_id(run)] = rec
        if progress:
            fid = rec.get(rec.get("feature_space", ""), float("nan"))
            acc = rec.get("class_accuracy")
            print(f"[prior {done}/{total}] {label}: {rec['bits_per_token']:.3f} bits/token, "
                  f"{_FID_LABELS.get(rec.get('feature_space'), ('gFID',))[0]} {fid:.2f}"
                  + (f", class accuracy {100 * acc:.0f}%" if acc is not None else "")
                  + f", {rec['wall_time_s']:.0f} s", file=sys.stderr, flush=True)

    if todo and progress:
        print(f"  training {len(todo)} prior(s) ({spec.prior_config}, {config['trainer']['max_steps']} steps each) on "
              f"{workers} worker(s)", file=sys.stderr, flush=True)
    if workers == 1:
        for run, label, kwargs in todo:
            finish(run, label, train_and_measure(threads=None, **kwargs))
    elif todo:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(train_and_measure, threads=1, **kwargs): (run, label) for run, label, kwargs in todo}
            for fut in as_completed(futures):
                run, label = futures[fut]
                finish(run, label, fut.result())  # a worker's exception surfaces here with its traceback
    ordered = [records[_run_id(r)] for r in runs if _run_id(r) in records]
    grids = _copy_grids(ordered, out)
    summary = summarise_generation(ordered)
    feature = next((r.get("feature_space") for r in ordered if r.get("feature_space")), None)
    return {
        "version": GENERATION_VERSION,
        "prior_config": spec.prior_config if isinstance(spec.prior_config, str) else "(dict)",
        "prior_overrides": list(spec.prior_overrides),
        "prior": config,
        "feature_space": feature,
        "classifier": classifier_info,
        "notes": notes,
        "summary": summary,
        "verdict": generation_verdict(summary, feature),
        "grids": grids,
        "reused_priors": total - len(todo),
        "wall_time_s": time.perf_counter() - t0,
        "priors_wall_time_s_sum": sum(r.get("wall_time_s", 0.0) for r in ordered),
        "records": [_portable(r, out) for r in ordered],
    }


def _run_id(run) -> tuple:
    return (run.variant, run.requested_size, run.seed)


def _portable(record: dict, out: Path) -> dict:
    rec = {k: v for k, v in record.items() if k != "prior_history"}
    if rec.get("samples_png"):
        try:
            rec["samples_png"] = str(Path(rec["samples_png"]).resolve().relative_to(Path(out).resolve()))
        except ValueError:
            pass
    return rec


def _copy_grids(records: list[dict], out: Path) -> dict:
    """``{variant: plots/generation_<variant>.png}``: each quantizer's grid at its largest K, first seed."""
    grids = {}
    for variant in dict.fromkeys(r["variant"] for r in records):
        mine = [r for r in records if r["variant"] == variant and r.get("samples_png")]
        if not mine:
            continue
        size = max(r["requested_size"] for r in mine)
        pick = min((r for r in mine if r["requested_size"] == size), key=lambda r: r["seed"])
        src = Path(pick["samples_png"])
        if not src.is_file():
            continue
        rel = f"plots/generation_{variant}.png"
        save_file_atomic(Path(out) / rel, lambda tmp, src=src: shutil.copyfile(src, tmp))
        grids[variant] = {"path": rel, "codebook_size": pick["codebook_size"], "seed": pick["seed"]}
    return grids


# ----- summary, verdict, report section ---------------------------------------------------------------------
def _metric_keys(records: list[dict]) -> list[str]:
    fid = [k for k in _FID_LABELS if any(k in r for r in records)]
    return [k for k, *_ in _METRICS] + fid


def summarise_generation(records: list[dict]) -> list[dict]:
    """One entry per (quantizer, requested K): every generation number as mean ± spread over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["variant"], r["requested_size"]), []).append(r)
    out = []
    for (variant, size), recs in groups.items():
        recs = sorted(recs, key=lambda r: r["seed"])
        entry = {"variant": variant, "label": recs[0]["label"], "requested_size": size,
                 "codebook_size": recs[0]["codebook_size"], "seeds": [r["seed"] for r in recs], "metrics": {}}
        for key in _metric_keys(recs):
            vals = [float(r[key]) for r in recs if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
            if vals:
                entry["metrics"][key] = stats(vals)
        params = [r["prior_parameters"]["total"] for r in recs if r.get("prior_parameters")]
        if params:
            entry["metrics"]["prior_parameters"] = stats([float(p) for p in params])
        out.append(entry)
    return out


def _within(a: dict, b: dict) -> str:
    if (a.get("n") or 0) < 2 and (b.get("n") or 0) < 2:
        return ", one seed: no spread"
    return "" if beyond_spread(a, b) else ", within the seed spread"


def generation_verdict(summary: list[dict], feature: str | None) -> list[str]:
    """Sentences from the numbers: per K, SimVQ against plain VQ, who needs the fewest bits per image and who
    has the lowest gFID (proxy), each with "within the seed spread" where the gap is smaller than the spreads.

    Fewer bits per image mean tokens that are easier to model, not better images (a tokenizer that uses fewer
    codes needs fewer bits), so bits/image is stated, never called better; the gFID (proxy) and class accuracy are.
    """
    lines = []
    # (key, label, format, lower is better or None: not a quality judgement)
    checks = [("bits_per_image", "bits/image", "0f", None)]
    if feature:
        checks.append((feature, _FID_LABELS.get(feature, ("gFID",))[0], "2f", True))
    checks.append(("class_accuracy", "class accuracy", "pct", False))

    def digits(kind):
        return 2 if kind == "2f" else 1 if kind == "pct" else 0

    for size in sorted({e["requested_size"] for e in summary}):
        rows = [e for e in summary if e["requested_size"] == size]
        sim = next((e for e in rows if e["variant"] == "simvq"), None)
        vq = next((e for e in rows if e["variant"] == "vq"), None)
        if sim and vq:
            parts = []
            for key, label, kind, lower in checks:
                a, b = sim["metrics"].get(key), vq["metrics"].get(key)
                if not a or not b:
                    continue
                unit = "%" if kind == "pct" else ""
                diff = (a["mean"] - b["mean"]) * (100 if kind == "pct" else 1)
                if diff == 0:
                    which = ""
                elif lower is None:
                    which = ", fewer for SimVQ" if diff < 0 else ", fewer for VQ"
                else:
                    which = ", SimVQ better" if (diff < 0) == lower else ", VQ better"
                parts.append(f"{label} {fmt_stat(a, kind)}{unit} for SimVQ tokens against {fmt_stat(b, kind)}{unit} for "
                             f"plain VQ ({diff:+.{digits(kind)}f}{unit}{which}{_within(a, b)})")
            if parts:
                lines.append(f"Generation, K={size}: " + "; ".join(parts) + ".")
        for key, label, kind, lower in checks[:2]:
            have = [e for e in rows if e["metrics"].get(key)]
            if len(have) < 2:
                continue
            ranked = sorted(have, key=lambda e: e["metrics"][key]["mean"])
            top, second = ranked[0], ranked[1]
            a, b = top["metrics"][key], second["metrics"][key]
            gap = f"{abs(a['mean'] - b['mean']):.{digits(kind)}f}"
            if lower is None:
                lines.append(f"Generation, K={size}: fewest {label} with {top['label']} tokens ({fmt_stat(a, kind)}), "
                             f"{gap} fewer than {second['label']}{_within(a, b)} (the easiest tokens to model; using "
                             "fewer codes also lowers it, so this is no quality ranking).")
                continue
            line = (f"Generation, K={size}: lowest {label} with {top['label']} tokens ({fmt_stat(a, kind)}), "
                    f"{gap} ahead of {second['label']}{_within(a, b)}")
            if sim and top["variant"] != "simvq" and sim["metrics"].get(key):
                s = sim["metrics"][key]
                line += f"; SimVQ tokens do not generate better by this measure ({fmt_stat(s, kind)}{_within(a, s)})"
            lines.append(line + ".")
    return lines


def _classifier_line(gen: dict) -> str:
    info = gen.get("classifier") or {}
    if gen.get("feature_space") == "proxy_gfid_classifier":
        return (f"proxy gFID* is the Fréchet distance (torchmetrics' FID with a custom feature extractor) of the 128-d "
                f"features of a small CNN classifier that the project trained on the data set's training split "
                f"({info.get('steps', '?')} steps; its held-out accuracy {100 * info.get('accuracy', float('nan')):.1f}% "
                f"on {info.get('eval_images', '?'):,} test images); one classifier for every prior of this report. "
                "Its scale is its own: compare it between the rows of this table, never with published gFID. "
                "Precision / recall (k = 3) and class accuracy use the same classifier.")
    if gen.get("feature_space") == "proxy_gfid_random_conv":
        return ("proxy gFID† is the Fréchet distance of features of a fixed random conv net (the data set has no labels "
                "to train a classifier on); comparable between the rows of this table only.")
    return "gFID: Inception features (SIMVQ_FID_INCEPTION_WEIGHTS)."


def section_markdown(gen: dict | None) -> str | None:
    """The report's generation section (Markdown) from ``results["generation"]``; None without one."""
    if not gen:
        return None
    p = gen["prior"]
    m, d, t, e = p["model"], p["data"], p["trainer"], p["eval"]
    feature = gen.get("feature_space")
    fid = [(feature, _FID_LABELS[feature][0], "2f")] if feature in _FID_LABELS else []
    cols = [("bits_per_token", "bits/token", "3f"), ("bits_per_image", "bits/image", "0f"), *fid,
            ("precision", "precision", "2f"), ("recall", "recall", "2f"), ("class_accuracy", "class accuracy %", "pct"),
            ("prior_train_time_s", "prior train s", "0f")]
    rows = []
    for size in sorted({x["requested_size"] for x in gen["summary"]}):
        for x in [x for x in gen["summary"] if x["requested_size"] == size]:
            rows.append([x["label"], str(x["codebook_size"]), *(fmt_stat(x["metrics"].get(k), kind) for k, _, kind in cols),
                         str(len(x["seeds"]))])
    header = ["quantizer", "K", *(label for _, label, _ in cols), "priors (seeds)"]
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
                       *("| " + " | ".join(r) + " |" for r in rows)])
    first = gen["records"][0] if gen["records"] else {}
    cond = "class-conditional (one class token, CFG by label dropout)" if first.get("num_classes") else "unconditional"
    lines = [
        f"One token prior per tokenizer run above, all with the same prior config, steps and seed: `{gen['prior_config']}`"
        + (f" with {', '.join('`' + o + '`' for o in gen['prior_overrides'])}" if gen["prior_overrides"] else "")
        + f", a {cond} GPT-style transformer (width {m['width']}, {m['depth']} layers, {m['heads']} heads, "
        f"{m['positions']} positions), {t['max_steps']} steps of {d['batch_size']} token grids on the first "
        f"{d['train_limit'] if isinstance(d['train_limit'], int) else 'all'} training images' tokens, seed {p['seed']}.",
        f"Bits/token: held-out negative log-likelihood on {first.get('nll_images', '?')} held-out grids; bits/image = "
        "bits/token x tokens per image, the figure that compares across K (a larger K costs more bits per token).",
        f"Samples: {first.get('samples', e['samples'])} per prior (seed {e['seed']}, CFG scale {first.get('cfg_scale', e['cfg_scale'])}, "
        f"temperature {e['temperature']}{', sample i asks for class i mod ' + str(first['num_classes']) if first.get('num_classes') else ''}), "
        f"decoded by the prior's own tokenizer and compared with {first.get('held_out_images', '?')} held-out images. "
        + (f"Class accuracy: the share of samples the classifier assigns to the class they were asked for (chance "
           f"{100 / first['num_classes']:.0f}%)." if first.get("num_classes") else "No class labels: class accuracy n/a."),
        _classifier_line(gen),
        f"Priors: {len(gen['records'])} ({gen.get('reused_priors', 0)} reused), {gen['wall_time_s'] / 60:.1f} min for the "
        f"generation part (the priors' own wall times add up to {gen['priors_wall_time_s_sum'] / 60:.1f} min, run side by side).",
    ]
    lines += [f"Note: {n}" for n in gen.get("notes", [])]
    out = ["\n".join(f"- {line}" for line in lines), "", table, "", "Verdict (generation):", ""]
    out += [f"- {line}" for line in gen["verdict"]] or ["- (too few rows to compare)"]
    for variant, g in gen.get("grids", {}).items():
        label = VARIANTS[variant].label if variant in VARIANTS else variant
        what = "one row per class" if first.get("num_classes") else "unconditional"
        out += ["", f"![{label} samples]({g['path']})", "",
                f"*{label} (K={g['codebook_size']}, seed {g['seed']}): prior samples, {what}.*"]
    return "\n".join(out)


__all__ = ["DEFAULT_PRIOR_CONFIG", "GENERATION_VERSION", "check_spec", "class_rows", "generation_verdict",
           "prior_config", "prior_key", "run_generation", "section_markdown", "summarise_generation",
           "train_and_measure"]
