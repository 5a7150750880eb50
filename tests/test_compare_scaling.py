"""simvq compare: today's baselines as variants, the compare/scaling preset, the usage-coverage check and the
scaling figures."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from simvq.compare import CompareSpec, plan_runs, run_compare
from simvq.compare import plots
from simvq.compare.plan import base_config, code_dim
from simvq.compare.variants import DEFAULT_QUANTIZERS, VARIANTS
from simvq.modalities import get_modality
from simvq.modalities.image.data import FASHION_MNIST_DIR

NEW = ("ibq", "vq_cosine", "vq_rotation", "vq_kmeans")
#: the nine variants of the original comparison (docs/compare.md, "What it runs")
ORIGINAL_NINE = ("simvq", "vq", "ema_vq", "factorized_vq", "lc_vq", "fsq", "lfq", "simvq_mlp", "simvq_learn_c")
SCALING_SIZES = (1024, 4096, 16384, 65536, 262144)
# FSQ codes per size: the FSQ paper's Table 1 (Mentzer et al. 2023) for 2**10, 2**12, 2**14, 2**16, and for 2**18
# the 2**12 row [7, 5, 5, 5, 5] with two 8-level channels prepended (the project's documented extension rule)
FSQ_CODES = {1024: 8 * 5 * 5 * 5, 4096: 7 * 5**4, 16384: 8 * 8 * 8 * 6 * 5, 65536: 8 * 8 * 8 * 5 * 5 * 5,
             262144: 8 * 8 * 7 * 5**4}


def _no_training(*args, **kwargs):
    raise AssertionError("training started although it should not have")


@pytest.fixture
def forbid_training(monkeypatch):
    import simvq.training

    monkeypatch.setattr(simvq.training, "train", _no_training)


# ----- the new variants ----------------------------------------------------------------------------------
def test_list_names_every_new_variant_and_its_reference(capsys):
    from simvq.cli import main

    assert main(["compare", "--list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    references = {"ibq": "2412.02692", "vq_cosine": "ViT-VQGAN", "vq_rotation": "2410.06424", "vq_kmeans": "k-means"}
    for key, ref in references.items():
        assert key in lines and ref in lines[key]


def test_the_default_run_keeps_its_nine_variants():
    spec = CompareSpec(data="digits").check()
    assert tuple(spec.quantizers) == ORIGINAL_NINE == DEFAULT_QUANTIZERS
    assert not set(NEW) & set(spec.quantizers)
    named = CompareSpec(quantizers="simvq,ibq,vq_cosine", data="digits").check()
    assert named.quantizers == ["simvq", "ibq", "vq_cosine"]


def test_new_variants_plan_and_build_at_small_k(forbid_training):
    spec = CompareSpec(quantizers=list(NEW), quantizers_given=True, codebook_sizes=[16, 64], seeds=[0], budget="2",
                       data="digits")
    runs, notes = plan_runs(spec)
    assert not notes
    assert sorted((r.variant, r.codebook_size) for r in runs) == sorted((v, k) for v in NEW for k in (16, 64))
    expected = {"ibq": ("ibq", {}), "vq_cosine": ("vq", {"l2_normalize": True}),
                "vq_rotation": ("vq", {"rotation_trick": True}), "vq_kmeans": ("vq", {"kmeans_init": True})}
    for r in runs:
        name, flags = expected[r.variant]
        q = r.config["quantizer"]
        assert q["name"] == name and q["codebook_size"] == r.requested_size
        assert all(q[k] == v for k, v in flags.items())
        model = get_modality("image").build_model(r.config)
        quantizer = model.quantize
        assert quantizer.codebook.shape == (r.requested_size, code_dim(r.config))
        for flag, attr in (("l2_normalize", "l2_normalize"), ("rotation_trick", "use_rotation_trick"),
                           ("kmeans_init", "use_kmeans_init")):
            if flag in flags:
                assert getattr(quantizer, attr) is True
        size = r.config["data"]["image_size"]
        x = torch.rand(2, 1, size, size) * 2 - 1
        x_hat, _ = model(x)
        assert x_hat.shape == x.shape and torch.isfinite(x_hat).all()


@pytest.mark.slow
def test_new_variants_train_two_steps_and_report(tmp_path):
    out = tmp_path / "report"
    results = run_compare(progress=False, jobs=1, quantizers=list(NEW), codebook_sizes=[16], seeds=[0], budget="2",
                          data="digits", out=out, eval_limit=8, usage_items=20, retrofit=False)
    assert sorted(r["variant"] for r in results["runs"]) == sorted(NEW)
    assert all(r["status"] == "ok" and r["steps"] == 2 for r in results["runs"])
    report = (out / "report.md").read_text()
    for key in NEW:
        assert f"**{VARIANTS[key].label}** (`{key}`)" in report


# ----- the scaling preset --------------------------------------------------------------------------------
def test_scaling_preset_brings_its_own_defaults_and_16d_codes():
    spec = CompareSpec(config="compare/scaling").check()
    assert spec.quantizers == ["simvq", "vq", "ema_vq", "ibq", "fsq", "lfq"]
    assert spec.codebook_sizes == list(SCALING_SIZES)
    assert spec.seeds == [0] and spec.usage_items is None and spec.retrofit is False
    assert spec.budget.steps is not None
    assert code_dim(base_config(spec)) == 16
    # arguments given still win over the preset's defaults
    given = CompareSpec(config="compare/scaling", codebook_sizes="1024", seeds="0,1", quantizers="simvq").check()
    assert given.codebook_sizes == [1024] and given.seeds == [0, 1] and given.quantizers == ["simvq"]
    # the default preset's own defaults are untouched
    assert CompareSpec(config="compare/default").check().codebook_sizes == [1024, 8192]


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="needs Debian's dataset-fashion-mnist (scripts/install.sh)")
def test_scaling_preset_plans_five_sizes_per_family_with_the_sizes_used(forbid_training):
    spec = CompareSpec(config="compare/scaling")
    runs, notes = plan_runs(spec)
    assert not notes
    actual = {}
    for r in runs:
        actual.setdefault(r.variant, []).append((r.requested_size, r.codebook_size))
        assert code_dim(r.config) == 16 and r.seed == 0
    assert set(actual) == {"simvq", "vq", "ema_vq", "ibq", "fsq", "lfq"}
    for variant, pairs in actual.items():
        want = FSQ_CODES if variant == "fsq" else {k: k for k in SCALING_SIZES}
        assert sorted(pairs) == sorted(want.items()), variant
    assert math.prod([8, 8, 7, 5, 5, 5, 5]) == FSQ_CODES[262144] == 280_000


# ----- usage coverage, before training -------------------------------------------------------------------
def test_usage_set_smaller_than_k_fails_before_training(tmp_path, capsys, forbid_training):
    from simvq.cli import main

    out = tmp_path / "report"
    # compare/scaling keeps 32x32 images and one x2 down-sampling: 16 x 16 = 256 tokens per image, so 2 images give
    # 512 tokens, fewer than K = 1024; 1024 / 256 = 4 images are the least that could cover it
    args = ["compare", "--config", "compare/scaling", "--data", "digits", "--quantizers", "simvq",
            "--codebook-sizes", "1024", "--usage-items", "2", "--out", str(out), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "K=1,024" in err[0] and "512 tokens" in err[0] and "--usage-items 4 or more" in err[0]
    assert not (out / "runs").exists() and not (out / "work").exists()  # nothing was started


def test_held_out_split_too_small_for_k_names_the_split(tmp_path, capsys, forbid_training):
    from simvq.cli import main
    from sklearn.datasets import load_digits

    out = tmp_path / "report"
    held_out_bound = len(load_digits().images)  # the held-out split is part of the 1,797 images
    k = 65536  # needs 65536 / 256 = 256 images: more than a held-out part of digits can be
    args = ["compare", "--config", "compare/scaling", "--data", "digits", "--quantizers", "vq",
            "--codebook-sizes", str(k), "--out", str(out), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at least 256 images" in err[0] and "held-out split has only" in err[0]
    split = int(err[0].split("held-out split has only ")[1].split()[0].replace(",", ""))
    assert 0 < split < 256 and split < held_out_bound
    assert not (out / "runs").exists() and not (out / "work").exists()  # nothing was started


# ----- the figures ---------------------------------------------------------------------------------------
def _entry(variant, label, requested, actual, util, steps_per_s):
    def stat(values):
        return {"mean": sum(values) / len(values), "std": None, "values": list(values), "n": len(values)}

    return {"variant": variant, "label": label, "requested_size": requested, "codebook_size": actual,
            "metrics": {"utilization": stat([util]), "psnr_official_batch64": stat([20.0]),
                        "steps_per_s": stat(steps_per_s)}}


def _results():
    summary = [_entry("simvq", "SimVQ", 1024, 1024, 0.9, [4.0, 2.0]), _entry("simvq", "SimVQ", 16384, 16384, 0.8, [1.0]),
               _entry("fsq", "FSQ", 1024, 1000, 0.5, [5.0]), _entry("fsq", "FSQ", 16384, 15360, 0.4, [5.0])]
    return {"summary": summary, "spec": {"quantizers": ["simvq", "fsq"]}}


def _capture(monkeypatch):
    figures = []

    def save(fig, path):
        figures.append(fig)
        return path.name

    monkeypatch.setattr(plots, "_save", save)
    return figures


def test_scaling_figures_use_a_log_k_axis_and_the_sizes_used(tmp_path, monkeypatch):
    figures = _capture(monkeypatch)
    plots.codebook_scaling(_results(), tmp_path / "s.png", [("utilization", 100.0, "u"), ("psnr_official_batch64", 1.0, "p")])
    plots.step_time(_results(), tmp_path / "t.png")
    scaling, step = figures
    for ax in (*scaling.axes, step.axes[0]):
        assert ax.get_xscale() == "log"
    fsq_x = {tuple(line.get_xdata()) for line in scaling.axes[0].lines if line.get_marker() == "o"}
    assert (1000, 15360) in fsq_x  # FSQ's codes, not the requested 1024 / 16384
    lines = {tuple(line.get_xdata()): list(line.get_ydata()) for line in step.axes[0].lines if line.get_marker() == "o"}
    # seconds per step: SimVQ seeds at 4 and 2 steps/s -> 0.25 s and 0.5 s, mean 0.375; then 1 s
    assert lines[(1024, 16384)] == pytest.approx([0.375, 1.0])
    assert lines[(1000, 15360)] == pytest.approx([0.2, 0.2])


def test_step_time_needs_two_sizes(tmp_path):
    one = {"summary": [_entry("simvq", "SimVQ", 1024, 1024, 0.9, [4.0])], "spec": {"quantizers": ["simvq"]}}
    assert plots.step_time(one, tmp_path / "t.png") is None
    assert not (tmp_path / "t.png").exists()
    assert plots.step_time(_results(), tmp_path / "t.png").endswith("t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
