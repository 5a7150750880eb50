"""Measuring a trained run: reconstruction metrics and codebook usage, both through ``evaluate()``."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch.utils.data import Dataset

from simvq.checkpoints import load_tokenizer
from simvq.compare.modality import compare_module
from simvq.compare.records import save_record
from simvq.evaluation import evaluate
from simvq.modalities import build_datasets, modality_of


def _param_counts(model) -> dict:
    q = model.quantize
    return {
        "params_total": int(sum(p.numel() for p in model.parameters())),
        "params_trainable": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "quantizer_params": int(sum(p.numel() for p in q.parameters())),
        "quantizer_params_trainable": int(sum(p.numel() for p in q.parameters() if p.requires_grad)),
    }


class _Tally(Dataset):
    """A data set that adds up the last-axis length of every item it hands out (audio: samples)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.samples = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        self.samples += int(item.shape[-1])
        return item


def measure_usage(model_dir: str | Path, config: dict, items: int | None, work: Path) -> dict:
    """Codebook usage over up to ``items`` held-out items, and the per-code counts for the figures.

    Covering K codes needs many tokens (at K = 8192, 65,536 tokens are 8 per code, and a code drawn by 1 in
    10,000 tokens is missed half the time), so utilisation is measured on a larger held-out set than the
    reconstruction metrics, in an encoder-and-quantizer pass (``evaluate(metrics=False)``).
    """
    cfg = copy.deepcopy(config)
    cfg["data"]["eval_limit"] = items
    _, dataset = build_datasets(cfg)
    tally = _Tally(dataset)
    result = evaluate(model_dir, tally, batch_size=cfg["data"]["eval_batch_size"], metrics=False, counts=True,
                      distributed=False)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "usage_counts.pt"
    torch.save(result["counts"], path)
    measured = {k: result[k] for k in ("utilization", "perplexity", "dead_codes", "used_codes", "tokens", "sample_coverage",
                                       "estimated_used_codes") if k in result}
    if "levels" in result:  # a residual stack: the figures above are level 0's, every level's utilisation here
        measured["level_utilization"] = [level["utilization"] for level in result["levels"]]
    measured["items"] = len(dataset)
    measured.update(compare_module(modality_of(config).name).usage_fields(len(dataset), tally.samples, config))
    return {"usage_counts": str(path), "usage_eval": measured}


def ensure_usage(record: dict, config: dict, items: int | None, out: Path) -> dict:
    """Add (or redo, when measured on another number of items) a finished run's usage measurement."""
    if record.get("status") != "ok" or not record.get("model_dir") or not Path(record["model_dir"]).is_dir():
        return record
    if record.get("usage_eval") and record.get("usage_request", -1) == items:
        return record
    record.update(measure_usage(record["model_dir"], config, items, out / "work" / record["key"]))
    record["usage_request"] = items
    save_record(out, record)
    return record


def evaluate_run(model_dir: str | Path, config: dict, work: Path) -> dict:
    """``evaluate()`` of a trained model on the run's held-out split, and the reconstructions for the figures.

    Returns the record fields: ``eval`` (the scalar metrics), ``eval_unavailable`` (metrics that could not
    run, with the reason, when the modality reports them), ``eval_request`` (the ``data.eval_limit`` used),
    parameter counts, the token rate and bitrate (the modality's ``rate()``) and ``reconstructions``.
    """
    modality = modality_of(config)
    _, eval_set = build_datasets(config)  # once, for the evaluation and the figures' artifacts
    metrics = evaluate(model_dir, eval_set, progress=False)
    fields = {"eval": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and k != "model_dir"}}
    model = load_tokenizer(model_dir).eval()
    fields.update(_param_counts(model))
    if "unavailable" in metrics:
        fields["eval_unavailable"] = dict(metrics["unavailable"] or {})
    fields["eval_request"] = config["data"].get("eval_limit")
    fields.update(modality.rate(model, config))
    fields.update(compare_module(modality.name).save_reconstructions(model, eval_set, work))
    return fields


def ensure_eval(record: dict, config: dict, out: Path) -> dict:
    """Re-evaluate a finished run whose evaluation used another ``--eval-limit`` (no retraining), for the
    modalities whose run key leaves the evaluation limit out."""
    if not compare_module(modality_of(config).name).EVAL_LIMIT_REEVALUATES or record.get("status") != "ok":
        return record
    if not record.get("model_dir") or not Path(record["model_dir"]).is_dir():
        return record
    if "eval_request" in record and record["eval_request"] == config["data"].get("eval_limit"):
        return record
    record.update(evaluate_run(record["model_dir"], config, out / "work" / record["key"]))
    save_record(out, record)
    return record


__all__ = ["ensure_eval", "ensure_usage", "evaluate_run", "measure_usage"]
