"""simvq compare: arguments checked before training, the report's contents, resuming without retraining."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from simvq.compare import CompareSpec, parse_budget, plan_runs, run_compare
from simvq.compare.report import fmt_stat, markdown_to_html, stats, summarise, verdict
from simvq.compare.runner import Budget


def _no_training(*args, **kwargs):
    raise AssertionError("training started although it should not have")


@pytest.fixture
def forbid_training(monkeypatch):
    import simvq.training

    monkeypatch.setattr(simvq.training, "train", _no_training)


# ----- arguments ---------------------------------------------------------------------------------------
def test_parse_budget():
    assert parse_budget("500") == Budget(steps=500)
    assert parse_budget(40) == Budget(steps=40)
    assert parse_budget("5m") == Budget(minutes=5.0)
    assert parse_budget("90s") == Budget(minutes=1.5)
    assert parse_budget("0.5h") == Budget(minutes=30.0)
    for bad in ("5x", "-3", "0", "m", "", True):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(quantizers=["simvq", "vqq"]), "unknown quantizer"),
        (dict(quantizers=["fsq"], quantizers_given=True, codebook_sizes=[2**20]), "fsq cannot run at codebook size 1048576"),
        (dict(quantizers=["lfq"], quantizers_given=True, codebook_sizes=[1000]), "power-of-two"),
        (dict(codebook_sizes=[1]), "codebook sizes must be >= 2"),
        (dict(seeds="0,zero"), "whole numbers"),
        (dict(seeds=[0, 0]), "twice"),
        (dict(budget="soon"), "budget"),
        (dict(overrides=["quantizer.commitment_weight=0.5"]), "quantizer settings come from --quantizers"),
        (dict(config={"model": {"ch": 8}, "quantizer": {"name": "simvq"}, "optim": {"lr": 1e-3, "momentum": 0.9}}),
         "optim.momentum"),
    ],
)
def test_bad_arguments_fail_before_training(tmp_path, forbid_training, kwargs, match):
    out = tmp_path / "report"
    args = dict(quantizers=["simvq", "vq"], codebook_sizes=[16], seeds=[0], budget="2", data="digits", out=out)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        run_compare(progress=False, jobs=1, **args)
    assert not (out / "runs").exists()  # nothing was started


def test_bad_trainer_setting_is_refused_before_anything_is_written(tmp_path, capsys, forbid_training):
    from simvq.cli import main

    out = tmp_path / "report"
    args = ["compare", "--data", "digits", "--quantizers", "simvq", "--codebook-sizes", "64", "--seeds", "0",
            "--budget", "2", "--no-retrofit", "--quiet", "--jobs", "1", "--out", str(out)]
    for setting, key in (("trainer.devices=abc", "trainer.devices"), ("trainer.strategy=bogus", "trainer.strategy")):
        assert main([*args, "--set", setting]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error" in err[0] and key in err[0], err
        assert not out.exists()


def test_missing_data_folder_fails_before_training(tmp_path, forbid_training):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        run_compare(quantizers=["simvq"], codebook_sizes=[16], seeds=[0], budget="2", data=str(tmp_path / "nope"),
                    out=tmp_path / "r", progress=False, jobs=1)


def test_default_quantizer_list_skips_sizes_fsq_cannot_take():
    spec = CompareSpec(quantizers=["simvq", "fsq", "lfq"], codebook_sizes=[1024, 8192, 2**20], seeds=[0], data="digits")
    runs, notes = plan_runs(spec)
    sizes = {(r.variant, r.codebook_size) for r in runs}
    # FSQ maps 1024 to the paper's [8, 5, 5, 5] = 1000 codes, 8192 to [8, 8, 5, 5, 5] = 8000, and has no levels
    # for 2**20
    assert sizes == {("simvq", 1024), ("simvq", 8192), ("simvq", 2**20), ("fsq", 1000), ("fsq", 8000),
                     ("lfq", 1024), ("lfq", 8192), ("lfq", 2**20)}
    assert len(notes) == 1 and "FSQ skipped at K=1048576" in notes[0]


def test_run_keys_follow_the_config_and_budget():
    def keys(**kw):
        spec = CompareSpec(quantizers=["simvq"], codebook_sizes=[16, 32], seeds=[0, 1], data="digits", **kw)
        return [r.key for r in plan_runs(spec)[0]]

    a = keys(budget="5")
    assert a == keys(budget="5")  # deterministic: a rerun finds its runs
    assert len(set(a)) == 4 and a[0].startswith("simvq-K16-seed0-")
    assert set(a).isdisjoint(keys(budget="6"))
    assert set(a).isdisjoint(keys(budget="5", overrides=["optim.lr=0.01"]))


# ----- report pieces -----------------------------------------------------------------------------------
def test_stats_by_hand():
    s = stats([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0) and (s["min"], s["max"], s["n"]) == (1.0, 3.0, 3)
    one = stats([0.5])
    assert one["std"] is None and fmt_stat(one, "pct") == "50.0"
    assert fmt_stat(stats([0.9, 1.0]), "pct") == f"95.0 ± {100 * math.sqrt(0.005):.1f}"


def _record(variant, seed, util, psnr, label=None):
    return {"kind": "compare", "variant": variant, "label": label or variant, "requested_size": 64, "codebook_size": 64,
            "seed": seed, "status": "ok", "eval": {"utilization": util, "psnr_official_batch64": psnr},
            "history": [{"step": 10, "l1": 0.2, "utilization": util}], "steps_per_s": 10.0,
            "quantizer_params_trainable": 20}


def test_verdict_states_the_numbers_and_the_spread():
    records = [_record("simvq", 0, 0.90, 20.0, "SimVQ"), _record("simvq", 1, 1.00, 21.0, "SimVQ"),
               _record("vq", 0, 0.10, 18.0, "VQ"), _record("vq", 1, 0.20, 20.5, "VQ")]
    summary = summarise(records)
    lines = verdict(summary, None, [64])
    text = "\n".join(lines)
    # utilisation: means 95.0 and 15.0, std sqrt(0.005) = 7.1 points each, difference +80.0 points
    assert "SimVQ uses 95.0 ± 7.1% of its codes" in text and "plain VQ 15.0 ± 7.1%" in text
    assert "+80.0 points)" in text
    # PSNR: 20.50 ± 0.71 vs 19.25 ± 1.77; +1.25 dB is smaller than the summed spread (2.48)
    assert "PSNR 20.50 ± 0.71 dB for SimVQ against 19.25 ± 1.77 dB" in text and "+1.25 dB, within the seed spread" in text
    assert "best PSNR SimVQ" in text
    assert "Diverged runs (NaN/Inf): none." in text


def test_markdown_to_html():
    md = "# Title\n\nSome `code` and **bold**.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n- x\n- y\n\n![cap](plots/p.png)\n"
    page = markdown_to_html(md, title="t")
    assert "<h1>Title</h1>" in page and "<code>code</code>" in page and "<strong>bold</strong>" in page
    flat = re.sub(r">\s+<", "><", page)  # the markdown package puts table cells on lines of their own
    assert "<th>a</th><th>b</th>" in flat and "<td>1</td><td>2</td>" in flat and "---" not in page
    assert page.count("<li>") == 2 and re.search(r'<img (?=[^>]*src="plots/p.png")(?=[^>]*alt="cap")', page)


# ----- end to end --------------------------------------------------------------------------------------
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_report_contents_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "report"
    kwargs = dict(quantizers=["simvq", "vq"], codebook_sizes=[16], seeds=[0, 1], budget="2", data="digits",
                  out=out, eval_limit=16, usage_images=40, overrides=["trainer.log_every=1"])
    results = run_compare(progress=False, jobs=1, **kwargs)

    for name in ("report.md", "report.html", "results.json"):
        assert (out / name).is_file()
    stored = json.loads((out / "results.json").read_text())
    assert stored["spec"]["quantizers"] == ["simvq", "vq"] and stored["spec"]["budget"] == "2 steps"
    assert len(stored["runs"]) == 4 and {r["status"] for r in stored["runs"]} == {"ok"}
    for r in stored["runs"]:
        assert r["steps"] == 2 and len(r["history"]) == 2
        assert r["params_total"] > 0 and r["steps_per_s"] > 0 and r["wall_time_s"] > 0
        for key in ("utilization", "perplexity", "dead_codes", "psnr_official_batch64", "ssim_x100"):
            assert key in r["eval"]
        assert r["eval"]["items"] == 16
        # utilisation is measured on its own, larger held-out set: 40 images x 8x8 tokens
        assert r["usage_eval"]["images"] == 40 and r["usage_eval"]["tokens"] == 40 * 64
        counts = torch.load(out / r["usage_counts"], weights_only=True)
        assert counts.numel() == 16 and int(counts.sum()) == 40 * 64
        assert r["usage_eval"]["utilization"] == pytest.approx(float((counts > 0).float().mean()))
    by = {(e["variant"]): e for e in stored["summary"]}
    sim_u = by["simvq"]["metrics"]["utilization"]
    seeds_u = sorted(r["usage_eval"]["utilization"] for r in stored["runs"] if r["variant"] == "simvq")
    assert sorted(sim_u["values"]) == pytest.approx(seeds_u)
    assert sim_u["mean"] == pytest.approx(sum(seeds_u) / 2)
    # the verdict quotes the summary's numbers
    verdict_text = "\n".join(stored["verdict"])
    assert fmt_stat(sim_u, "pct") in verdict_text
    assert fmt_stat(by["vq"]["metrics"]["utilization"], "pct") in verdict_text
    # retrofit experiment: VQ K=16 of each seed -> SimVQ with each strategy, trained 2 more steps; control as long
    retro = stored["retrofit"]
    assert retro["replaced"] == ["quantize"] and retro["seeds"] == [0, 1] and retro["codebook_size"] == 16
    rows = {r["name"]: r for r in retro["rows"]}
    assert list(rows) == ["before", "control", "keep", "respread", "fresh", "simvq"]
    for name, row in rows.items():
        assert [r["seed"] for r in row["runs"]] == [0, 1] and {r["steps"] for r in row["runs"]} == {2}
    vq_runs = {r["seed"]: r for r in stored["runs"] if r["variant"] == "vq"}
    assert [r["utilization"] for r in rows["before"]["runs"]] == [vq_runs[s]["usage_eval"]["utilization"] for s in (0, 1)]
    # the summary is the mean and sample spread of the per-seed values
    u = [r["utilization"] for r in rows["respread"]["runs"]]
    assert rows["respread"]["metrics"]["utilization"]["mean"] == pytest.approx(sum(u) / 2)
    assert rows["respread"]["metrics"]["utilization"]["std"] == pytest.approx(abs(u[0] - u[1]) / 2**0.5)
    assert {r["seed"] for r in retro["dead_codes"]["fresh"]} == {0, 1}
    # the retrofitted runs started from the VQ model: with `keep` its frozen C is still the VQ codebook, with
    # `respread` the live codes are
    from simvq.checkpoints import load_tokenizer

    vq_model = load_tokenizer(out / "work" / rows["before"]["runs"][0]["key"] / "model")
    keep_model = load_tokenizer(out / "work" / rows["keep"]["runs"][0]["key"] / "model")
    assert type(keep_model.quantize).__name__ == "SimVQ"
    assert torch.equal(keep_model.quantize.embedding.weight, vq_model.quantize.embedding.weight)
    assert not torch.equal(keep_model.quantize.embedding_proj.weight, torch.eye(4))  # W trained from I
    respread = load_tokenizer(out / "work" / rows["respread"]["runs"][0]["key"] / "model").quantize.embedding.weight
    same = (respread == vq_model.quantize.embedding.weight).all(1)
    assert int(same.sum()) == retro["dead_codes"]["respread"][0]["live"] and int((~same).sum()) == retro["dead_codes"]["respread"][0]["dead"]
    assert any(line.startswith("Retrofit target (utilisation above 50% with PSNR at least the control's): met by") for line in stored["verdict"])
    # published table beside ours
    assert any(row["method"] == "SimVQ" and row["codebook_size"] == 8192 for row in stored["published_imagenet"])
    md = (out / "report.md").read_text()
    assert "Published figures" in md and "## Verdict" in md and fmt_stat(sim_u, "pct") in md
    pngs = sorted((out / "plots").glob("*.png"))
    assert {p.stem for p in pngs} >= {"utilization_over_steps", "codebook_scaling", "code_usage", "reconstructions",
                                      "loss_curves", "retrofit"}
    from PIL import Image

    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC
        with Image.open(p) as im:
            im.verify()
            assert im.size[0] > 100 and im.size[1] > 100
        assert f"plots/{p.name}" in md

    # second invocation: everything is reused, nothing trains
    import simvq.training

    monkeypatch.setattr(simvq.training, "train", _no_training)
    again = run_compare(progress=False, jobs=1, **kwargs)
    assert again["reused_runs"] == 4
    assert [r["key"] for r in again["runs"]] == [r["key"] for r in results["runs"]]
    assert again["summary"] == json.loads(json.dumps(results["summary"]))
    assert again["retrofit"] == json.loads(json.dumps(results["retrofit"]))

    # asking for usage on more images re-measures the finished models, still without training
    more = run_compare(progress=False, jobs=1, **{**kwargs, "usage_images": 80})
    assert {r["usage_eval"]["images"] for r in more["runs"]} == {80}
    assert [r["key"] for r in more["runs"]] == [r["key"] for r in results["runs"]]


def test_compare_never_writes_into_a_folder_it_did_not_make(tmp_path, capsys):
    from simvq.cli import main

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep")
    args = ["compare", "--data", "digits", "--quantizers", "simvq", "--codebook-sizes", "64", "--seeds", "0",
            "--budget", "2", "--no-retrofit", "--quiet"]
    assert main([*args, "--out", str(foreign)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0] and "simvq compare" in err[0]
    assert sorted(p.name for p in foreign.iterdir()) == ["todo.txt"] and (foreign / "todo.txt").read_text() == "keep"
    config = tmp_path / "cfg" / "my.yaml"
    config.parent.mkdir()
    config.write_text("base: compare/default\n")
    assert main([*args, "--config", str(config), "--out", str(config)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        Image.fromarray((torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()).save(photos / f"{i}.png")
    folder_args = [a if a != "digits" else str(photos) for a in args]
    assert main([*folder_args, "--out", str(photos / "report")]) == 2
    assert "overlaps the input" in capsys.readouterr().err
    assert sorted(p.name for p in photos.iterdir()) == ["0.png", "1.png", "2.png", "3.png"]
    assert sorted(p.name for p in config.parent.iterdir()) == ["my.yaml"] and config.read_text() == "base: compare/default\n"
