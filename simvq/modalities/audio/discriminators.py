"""Waveform discriminators of the audio recipe (Vocos) and the audio tokenizer's training loss.

- Multi-period discriminator (HiFi-GAN): for each period ``p`` in (2, 3, 5, 7, 11) the waveform is folded
  into a ``(T / p, p)`` image and judged by a stack of ``(5, 1)`` 2-D convs (stride 3 along time).
- Multi-resolution discriminator (UniVNet): magnitude STFTs at (n_fft, hop, win) = (1024, 256, 1024),
  (2048, 512, 2048), (512, 128, 512) (rectangular window, as Vocos) judged by a stack of 2-D convs.
- Optional DAC discriminator (Descript Audio Codec, as WavTokenizer and the official SimVQ audio code use it;
  ``loss.dac_weight > 0``): the waveform is DC-removed and peak-normalised to 0.8, then judged by DAC-style
  period discriminators (periods 2, 3, 5, 7, 11) and by multi-band complex-STFT discriminators
  (:class:`MultiBandSTFTDiscriminator`, windows 2048, 1024, 512).
All convs are weight-normed, activations LeakyReLU(0.1). Every sub-discriminator returns its logits and the
list of its feature maps (for feature matching; the last map is the logits map).

MPD/MRD losses as Vocos/WavTokenizer/SimVQ compute them, each averaged over the sub-discriminators:
discriminator ``mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))``; generator ``mean(relu(1 - D(x_hat)))``;
feature matching ``sum over layers of mean |f(x) - f(x_hat)|``.
DAC losses as DAC's/WavTokenizer's ``GANLoss`` compute them, least squares and *summed* over the
sub-discriminators: discriminator ``mean(D(x_hat)**2) + mean((1 - D(x))**2)``; generator ``mean((1 - D(x_hat))**2)``;
feature matching ``sum over layers but the logits of mean |f(x) - f(x_hat)|``.
The generator objective is ``mel_weight * logmel_L1 + quantizer_weight * vq_loss + gan terms``
(:func:`audio_generator_loss`, official weights 45 and 1000).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from simvq.losses.adversarial import hinge_d_loss

DEFAULT_PERIODS = (2, 3, 5, 7, 11)
DEFAULT_RESOLUTIONS = ((1024, 256, 1024), (2048, 512, 2048), (512, 128, 512))
#: DAC's STFT window lengths (hop = window / 4) and its frequency bands, as fractions of the STFT bins.
DAC_WINDOWS = (2048, 1024, 512)
DAC_BANDS = ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))
#: the periods of the DAC discriminator's own period discriminators (beside the multi-band STFT ones)
DAC_PERIODS = (2, 3, 5, 7, 11)


class PeriodDiscriminator(nn.Module):
    """Judges the waveform folded by ``period``. ``(B, 1, T)`` -> (logits ``(B, n)``, feature maps).

    ``channels`` are the widths of the four strided convs (official ``(32, 128, 512, 1024)``); a fifth conv
    keeps the last width at stride 1, then a ``(3, 1)`` conv gives one logit per position.
    ``first_feature_map``: also return the first conv's output for feature matching (DAC does; Vocos does not).
    """

    def __init__(
        self, period: int, *, channels=(32, 128, 512, 1024), kernel_size: int = 5, stride: int = 3, first_feature_map: bool = False
    ) -> None:
        super().__init__()
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        self.period = period
        self.first_feature_map = first_feature_map
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
            if i > 0 or self.first_feature_map:  # Vocos leaves the first layer's output out of feature matching
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


def dac_band_edges(window: int, bands=DAC_BANDS) -> list[tuple[int, int]]:
    """The ``[start, stop)`` STFT bins of each band for a window of ``window`` samples.

    The STFT has ``window // 2 + 1`` bins; a band ``(lo, hi)`` covers bins ``int(lo * bins)`` to
    ``int(hi * bins)`` (as DAC). Raises ValueError for a window shorter than 4 samples, a band outside
    ``0 <= lo < hi <= 1`` or a band that gets no bin at this window length.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 4:
        raise ValueError(f"a DAC STFT window must be an integer >= 4 samples (the hop is window // 4), got {window!r}")
    bands = [tuple(b) for b in bands]
    if not bands:
        raise ValueError("the DAC discriminator needs at least one frequency band")
    bins = window // 2 + 1
    edges = []
    for i, band in enumerate(bands):
        if len(band) != 2 or not 0.0 <= band[0] < band[1] <= 1.0:
            raise ValueError(f"DAC band {i} must be a pair [lo, hi] of fractions with 0 <= lo < hi <= 1, got {list(band)}")
        start, stop = int(band[0] * bins), int(band[1] * bins)
        if stop <= start:
            raise ValueError(
                f"DAC window {window} has {bins} frequency bins, too few for band {i} {list(band)} (it gets no bin); "
                "use a longer window or wider bands"
            )
        edges.append((start, stop))
    return edges


class MultiBandSTFTDiscriminator(nn.Module):
    """DAC's multi-band complex-STFT discriminator at one window length (DAC calls it ``MRD``).

    The waveform ``(B, 1, T)`` goes through an STFT (n_fft = win = ``window``, hop ``window // 4``, rectangular
    window, centred with reflect padding, as the WavTokenizer/SimVQ copy of DAC calls ``torch.stft``); real and
    imaginary parts are two input channels of a ``(B, 2, frames, bins)`` image (time x frequency). The bins are
    split into bands (:func:`dac_band_edges`); each band has its own stack of five weight-normed convs
    (``channels`` wide, LeakyReLU 0.1): ``(3, 9)`` at stride 1, three ``(3, 9)`` at stride 2 along frequency,
    ``(3, 3)``. The band outputs are concatenated along frequency and a ``(3, 3)`` conv gives one channel of
    logits ``(B, 1, frames, sum of band widths)``.

    ``forward(x) -> (logits (B, n), feature maps)``: ``5 * len(bands)`` maps (band by band, layer by layer)
    and, last, the logits map.
    """

    def __init__(self, window: int, *, channels: int = 32, bands=DAC_BANDS) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        self.window = window
        self.hop = window // 4
        self.bands = dac_band_edges(window, bands)
        c = channels

        def stack() -> nn.ModuleList:
            return nn.ModuleList(
                [
                    weight_norm(nn.Conv2d(2, c, (3, 9), 1, padding=(1, 4))),
                    weight_norm(nn.Conv2d(c, c, (3, 9), (1, 2), padding=(1, 4))),
                    weight_norm(nn.Conv2d(c, c, (3, 9), (1, 2), padding=(1, 4))),
                    weight_norm(nn.Conv2d(c, c, (3, 9), (1, 2), padding=(1, 4))),
                    weight_norm(nn.Conv2d(c, c, (3, 3), 1, padding=(1, 1))),
                ]
            )

        self.band_convs = nn.ModuleList(stack() for _ in self.bands)
        self.conv_post = weight_norm(nn.Conv2d(c, 1, (3, 3), 1, padding=(1, 1)))

    def spectrogram(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, T)`` -> ``(B, 2, frames, window // 2 + 1)``: real and imaginary STFT parts."""
        w = self.window
        with torch.autocast(device_type=x.device.type, enabled=False):
            wave = x[:, 0].float()
            # reflect padding needs more than window / 2 samples; shorter clips are zero-padded instead
            pad_mode = "reflect" if wave.shape[-1] > w // 2 else "constant"
            spec = torch.stft(
                wave, n_fft=w, hop_length=self.hop, win_length=w, window=torch.ones(w, device=x.device),
                center=True, pad_mode=pad_mode, return_complex=True,
            )
        return torch.view_as_real(spec).permute(0, 3, 2, 1)  # (B, bins, frames, 2) -> (B, 2, frames, bins)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        spec = self.spectrogram(x)
        fmap, outs = [], []
        for (start, stop), convs in zip(self.bands, self.band_convs):
            h = spec[..., start:stop]
            for conv in convs:
                h = F.leaky_relu(conv(h), 0.1)
                fmap.append(h)
            outs.append(h)
        h = self.conv_post(torch.cat(outs, dim=-1))
        fmap.append(h)
        return h.flatten(1), fmap


class DACDiscriminator(nn.Module):
    """DAC's discriminator as WavTokenizer and the official SimVQ audio code use it (no multi-scale part).

    The input is DC-removed and peak-normalised per clip (``0.8 * x / (max |x| + 1e-9)``, so it judges
    shape, not loudness), then judged by one :class:`PeriodDiscriminator` per period (DAC style: the first
    layer's map is a feature map too; widths ``period_channels``) and one :class:`MultiBandSTFTDiscriminator`
    per window. ``forward(x)`` -> lists of logits and feature maps, periods first.
    """

    def __init__(self, *, windows=DAC_WINDOWS, channels: int = 32, bands=DAC_BANDS, periods=DAC_PERIODS, period_channels=(32, 128, 512, 1024)) -> None:
        super().__init__()
        windows, periods = list(windows), list(periods)
        if not windows and not periods:
            raise ValueError("the DAC discriminator needs at least one STFT window or period")
        discs: list[nn.Module] = [PeriodDiscriminator(int(p), channels=tuple(period_channels), first_feature_map=True) for p in periods]
        discs += [MultiBandSTFTDiscriminator(w, channels=channels, bands=bands) for w in windows]
        self.discriminators = nn.ModuleList(discs)

    @staticmethod
    def preprocess(x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(dim=-1, keepdim=True)
        return 0.8 * x / (x.abs().amax(dim=-1, keepdim=True) + 1e-9)

    def forward(self, x: torch.Tensor):
        x = self.preprocess(x)
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


def lsgan_generator_loss(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """DAC's generator term ``mean((1 - D(x_hat))**2)``, summed over sub-discriminators."""
    return torch.stack([(1.0 - f.float()).pow(2).mean() for f in fake_logits]).sum()


def lsgan_discriminator_loss(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """DAC's ``mean(D(x_hat)**2) + mean((1 - D(x))**2)``, summed over sub-discriminators."""
    return torch.stack([f.float().pow(2).mean() + (1.0 - r.float()).pow(2).mean() for r, f in zip(real_logits, fake_logits)]).sum()


def dac_feature_matching_loss(real_maps: list[list[torch.Tensor]], fake_maps: list[list[torch.Tensor]]) -> torch.Tensor:
    """``sum over sub-discriminators and layers of mean |f(x) - f(x_hat)|``, the logits map (last) left out, as
    DAC's ``GANLoss``; the real side is detached."""
    terms = [(r.detach().float() - f.float()).abs().mean() for rs, fs in zip(real_maps, fake_maps) for r, f in zip(rs[:-1], fs[:-1])]
    return torch.stack(terms).sum()


class AudioDiscriminator(nn.Module):
    """The recipe's discriminators as one module: ``mpd`` (multi-period), ``mrd`` (multi-resolution) and, when
    ``dac_weight > 0``, ``dac`` (:class:`DACDiscriminator`; otherwise ``dac`` is None and has no parameters)."""

    def __init__(
        self,
        *,
        periods=DEFAULT_PERIODS,
        mpd_channels=(32, 128, 512, 1024),
        resolutions=DEFAULT_RESOLUTIONS,
        mrd_channels: int = 64,
        dac_weight: float = 0.0,
        dac_windows=DAC_WINDOWS,
        dac_channels: int = 32,
        dac_bands=DAC_BANDS,
        dac_periods=DAC_PERIODS,
    ) -> None:
        super().__init__()
        self.mpd = MultiPeriodDiscriminator(periods=periods, channels=mpd_channels)
        self.mrd = MultiResolutionDiscriminator(resolutions=resolutions, channels=mrd_channels)
        self.dac = (
            DACDiscriminator(windows=dac_windows, channels=dac_channels, bands=dac_bands, periods=dac_periods, period_channels=mpd_channels)
            if dac_weight > 0
            else None
        )

    @classmethod
    def from_loss_config(cls, loss: dict) -> "AudioDiscriminator":
        return cls(
            periods=loss["periods"], mpd_channels=loss["mpd_channels"], resolutions=loss["resolutions"], mrd_channels=loss["mrd_channels"],
            dac_weight=loss.get("dac_weight", 0.0), dac_windows=loss.get("dac_windows", DAC_WINDOWS),
            dac_channels=loss.get("dac_channels", 32), dac_bands=loss.get("dac_bands", DAC_BANDS),
            dac_periods=loss.get("dac_periods", DAC_PERIODS),
        )


def _active_dac(discriminator, loss: dict):
    """The DAC discriminator when the loss uses it, else None."""
    dac = getattr(discriminator, "dac", None)
    return dac if dac is not None and loss.get("dac_weight", 0.0) > 0 else None


def uses_gan(loss: dict) -> bool:
    """Whether the loss section asks for discriminators at all."""
    return loss["gan_weight"] > 0 or loss["feature_matching_weight"] > 0


def audio_generator_loss(*, x, x_hat, quant, mel_loss, discriminator, loss: dict, gan_active: bool):
    """``(total, logs)``: ``mel_weight * logmel_L1 + quantizer_weight * quant.loss`` plus, when the GAN is active,
    ``gan_weight * (G_mpd + mrd_weight * G_mrd) + feature_matching_weight * (FM_mpd + mrd_weight * FM_mrd)``
    and, with the DAC discriminator, ``dac_weight * (gan_weight * G_dac + feature_matching_weight * FM_dac)``.

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
        dac = _active_dac(discriminator, loss)
        if dac is not None:
            with torch.no_grad():  # only the (detached) real feature maps are needed
                real_d_maps = dac(x)[1]
            fake_d, fake_d_maps = dac(x_hat)
            g_dac, fm_dac = lsgan_generator_loss(fake_d), dac_feature_matching_loss(real_d_maps, fake_d_maps)
            total = total + loss["dac_weight"] * (loss["gan_weight"] * g_dac + loss["feature_matching_weight"] * fm_dac)
            logs.update(gan_g_dac=g_dac, fm_dac=fm_dac)
    logs["loss"] = total
    return total, {k: v.detach().float() for k, v in logs.items()}


def audio_discriminator_loss(*, x, x_hat, discriminator, loss: dict):
    """``(loss, logs)``: hinge losses of MPD and MRD on real ``x`` and (detached) ``x_hat``,
    ``D_mpd + mrd_weight * D_mrd``, plus ``dac_weight * D_dac`` (least squares) with the DAC discriminator."""
    x_hat = x_hat.detach()
    d_mp = discriminator_adversarial_loss(discriminator.mpd(x)[0], discriminator.mpd(x_hat)[0])
    d_mr = discriminator_adversarial_loss(discriminator.mrd(x)[0], discriminator.mrd(x_hat)[0])
    total = d_mp + loss["mrd_weight"] * d_mr
    logs = {"disc_mpd": d_mp.detach().float(), "disc_mrd": d_mr.detach().float()}
    dac = _active_dac(discriminator, loss)
    if dac is not None:
        # one pass over real and fake together (every layer works per clip; ~20% faster on a CPU than two)
        n = x.shape[0]
        logits = dac(torch.cat([x, x_hat.to(x.dtype)]))[0]
        d_dac = lsgan_discriminator_loss([t[:n] for t in logits], [t[n:] for t in logits])
        total = total + loss["dac_weight"] * d_dac
        logs["disc_dac"] = d_dac.detach().float()
    logs["disc_loss"] = total.detach().float()
    return total, logs
