"""The retrofit experiment: a trained plain-VQ model swapped to SimVQ and trained on, beside a VQ control."""

from __future__ import annotations

import copy
from pathlib import Path

from simvq.checkpoints import load_tokenizer
from simvq.compare.execute import Scheduler
from simvq.compare.plan import PlannedRun, run_key
from simvq.compare.records import load_run
from simvq.compare.spec import CompareSpec
from simvq.config import resolve_config
from simvq.retrofit import retrofit


def run_retrofit_experiment(spec: CompareSpec, base: dict, finished: dict, *, out: Path, scheduler: Scheduler,
                            max_minutes: float | None) -> dict | None:
    """Retrofit the trained plain-VQ model (largest K, first seed) and train on; a VQ control trains on too.

    Both continuations get the same budget as the original runs, so the retrofit's "after" numbers are
    compared with plain VQ trained equally long, not only with the collapsed start.
    """
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


__all__ = ["run_retrofit_experiment"]
