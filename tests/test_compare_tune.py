"""simvq compare --tune: argument checks, per-variant spaces, the verdict change, and a tiny run end to end."""

from __future__ import annotations

import json

import pytest

optuna = pytest.importorskip("optuna")

from simvq.cli import main  # noqa: E402
from simvq.compare import CompareSpec, run_compare  # noqa: E402
from simvq.compare.summary import stats  # noqa: E402
from simvq.compare.tuned import FALLBACK_SPACE, variant_space, verdict_change  # noqa: E402


def _no_training(*args, **kwargs):
    raise AssertionError("training started although it should not have")


# ----- arguments (no training) -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"tune": -1}, "--tune must be a whole number"),
    ({"tune": True}, "--tune must be a whole number"),
    ({"tune": "3"}, "--tune must be a whole number"),
    ({"tune": 2, "tune_budget": 0}, "--tune-budget must be a positive number"),
    ({"tune": 2, "tune_budget": 1.5}, "--tune-budget must be a positive number"),
    ({"tune": 2, "budget": "2m"}, "needs --tune-budget"),
    ({"tune_budget": 3}, "it needs --tune N"),
])
def test_tune_values_are_checked_before_anything_runs(tmp_path, monkeypatch, kwargs, match):
    import simvq.training

    monkeypatch.setattr(simvq.training, "train", _no_training)
    args = {**dict(quantizers=["simvq", "vq"], codebook_sizes=[16], seeds=[0], budget="2", data="digits",
                   out=tmp_path / "report"), **kwargs}
    with pytest.raises(ValueError, match=match):
        run_compare(progress=False, jobs=1, **args)
    assert not (tmp_path / "report").exists()
    CompareSpec(**{**args, "budget": "2m", "tune": 2, "tune_budget": 3}).check()  # a time budget with steps per trial


def test_audio_comparison_cannot_be_tuned_on_psnr():
    from simvq.compare.tuned import check_tunable

    with pytest.raises(ValueError, match="--tune scores trials on psnr, but the audio comparison is judged on PESQ"):
        check_tunable(CompareSpec(config="compare/audio", tune=2).check())
    check_tunable(CompareSpec(data="digits", tune=2).check())


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_cli_refuses_a_bad_tune_count(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--data", "digits", "--tune", value, "--out", str(tmp_path / "r")])
    assert exc.value.code == 2 and "--tune" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_each_variant_searches_its_family_space_without_the_keys_that_define_it():
    simvq, _ = variant_space("simvq")
    assert list(simvq) == ["optim.lr", "quantizer.commitment_weight", "quantizer.codebook_weight",
                           "quantizer.transform", "quantizer.hidden_dim"]
    mlp, _ = variant_space("simvq_mlp")  # the MLP variant keeps its transform; the width is still searched
    assert "quantizer.transform" not in mlp and mlp["quantizer.hidden_dim"]["when"] == {"quantizer.transform": "mlp"}
    assert list(variant_space("fsq")[0]) == ["optim.lr"]  # the levels are the compared codebook size
    assert "quantizer.kmeans_init" not in variant_space("vq_kmeans")[0]
    lr_only, path = variant_space("factorized_vq")  # no shipped space for the family
    assert path == FALLBACK_SPACE and list(lr_only) == ["optim.lr"]


def _entry(variant, label, size, psnr, util):
    return {"variant": variant, "label": label, "requested_size": size, "codebook_size": size, "seeds": [0, 1],
            "diverged": [], "metrics": {"psnr_official_batch64": stats(psnr), "utilization": stats(util)}}


def test_verdict_change_names_the_winners_per_size():
    quality = ("psnr_official_batch64", "PSNR", "2f", True, " dB")
    shared = [_entry("simvq", "SimVQ", 64, [20.0, 20.2], [0.9, 0.92]), _entry("vq", "VQ", 64, [21.0, 21.2], [0.1, 0.12])]
    tuned = [_entry("simvq", "SimVQ", 64, [22.0, 22.2], [0.9, 0.9]), _entry("vq", "VQ", 64, [21.5, 21.7], [0.3, 0.32])]
    lines, changed = verdict_change(shared, tuned, [64], quality)
    assert changed
    # shared: VQ best on PSNR (21.1 mean, sample std 0.14); tuned: SimVQ (22.1), 0.6 dB ahead of VQ, beyond 0.28
    assert lines[0] == ("K=64, best PSNR: VQ (21.10 ± 0.14 dB) with shared settings, SimVQ (22.10 ± 0.14 dB) tuned "
                        "(changed).")
    assert lines[1] == ("K=64, best utilisation: SimVQ (91.0 ± 1.4%) with shared settings, SimVQ (90.0 ± 0.0%) tuned "
                        "(unchanged).")
    lines, changed = verdict_change(shared, shared, [64], quality)
    assert not changed and all(line.endswith("(unchanged).") for line in lines)


# ----- end to end (tiny) -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compare_tune_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "report"
    args = ["compare", "--data", "digits", "--quantizers", "simvq", "--codebook-sizes", "16", "--seeds", "0",
            "--budget", "2", "--eval-limit", "8", "--usage-items", "8", "--no-retrofit", "--jobs", "1",
            "--tune", "2", "--tune-budget", "1", "--out", str(out), "--quiet"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    tuned = results["tuned"]
    assert tuned["trials"] == 2 and tuned["steps_per_trial"] == 1 and tuned["validation_items"] == 8
    assert set(tuned["studies"]) == {"simvq"}
    for variant in ("simvq",):
        study = optuna.load_study(study_name="simvq-tune", storage=f"sqlite:///{out / 'tune' / variant / 'study.db'}")
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
        best = max(study.trials, key=lambda t: t.value)
        assert tuned["studies"][variant]["best"]["trial"] == best.number
        # the tuned runs train with the study's best values (read back from the database, not from the report)
        (run,) = [r for r in tuned["runs"] if r["variant"] == variant]
        assert run["status"] == "ok" and run["steps"] == 2
        record = json.loads((out / "runs" / f"{run['key']}.json").read_text())
        assert record["kind"] == "tuned"
        assert record["quantizer"]["commitment_weight"] == pytest.approx(best.params["quantizer.commitment_weight"])
        # the trials trained without the validation slice: data.train_limit is the split's size less 8 items
        config = json.loads(json.dumps(study.user_attrs["settings"]))
        assert config["validation"][1] - config["validation"][0] == 8
    shared_keys = {r["key"] for r in results["runs"]}
    assert not shared_keys & {r["key"] for r in tuned["runs"]}
    md = (out / "report.md").read_text()
    assert "## Tuned: each quantizer at its own best settings (`--tune 2`)" in md
    assert "| quantizer | K | utilisation % shared | utilisation % tuned | PSNR shared | PSNR tuned |" in md
    assert "1 training steps per trial" in md and "validation slice of 8 items" in md
    assert results["verdict"][-1].startswith(("Tuning did not change the verdict", "Tuning changed the verdict"))
    # every PSNR cell of the side-by-side table is the summary's mean (one seed: no spread)
    for entry, label in ((results["summary"], "shared"), (tuned["summary"], "tuned")):
        for e in entry:
            assert f"{e['metrics']['psnr_official_batch64']['mean']:.2f}" in md, label

    # the same command again: studies and runs are reused, nothing trains
    import simvq.training

    monkeypatch.setattr(simvq.training, "train", _no_training)
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())["tuned"]
    assert [r["key"] for r in again["runs"]] == [r["key"] for r in tuned["runs"]]
    assert {v: s["trials"] for v, s in again["studies"].items()} == {"simvq": 2}
