"""Waveform discriminators of the audio recipe (Vocos) and the audio tokenizer's training loss.

- Multi-period discriminator (HiFi-GAN): for each period ``p`` in (2, 3, 5, 7, 11) the waveform is folded
  into a ``(T / p, p)`` image and judged by a stack of ``(5, 1)`` 2-D convs (stride 3 along time).
- Multi-resolution discriminator (UniVNet): magnitude STFTs at (n_fft, hop, win) = (1024, 256, 1024),
  (2048, 512, 2048), (512, 128, 512) (rectangular window, as Vocos) judged by a stack of 2-D convs.
All convs are weight-normed, activations LeakyReLU(0.1). Every sub-discriminator returns its logits and the
list of its feature maps (for feature matching).

Losses as Vocos/WavTokenizer/SimVQ compute them, each averaged over the sub-discriminators:
discriminator ``mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))``; generator ``mean(relu(1 - D(x_hat)))``;
feature matching ``sum over layers of mean |f(x) - f(x_hat)|``.
The generator objective is ``mel_weight * logmel_L1 + quantizer_weight * vq_loss + gan terms``
(:func:`audio_generator_loss`, official weights 45 and 1000).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from simvq.losses.adversarial import hinge_d_loss
from simvq.losses.spectral import MelReconstructionLoss

DEFAULT_PERIODS = (2, 3, 5, 7, 11)
DEFAULT_RESOLUTIONS = ((1024, 256, 1024), (2048, 512, 2048), (512, 128, 512))


class PeriodDiscriminator(nn.Module):
    """Judges the waveform folded by ``period``. ``(B, 1, T)`` -> (logits ``(B, n)``, feature maps).

    ``channels`` are the widths of the four strided convs (official ``(32, 128, 512, 1024)``); a fifth conv
    keeps the last width at stride 1, then a ``(3, 1)`` conv gives one logit per position.
    """

    def __init__(self, period: int, *, channels=(32, 128, 512, 1024), kernel_size: int = 5, stride: int = 3) -> None:
        super().__init__()
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        self.period = period
        widths = [1, *channels, channels[-1]]
        strides = [stride] * len(channels) + [1]
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(cin, cout, (kernel_size, 1), (s, 1), padding=(kernel_size // 2, 0)))
            for cin, cout, s in zip(widths[:-1], widths[1:], strides)
        )
        self.conv_post = weight_norm(nn.Conv2d(widths[-1], 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, c, t = x.shape
        if t % self.period:
            # reflect-pad to a whole number of periods (Vocos); tiny inputs fall back to zeros
            n_pad = self.period - t % self.period
            x = F.pad(x, (0, n_pad), mode="reflect" if t > n_pad else "constant")
            t += n_pad
        h = x.view(b, c, t // self.period, self.period)
        fmap = []
        for i, conv in enumerate(self.convs):
            h = F.leaky_relu(conv(h), 0.1)
            if i > 0:  # Vocos leaves the first layer's output out of feature matching
                fmap.append(h)
        h = self.conv_post(h)
        fmap.append(h)
        return h.flatten(1), fmap


class ResolutionDiscriminator(nn.Module):
    """Judges a magnitude spectrogram ``(B, 1, freq, frames)`` of the waveform at one STFT resolution."""

    def __init__(self, resolution: tuple[int, int, int], *, channels: int = 64) -> None:
        super().__init__()
        n_fft, hop, win = (int(v) for v in resolution)
        if not (0 < hop <= win <= n_fft):
            raise ValueError(f"resolution must be (n_fft, hop, win) with 0 < hop <= win <= n_fft, got {resolution}")
        self.resolution = (n_fft, hop, win)
        c = channels
        self.convs = nn.ModuleList(
            [
                weight_norm(nn.Conv2d(1, c, (7, 5), (2, 2), padding=(3, 2))),
                weight_norm(nn.Conv2d(c, c, (5, 3), (2, 1), padding=(2, 1))),
                weight_norm(nn.Conv2d(c, c, (5, 3), (2, 2), padding=(2, 1))),
                weight_norm(nn.Conv2d(c, c, 3, (2, 1), padding=1)),
                weight_norm(nn.Conv2d(c, c, 3, (2, 2), padding=1)),
            ]
        )
        self.conv_post = weight_norm(nn.Conv2d(c, 1, 3, padding=1))

    def spectrogram(self, x: torch.Tensor) -> torch.Tensor:
        n_fft, hop, win = self.resolution
        with torch.autocast(device_type=x.device.type, enabled=False):
            # a rectangular window, as Vocos uses here (its torch.stft call passes window=None)
            window = torch.ones(win, device=x.device)
            spec = torch.stft(x[:, 0].float(), n_fft=n_fft, hop_length=hop, win_length=win, window=window, center=True, return_complex=True)
        return spec.abs().unsqueeze(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.spectrogram(x)
        fmap = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.1)
            fmap.append(h)
        h = self.conv_post(h)
        fmap.append(h)
        return h.flatten(1), fmap


class MultiPeriodDiscriminator(nn.Module):
    """One :class:`PeriodDiscriminator` per period; ``forward(x)`` -> lists of logits and feature maps."""

    def __init__(self, *, periods=DEFAULT_PERIODS, channels=(32, 128, 512, 1024)) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList(PeriodDiscriminator(int(p), channels=tuple(channels)) for p in periods)

    def forward(self, x: torch.Tensor):
        outs = [d(x) for d in self.discriminators]
        return [o[0] for o in outs], [o[1] for o in outs]


class MultiResolutionDiscriminator(nn.Module):
    """One :class:`ResolutionDiscriminator` per STFT resolution."""

    def __init__(self, *, resolutions=DEFAULT_RESOLUTIONS, channels: int = 64) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList(ResolutionDiscriminator(tuple(r), channels=channels) for r in resolutions)

    def forward(self, x: torch.Tensor):
        outs = [d(x) for d in self.discriminators]
        return [o[0] for o in outs], [o[1] for o in outs]


def generator_adversarial_loss(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """Vocos' generator term ``mean(relu(1 - D(x_hat)))``, averaged over sub-discriminators.

    (Not ``-mean(D)``: Vocos clamps the generator side of the hinge as well.)
    """
    return torch.stack([F.relu(1.0 - f.float()).mean() for f in fake_logits]).mean()


def discriminator_adversarial_loss(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """``mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))`` averaged over sub-discriminators.

    ``hinge_d_loss`` carries a factor 1/2 (the image recipe's convention); doubled here to Vocos' scale.
    """
    return torch.stack([2.0 * hinge_d_loss(r, f) for r, f in zip(real_logits, fake_logits)]).mean()


def feature_matching_loss(real_maps: list[list[torch.Tensor]], fake_maps: list[list[torch.Tensor]]) -> torch.Tensor:
    """``sum over layers of mean |f(x) - f(x_hat)|``, averaged over sub-discriminators (real side detached)."""
    per_disc = [
        sum((r.detach().float() - f.float()).abs().mean() for r, f in zip(rs, fs)) for rs, fs in zip(real_maps, fake_maps)
    ]
    return torch.stack(per_disc).mean()


@dataclass
class AudioLossConfig:
    """Loss of the audio tokenizer (REFERENCE §3): ``mel_weight * logmel_L1 + quantizer_weight * VQ loss +
    gan_weight * (MPD + MRD generator hinge) + feature_matching_weight * (MPD + MRD feature matching)``.

    ``mel_n_fft / mel_hop / mel_n_mels``: the log-mel L1 (official 1024 / 256 / 100 at 24 kHz).
    ``gan_weight: 0`` trains without discriminators. ``mpd_channels`` / ``mrd_channels`` set the
    discriminator widths (official ``[32, 128, 512, 1024]`` and 64); ``gan_start_step`` delays the GAN terms and
    the discriminator updates. The official recipe also has a DAC discriminator, not included here.
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


class AudioDiscriminator(nn.Module):
    """The recipe's discriminators as one module: ``mpd`` (multi-period) and ``mrd`` (multi-resolution)."""

    def __init__(self, *, periods=DEFAULT_PERIODS, mpd_channels=(32, 128, 512, 1024), resolutions=DEFAULT_RESOLUTIONS, mrd_channels: int = 64) -> None:
        super().__init__()
        self.mpd = MultiPeriodDiscriminator(periods=periods, channels=mpd_channels)
        self.mrd = MultiResolutionDiscriminator(resolutions=resolutions, channels=mrd_channels)

    @classmethod
    def from_loss_config(cls, loss: dict) -> "AudioDiscriminator":
        return cls(periods=loss["periods"], mpd_channels=loss["mpd_channels"], resolutions=loss["resolutions"], mrd_channels=loss["mrd_channels"])


def uses_gan(loss: dict) -> bool:
    """Whether the loss section asks for discriminators at all."""
    return loss["gan_weight"] > 0 or loss["feature_matching_weight"] > 0


def audio_generator_loss(*, x, x_hat, quant, mel_loss, discriminator, loss: dict, gan_active: bool):
    """``(total, logs)``: ``mel_weight * logmel_L1 + quantizer_weight * quant.loss`` plus, when the GAN is active,
    ``gan_weight * (G_mpd + mrd_weight * G_mrd) + feature_matching_weight * (FM_mpd + mrd_weight * FM_mrd)``.

    ``x``, ``x_hat``: ``(B, 1, T)``; ``mel_loss``: a :class:`MelReconstructionLoss`; ``loss``: the loss section.
    """
    mel = mel_loss(x_hat, x)
    vq = quant.loss.float()
    total = loss["mel_weight"] * mel + loss["quantizer_weight"] * vq
    logs = {"mel_loss": mel, "quant_loss": vq, "commitment": quant.commitment_loss, "codebook": quant.codebook_loss}
    if gan_active and discriminator is not None:
        real_p, real_p_maps = discriminator.mpd(x)
        fake_p, fake_p_maps = discriminator.mpd(x_hat)
        real_r, real_r_maps = discriminator.mrd(x)
        fake_r, fake_r_maps = discriminator.mrd(x_hat)
        g_mp, g_mr = generator_adversarial_loss(fake_p), generator_adversarial_loss(fake_r)
        fm_mp, fm_mr = feature_matching_loss(real_p_maps, fake_p_maps), feature_matching_loss(real_r_maps, fake_r_maps)
        total = total + loss["gan_weight"] * (g_mp + loss["mrd_weight"] * g_mr)
        total = total + loss["feature_matching_weight"] * (fm_mp + loss["mrd_weight"] * fm_mr)
        logs.update(gan_g_mpd=g_mp, gan_g_mrd=g_mr, fm_mpd=fm_mp, fm_mrd=fm_mr)
    logs["loss"] = total
    return total, {k: v.detach().float() for k, v in logs.items()}


def audio_discriminator_loss(*, x, x_hat, discriminator, loss: dict):
    """``(loss, logs)``: hinge losses of both discriminators on real ``x`` and (detached) ``x_hat``."""
    x_hat = x_hat.detach()
    d_mp = discriminator_adversarial_loss(discriminator.mpd(x)[0], discriminator.mpd(x_hat)[0])
    d_mr = discriminator_adversarial_loss(discriminator.mrd(x)[0], discriminator.mrd(x_hat)[0])
    total = d_mp + loss["mrd_weight"] * d_mr
    return total, {"disc_mpd": d_mp.detach().float(), "disc_mrd": d_mr.detach().float(), "disc_loss": total.detach().float()}
