"""What a token prior needs from the audio modality: fixed-length windows, a sample-quality proxy, wav output.

A prior models an audio tokenizer's tokens in windows of ``frames`` tokens (the prior config's
``data.frames``), i.e. ``frames * hop_length`` samples, so one window encodes to exactly ``frames`` tokens:

* training windows: the training split's random crops (:class:`~simvq.modalities.audio.data.AudioTrainSet`,
  items ``(index, seed)``) of ``frames * hop_length`` samples; ``crops`` crops per clip (seeds ``0 ..
  crops - 1``);
* held-out windows: every held-out clip (as the tokenizer's config gives it, ``data.eval_max_seconds``
  included) cut into consecutive, non-overlapping windows of ``frames * hop_length`` samples from its start;
  the remainder of each clip is dropped.

The prior package reaches these through the audio :class:`~simvq.modalities.base.Modality` object
(``prior_datasets``, ``prior_sample_metrics``, ``save_prior_samples``), never by importing this module.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from simvq.modalities.audio.data import AudioEvalSet, AudioTrainSet, audio_file_splits, write_wav


def hop_length_of(config: dict) -> int:
    """Samples per token of the audio tokenizer a config describes (the product of the encoder's strides)."""
    return int(math.prod(config["model"]["ratios"]))  # a resolved config holds the preset's ratios


class AudioCrops(Dataset):
    """``crops`` random crops of every clip of an :class:`AudioTrainSet`: item ``(j, _)`` is clip ``j // crops``
    cropped with seed ``j % crops`` (the second element of the key is ignored: the crops are fixed)."""

    def __init__(self, clips: AudioTrainSet, crops: int = 1) -> None:
        if isinstance(crops, bool) or not isinstance(crops, int) or crops < 1:
            raise ValueError(f"crops must be a positive integer, got {crops!r}")
        self.clips, self.crops = clips, crops

    def __len__(self) -> int:
        return len(self.clips) * self.crops

    def __getitem__(self, item) -> torch.Tensor:
        j = item[0] if isinstance(item, tuple) else item
        return self.clips[(j // self.crops, j % self.crops)]


class AudioWindows(Dataset):
    """Consecutive non-overlapping windows of ``window`` samples of every clip of ``clips`` (items ``(1, T_i)``);
    item ``k`` -> ``(1, window)``. Each clip is read once here to learn its length; ``spans`` lists
    ``(clip index, start sample)`` of every window, in clip order."""

    def __init__(self, clips, window: int) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer number of samples, got {window!r}")
        self.clips, self.window = clips, window
        self.clip_lengths = [int(clips[i].shape[-1]) for i in range(len(clips))]
        self.spans = [(i, k * window) for i, n in enumerate(self.clip_lengths) for k in range(n // window)]
        self._cached: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, index: int) -> torch.Tensor:
        clip, start = self.spans[index]
        if self._cached is None or self._cached[0] != clip:  # windows of one clip are consecutive
            self._cached = (clip, self.clips[clip])
        return self._cached[1][..., start : start + self.window].clone()


def prior_datasets(config: dict, frames: int, crops: int = 1) -> tuple[AudioCrops, AudioWindows]:
    """``(training windows, held-out windows)`` of ``frames`` tokens for a resolved audio tokenizer config.

    Raises ValueError naming the fix when the held-out split yields no window.
    """
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"data.frames must be a positive integer (tokens per window), got {frames!r}")
    data = dict(config["data"])
    rate = int(data["sample_rate"])
    hop = hop_length_of(config)
    window = frames * hop
    train_files, eval_files = audio_file_splits(data)
    train = AudioCrops(AudioTrainSet(train_files, sample_rate=rate, segment_samples=window), crops)
    clips = AudioEvalSet(eval_files, sample_rate=rate, max_seconds=data.get("eval_max_seconds"))
    held_out = AudioWindows(clips, window)
    if len(held_out) == 0:
        longest = max(held_out.clip_lengths) / rate
        cap = data.get("eval_max_seconds")
        raise ValueError(
            f"the held-out split has no window of data.frames={frames} tokens ({window / rate:g} s at {rate} Hz): "
            f"its {len(clips)} clip(s) are at most {longest:.3g} s long"
            + (f" (the tokenizer's data.eval_max_seconds={cap:g} crops them)" if cap else "")
            + f"; lower data.frames to at most {int(longest * rate) // hop} or use longer held-out clips"
        )
    return train, held_out


def _dnsmos_means(scorer, waves: torch.Tensor, sample_rate: int) -> dict:
    """Mean DNSMOS scores of ``waves`` ``(n, 1, T)``; a window shorter than DNSMOS's 9.01 s input is tiled to
    exactly that length and scored once (DNSMOS itself would double it until it is long enough and average
    the scores of every 1 s shift of the same repeating signal: the same content at several times the cost)."""
    from simvq.modalities.audio.metrics import DNSMOS_RATE, DNSMOS_WINDOW_S
    from simvq.modalities.audio.signal import resample

    need = int(DNSMOS_WINDOW_S * DNSMOS_RATE)
    rows = []
    for w in waves:
        wave = resample(w.reshape(-1).float().cpu().numpy(), sample_rate, DNSMOS_RATE)
        rows.append(scorer(np.resize(wave, need) if wave.shape[0] < need else wave))
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}


def prior_sample_metrics(samples: torch.Tensor, references: torch.Tensor, sample_rate: int, *, dnsmos=None) -> dict:
    """Mean offline DNSMOS (P.835 SIG/BAK/OVRL and P.808) of decoded samples ``(n, 1, T)`` and of held-out
    windows reconstructed through the tokenizer ``(m, 1, T)``: a labelled proxy of sample quality.

    When DNSMOS cannot run (onnxruntime or the ``speechmos`` model files missing) the result says so in
    ``dnsmos_unavailable`` instead of failing.
    """
    out: dict = {
        "sample_quality_proxy": "mean offline DNSMOS (P.835 SIG/BAK/OVRL, P.808) of decoded samples, next to the "
        "same on held-out windows reconstructed through the tokenizer; a proxy, not a listening test",
        "dnsmos_samples_n": int(len(samples)),
        "dnsmos_reference_n": int(len(references)),
    }
    if dnsmos is None:
        from simvq.modalities.audio.metrics import DNSMOS

        try:
            dnsmos = DNSMOS()
        except RuntimeError as err:
            out["dnsmos_unavailable"] = str(err)
            return out
    out["dnsmos_samples"] = _dnsmos_means(dnsmos, samples, sample_rate)
    out["dnsmos_reconstructed_held_out"] = _dnsmos_means(dnsmos, references, sample_rate)
    return out


def save_prior_samples(samples: torch.Tensor, out: str | Path, sample_rate: int) -> list[Path]:
    """Write decoded samples ``(n, 1, T)`` as ``out/sample_000.wav ...``; earlier ``sample_*.wav`` are removed."""
    out = Path(out)
    for old in out.glob("sample_*.wav"):  # a smaller --n must not leave earlier samples behind
        old.unlink()
    return [write_wav(out / f"sample_{i:03d}.wav", wave.reshape(-1), sample_rate) for i, wave in enumerate(samples)]


__all__ = ["AudioCrops", "AudioWindows", "hop_length_of", "prior_datasets", "prior_sample_metrics", "save_prior_samples"]
