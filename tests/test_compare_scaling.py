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


def test_the_default_run_adds_todays_baselines_at_the_smaller_size(forbid_training):
    spec = CompareSpec(data="digits").check()
    assert tuple(spec.quantizers) == ORIGINAL_NINE + NEW == DEFAULT_QUANTIZERS
    assert spec.size_limits == {key: 1024 for key in NEW}
    runs, notes = plan_runs(spec)
    sizes = {}
    for r in runs:
        sizes.setdefault(r.variant, set()).add(r.requested_size)
    assert all(sizes[v] == {1024, 8192} for v in ORIGINAL_NINE) and all(sizes[v] == {1024} for v in NEW)
    assert len(runs) == (9 * 2 + 4) * 2 and len(notes) == 4
    # named quantizers run at every size asked
    named = CompareSpec(quantizers="simvq,ibq,vq_cosine", quantizers_given=True, data="digits").check()
    assert named.quantizers == ["simvq", "ibq", "vq_cosine"] and named.size_limits == {}


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
    assert spec.seeds == [0] and spec.usage_items == 4096 and spec.retrofit is False
    assert spec.budget.steps == 300 and spec.size_limits == {"ibq": 4096}
    # 4,096 held-out images x 256 tokens = 4 tokens per code at the largest K
    assert spec.usage_items * 256 == 4 * max(SCALING_SIZES)
    assert code_dim(base_config(spec)) == 16
    # arguments given still win over the preset's defaults
    given = CompareSpec(config="compare/scaling", codebook_sizes="1024", seeds="0,1", quantizers="simvq").check()
    assert given.codebook_sizes == [1024] and given.seeds == [0, 1] and given.quantizers == ["simvq"]
    # the default preset's own defaults are untouched
    assert CompareSpec(config="compare/default").check().codebook_sizes == [1024, 8192]


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="needs Debian's dataset-fashion-mnist (scripts/install.sh)")
def test_scaling_preset_plans_five_sizes_per_family_with_the_sizes_used(forbid_training):
    spec = CompareSpec(config="compare/scaling", size_limits="ibq=none")
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


# ----- size limits (the CPU preset's cut) ----------------------------------------------------------------
def test_size_limits_skip_runs_above_the_limit_with_a_note(forbid_training):
    runs, notes = plan_runs(CompareSpec(config="compare/scaling", data="digits"))
    ibq = sorted(r.requested_size for r in runs if r.variant == "ibq")
    assert ibq == [1024, 4096]
    assert len(runs) == 5 * 5 + 2
    assert [n.split(":")[0] for n in notes] == [f"IBQ skipped at K={k}" for k in (16384, 65536, 262144)]
    assert all("--size-limit ibq=none" in n for n in notes)
    # a limit given by the user adds to the preset's, and "none" lifts one
    spec = CompareSpec(config="compare/scaling", data="digits", size_limits="vq=4096,ibq=none").check()
    assert spec.size_limits == {"ibq": None, "vq": 4096}
    # run_compare checks the spec again inside plan_runs: a lifted limit stays lifted
    runs, notes = plan_runs(spec)
    assert sorted(r.requested_size for r in runs if r.variant == "ibq") == list(SCALING_SIZES)
    assert max(r.requested_size for r in runs if r.variant == "vq") == 4096 and len(notes) == 3
    named = CompareSpec(config="compare/scaling", quantizers="simvq,ibq", quantizers_given=True).check()
    assert named.size_limits == {}
    assert CompareSpec(config="compare/scaling-gpu").check().size_limits == {}


@pytest.mark.parametrize("text, words", [("ibq", "VARIANT=K"), ("nope=4", "unknown quantizer 'nope'"),
                                         ("ibq=big", "whole codebook size"), ("ibq=1", ">= 2")])
def test_size_limit_errors_are_one_line(tmp_path, capsys, forbid_training, text, words):
    from simvq.cli import main

    out = tmp_path / "report"
    assert main(["compare", "--data", "digits", "--size-limit", text, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()


def test_scaling_gpu_preset_runs_every_size_at_batch_32():
    spec = CompareSpec(config="compare/scaling-gpu").check()
    cfg = base_config(spec)
    assert cfg["data"]["batch_size"] == 32 and code_dim(cfg) == 16
    assert spec.usage_items is None and spec.seeds == [0, 1] and spec.budget.steps == 3000


def test_uniform_ceiling_matches_the_occupancy_formula():
    # K codes drawn uniformly T times: a code is missed with probability (1 - 1/K)^T; by hand for K = 4, T = 2:
    # 1 - (3/4)^2 = 7/16
    assert plots._uniform_ceiling(4, 2) == pytest.approx(100 * 7 / 16, rel=1e-12)
    # K = 262,144 with 4 tokens per code: 1 - exp(-4) to within 1e-6 (the Poisson limit)
    assert plots._uniform_ceiling(262144, 4 * 262144) == pytest.approx(100 * (1 - math.exp(-4)), abs=1e-4)


def _scaling_summary():
    def entry(variant, label, k, used, util, psnr, tokens=20_000):
        def stat(v):
            return {"mean": v, "std": None, "values": [v], "n": 1, "min": v, "max": v}

        return {"variant": variant, "label": label, "requested_size": k, "codebook_size": used, "seeds": [0],
                "diverged": [], "metrics": {"utilization": stat(util), "psnr_official_batch64": stat(psnr),
                                            "tokens": stat(tokens), "perplexity": stat(util * used / 2),
                                            "peak_memory_mb": stat(100.0 + k / 1000), "steps_per_s": stat(2.0)}}

    return [entry("simvq", "SimVQ", 1024, 1024, 0.99, 20.0), entry("simvq", "SimVQ", 4096, 4096, 0.95, 20.5),
            entry("simvq", "SimVQ", 16384, 16384, 0.85, 21.0),
            entry("vq", "plain VQ", 1024, 1024, 0.10, 19.0), entry("vq", "plain VQ", 4096, 4096, 0.05, 19.2),
            entry("vq", "plain VQ", 16384, 16384, 0.001, 18.0)]


def test_scaling_verdict_states_simvq_floor_and_where_baselines_stop():
    from simvq.compare.verdict import verdict

    lines = [line for line in verdict(_scaling_summary(), None, [1024, 4096, 16384]) if line.startswith("Scaling")]
    simvq_line, vq_line = lines
    # SimVQ: 0.99 x 1024 = 1,014, 0.95 x 4096 = 3,891, 0.85 x 16384 = 13,926 codes; lowest 85% < 90%
    assert "codes in use 1,014 -> 3,891 -> 13,926" in simvq_line
    assert "above 90% at every K: no (lowest 85.0% at K=16,384)" in simvq_line
    assert "PSNR 20.00 -> 21.00 dB, improving at every step of K" in simvq_line
    # VQ: 102 -> 205 -> 16 codes: the number in use peaks at K = 4,096; PSNR best there (19.20)
    assert "codes in use 102 -> 205 -> 16" in vq_line
    assert "stops growing after K=4,096 (205 codes)" in vq_line
    assert "best at K=4,096 (19.20 dB)" in vq_line
    assert not [line for line in verdict(_scaling_summary(), None, [1024, 4096]) if line.startswith("Scaling")]


def test_scaling_figure_panels_and_memory_panel(tmp_path, monkeypatch):
    figures = _capture(monkeypatch)
    results = {"summary": _scaling_summary(), "spec": {"quantizers": ["simvq", "vq"]}}
    from simvq.compare.modality import compare_module

    panels = compare_module("image").PLOTS["scaling_panels"]
    plots.codebook_scaling(results, tmp_path / "s.png", panels)
    plots.step_time(results, tmp_path / "t.png")
    scaling, cost = figures
    visible = [ax for ax in scaling.axes if ax.get_visible()]
    assert len(visible) == 3  # utilisation, perplexity, PSNR: the metrics these runs have (no SSIM, FID)
    ceiling = [line for line in visible[0].lines if line.get_linestyle() == "--"]
    assert len(ceiling) == 1  # 20,000 tokens cannot show every one of 16,384 codes even under uniform use
    ys = list(ceiling[0].get_ydata())
    assert ys == pytest.approx([100 * (1 - (1 - 1 / k) ** 20_000) for k in (1024, 4096, 16384)])
    memory = cost.axes[1]
    pts = {tuple(line.get_xdata()): list(line.get_ydata()) for line in memory.lines if line.get_marker() == "o"}
    assert pts[(1024, 4096, 16384)] == pytest.approx([(100 + k / 1000) / 1024 for k in (1024, 4096, 16384)])


def test_every_default_quantizer_gets_its_own_colour():
    colours = plots._colors(list(DEFAULT_QUANTIZERS))
    assert len(DEFAULT_QUANTIZERS) == 13 and len(set(colours.values())) == 13
