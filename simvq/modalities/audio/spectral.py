"""Mel spectrograms and the log-mel L1 reconstruction loss, written on ``torch.stft`` (no torchaudio).

The audio recipe (Vocos / WavTokenizer / SimVQ) computes its reconstruction loss with torchaudio's
``MelSpectrogram(sample_rate, n_fft=1024, hop_length=256, n_mels=100, center=True, power=1)``. Its defaults
are an HTK mel scale (``2595 * log10(1 + f / 700)``), no filter normalisation, a periodic Hann window,
reflect padding, ``f_min = 0`` and ``f_max = sample_rate / 2``; :func:`mel_filterbank` reproduces that
filterbank and also offers the Slaney scale and area normalisation (librosa's defaults, which DNSMOS's
P.808 features use).

The filterbank is built in the Hz domain: ``n_mels + 2`` points equally spaced on the mel axis are mapped back
to Hz, and filter ``m`` rises linearly from point ``m`` to ``m + 1`` and falls back to zero at ``m + 2``,
evaluated at the FFT bin frequencies ``k * sample_rate / n_fft``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MEL_SCALES = ("htk", "slaney")

# Slaney's scale is linear below 1 kHz (200/3 Hz per mel) and logarithmic above (27 steps per factor 6.4).
_SLANEY_F_SP = 200.0 / 3.0
_SLANEY_MIN_LOG_HZ = 1000.0
_SLANEY_MIN_LOG_MEL = _SLANEY_MIN_LOG_HZ / _SLANEY_F_SP
_SLANEY_LOGSTEP = math.log(6.4) / 27.0


def hz_to_mel(freq: torch.Tensor | float, *, scale: str = "htk") -> torch.Tensor:
    """Frequency in Hz -> mel on the HTK or Slaney scale (float64 tensor)."""
    f = torch.as_tensor(freq, dtype=torch.float64)
    if scale == "htk":
        return 2595.0 * torch.log10(1.0 + f / 700.0)
    if scale == "slaney":
        linear = f / _SLANEY_F_SP
        logpart = _SLANEY_MIN_LOG_MEL + torch.log(f.clamp_min(_SLANEY_MIN_LOG_HZ) / _SLANEY_MIN_LOG_HZ) / _SLANEY_LOGSTEP
        return torch.where(f >= _SLANEY_MIN_LOG_HZ, logpart, linear)
    raise ValueError(f"mel scale must be one of {MEL_SCALES}, got {scale!r}")


def mel_to_hz(mel: torch.Tensor | float, *, scale: str = "htk") -> torch.Tensor:
    """Inverse of :func:`hz_to_mel` (float64 tensor)."""
    m = torch.as_tensor(mel, dtype=torch.float64)
    if scale == "htk":
        return 700.0 * (torch.pow(10.0, m / 2595.0) - 1.0)
    if scale == "slaney":
        linear = m * _SLANEY_F_SP
        logpart = _SLANEY_MIN_LOG_HZ * torch.exp(_SLANEY_LOGSTEP * (m - _SLANEY_MIN_LOG_MEL))
        return torch.where(m >= _SLANEY_MIN_LOG_MEL, logpart, linear)
    raise ValueError(f"mel scale must be one of {MEL_SCALES}, got {scale!r}")


def mel_filterbank(
    *,
    sample_rate: int,
    n_fft: int,
    n_mels: int,
    f_min: float = 0.0,
    f_max: float | None = None,
    scale: str = "htk",
    norm: str | None = None,
) -> torch.Tensor:
    """Triangular mel filterbank, ``(n_fft // 2 + 1, n_mels)`` float32 (torchaudio's orientation).

    Args:
        sample_rate: audio sample rate in Hz.
        n_fft: FFT size; the bins are at ``k * sample_rate / n_fft`` for ``k = 0 .. n_fft // 2``.
        n_mels: number of filters.
        f_min, f_max: band edges in Hz (``f_max`` defaults to ``sample_rate / 2``).
        scale: ``"htk"`` (torchaudio's default) or ``"slaney"`` (librosa's default).
        norm: ``None`` (peak 1, torchaudio's default) or ``"slaney"`` (each filter divided by half its width
            in Hz so that all have the same area, librosa's default).
    """
    for name, value in (("sample_rate", sample_rate), ("n_fft", n_fft), ("n_mels", n_mels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    f_max = sample_rate / 2.0 if f_max is None else float(f_max)
    if not 0.0 <= f_min < f_max <= sample_rate / 2.0:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min={f_min}, f_max={f_max}, sample_rate={sample_rate}")
    if norm not in (None, "slaney"):
        raise ValueError(f"norm must be None or 'slaney', got {norm!r}")
    n_freqs = n_fft // 2 + 1
    bin_hz = torch.arange(n_freqs, dtype=torch.float64) * (sample_rate / n_fft)
    mel_points = torch.linspace(float(hz_to_mel(f_min, scale=scale)), float(hz_to_mel(f_max, scale=scale)), n_mels + 2, dtype=torch.float64)
    hz_points = mel_to_hz(mel_points, scale=scale)  # (n_mels + 2,)
    lower, centre, upper = hz_points[:-2], hz_points[1:-1], hz_points[2:]
    rising = (bin_hz[:, None] - lower[None, :]) / (centre - lower)[None, :]
    falling = (upper[None, :] - bin_hz[:, None]) / (upper - centre)[None, :]
    fb = torch.minimum(rising, falling).clamp_min(0.0)
    if norm == "slaney":
        fb = fb * (2.0 / (upper - lower))[None, :]
    return fb.float()


class MelSpectrogram(nn.Module):
    """Magnitude (``power=1``) or power (``power=2``) mel spectrogram of waveforms.

    Input ``(B, T)`` or ``(B, 1, T)``; output ``(B, n_mels, frames)`` with ``frames = T // hop + 1`` when
    ``center`` (the signal is padded by ``n_fft // 2`` on both sides, reflect by default).
    """

    def __init__(
        self,
        *,
        sample_rate: int,
        n_fft: int = 1024,
        hop_length: int = 256,
        n_mels: int = 100,
        f_min: float = 0.0,
        f_max: float | None = None,
        power: float = 1.0,
        center: bool = True,
        pad_mode: str = "reflect",
        scale: str = "htk",
        norm: str | None = None,
    ) -> None:
        super().__init__()
        if hop_length < 1:
            raise ValueError(f"hop_length must be >= 1, got {hop_length}")
        if power not in (1.0, 2.0):
            raise ValueError(f"power must be 1 (magnitude) or 2 (power), got {power}")
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.power = float(power)
        self.center = bool(center)
        self.pad_mode = pad_mode
        fb = mel_filterbank(sample_rate=sample_rate, n_fft=n_fft, n_mels=n_mels, f_min=f_min, f_max=f_max, scale=scale, norm=norm)
        # derived from the arguments, so kept out of the state dict
        self.register_buffer("filterbank", fb, persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() == 3:
            if wave.shape[1] != 1:
                raise ValueError(f"MelSpectrogram expects mono audio (B, 1, T), got shape {tuple(wave.shape)}")
            wave = wave[:, 0]
        if wave.dim() != 2:
            raise ValueError(f"MelSpectrogram expects (B, T) or (B, 1, T), got shape {tuple(wave.shape)}")
        # the STFT runs in fp32 even under autocast: fp16 spectra of quiet speech underflow
        with torch.autocast(device_type=wave.device.type, enabled=False):
            spec = torch.stft(
                wave.float(),
                n_fft=self.n_fft,
                hop_length=self.hop_length,
                window=self.window,
                center=self.center,
                pad_mode=self.pad_mode,
                return_complex=True,
            ).abs()
            if self.power == 2.0:
                spec = spec.pow(2)
            return torch.einsum("bft,fm->bmt", spec, self.filterbank)


def safe_log(x: torch.Tensor, floor: float = 1e-7) -> torch.Tensor:
    """``log(max(x, floor))``: silence gives a finite floor instead of ``-inf``."""
    return torch.log(x.clamp_min(floor))


class MelReconstructionLoss(nn.Module):
    """L1 distance between log-mel spectrograms (the recipe's reconstruction term, weight 45 at 24 kHz).

    ``loss(reconstruction, target)`` with waveforms ``(B, 1, T)``; defaults are the recipe's
    ``n_fft=1024, hop=256, n_mels=100`` magnitude mel spectrogram, natural log floored at ``1e-7``.
    """

    def __init__(self, *, sample_rate: int, n_fft: int = 1024, hop_length: int = 256, n_mels: int = 100) -> None:
        super().__init__()
        self.mel = MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels)

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if reconstruction.shape != target.shape:
            raise ValueError(
                f"reconstruction and target must have the same shape, got {tuple(reconstruction.shape)} and {tuple(target.shape)}"
            )
        return (safe_log(self.mel(reconstruction)) - safe_log(self.mel(target))).abs().mean()
