"""The audio modality's config sections (``model``, ``loss``, ``data``) and their cross-section checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from simvq.modalities.audio.discriminators import DAC_BANDS, DAC_PERIODS, DAC_WINDOWS, DEFAULT_PERIODS, DEFAULT_RESOLUTIONS, dac_band_edges
from simvq.modalities.audio.model import resolve_audio_model_config
from simvq.modalities.audio.speech import CORPUS_SENTENCES, CORPUS_VOICES_PER_SENTENCE


@dataclass
class AudioModelConfig:
    """The audio tokenizer (:mod:`simvq.modalities.audio.model`, REFERENCE §3).

    ``preset`` names an entry of :data:`AUDIO_PRESETS` (``official-24k``, ``small-16k``, ``tiny-16k``; default
    ``official-24k``); keys given next to it override the preset. ``ratios`` are EnCodec's decoder-order
    strides (the encoder applies them reversed; hop = their product); ``dimension`` is the token dimension
    (the quantizer's ``dim``); ``backbone_*`` size the Vocos decoder; ``n_fft`` is the ISTFT size of the head;
    ``encoder_init_gain`` (default: PyTorch's initialisation, as official) redraws the encoder convs
    variance-preserving at that gain. The resolved config stores every key.
    """

    preset: Optional[str] = None
    sample_rate: Optional[int] = None
    n_filters: Optional[int] = None
    ratios: Optional[list[int]] = None
    n_residual_layers: Optional[int] = None
    dilation_base: Optional[int] = None
    kernel_size: Optional[int] = None
    last_kernel_size: Optional[int] = None
    residual_kernel_size: Optional[int] = None
    compress: Optional[int] = None
    lstm_layers: Optional[int] = None
    dimension: Optional[int] = None
    backbone_dim: Optional[int] = None
    backbone_intermediate_dim: Optional[int] = None
    backbone_layers: Optional[int] = None
    pos_net: Optional[bool] = None
    n_fft: Optional[int] = None
    encoder_init_gain: Optional[float] = None


@dataclass
class AudioLossConfig:
    """Loss of the audio tokenizer (REFERENCE §3): ``mel_weight * logmel_L1 + quantizer_weight * VQ loss +
    gan_weight * (MPD + MRD generator hinge) + feature_matching_weight * (MPD + MRD feature matching)``.

    ``mel_n_fft / mel_hop / mel_n_mels``: the log-mel L1 (official 1024 / 256 / 100 at 24 kHz).
    ``gan_weight: 0`` trains without discriminators. ``mpd_channels`` / ``mrd_channels`` set the
    discriminator widths (official ``[32, 128, 512, 1024]`` and 64); ``gan_start_step`` delays the GAN terms and
    the discriminator updates.

    ``dac_weight`` adds the official recipe's DAC discriminator (:class:`DACDiscriminator`, least-squares GAN):
    ``dac_weight * (gan_weight * G_dac + feature_matching_weight * FM_dac)`` in the generator objective and
    ``dac_weight * D_dac`` in the discriminator's. 0 (the default) builds nothing and leaves the loss as it was;
    the official value is 1 (WavTokenizer/SimVQ add the DAC terms unweighted). ``dac_windows`` (official
    ``[2048, 1024, 512]``), ``dac_channels`` (32) and ``dac_bands`` (fractions of the STFT bins) shape its
    multi-band STFT discriminators; ``dac_periods`` (official ``[2, 3, 5, 7, 11]``; ``[]`` drops them) its period
    discriminators, which are ``mpd_channels`` wide.
    """

    mel_weight: float = 45.0
    quantizer_weight: float = 1000.0
    gan_weight: float = 1.0
    feature_matching_weight: float = 1.0
    mrd_weight: float = 1.0
    gan_start_step: int = 0
    mel_n_fft: int = 1024
    mel_hop: int = 256
    mel_n_mels: int = 100
    periods: list[int] = field(default_factory=lambda: list(DEFAULT_PERIODS))
    mpd_channels: list[int] = field(default_factory=lambda: [32, 128, 512, 1024])
    resolutions: list[list[int]] = field(default_factory=lambda: [list(r) for r in DEFAULT_RESOLUTIONS])
    mrd_channels: int = 64
    dac_weight: float = 0.0
    dac_windows: list[int] = field(default_factory=lambda: list(DAC_WINDOWS))
    dac_channels: int = 32
    dac_bands: list[list[float]] = field(default_factory=lambda: [list(b) for b in DAC_BANDS])
    dac_periods: list[int] = field(default_factory=lambda: list(DAC_PERIODS))


@dataclass
class AudioDataConfig:
    """Audio data; ``batch_size`` is per device.

    ``dataset``: ``speech`` (the built-in synthetic speech corpus: ``path`` is its folder, built there with
    espeak-ng when missing, default ``~/.cache/simvq/speech-<rate>hz-<sentences>s-<voices>v-<eval_fraction>e``;
    train/eval held out by sentence, ``eval_fraction`` of the sentences) or
    ``folder`` (any nested folder of wav/flac, e.g. LibriTTS ``train-clean-100``; ``eval_path`` is the
    evaluation folder, otherwise ``eval_fraction`` of the files, every n-th in sorted order, is held out).
    ``eval_fraction`` None means the data set's default: 0.3 of the built-in corpus's sentences, 0.1 of a
    folder's files.
    ``eval_dataset: pocketsphinx`` evaluates on Debian's real LibriVox clips instead.
    ``sample_rate`` is filled from the model. ``segment_seconds``: training crop length (official 1 s).
    ``eval_max_seconds`` crops evaluation utterances (None: whole utterances).
    ``corpus_sentences`` / ``corpus_voices_per_sentence``: size of the built-in corpus when it is built.
    """

    dataset: str = "speech"
    path: Optional[str] = None
    eval_path: Optional[str] = None
    eval_dataset: Optional[str] = None
    eval_fraction: Optional[float] = None
    sample_rate: Optional[int] = None
    segment_seconds: float = 1.0
    eval_max_seconds: Optional[float] = None
    train_limit: Optional[int] = None
    eval_limit: Optional[int] = None
    batch_size: int = 8
    eval_batch_size: int = 1
    num_workers: int = 0
    corpus_sentences: int = CORPUS_SENTENCES
    corpus_voices_per_sentence: int = CORPUS_VOICES_PER_SENTENCE


def finalize_audio_config(cfg: dict) -> dict:
    """Expand the model preset, copy the model's rate into ``data.sample_rate`` and check the audio values."""
    model = {k: v for k, v in cfg["model"].items() if v is not None}
    preset = model.get("preset") or "official-24k"
    model["preset"] = preset
    resolved = resolve_audio_model_config(model)
    cfg["model"] = {"preset": preset, **resolved}
    rate = resolved["sample_rate"]
    data = cfg["data"]
    if data.get("sample_rate") not in (None, rate):
        raise ValueError(f"data.sample_rate ({data['sample_rate']}) differs from model.sample_rate ({rate}); drop data.sample_rate")
    data["sample_rate"] = rate
    hop = math.prod(resolved["ratios"])
    if (resolved["n_fft"] - hop) % 2 or resolved["n_fft"] < hop:
        raise ValueError(f"model.n_fft ({resolved['n_fft']}) must be >= the hop ({hop}) with an even difference")
    if resolved["pos_net"] and resolved["backbone_dim"] % 32:
        raise ValueError(f"model.backbone_dim ({resolved['backbone_dim']}) must be a multiple of 32 with the pos-net")
    for key in ("batch_size", "eval_batch_size", "corpus_sentences", "corpus_voices_per_sentence"):
        if data[key] < 1:
            raise ValueError(f"data.{key} must be >= 1, got {data[key]}")
    if data["eval_fraction"] is not None and not 0 < data["eval_fraction"] < 1:
        raise ValueError(f"data.eval_fraction must lie in (0, 1) or be null (the data set's default), got {data['eval_fraction']!r}")
    if not data["segment_seconds"] > 0:
        raise ValueError(f"data.segment_seconds must be > 0, got {data['segment_seconds']}")
    if data["segment_seconds"] * rate < hop:
        raise ValueError(f"data.segment_seconds is shorter than one token ({hop} samples at {rate} Hz)")
    loss = cfg["loss"]
    for key in ("mel_weight", "quantizer_weight", "gan_weight", "feature_matching_weight", "mrd_weight", "gan_start_step", "dac_weight"):
        if not loss[key] >= 0:
            raise ValueError(f"loss.{key} must be >= 0, got {loss[key]!r}")
    if any(p < 1 for p in loss["periods"]) or any(len(r) != 3 for r in loss["resolutions"]):
        raise ValueError("loss.periods must be positive integers and loss.resolutions [n_fft, hop, win] triples")
    _check_dac_loss(loss)
    return cfg


def _check_dac_loss(loss: dict) -> None:
    """Check the DAC discriminator keys of the ``loss`` section (checked even when ``dac_weight`` is 0)."""
    if loss["dac_weight"] > 0 and not (loss["gan_weight"] > 0 or loss["feature_matching_weight"] > 0):
        raise ValueError(
            f"loss.dac_weight ({loss['dac_weight']}) adds a discriminator to the GAN, but the GAN is off "
            "(loss.gan_weight and loss.feature_matching_weight are 0); turn the GAN on or set loss.dac_weight to 0"
        )
    if loss["dac_channels"] < 1:
        raise ValueError(f"loss.dac_channels must be >= 1, got {loss['dac_channels']}")
    if any(p < 1 for p in loss["dac_periods"]):
        raise ValueError(f"loss.dac_periods must be positive integers (or [] for none), got {loss['dac_periods']}")
    if not loss["dac_windows"] and not loss["dac_periods"]:
        raise ValueError("loss.dac_windows and loss.dac_periods are both empty: the DAC discriminator would judge nothing")
    for i, band in enumerate(loss["dac_bands"]):
        if len(band) != 2 or not 0 <= band[0] < band[1] <= 1:
            raise ValueError(f"loss.dac_bands[{i}] must be a pair [lo, hi] of fractions of the STFT bins with 0 <= lo < hi <= 1, got {band}")
    if loss["dac_windows"] and not loss["dac_bands"]:
        raise ValueError("loss.dac_bands must list at least one [lo, hi] band")
    for window in loss["dac_windows"]:
        try:
            dac_band_edges(window, loss["dac_bands"])
        except ValueError as err:
            raise ValueError(f"loss.dac_windows: {err}") from None


__all__ = ["AudioDataConfig", "AudioLossConfig", "AudioModelConfig", "finalize_audio_config"]
