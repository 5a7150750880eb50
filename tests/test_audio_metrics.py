"""Audio metrics on known signals: identical audio scores at the ceiling, degraded audio lower."""

import importlib.util

import numpy as np
import pytest
import soundfile as sf
import torch

from simvq.modalities.audio.data import pocketsphinx_clips, read_audio
from simvq.modalities.audio.metrics import DNSMOS, AudioMetricAccumulator, mel_distance, pesq_wb, stoi, to_pcm16

needs_onnx = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")


@pytest.fixture(scope="module")
def speech():
    """Real speech: a LibriVox clip from pocketsphinx-testdata, or a synthetic vowel-like signal."""
    try:
        return read_audio(pocketsphinx_clips()[0], sample_rate=16000)[: 16000 * 3]
    except FileNotFoundError:
        t = np.arange(16000 * 3) / 16000
        f0 = 120 + 30 * np.sin(2 * np.pi * 0.5 * t)
        phase = 2 * np.pi * np.cumsum(f0) / 16000
        wave = sum(np.sin(k * phase) / k for k in range(1, 20)) * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t)) ** 2
        return (0.3 * wave / np.abs(wave).max()).astype(np.float32)


def test_pcm16_round_trip_quantises_to_int16_steps(tmp_path):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-1.2, 1.2, 1000), [0.5, 1.0, -1.0, 1e-5, -0.25]]).astype(np.float32)
    y = to_pcm16(x)
    steps = y.astype(np.float64) * 32768
    np.testing.assert_array_equal(steps, np.round(steps))  # integer multiples of 1/32768
    inside = np.abs(x) < 32767 / 32768
    assert np.abs(y[inside] - x[inside]).max() <= 0.5 / 32768 + 1e-9
    assert y.max() == 32767 / 32768 and y.min() == -1.0  # clipped to the int16 range
    np.testing.assert_array_equal(y[-5:], np.array([0.5, 32767 / 32768, -1.0, 0.0, -0.25], dtype=np.float32))
    # a 16-bit wav written from the same signal holds the same samples to within one step
    path = tmp_path / "x.wav"
    sf.write(path, np.clip(x, -1, 1), 16000, subtype="PCM_16")
    from_disk, _ = sf.read(path, dtype="float32")
    assert np.abs(from_disk - y).max() <= 1 / 32768 + 1e-9


def test_identical_speech_scores_at_the_ceiling(speech):
    assert pesq_wb(speech, speech, 16000) > 4.4  # wide-band PESQ tops out near 4.64
    assert stoi(speech, speech, 16000) == pytest.approx(1.0, abs=1e-6)
    assert mel_distance(speech, speech, 16000) == 0.0


def test_degradation_lowers_pesq_and_stoi(speech):
    rng = np.random.default_rng(1)
    light = speech + 0.003 * rng.standard_normal(speech.shape).astype(np.float32)
    heavy = speech + 0.1 * rng.standard_normal(speech.shape).astype(np.float32)
    p_light, p_heavy = pesq_wb(speech, light, 16000), pesq_wb(speech, heavy, 16000)
    s_light, s_heavy = stoi(speech, light, 16000), stoi(speech, heavy, 16000)
    assert 4.6 > p_light > p_heavy >= 1.0
    assert 1.0 > s_light > s_heavy
    assert mel_distance(speech, light, 16000) < mel_distance(speech, heavy, 16000)
    # PESQ is computed at 16 kHz whatever the model rate: upsampled copies score the same
    from simvq.modalities.audio.data import resample

    up_ref, up_deg = resample(speech, 16000, 24000), resample(heavy, 16000, 24000)
    assert pesq_wb(up_ref, up_deg, 24000) == pytest.approx(p_heavy, abs=0.15)


@needs_onnx
def test_dnsmos_prefers_clean_speech_and_builds_p808_features(speech):
    dnsmos = DNSMOS()
    seg = np.resize(speech, int(9.01 * 16000))
    feats = dnsmos.p808_features(seg[:-160])
    assert feats.shape == (900, 120)  # the P.808 model's input: 900 frames x 120 mel bands
    assert feats.max() == pytest.approx(1.0)  # (0 dB at the maximum + 40) / 40
    assert feats.min() >= 1.0 - 80.0 / 40.0 - 1e-6  # 80 dB floor
    clean = dnsmos(speech)
    noisy = dnsmos(np.clip(speech + 0.1 * np.random.default_rng(2).standard_normal(speech.shape), -1, 1).astype(np.float32))
    assert set(clean) == {"dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808"}
    assert 1.0 < noisy["dnsmos_ovrl"] < clean["dnsmos_ovrl"] < 5.0
    assert noisy["dnsmos_bak"] < clean["dnsmos_bak"]


def test_accumulator_averages(speech):
    acc = AudioMetricAccumulator(sample_rate=16000, metrics=("pesq", "stoi", "mel", "vuv_f1", "utmos"))
    a = acc.update(speech, speech)
    b = acc.update(speech, speech * 0.0 + 1e-3)
    out = acc.compute()
    assert out["utterances"] == 2 and out["seconds"] == pytest.approx(2 * len(speech) / 16000)
    assert out["stoi"] == pytest.approx((a["stoi"] + b["stoi"]) / 2)
    assert "used_codes" not in out and "bitrate_bps" not in out  # usage and bitrate: evaluate() alone
    assert "utmos" in out["unavailable"]  # no local checkpoint: reported, not silently dropped
    if importlib.util.find_spec("torchcrepe") is None:
        assert "vuv_f1" in out["unavailable"] and "vuv_f1" not in out
    else:  # CREPE on a CPU defaults to the tiny model and says so
        assert a["vuv_f1"] == 1.0 and b["vuv_f1"] == 0.0 and out["vuv_f1"] == 0.5
        assert out["vuv_model"] == "crepe-tiny"
    with pytest.raises(ValueError, match="unknown audio metric"):
        AudioMetricAccumulator(sample_rate=16000, metrics=("pesq", "fad"))


class _LoudnessMOS(torch.nn.Module):
    """A stand-in TorchScript "MOS" model: 1 + 4 x the RMS of each 16 kHz waveform (B, T) -> (B,)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.0 + 4.0 * x.pow(2).mean(dim=1).sqrt()


def test_utmos_runs_a_local_checkpoint_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "utmos.pt"
    torch.jit.script(_LoudnessMOS()).save(str(path))
    monkeypatch.setenv("SIMVQ_UTMOS_CHECKPOINT", str(path))
    acc = AudioMetricAccumulator(sample_rate=16000, metrics=("utmos",))
    t = np.arange(16000) / 16000
    wave = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    out = acc.update(wave, wave)
    # scored on the 16-bit PCM reconstruction: RMS of a 0.5-amplitude sine is 0.5 / sqrt(2)
    assert out["utmos"] == pytest.approx(1 + 4 * 0.5 / np.sqrt(2), abs=1e-3)
    assert "utmos" not in acc.compute()["unavailable"]
    monkeypatch.setenv("SIMVQ_UTMOS_CHECKPOINT", str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="SIMVQ_UTMOS_CHECKPOINT"):
        AudioMetricAccumulator(sample_rate=16000, metrics=("utmos",))
