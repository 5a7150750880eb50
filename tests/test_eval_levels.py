"""evaluate() on a residual stack: every level's usage, counted by hand from the encoded indices."""

import math

import torch
from torch.utils.data import Dataset

from simvq.config import load_raw_config, resolve_config
from simvq.evaluation import evaluate, format_result
from simvq.modalities import build_tokenizer


class _Images(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def test_evaluate_reports_each_residual_level_and_keeps_training_tallies():
    raw = load_raw_config("image/digits-tiny")
    raw["quantizer"] = {"name": "residual", "num_quantizers": 3, "quantizer": "vq", "codebook_size": 16}
    config = resolve_config(raw)
    torch.manual_seed(0)
    model = build_tokenizer(config)
    images = torch.rand(20, config["model"]["in_channels"], config["data"]["image_size"], config["data"]["image_size"]) * 2 - 1
    for i, level in enumerate(model.quantize.levels):  # training tallies that evaluation must not touch
        level.usage.update(torch.full((5,), i, dtype=torch.long))
    before = [level.usage.counts.clone() for level in model.quantize.levels]
    result = evaluate(model, _Images(images), config=config, metrics=False, batch_size=8, distributed=False)
    for level, saved in zip(model.quantize.levels, before):
        assert torch.equal(level.usage.counts, saved)

    with torch.no_grad():
        indices = model.encode(images).indices  # (B, h, w, levels)
    assert len(result["levels"]) == 3
    for level, stats in enumerate(result["levels"]):
        counts = torch.bincount(indices[..., level].reshape(-1), minlength=16).double()
        p = counts[counts > 0] / counts.sum()
        assert stats["tokens"] == indices[..., level].numel()
        assert stats["used_codes"] == int((counts > 0).sum())
        assert math.isclose(stats["perplexity"], math.exp(float(-(p * p.log()).sum())), rel_tol=1e-9)
    assert result["used_codes"] == result["levels"][0]["used_codes"]  # the top-level figures are level 0's
    # the printed form names each level's share of codes in use
    text = format_result({"levels": [{"utilization": 0.5, "used_codes": 8, "perplexity": 6.25},
                                     {"utilization": 0.25, "used_codes": 4, "perplexity": 3.0}]})
    assert text == "levels  level 0: 50.0% (8 codes, perplexity 6.2); level 1: 25.0% (4 codes, perplexity 3.0)"


def test_fsq_levels_are_a_grid_not_a_stack():
    # FSQ's ``levels`` attribute is its per-channel grid, [8, 5, 5, 5]: not residual levels to count
    raw = load_raw_config("image/digits-tiny")
    raw["quantizer"] = {"name": "fsq", "levels": [8, 5, 5, 5]}
    config = resolve_config(raw)
    torch.manual_seed(0)
    model = build_tokenizer(config)
    size = config["data"]["image_size"]
    images = torch.rand(6, config["model"]["in_channels"], size, size) * 2 - 1
    result = evaluate(model, _Images(images), config=config, metrics=False, batch_size=4, distributed=False)
    with torch.no_grad():
        indices = model.encode(images).indices
    assert "levels" not in result
    assert result["used_codes"] == int(torch.unique(indices).numel()) and result["codebook_size"] == 8 * 5 * 5 * 5
