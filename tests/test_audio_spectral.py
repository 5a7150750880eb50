"""Mel filterbank and log-mel loss against hand computation of the mel scales and the triangle formula."""

import math

import numpy as np
import pytest
import torch

from simvq.modalities.audio.spectral import MelReconstructionLoss, MelSpectrogram, hz_to_mel, mel_filterbank, mel_to_hz


def test_mel_scales_known_values():
    # HTK: 2595 log10(1 + f / 700); 700 Hz -> 2595 log10 2
    assert float(hz_to_mel(700.0, scale="htk")) == pytest.approx(2595 * math.log10(2))
    assert float(hz_to_mel(1000.0, scale="htk")) == pytest.approx(999.9855, abs=1e-3)
    # Slaney: 200/3 Hz per mel below 1 kHz (1000 Hz = 15 mel), 27 mel per factor 6.4 above
    assert float(hz_to_mel(500.0, scale="slaney")) == pytest.approx(7.5)
    assert float(hz_to_mel(1000.0, scale="slaney")) == pytest.approx(15.0)
    assert float(hz_to_mel(6400.0, scale="slaney")) == pytest.approx(42.0)
    for scale in ("htk", "slaney"):
        f = torch.tensor([0.0, 123.0, 999.0, 1000.0, 4321.0, 12000.0], dtype=torch.float64)
        torch.testing.assert_close(mel_to_hz(hz_to_mel(f, scale=scale), scale=scale), f)


def _triangle_by_hand(sr, n_fft, n_mels, bin_k, m, to_mel, to_hz):
    """Filter m at FFT bin k: the textbook triangle between three consecutive mel-spaced edge frequencies."""
    top = to_mel(sr / 2)
    edges = [to_hz(top * i / (n_mels + 1)) for i in range(n_mels + 2)]
    f = bin_k * sr / n_fft
    lo, c, hi = edges[m], edges[m + 1], edges[m + 2]
    if lo <= f <= c:
        return (f - lo) / (c - lo)
    if c <= f <= hi:
        return (hi - f) / (hi - c)
    return 0.0


def test_htk_filterbank_matches_the_triangle_formula():
    sr, n_fft, n_mels = 24000, 1024, 100
    fb = mel_filterbank(sample_rate=sr, n_fft=n_fft, n_mels=n_mels).double()
    assert fb.shape == (513, 100)
    to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    to_hz = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)  # noqa: E731
    rng = np.random.default_rng(0)
    checked_nonzero = 0
    for m in [0, 1, 10, 50, 99]:
        # the bins around the filter's centre, plus random ones
        centre_bin = int(round(to_hz(to_mel(sr / 2) * (m + 1) / (n_mels + 1)) * n_fft / sr))
        for k in [*range(max(0, centre_bin - 3), min(513, centre_bin + 4)), *rng.integers(0, 513, 5).tolist()]:
            expected = _triangle_by_hand(sr, n_fft, n_mels, k, m, to_mel, to_hz)
            assert float(fb[k, m]) == pytest.approx(expected, abs=1e-6), (k, m)
            checked_nonzero += expected > 0
    assert checked_nonzero > 10
    assert float(fb.max()) <= 1.0 + 1e-6  # no normalisation: peaks at most 1


def test_slaney_normalised_filters_have_equal_area():
    sr, n_fft, n_mels = 16000, 321, 120
    fb = mel_filterbank(sample_rate=sr, n_fft=n_fft, n_mels=n_mels, scale="slaney", norm="slaney").double()
    # a triangle of height 2 / (hi - lo) over [lo, hi] has area 1 (continuous); check a wide filter numerically
    edges = mel_to_hz(torch.linspace(0, float(hz_to_mel(sr / 2, scale="slaney")), n_mels + 2, dtype=torch.float64), scale="slaney")
    m = 110
    lo, c, hi = (float(e) for e in edges[m : m + 3])
    assert float(fb[:, m].max()) <= 2 / (hi - lo) + 1e-9
    fine = torch.linspace(lo, hi, 20001, dtype=torch.float64)
    tri = torch.minimum((fine - lo) / (c - lo), (hi - fine) / (hi - c)).clamp_min(0) * 2 / (hi - lo)
    assert float(torch.trapezoid(tri, fine)) == pytest.approx(1.0, rel=1e-4)


def test_mel_spectrogram_of_a_tone_peaks_in_its_band():
    sr = 24000
    mel = MelSpectrogram(sample_rate=sr)
    t = torch.arange(sr) / sr
    spec = mel(torch.sin(2 * math.pi * 1000.0 * t)[None])
    assert spec.shape == (1, 100, sr // 256 + 1)
    band = int(spec[0, :, 10:-10].mean(dim=1).argmax())
    edges = mel_to_hz(torch.linspace(0, float(hz_to_mel(sr / 2)), 102, dtype=torch.float64))
    assert float(edges[band]) < 1000.0 < float(edges[band + 2])


def test_log_mel_l1_loss():
    loss = MelReconstructionLoss(sample_rate=16000)
    x = torch.randn(2, 1, 16000) * 0.1
    assert float(loss(x, x)) == 0.0
    quiet = float(loss(x + 0.001 * torch.randn_like(x), x))
    loud = float(loss(x + 0.1 * torch.randn_like(x), x))
    assert 0 < quiet < loud
    # silence is floored at 1e-7: log(1e-7) vs log(mel(x)), finite
    assert math.isfinite(float(loss(torch.zeros_like(x), x)))
    with pytest.raises(ValueError, match="same shape"):
        loss(x[..., :100], x)
