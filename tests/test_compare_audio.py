"""simvq compare for audio tokenizers: modality selection, argument errors before training, and a tiny end-to-end
comparison whose report is checked against an independent ``evaluate()`` of the saved models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from simvq.compare import CompareSpec, plan_runs, run_compare
from simvq.compare.report import PUBLISHED_LIBRITTS, fmt_stat, summarise, verdict
from simvq.compare.runner import base_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _no_training(*args, **kwargs):
    raise AssertionError("training started although it should not have")


@pytest.fixture
def forbid_training(monkeypatch):
    import simvq.training

    monkeypatch.setattr(simvq.training, "train", _no_training)


def _write_wavs(folder: Path, count: int, seconds: float = 0.5, rate: int = 16000) -> list[Path]:
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    paths = []
    for i in range(count):
        p = folder / f"clip{i:02d}.wav"
        sf.write(p, (0.3 * np.sin(2 * np.pi * (150 + 20 * i) * t)).astype(np.float32), rate, subtype="PCM_16")
        paths.append(p)
    return paths


# ----- modality and defaults (no training, no corpus build) ---------------------------------------------
def test_audio_default_plan():
    for spec in (CompareSpec(data="speech"), CompareSpec(config="compare/audio")):
        runs, notes = plan_runs(spec)
        assert spec.modality == "audio" and spec.retrofit is False and spec.usage_items is None
        assert spec.budget.steps == 300 and spec.seeds == [0] and spec.codebook_sizes == [4096]
        assert [(r.variant, r.codebook_size) for r in runs] == [
            ("simvq", 4096), ("vq", 4096), ("ema_vq", 4096), ("fsq", 7 * 5 * 5 * 5 * 5), ("lfq", 4096)]
        assert notes == []
        base = base_config(spec)
        assert base["modality"] == "audio" and base["model"]["preset"] == "small-16k"
        assert base["model"]["dimension"] == 8 and base["model"]["encoder_init_gain"] == 1.0
        assert base["loss"]["gan_weight"] == 0 and base["data"]["dataset"] == "speech"
        assert base["data"]["eval_limit"] == 15 and base["trainer"]["max_steps"] == 300
    # same runs whichever way the audio preset was chosen
    assert [r.key for r in plan_runs(CompareSpec(data="speech"))[0]] == [
        r.key for r in plan_runs(CompareSpec(config="compare/audio"))[0]]
    # the image default is unchanged
    image = CompareSpec()
    image.check()
    assert image.modality == "image" and image.codebook_sizes == [1024, 8192] and image.seeds == [0, 1]
    assert image.usage_items == 2048 and image.retrofit is True and len(image.quantizers) == 13


def test_user_audio_config_gets_a_small_eval_limit_and_keeps_its_own():
    spec = CompareSpec(config="audio/speech-small", quantizers=["simvq"])
    assert base_config(spec)["data"]["eval_limit"] == 30  # speech-small sets none: DNSMOS/CREPE are slow
    spec = CompareSpec(config="audio/speech-small", quantizers=["simvq"], eval_limit=7)
    assert base_config(spec)["data"]["eval_limit"] == 7


def test_eval_limit_is_not_part_of_an_audio_run_key():
    def keys(**kw):
        spec = CompareSpec(config="audio/speech-tiny", quantizers=["simvq", "vq"], codebook_sizes=[16], **kw)
        return [r.key for r in plan_runs(spec)[0]]

    assert keys(eval_limit=2) == keys(eval_limit=5)  # re-evaluated, not retrained
    assert set(keys(eval_limit=2)).isdisjoint(keys(eval_limit=2, budget="4"))


def test_audio_folder_selects_audio_and_holds_out_a_fraction(tmp_path):
    _write_wavs(tmp_path / "speech" / "spk1", 6)
    _write_wavs(tmp_path / "speech" / "spk2", 4)
    spec = CompareSpec(data=str(tmp_path / "speech"), quantizers=["simvq", "vq"], codebook_sizes=[64],
                       overrides=["data.eval_fraction=0.2"])
    runs, _ = plan_runs(spec)
    assert spec.modality == "audio" and len(runs) == 2
    data = runs[0].config["data"]
    assert data["dataset"] == "folder" and data["path"] == str(tmp_path / "speech") and data["eval_fraction"] == 0.2
    from simvq.modalities.audio.data import audio_file_splits

    train, evals = audio_file_splits(data)
    assert (len(train), len(evals)) == (8, 2)  # every 5th of the 10 sorted files


@pytest.mark.parametrize(
    "make, kwargs, error, match",
    [
        # an audio folder with an image config
        (lambda d: _write_wavs(d, 3), dict(config="compare/default"), ValueError, "audio data but compare/default is an image config"),
        # an image folder with an audio config
        (lambda d: _write_png(d), dict(config="compare/audio"), ValueError, "image data but compare/audio is an audio config"),
        # nothing to train on
        (lambda d: (d / "notes.txt").write_text("hello"), dict(), FileNotFoundError, "no audio .* and no image"),
        # one file cannot be split into training and held-out audio
        (lambda d: _write_wavs(d, 1), dict(), ValueError, "at least two readable wav/flac files"),
        # both kinds and no config to choose
        (lambda d: (_write_wavs(d, 2), _write_png(d)), dict(), ValueError, "both audio .* and image files"),
    ],
)
def test_bad_data_fails_before_training(tmp_path, forbid_training, make, kwargs, error, match):
    folder = tmp_path / "data"
    folder.mkdir()
    make(folder)
    out = tmp_path / "report"
    with pytest.raises(error, match=match):
        run_compare(quantizers=["simvq", "vq"], codebook_sizes=[16], budget="2", data=str(folder), out=out,
                    progress=False, jobs=1, **kwargs)
    assert not (out / "runs").exists()


def _write_png(folder: Path) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "img.png")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(data="digits", config="compare/audio"), "image data but compare/audio is an audio config"),
        (dict(data="speech", config="image/photos-small"), "audio data but image/photos-small is an image config"),
        (dict(config="compare/audio", quantizers=["lfq"], quantizers_given=True, codebook_sizes=[1000]), "power-of-two"),
        (dict(config="compare/audio", quantizers=["fsq"], quantizers_given=True, codebook_sizes=[2**20]),
         "fsq cannot run at codebook size 1048576"),
        (dict(data="speech", usage_items=10, usage_images=20), "disagree"),
        (dict(data="speech", usage_items=0), "usage_items must be a positive integer"),
        (dict(data="speech", set_modality=True), "cannot change the default preset's modality"),
    ],
)
def test_bad_audio_arguments_fail_before_training(tmp_path, forbid_training, kwargs, match):
    if kwargs.pop("set_modality", False):
        kwargs["overrides"] = ["modality=audio"]
        kwargs.pop("data")
    with pytest.raises(ValueError, match=match):
        run_compare(out=tmp_path / "r", progress=False, jobs=1, **{"budget": "2", **kwargs})
    assert not (tmp_path / "r" / "runs").exists()


def test_default_audio_list_skips_sizes_fsq_cannot_take():
    runs, notes = plan_runs(CompareSpec(config="compare/audio", codebook_sizes=[4096, 2**20]))
    planned = {(r.variant, r.requested_size, r.codebook_size) for r in runs}
    assert ("fsq", 4096, 4375) in planned  # the FSQ paper's [7, 5, 5, 5, 5]
    assert not any(v == "fsq" and k == 2**20 for v, k, _ in planned)
    assert len(notes) == 1 and "FSQ skipped at K=1048576" in notes[0]


def test_cli_usage_option_and_its_alias():
    import argparse

    from simvq.compare.command import _usage_items, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--usage-items", "12"]).usage_items == "12"
    assert parser.parse_args(["--usage-images", "all"]).usage_items == "all"
    assert _usage_items("all") is None and _usage_items("12") == 12
    args = parser.parse_args([])
    assert args.retrofit is None and args.codebook_sizes is None and args.budget is None
    assert parser.parse_args(["--no-retrofit"]).retrofit is False and parser.parse_args(["--retrofit"]).retrofit is True


# ----- the audio verdict -------------------------------------------------------------------------------
def _audio_record(variant, seed, util, pesq, mel, label):
    return {"kind": "compare", "variant": variant, "label": label, "requested_size": 64, "codebook_size": 64,
            "seed": seed, "status": "ok",
            "eval": {"utilization": util, "perplexity": 10.0, "pesq": pesq, "stoi": 0.5, "mel_distance": mel},
            "history": [{"step": 10, "mel_loss": 1.0, "utilization": util}], "steps_per_s": 2.0,
            "quantizer_params_trainable": 72}


def test_audio_verdict_states_the_numbers():
    records = [_audio_record("simvq", 0, 0.80, 1.10, 1.20, "SimVQ"), _audio_record("vq", 0, 0.05, 1.05, 1.40, "VQ")]
    lines = verdict(summarise(records), None, [64], modality="audio")
    text = "\n".join(lines)
    assert "SimVQ uses 80.0% of its codes on held-out speech, plain VQ 5.0% (+75.0 points)" in text
    assert "PESQ 1.10 against 1.05 (+0.05, SimVQ better)" in text
    assert "mel distance 1.200 against 1.400 (-0.200, SimVQ better)" in text  # lower is better
    assert "lowest mel distance SimVQ (1.200, 0.200 ahead of VQ)" in text
    assert "collapsed (under 10% of codes used): VQ (5.0%)" in text
    assert "Every run's PESQ is below 1.5" in text and "One seed per run" in text
    assert "Diverged runs (NaN/Inf): none." in text


# ----- end to end --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_audio_compare_matches_an_independent_evaluation(tmp_path, monkeypatch):
    from simvq.modalities import build_datasets
    from simvq.evaluation import evaluate

    out = tmp_path / "report"
    # quality metrics on one utterance (DNSMOS and CREPE cost seconds each), utilisation on every held-out one
    kwargs = dict(config="audio/speech-tiny", quantizers=["simvq", "vq"], codebook_sizes=[16], budget="3",
                  out=out, eval_limit=1, usage_items=None, overrides=["trainer.log_every=1"])
    results = run_compare(progress=False, jobs=1, **kwargs)

    for name in ("report.md", "report.html", "results.json"):
        assert (out / name).is_file()
    stored = json.loads((out / "results.json").read_text())
    assert stored["spec"]["modality"] == "audio" and stored["spec"]["budget"] == "3 steps"
    assert stored["base_config"]["modality"] == "audio" and "published_imagenet" not in stored
    assert [r["method"] for r in stored["published_libritts"]["rows"]] == [row[0] for row in PUBLISHED_LIBRITTS]
    assert len(stored["runs"]) == 2 and {r["status"] for r in stored["runs"]} == {"ok"}

    # the held-out split, read here without the model: every utterance's length gives its token count
    config = stored["base_config"]
    hop = math.prod(config["model"]["ratios"])
    full = json.loads(json.dumps(config))
    full["data"]["eval_limit"] = None
    _, eval_set = build_datasets(full)
    expected_tokens = sum(math.ceil(eval_set[i].shape[-1] / hop) for i in range(len(eval_set)))
    by_variant = {e["variant"]: e for e in stored["summary"]}
    for r in stored["runs"]:
        assert r["steps"] == 3 and len(r["history"]) == 3 and r["steps_per_s"] > 0
        model_dir = out / r["model_dir"]
        # an independent evaluation of the saved model, through the public API
        quality = evaluate(model_dir, limit=1)
        usage = evaluate(model_dir, data={"eval_limit": None}, metrics=False)
        assert r["eval"]["items"] == quality["items"] == 1
        for key in ("pesq", "stoi", "mel_distance", "dnsmos_ovrl", "vuv_f1"):
            if key in quality:
                assert r["eval"][key] == pytest.approx(quality[key], rel=1e-5, abs=1e-6), key
                assert by_variant[r["variant"]]["metrics"][key]["mean"] == pytest.approx(quality[key], rel=1e-5, abs=1e-6)
        assert "pesq" in quality and "stoi" in quality and "mel_distance" in quality
        assert r["eval"].get("vuv_model") == quality.get("vuv_model")
        # utilisation over every held-out utterance, as a metrics-free evaluate() counts it
        assert r["usage_eval"]["items"] == len(eval_set) == usage["items"]
        assert r["usage_eval"]["tokens"] == expected_tokens == usage["tokens"]
        assert r["usage_eval"]["utilization"] == pytest.approx(usage["utilization"])
        assert r["usage_eval"]["perplexity"] == pytest.approx(usage["perplexity"], rel=1e-5)
        counts = torch.load(out / r["usage_counts"], weights_only=True)
        assert counts.numel() == 16 and int(counts.sum()) == expected_tokens
        assert by_variant[r["variant"]]["metrics"]["utilization"]["mean"] == pytest.approx(usage["utilization"])
        # bitrate: tokens/s x log2 K
        assert r["bitrate_bps"] == pytest.approx(config["model"]["sample_rate"] / hop * math.log2(16))
    md = (out / "report.md").read_text()
    sim = by_variant["simvq"]["metrics"]
    assert "## Verdict" in md and fmt_stat(sim["utilization"], "pct") in md
    assert f"| SimVQ | 16 | {fmt_stat(sim['utilization'], 'pct')} |" in md
    assert fmt_stat(sim["pesq"], "2f") in md and fmt_stat(sim["mel_distance"], "3f") in md
    assert "LibriTTS" in md and "ImageNet" not in md and "SimVQ K=4096" in md
    assert "\n".join(results["verdict"]) == "\n".join(stored["verdict"])
    assert fmt_stat(sim["utilization"], "pct") in "\n".join(stored["verdict"])
    pngs = sorted((out / "plots").glob("*.png"))
    assert {p.stem for p in pngs} == {"utilization_over_steps", "quality", "code_usage", "spectrograms", "loss_curves"}
    from PIL import Image

    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC
        with Image.open(p) as im:
            im.verify()
            assert im.size[0] > 100 and im.size[1] > 100
        assert f"plots/{p.name}" in md
    html = (out / "report.html").read_text()
    assert "<table>" in html and "plots/spectrograms.png" in html

    # a second invocation reuses every run; a new --eval-limit re-evaluates them, still without training
    import simvq.training

    monkeypatch.setattr(simvq.training, "train", _no_training)
    again = run_compare(progress=False, jobs=1, **kwargs)
    assert again["reused_runs"] == 2 and again["summary"] == json.loads(json.dumps(results["summary"]))
    more = run_compare(progress=False, jobs=1, **{**kwargs, "quantizers": ["simvq"], "eval_limit": 2})
    assert more["reused_runs"] == 1 and more["runs"][0]["key"] == results["runs"][0]["key"]
    assert more["runs"][0]["eval"]["items"] == 2
    assert more["runs"][0]["usage_eval"] == stored["runs"][0]["usage_eval"]
    assert json.loads((out / "results.json").read_text())["base_config"]["data"]["eval_limit"] == 2


def test_packed_jobs_keeps_every_core_busy():
    from simvq.compare.runner import packed_jobs

    # 5 equal runs on 2 cores: two at a time take 3 run-lengths, all five at once 2.5
    assert packed_jobs(5, 2, limit=6) == 5
    assert packed_jobs(2, 2, limit=6) == 2 and packed_jobs(1, 2, limit=6) == 2
    # more runs than the limit: the count with the shortest total time, ties to fewer processes
    assert packed_jobs(34, 2, limit=6) == 2
    assert packed_jobs(7, 2, limit=6) == 4  # 4 then 3: 2 + 1.5 run-lengths, against 4 two at a time
    assert packed_jobs(5, 1, limit=3) == 1
