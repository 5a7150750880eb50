"""Audio training end to end (tiny preset, a handful of steps), evaluation, and official checkpoint conversion."""

import math
import shutil

import pytest

from simvq.config import load_config

pytestmark = pytest.mark.slow


def test_audio_presets_turn_on_warmup_clipping_and_ema():
    for name in ("audio/official-24k", "audio/speech-small", "audio/speech-tiny"):
        c = load_config(name)
        assert c["optim"]["warmup_steps"] > 0 and c["optim"]["grad_clip"] is not None and c["optim"]["ema_decay"] is not None, name
    official = load_config("audio/official-24k")
    assert (official["loss"]["mel_weight"], official["loss"]["quantizer_weight"]) == (45.0, 1000.0)
    assert official["data"]["segment_seconds"] == 1.0 and official["optim"]["lr"] == 1e-4
    with pytest.raises(ValueError, match="data.sample_rate"):
        load_config("audio/speech-tiny", ["data.sample_rate=24000"])
    with pytest.raises(ValueError, match="valid keys"):
        load_config("audio/speech-tiny", ["loss.mel_wieght=1"])


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_tiny_audio_training_runs_with_gan_and_evaluates(tmp_path):
    from simvq.evaluation import evaluate
    from simvq.training import train

    result = train(
        "audio/speech-tiny", out_dir=tmp_path / "run", progress=False,
        overrides=[f"data.path={tmp_path / 'corpus'}"],
    )
    assert not result.diverged and result.steps == 4 and result.model_dir is not None
    last = result.history[-1]
    for key in ("mel_loss", "quant_loss", "gan_g_mpd", "gan_g_mrd", "fm_mpd", "disc_mpd", "disc_mrd", "utilization"):
        assert key in last and math.isfinite(last[key]), key
    assert result.samples and result.samples[-1].suffix == ".png" and result.samples[-1].is_file()
    metrics = evaluate(result.model_dir, limit=1, metrics=True)
    assert metrics["modality"] == "audio" and metrics["items"] == 1
    assert 1.0 <= metrics["pesq"] <= 4.65 and 0.0 <= metrics["stoi"] <= 1.0 and metrics["tokens"] == 50
    assert metrics["bitrate_bps"] == pytest.approx(50 * 6)  # 50 tokens/s x log2(64)
    if "dnsmos" not in metrics["unavailable"]:
        assert 1.0 <= metrics["dnsmos_ovrl"] <= 5.0
