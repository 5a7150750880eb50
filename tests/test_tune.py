"""simvq tune: search spaces, resume, pruning, the best config, and refusals (tiny digits runs, CPU)."""

from __future__ import annotations

import csv
import math
import os
import shutil
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from simvq.cli import main  # noqa: E402
from simvq.tune import parse_space, tune, write_outputs  # noqa: E402
from simvq.tune.objective import check_available, parse_weights, score  # noqa: E402
from simvq.tune.space import SPACE_DIR, load_space  # noqa: E402
from simvq.tune.study import segment_ends, trial_config, validate_space  # noqa: E402

CONFIG = "image/digits-tiny"
TINY = dict(steps=2, segments=2, eval_limit=16, progress=False)
SPACE = {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
         "quantizer.commitment_weight": {"type": "float", "low": 0.1, "high": 1.0}}


def _tune_cli(*args):
    return main(["tune", "--config", CONFIG, "--quiet", *args])


# ----- search spaces (no training) ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(SPACE_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_spaces_resolve_for_their_quantizer(path):
    from simvq.tune.study import _base_config

    params = load_space(path)
    validate_space(_base_config(CONFIG, [], path.stem, 2), params)  # every end and choice is a valid config


@pytest.mark.parametrize("space, message", [
    ({"optim.lrr": {"type": "float", "low": 1e-4, "high": 1e-3}}, "optim.lrr"),
    ({"quantizer.decay": {"type": "float", "low": 0.9, "high": 0.99}}, "quantizer.decay"),  # not a simvq keyword
])
def test_unknown_config_key_is_refused(space, message):
    from simvq.tune.study import _base_config

    with pytest.raises(ValueError, match=message):
        validate_space(_base_config(CONFIG, [], "simvq", 2), parse_space(space))


@pytest.mark.parametrize("space, message", [
    ({"optim.lr": {"type": "float", "low": 1e-2, "high": 1e-3}}, "empty range"),
    ({"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-3}}, "empty range"),
    ({"optim.lr": {"type": "float", "low": 0.0, "high": 1e-3, "log": True}}, "log range needs low > 0"),
    ({"quantizer.transform": {"type": "categorical", "choices": []}}, "non-empty list"),
    ({"optim.lr": {"type": "uniform", "low": 0.1, "high": 1}}, "type must be one of"),
    ({"optim.lr": {"type": "float", "low": 0.1}}, "needs high"),
    ({"optim.lr": {"type": "float", "low": 0.1, "high": 1, "step": 2}}, "unknown field"),
    ({"lr": {"type": "float", "low": 0.1, "high": 1}}, "dotted config key"),
    ({"model.ch": {"type": "int", "low": 1.5, "high": 4}}, "integers"),
    ([], "non-empty mapping"),
])
def test_space_errors_name_the_entry(space, message):
    with pytest.raises(ValueError, match=message):
        parse_space(space)


def test_categorical_lists_map_back_to_config_values():
    (levels,) = parse_space({"quantizer.levels": {"type": "categorical", "choices": [[8, 5, 5, 5], [8, 8, 8]]}})
    assert levels.labels == ("[8, 5, 5, 5]", "[8, 8, 8]")  # what Optuna stores (it takes no lists)
    assert levels.value_of("[8, 8, 8]") == [8, 8, 8]
    from simvq.tune.study import _base_config

    config = trial_config(_base_config(CONFIG, [], "fsq", 2), {"quantizer.levels": [8, 8, 8]})
    assert config["quantizer"]["levels"] == [8, 8, 8] and "codebook_size" not in config["quantizer"]


def test_objectives_and_missing_metrics():
    audio_like = {"utilization": 0.5, "pesq_wb": 1.2, "stoi": 0.6}
    with pytest.raises(ValueError, match="does not produce psnr"):
        check_available(audio_like, ["psnr"], "audio")
    check_available(audio_like, ["utilization"], "audio")
    image = {"utilization": 0.5, "psnr_official_batch64": 20.0, "proxy_fid_random_conv": 3.0}
    assert score(image, "fid", {}) == 3.0
    assert score(image, "weighted", parse_weights("psnr=1,utilization=10,fid=-1")) == pytest.approx(20 + 5 - 3)
    assert math.isnan(score({"utilization": 0.5}, "psnr", {}))
    with pytest.raises(ValueError, match="METRIC=NUMBER"):
        parse_weights("ssim=1")


def test_segments_end_at_the_budget():
    assert segment_ends(4, 2) == [2, 4]
    assert segment_ends(5, 3) == [2, 4, 5]
    assert segment_ends(2, 5) == [1, 2]


def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {type: float, low: 1.0e-2, high: 1.0e-3}\n")
    out = tmp_path / "study"
    assert _tune_cli("--quantizer", "simvq", "--space", str(space), "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "empty range" in err and "optim.lr" in err
    assert not out.exists()
    space.write_text("optim.lr: {type: float, low: [1, \n")
    assert _tune_cli("--quantizer", "simvq", "--space", str(space), "--out", str(out)) == 2
    assert "not valid YAML" in capsys.readouterr().err and not out.exists()
    assert _tune_cli("--quantizer", "nosuch", "--out", str(out)) == 2
    assert "no default search space" in capsys.readouterr().err
    # a folder another program made: refused, its file untouched
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert _tune_cli("--quantizer", "simvq", "--out", str(other), "--steps", "2") == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"] and (other / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (the speech corpus)")
def test_objective_the_modality_lacks_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "study"
    code = main(["tune", "--config", "audio/speech-tiny", "--quantizer", "simvq", "--objective", "psnr", "--out", str(out),
                 "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "audio evaluation does not produce psnr" in err and "utilization" in err and "\n" not in err
    assert not out.exists()


# ----- studies (tiny training runs) --------------------------------------------------------------------------
def _states(out):
    study = optuna.load_study(study_name="simvq-tune", storage=f"sqlite:///{out / 'study.db'}")
    return [t.state.name for t in study.get_trials()], study


@pytest.mark.slow
def test_resume_adds_only_missing_trials_and_best_yaml_retrains_to_the_metric(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["--quantizer", "simvq", "--steps", "4", "--segments", "2", "--eval-limit", "16", "--out", str(out)]
    assert _tune_cli(*args, "--trials", "2") == 0
    states, study = _states(out)
    assert states == ["COMPLETE", "COMPLETE"]
    first = {t.number: (t.params, t.value, t.datetime_complete) for t in study.get_trials()}
    assert _tune_cli(*args, "--trials", "3") == 0
    states, study = _states(out)
    assert states == ["COMPLETE"] * 3  # one new trial; the first two are not redone
    for t in study.get_trials()[:2]:
        assert (t.params, t.value, t.datetime_complete) == first[t.number]
    assert study.trials[2].params != study.trials[0].params  # the resumed sampler does not replay trial 0
    assert _tune_cli(*args, "--trials", "3") == 0  # nothing left to do
    assert len(_states(out)[1].trials) == 3

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["COMPLETE"] * 3 and all(r["steps"] == "4" for r in rows)
    assert {"optim.lr", "quantizer.transform", "value", "duration_s"} <= set(rows[0])
    assert {p.name for p in (out / "plots").glob("*.png")} >= {"history.png", "slice.png", "importance.png"}
    assert "## Best: trial" in (out / "report.md").read_text()

    # another quantizer (or config) in the same folder: refused, the study untouched
    assert _tune_cli(*[a if a != "simvq" else "vq" for a in args], "--trials", "4") == 2
    assert "holds a study of" in capsys.readouterr().err and len(_states(out)[1].trials) == 3

    # best.yaml trains to the recorded metric: one 4-step run reproduces the trial's two 2-step segments
    # exactly (same seed, deterministic CPU kernels, exact resume); the tolerance only covers printing noise
    best = max(study.trials, key=lambda t: t.value)
    from simvq.evaluation import evaluate
    from simvq.training import train

    config = yaml.safe_load((out / "best.yaml").read_text())
    assert config["trainer"]["max_steps"] == 4 and config["optim"]["lr"] == pytest.approx(best.params["optim.lr"])
    result = train(str(out / "best.yaml"), out_dir=tmp_path / "retrain", progress=False)
    ev = evaluate(result.model_dir, limit=16)
    assert ev["psnr_official_batch64"] == pytest.approx(best.value, abs=1e-4)


@pytest.mark.slow
def test_a_trial_that_raises_or_is_killed_is_rerun_and_finished_ones_kept(tmp_path, monkeypatch):
    import simvq.tune.study as study_module

    out = tmp_path / "study"
    real = study_module.run_trial

    def crash_second(trial, s):
        if trial.number == 1:
            raise RuntimeError("killed mid-trial")
        return real(trial, s)

    monkeypatch.setattr(study_module, "run_trial", crash_second)
    with pytest.raises(RuntimeError, match="killed mid-trial"):
        tune(CONFIG, quantizer="simvq", out=out, space=SPACE, trials=2, **TINY)
    assert _states(out)[0] == ["COMPLETE", "FAIL"]
    monkeypatch.setattr(study_module, "run_trial", real)
    # a hard kill leaves a trial RUNNING in the database; the rerun marks it failed and replaces it
    _states(out)[1].ask()
    study, settings = tune(CONFIG, quantizer="simvq", out=out, space=SPACE, trials=2, **TINY)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE"]



@pytest.mark.slow
def test_two_jobs_share_one_study_and_stop_at_the_trial_count(tmp_path):
    out = tmp_path / "study"
    study, settings = tune(CONFIG, quantizer="simvq", out=out, space=SPACE, trials=3, jobs=2, **TINY)
    states = [t.state.name for t in study.trials]
    # two processes stop once 3 trials have finished; the one still running then finishes too (docs/tune.md);
    # a trial past the median pruner's two start-up trials may be pruned at its first evaluation
    assert len(states) in (3, 4) and set(states) <= {"COMPLETE", "PRUNED"} and states[:2] == ["COMPLETE"] * 2
    assert settings.threads == max(1, (os.cpu_count() or 1) // 2)
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(params)) == len(params)  # the workers' samplers are seeded apart: no point is trained twice
    dirs = [t.user_attrs["dir"] for t in study.trials]
    assert len(set(dirs)) == len(dirs) and all(Path(d).is_dir() for d in dirs)
    assert all(t.user_attrs["steps"] == 2 and math.isfinite(t.value) for t in study.trials
               if t.state.name == "COMPLETE")
    outputs = write_outputs(study, settings)
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == len(states) and outputs["best"] is not None and (out / "best.yaml").is_file()
    # a rerun with a larger count adds what is missing, in parallel again, and keeps the finished trials
    first = {t.number: t.datetime_complete for t in study.trials}
    study2, _ = tune(CONFIG, quantizer="simvq", out=out, space=SPACE, trials=len(states) + 1, jobs=2, **TINY)
    states2 = [t.state.name for t in study2.trials]
    assert len(states2) in (len(states) + 1, len(states) + 2) and set(states2) <= {"COMPLETE", "PRUNED"}
    assert all(first[t.number] == t.datetime_complete for t in study2.trials[:len(states)])


@pytest.mark.slow
def test_pruned_trial_stops_early(tmp_path):
    out = tmp_path / "study"
    must_prune = optuna.pruners.ThresholdPruner(lower=1e9)  # no PSNR reaches it: pruned at the first report
    study, settings = tune(CONFIG, quantizer="simvq", out=out, space=SPACE, trials=1, pruner=must_prune,
                           **{**TINY, "steps": 4})
    (trial,) = study.trials
    assert trial.state.name == "PRUNED"
    assert trial.user_attrs["steps"] == 2 < settings.steps
    assert list(trial.intermediate_values) == [2]
    outputs = write_outputs(study, settings)
    assert outputs["best"] is None and not (out / "best.yaml").exists()
    assert "No trial completed" in (out / "report.md").read_text()


# ----- conditional entries, pruners, the validation slice (no training) --------------------------------------
COND = {"quantizer.transform": {"type": "categorical", "choices": ["linear", "mlp"]},
        "quantizer.hidden_dim": {"type": "categorical", "choices": [None, 64], "when": {"quantizer.transform": "mlp"}}}


def test_conditional_entry_is_sampled_only_when_its_condition_holds():
    from simvq.tune.study import _base_config, sample

    params = parse_space(COND)
    base = _base_config(CONFIG, [], "simvq", 2)
    linear = sample(params, optuna.trial.FixedTrial({"quantizer.transform": "linear", "quantizer.hidden_dim": 64}), base)
    assert linear == {"quantizer.transform": "linear"}
    mlp = sample(params, optuna.trial.FixedTrial({"quantizer.transform": "mlp", "quantizer.hidden_dim": 64}), base)
    assert mlp == {"quantizer.transform": "mlp", "quantizer.hidden_dim": 64}
    assert trial_config(base, mlp)["quantizer"]["hidden_dim"] == 64
    # a condition on a key the space does not search reads the base config
    (width,) = parse_space({"quantizer.hidden_dim": COND["quantizer.hidden_dim"]})
    fixed = optuna.trial.FixedTrial({"quantizer.hidden_dim": 64})
    assert sample([width], fixed, base) == {}
    assert sample([width], fixed, {**base, "quantizer": {**base["quantizer"], "transform": "mlp"}}) == {
        "quantizer.hidden_dim": 64}
    # the shipped SimVQ space makes the width conditional
    shipped = {p.key: p for p in load_space(SPACE_DIR / "simvq.yaml")}
    assert shipped["quantizer.hidden_dim"].when == (("quantizer.transform", ("mlp",)),)


@pytest.mark.parametrize("when, message", [
    ({"quantizer.transform": "conv"}, "not among quantizer.transform's choices"),
    ("mlp", "when must be a mapping"),
    ({"transform": "mlp"}, "dotted config key"),
])
def test_bad_conditions_name_the_entry(when, message):
    space = {**COND, "quantizer.hidden_dim": {**COND["quantizer.hidden_dim"], "when": when}}
    with pytest.raises(ValueError, match=f"quantizer.hidden_dim: .*{message}"):
        parse_space(space)


def test_condition_on_a_key_the_schema_lacks_is_refused():
    from simvq.tune.study import _base_config

    space = {"quantizer.hidden_dim": {"type": "categorical", "choices": [64], "when": {"quantizer.transfrom": "mlp"}}}
    with pytest.raises(ValueError, match="quantizer.hidden_dim"):
        validate_space(_base_config(CONFIG, [], "simvq", 2), parse_space(space))


def test_pruner_choices(tmp_path):
    from simvq.tune.study import make_pruner

    hyperband = make_pruner("hyperband", 9, 3)
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner)
    assert (hyperband._min_resource, hyperband._max_resource) == (3, 9)  # the first and last segment ends
    assert isinstance(make_pruner("none", 9, 3), optuna.pruners.NopPruner)
    with pytest.raises(ValueError, match="choose one of median, hyperband, none"):
        tune(CONFIG, quantizer="simvq", out=tmp_path / "s", space=SPACE, trials=1, pruner="asha", **TINY)


def test_validation_slice_is_never_trained_on():
    import torch

    from simvq.config import load_config
    from simvq.modalities import modality_of
    from simvq.tune.study import TuneSettings, _base_config, carve_validation, validation_data

    base = _base_config(CONFIG, [], "simvq", 2)
    start, stop = carve_validation(base, 16)
    config = load_config(base)
    full = modality_of(config).build_datasets(config)[0]
    assert stop == len(full) and start == stop - 16
    s = TuneSettings(base={**base, "data": {**base.get("data", {}), "train_limit": start}}, quantizer="simvq", params=[],
                     objective="psnr", weights={}, steps=2, segments=1, eval_limit=16, min_utilization=None, out="",
                     storage="", study_name="", seed=0, validation=(start, stop))
    val = torch.stack([validation_data(s)[i] for i in range(16)])
    assert torch.equal(val, torch.stack([full[i] for i in range(start, stop)]))
    trial_config_ = load_config(s.base)
    train = modality_of(trial_config_).build_datasets(trial_config_)[0]
    assert len(train) == start
    seen = torch.stack([train[i] for i in range(len(train))]).flatten(1)
    for item in val.flatten(1):  # no validation image is among the images the trials train on
        assert not (seen == item).all(1).any()
    with pytest.raises(ValueError, match="leaves no training data"):
        carve_validation(base, stop)


def test_validation_slice_of_random_crops_is_refused():
    from simvq.tune.study import _base_config, carve_validation

    with pytest.raises(ValueError, match="not cut to a prefix by data.train_limit"):
        carve_validation(_base_config("image/photos-small", [], "simvq", 2), 16)


def test_bad_storage_or_trainer_setting_is_refused_before_the_folder_is_made(tmp_path, capsys):
    out = tmp_path / "study"
    base = ["--quantizer", "simvq", "--trials", "1", "--steps", "1", "--eval-limit", "8", "--out", str(out)]
    cases = [
        (["--storage", "bogus://x"], ["--storage", "bogus://x"]),
        (["--storage", f"sqlite:///{tmp_path / 'nope' / 'x.db'}"], ["--storage", "does not exist"]),
        (["--storage", "not a url"], ["--storage"]),
        (["--set", "trainer.devices=abc"], ["trainer.devices", "'abc'"]),
        (["--set", "trainer.strategy=bogus"], ["trainer.strategy"]),
    ]
    for args, words in cases:
        assert _tune_cli(*base, *args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "error" in err and all(w in err for w in words), err
        assert not out.exists(), args
    assert not (tmp_path / "nope").exists()
