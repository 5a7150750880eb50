"""``simvq compare --generation``: options checked before training, the report section's numbers, end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from simvq.compare import CompareSpec, run_compare
from simvq.compare.generation import class_rows, generation_verdict, section_markdown, summarise_generation


def _no_training(*args, **kwargs):
    raise AssertionError("training started although it should not have")


@pytest.fixture
def forbid_training(monkeypatch):
    import simvq.prior.train
    import simvq.training

    monkeypatch.setattr(simvq.training, "train", _no_training)
    monkeypatch.setattr(simvq.prior.train, "train_prior", _no_training)


# ----- arguments ---------------------------------------------------------------------------------------
def test_generation_preset_and_defaults():
    spec = CompareSpec(config="compare/generation").check()
    assert spec.quantizers == ["simvq", "vq", "ema_vq", "fsq", "lfq"]
    assert spec.codebook_sizes == [1024, 8192] and spec.seeds == [0, 1]
    assert spec.generation is True and spec.retrofit is False
    assert spec.prior_config == "prior/compare-cpu" and spec.prior_overrides == []
    plain = CompareSpec().check()
    assert plain.generation is False
    # check() runs again inside run_compare / plan_runs: the defaults it filled in are not "given" options
    assert plain.check().generation is False and spec.check().prior_config == "prior/compare-cpu"
    # the preset's tokenizer config is compare/default's
    from simvq.compare.plan import base_config

    assert base_config(spec)["model"] == base_config(plain)["model"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(prior_config="prior/fashion-cpu"), ValueError, "only apply with --generation"),
        (dict(prior_overrides=["trainer.max_steps=5"]), ValueError, "only apply with --generation"),
        (dict(generation=True, prior_config="prior/nonesuch"), FileNotFoundError, "no prior config"),
        (dict(generation=True, prior_overrides=["model.wdth=8"]), ValueError, "unknown prior config key 'model.wdth'"),
        (dict(generation=True, prior_overrides=["trainer.max_steps"]), ValueError, "is not key=value"),
        (dict(generation=True, prior_overrides=["trainer.max_steps=0"]), ValueError, "trainer.max_steps"),
        (dict(generation="yes"), ValueError, "generation must be true or false"),
        (dict(generation=True, config="compare/audio", data=None), ValueError, "2-D token grids"),
    ],
)
def test_bad_generation_options_fail_before_training(tmp_path, forbid_training, kwargs, error, match):
    out = tmp_path / "report"
    args = dict(quantizers=["simvq"], codebook_sizes=[16], seeds=[0], budget="2", data="digits", out=out)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        run_compare(progress=False, jobs=1, **args)
    assert not out.exists()


def test_cli_rejects_prior_options_without_generation(tmp_path, capsys, forbid_training):
    from simvq.cli import main

    out = tmp_path / "report"
    args = ["compare", "--data", "digits", "--quantizers", "simvq", "--codebook-sizes", "16", "--seeds", "0",
            "--budget", "2", "--no-retrofit", "--quiet", "--out", str(out)]
    assert main([*args, "--prior-set", "trainer.max_steps=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--prior-set only apply with --generation" in err[0]
    assert main([*args, "--generation", "--prior-config", "prior/nonesuch"]) == 2
    assert "no prior config" in capsys.readouterr().err
    assert not out.exists()


# ----- the section's numbers -----------------------------------------------------------------------------
def _record(variant, label, size, seed, bpt, fid, acc):
    return {"variant": variant, "label": label, "requested_size": size, "codebook_size": size, "seed": seed,
            "bits_per_token": bpt, "bits_per_image": bpt * 256, "proxy_gfid_classifier": fid, "precision": 0.5,
            "recall": 0.25, "class_accuracy": acc, "prior_train_time_s": 60.0, "wall_time_s": 100.0,
            "feature_space": "proxy_gfid_classifier", "num_classes": 10, "samples": 200, "nll_images": 1000,
            "held_out_images": 1000, "cfg_scale": 2.0, "prior_parameters": {"total": 1000}}


def test_generation_summary_verdict_and_section_by_hand():
    records = [
        # SimVQ: bits/token 4.0, 4.2 -> mean 4.1, sample std 0.1414; bits/image 1049.6 ± 36.2
        _record("simvq", "SimVQ", 1024, 0, 4.0, 10.0, 0.30),
        _record("simvq", "SimVQ", 1024, 1, 4.2, 12.0, 0.40),
        # VQ: gFID 20 and 22 -> 21 ± 1.414; SimVQ 11 ± 1.414: a gap of 10 is beyond the summed spread (2.83)
        _record("vq", "VQ", 1024, 0, 4.1, 20.0, 0.20),
        _record("vq", "VQ", 1024, 1, 4.1, 22.0, 0.30),
        # FSQ: the lowest bits/image (3.9 x 256 = 998.4, one value each seed)
        _record("fsq", "FSQ", 1024, 0, 3.9, 30.0, 0.10),
        _record("fsq", "FSQ", 1024, 1, 3.9, 30.0, 0.10),
    ]
    summary = summarise_generation(records)
    sim = next(e for e in summary if e["variant"] == "simvq")["metrics"]
    assert sim["bits_per_token"]["mean"] == pytest.approx(4.1)
    assert sim["bits_per_token"]["std"] == pytest.approx(math.sqrt(0.02))
    assert sim["bits_per_image"]["mean"] == pytest.approx(4.1 * 256)
    assert sim["proxy_gfid_classifier"]["std"] == pytest.approx(math.sqrt(2.0))
    assert sim["class_accuracy"]["mean"] == pytest.approx(0.35)

    lines = generation_verdict(summary, "proxy_gfid_classifier")
    pair = next(line for line in lines if "for plain VQ" in line)
    # bits/image: 1049.6 vs 1049.6 (equal means); gFID 11 vs 21: SimVQ better beyond the spread
    assert "proxy gFID* 11.00 ± 1.41 for SimVQ tokens against 21.00 ± 1.41 for plain VQ (-10.00, SimVQ better)" in pair
    # class accuracy 35% vs 25% with std 7.07 each: the 10-point gap is within 14.1 points of spread
    assert "class accuracy 35.0 ± 7.1% for SimVQ tokens against 25.0 ± 7.1% for plain VQ (+10.0%, SimVQ better, " \
           "within the seed spread)" in pair
    bits = next(line for line in lines if "fewest bits/image" in line)
    # FSQ 998 (spread 0) ahead of the next, SimVQ and VQ at 1050: 51 bits, beyond SimVQ's spread of 36; stated,
    # not judged
    assert bits.startswith("Generation, K=1024: fewest bits/image with FSQ tokens (998 ± 0), 51 fewer than ")
    assert "no quality ranking" in bits and "better" not in bits
    fid = next(line for line in lines if "lowest proxy gFID*" in line)
    assert fid == "Generation, K=1024: lowest proxy gFID* with SimVQ tokens (11.00 ± 1.41), 10.00 ahead of VQ."
    # SimVQ's samples 20 worse: VQ 21 ± 1.41 leads FSQ (30 ± 0) by 9; SimVQ 31 ± 1.41 is beyond the summed spread
    worse = [dict(r, proxy_gfid_classifier=r["proxy_gfid_classifier"] + 20 * (r["variant"] == "simvq")) for r in records]
    fid = next(line for line in generation_verdict(summarise_generation(worse), "proxy_gfid_classifier")
               if "lowest proxy gFID*" in line)
    assert fid == ("Generation, K=1024: lowest proxy gFID* with VQ tokens (21.00 ± 1.41), 9.00 ahead of FSQ; SimVQ "
                   "tokens do not generate better by this measure (31.00 ± 1.41).")

    gen = {"prior_config": "prior/compare-cpu", "prior_overrides": [], "feature_space": "proxy_gfid_classifier",
           "prior": {"seed": 0, "model": {"width": 64, "depth": 4, "heads": 4, "positions": "rope"},
                     "data": {"batch_size": 16, "train_limit": 4000}, "trainer": {"max_steps": 200},
                     "eval": {"samples": 200, "seed": 0, "cfg_scale": 2.0, "temperature": 1.0}},
           "classifier": {"accuracy": 0.862, "steps": 500, "eval_images": 10000}, "notes": ["x: no prior"],
           "summary": summary, "verdict": lines, "records": records, "reused_priors": 0, "wall_time_s": 600.0,
           "priors_wall_time_s_sum": 1200.0,
           "grids": {"simvq": {"path": "plots/generation_simvq.png", "codebook_size": 1024, "seed": 0}}}
    md = section_markdown(gen)
    assert "| SimVQ | 1024 | 4.100 ± 0.141 | 1050 ± 36 | 11.00 ± 1.41 | 0.50 ± 0.00 | 0.25 ± 0.00 | 35.0 ± 7.1 |" in md
    assert "held-out accuracy 86.2% on 10,000 test images" in md and "never with published gFID" in md
    assert "![SimVQ samples](plots/generation_simvq.png)" in md and "one row per class" in md
    assert "Note: x: no prior" in md and "(chance 10%)" in md
    assert section_markdown(None) is None


def test_class_rows_puts_one_class_per_row():
    images = torch.arange(14, dtype=torch.float32).reshape(14, 1, 1, 1)
    classes = torch.arange(14) % 3  # class 0: 0 3 6 9 12; class 1: 1 4 7 10 13; class 2: 2 5 8 11
    rows, width = class_rows(images, classes, 3, columns=8)
    assert width == 4  # the fewest samples of a class
    assert rows.flatten().tolist() == [0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11]
    rows, width = class_rows(images, classes, 3, columns=2)
    assert width == 2 and rows.flatten().tolist() == [0, 3, 1, 4, 2, 5]


# ----- end to end ----------------------------------------------------------------------------------------
TINY_PRIOR = ["trainer.max_steps=2", "model.width=16", "model.depth=1", "model.heads=2", "data.train_limit=32",
              "data.eval_limit=20", "data.batch_size=4", "optim.warmup_steps=1", "eval.samples=20",
              "eval.batch_size=20", "eval.classifier_steps=3", "trainer.num_threads=1"]


@pytest.mark.slow
def test_compare_generation_end_to_end_and_resume(tmp_path, monkeypatch):
    from PIL import Image

    out = tmp_path / "report"
    kwargs = dict(quantizers=["simvq", "vq"], codebook_sizes=[16], seeds=[0], budget="2", data="digits", out=out,
                  eval_limit=16, usage_images=40, retrofit=False, generation=True, prior_overrides=TINY_PRIOR)
    results = run_compare(progress=False, jobs=1, **kwargs)
    gen = results["generation"]
    assert [(r["variant"], r["codebook_size"], r["seed"]) for r in gen["records"]] == [("simvq", 16, 0), ("vq", 16, 0)]
    for r in gen["records"]:
        assert r["prior_steps"] == 2 and r["samples"] == 20 and r["nll_images"] == 20 and r["num_classes"] == 10
        assert r["bits_per_image"] == pytest.approx(r["bits_per_token"] * 64)  # digits: 8x8 tokens
        assert 0 < r["bits_per_token"] < 3 * math.log2(16)
        assert 0 <= r["class_accuracy"] <= 1 and "proxy_gfid_classifier" in r
    assert gen["classifier"]["steps"] == 3
    # one classifier for both priors
    assert len(list((out / "generation" / "classifier").iterdir())) == 1
    md = (out / "report.md").read_text()
    assert "## Generation: a token prior on each tokenizer's tokens" in md
    assert any(line.startswith("Generation, K=16:") for line in results["verdict"])
    stored = json.loads((out / "results.json").read_text())
    assert stored["generation"]["summary"] == json.loads(json.dumps(gen["summary"]))
    # the grid: 20 samples of 10 classes -> 10 rows of 2 digits (16x16, 2-pixel padding), enlarged twice
    grid = Image.open(out / gen["grids"]["simvq"]["path"])
    assert grid.size == (2 * (2 * 18 + 2), 2 * (10 * 18 + 2))

    # a second invocation reuses the tokenizers and the priors: nothing trains
    import simvq.prior.train
    import simvq.training

    monkeypatch.setattr(simvq.training, "train", _no_training)
    monkeypatch.setattr(simvq.prior.train, "train_prior", _no_training)
    again = run_compare(progress=False, jobs=1, **kwargs)
    assert again["generation"]["reused_priors"] == 2
    assert again["generation"]["summary"] == gen["summary"]
