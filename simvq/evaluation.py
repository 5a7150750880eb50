"""Evaluate a tokenizer over a whole evaluation set: codebook usage and reconstruction quality.

``evaluate(model_or_dir, data)`` resets the quantizer's usage counters, reconstructs every evaluation item
(with the weights the model holds; exported model directories hold the EMA weights), and reports:

- ``utilization`` (codes used at least once over the whole set / K), ``perplexity``, ``dead_codes``; for a
  residual stack these are level 0's, and ``levels`` lists every level's own (level 0 first);
- the modality's metrics (images: :class:`simvq.modalities.image.metrics.ImageMetrics`: PSNR in both conventions,
  SSIM x100, LPIPS / rFID or their labelled proxies).

The modality (:mod:`simvq.modalities`) provides the data, the metric object and the bitrate, so every modality
is evaluated by this one loop. Under ``torch.distributed`` each rank evaluates its shard and the usage counts
are summed over ranks.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from simvq.checkpoints import load_model_dir, load_tokenizer
from simvq.config import resolve_config
from simvq.data import eval_loader
from simvq.io import check_output, save_file_atomic
from simvq.modalities import modality_of


def _load(model_or_dir, config):
    if isinstance(model_or_dir, nn.Module):
        if config is None:
            config = getattr(model_or_dir, "config", None)
        if config is None:
            raise ValueError("evaluate() needs the model's config when given a module: pass config=...")
        return model_or_dir, config, None
    directory = Path(model_or_dir)
    _, cfg = load_model_dir(directory)
    return load_tokenizer(directory), cfg, directory


def _eval_dataset(config: dict, data):
    """An evaluation data set from ``data`` (see :func:`evaluate`) and the model's config."""
    if isinstance(data, (DataLoader, Dataset)):
        return data, "given"
    modality = modality_of(config)
    if data is None:
        return modality.eval_dataset(resolve_config(config), None)
    if isinstance(data, (str, Path)):
        data = modality.data_changes(str(data))
    if not isinstance(data, dict):
        raise TypeError(f"data must be None, a data-section dict, a folder, a data-set name or a DataLoader, got {type(data).__name__}")
    cfg = resolve_config(config)
    cfg["data"].update(data)
    return modality.eval_dataset(resolve_config(cfg), data)


@torch.no_grad()
def evaluate(
    model_or_dir,
    data=None,
    *,
    config: dict | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    limit: int | None = None,
    out: str | Path | None = None,
    metrics: bool = True,
    progress: bool = False,
    distributed: bool = True,
    counts: bool = False,
    force: bool = True,
) -> dict:
    """Evaluate a tokenizer over a whole evaluation set and return a dict of metrics.

    Args:
        model_or_dir: a model directory (``config.yaml`` + ``model.safetensors``) or a tokenizer module (then
            pass ``config``).
        data: None (the evaluation split of the model's own ``data`` section), a dict of ``data`` keys to
            change (e.g. ``{"dataset": "photos"}``), a data-set name, an image folder, a Dataset or a DataLoader.
        batch_size: evaluation batch (default ``data.eval_batch_size``; the official PSNR convention uses 64).
        device: default CUDA when available.
        limit: evaluate only the first ``limit`` items.
        out: write the result as JSON here (atomically). Never over an input (the model directory's files, the
            data folder); an existing file is replaced only with ``force`` (the CLI's ``--force``).
        metrics: False skips the decoder and the reconstruction metrics (usage only; fast).
        distributed: under ``torch.distributed``, evaluate this rank's shard and sum the usage counts over
            ranks (every rank must call); False evaluates the whole set in this process alone.
        counts: also return the per-code counts (``result["counts"]``, a ``(K,)`` int64 tensor; not written
            to ``out``).

    The result also holds the token rate and bitrate of the model (:meth:`simvq.modalities.Modality.rate`).
    """
    t0 = time.perf_counter()
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size (--batch-size) must be a positive integer, got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit (--limit) must be a positive integer, got {limit!r}")
    if out is not None:
        inputs = [] if isinstance(model_or_dir, nn.Module) else [model_or_dir]
        if isinstance(data, (str, Path)) and Path(data).exists():
            inputs.append(data)
        check_output(out, inputs=inputs, force=force)
    model, config, directory = _load(model_or_dir, config)
    modality = modality_of(config)
    task = modality.task(config)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    was_training = model.training
    model.eval()
    dataset, description = _eval_dataset(config, data)
    bs = batch_size if batch_size is not None else config.get("data", {}).get("eval_batch_size", 64)
    if isinstance(dataset, DataLoader):
        loader = dataset
        if limit is not None:
            raise ValueError("limit cannot be applied to a DataLoader; pass the Dataset instead")
    else:
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit must be >= 1, got {limit}")
            dataset = Subset(dataset, range(min(limit, len(dataset))))
        rank, world = 0, 1
        if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        loader = eval_loader(dataset, batch_size=bs, rank=rank, world_size=world)

    weight_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    usage = model.quantize.usage
    level_usage = getattr(model.quantize, "level_usage", None)  # residual stacks: one counter per level
    stack_levels = list(model.quantize.levels) if callable(level_usage) else []  # (FSQ's ``levels`` are its grid)
    counters = [usage] + [level.usage for level in stack_levels]
    saved_counts = [c.counts.clone() for c in counters]
    usage.reset()
    metric = task.build_metrics(device) if metrics else None
    n_items = 0
    iterator = loader
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(loader, desc="evaluate", unit="batch")
    try:
        for batch in iterator:
            x = task.model_input(batch).to(device)
            # a model trained under a "true" precision (bf16-true, 64-true) takes inputs of its own dtype
            x_in = x if x.dtype == weight_dtype or not x.is_floating_point() else x.to(weight_dtype)
            if metric is None:
                model.encode(x_in)  # usage only: the quantizer counts the codes, the decoder is not needed
            else:
                x_hat, _ = task.reconstruct(model, x_in)
                metric.update(x, x_hat.to(x.dtype))
            n_items += x.shape[0]
        stats = usage.compute(reduce=distributed)
        levels = level_usage(reduce=distributed) if callable(level_usage) else None
    finally:
        for counter, saved in zip(counters, saved_counts):
            counter.counts.copy_(saved)  # evaluation never changes a model's training tallies
        model.train(was_training)
    result: dict = {
        "modality": config.get("modality", "image"),
        "quantizer": config.get("quantizer", {}).get("name"),
        "codebook_size": int(model.quantize.codebook_size),
        "items": n_items,
        "data": description,
    }
    result.update(stats.as_dict())
    if levels is not None:  # the top-level figures are level 0's; each level's own beside them
        result["levels"] = [{k: v for k, v in level.as_dict().items()} for level in levels]
    result.update(modality.rate(model, config))
    if metric is not None:
        result.update(metric.compute())
    if counts:
        result["counts"] = stats.counts.cpu()
    result["eval_time_s"] = time.perf_counter() - t0
    if directory is not None:
        result["model_dir"] = str(directory)
    if out is not None:
        saved = {k: v for k, v in result.items() if k != "counts"}
        save_file_atomic(out, json.dumps(saved, indent=2, default=_json_default) + "\n")
    return result


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def format_table(results: dict | list[dict], keys: list[str] | None = None) -> str:
    """A plain-text table of one or several evaluation results (one row each)."""
    rows = [results] if isinstance(results, dict) else list(results)
    if not rows:
        return ""
    if keys is None:
        keys = []
        for r in rows:
            for k, v in r.items():
                if k not in keys and isinstance(v, (int, float, str)) and k not in ("data", "model_dir"):
                    keys.append(k)

    def fmt(v):
        if isinstance(v, float):
            if math.isnan(v):
                return "nan"
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = "  ".join(k.ljust(w) for k, w in zip(keys, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c[i].ljust(widths[i]) for i in range(len(keys))) for c in cells]
    return "\n".join([line, sep, *body])


def format_result(result: dict) -> str:
    """One evaluation result as ``key  value`` lines (easier to read than a wide table)."""
    width = max(len(k) for k in result)
    lines = []
    for k, v in result.items():
        if isinstance(v, float):
            v = f"{v:.4f}" if abs(v) < 1e5 else f"{v:.0f}"
        elif k == "levels":  # a residual stack's per-level usage, one level per part
            v = "; ".join(f"level {i}: {100 * lv['utilization']:.1f}% ({lv['used_codes']:,} codes, perplexity "
                          f"{lv['perplexity']:.1f})" for i, lv in enumerate(v))
        lines.append(f"{k.ljust(width)}  {v}")
    return "\n".join(lines)


__all__ = ["evaluate", "format_result", "format_table"]
