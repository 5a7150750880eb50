"""Audio tokenizer of the SimVQ audio recipe: causal SEANet encoder -> quantizer -> Vocos decoder.

Architecture (official ``official-24k`` preset, LibriTTS 24 kHz, 75 tokens/s):

- Encoder: EnCodec's causal SEANet. A k7 conv 1 -> 32 channels; four stages, each one residual block
  (ELU, k3 conv to half the width with dilation 2**j, ELU, k1 conv back; a weight-normed k1 conv as the skip
  path) then ELU and a strided conv (kernel 2r, stride r) that doubles the width. The strides are the
  ratios ``[8, 5, 4, 2]`` applied in reverse order (2, 4, 5, 8), as EnCodec's encoder does, so the hop is
  320 samples; a 2-layer LSTM with a skip connection; ELU and a k7 conv to 512. Every conv is weight-normed
  and causal: the padding ``(k - 1) * dilation + 1 - stride`` goes on the left (reflect mode, as EnCodec).
- Quantizer: any :class:`~simvq.quantizers.base.Quantizer` over ``(B, 512, T')`` features (SimVQ in the paper).
- Decoder: the Vocos backbone as WavTokenizer/SimVQ use it: a k7 conv 512 -> 768, a "pos-net" (two ResNet
  blocks, one self-attention block, two ResNet blocks, GroupNorm; GroupNorm(32) + swish inside), LayerNorm,
  12 ConvNeXt blocks (depthwise k7, LayerNorm, 768 -> 2304 -> 768 GELU MLP, layer scale 1/12), LayerNorm;
  then an inverse-STFT head: a linear layer predicts ``n_fft + 2`` values per frame (log-magnitude and phase
  halves), the magnitude is ``exp`` clipped at 100, the spectrum ``mag * (cos p + i sin p)`` goes through an
  ISTFT with "same" padding (n_fft 1280, hop 320), so ``T'`` frames give exactly ``T' * 320`` samples.

Lengths: inputs whose length is a multiple of the hop come back with the same length. Other lengths are
zero-padded on the right to the next multiple of the hop before encoding and the reconstruction is trimmed
back to the input length in :meth:`AudioTokenizer.forward` (``encode`` covers the padded length, so a clip of
``T`` samples gives ``ceil(T / hop)`` tokens).

Module and parameter names mirror the official checkpoints (``encoder.model.N.conv.conv...``,
``backbone.*``/``head.*`` under ``decoder.``), so :func:`convert_official_audio_state_dict` only renames the
weight-norm tensors and moves the backbone and head under ``decoder``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from simvq.modalities.base import bits_per_token
from simvq.quantizers import build_quantizer
from simvq.quantizers.base import Quantizer, QuantizerOutput

# ----------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------

#: Architecture presets. ``official-24k`` is the paper's model; the small ones train on a CPU.
AUDIO_PRESETS: dict[str, dict] = {
    "official-24k": dict(
        sample_rate=24000,
        n_filters=32,
        ratios=[8, 5, 4, 2],
        n_residual_layers=1,
        dilation_base=2,
        kernel_size=7,
        last_kernel_size=7,
        residual_kernel_size=3,
        compress=2,
        lstm_layers=2,
        dimension=512,
        backbone_dim=768,
        backbone_intermediate_dim=2304,
        backbone_layers=12,
        pos_net=True,
        n_fft=1280,
        encoder_init_gain=None,
    ),
    # 16 kHz, hop 320 -> 50 tokens/s; about 1/10 of the official compute, trains on a laptop CPU.
    "small-16k": dict(
        sample_rate=16000,
        n_filters=16,
        ratios=[8, 5, 4, 2],
        n_residual_layers=1,
        dilation_base=2,
        kernel_size=7,
        last_kernel_size=7,
        residual_kernel_size=3,
        compress=2,
        lstm_layers=2,
        dimension=128,
        backbone_dim=256,
        backbone_intermediate_dim=768,
        backbone_layers=4,
        pos_net=True,
        n_fft=1280,
        encoder_init_gain=None,
    ),
    # the smallest model that still has every part; for tests and smoke runs.
    "tiny-16k": dict(
        sample_rate=16000,
        n_filters=4,
        ratios=[8, 5, 4, 2],
        n_residual_layers=1,
        dilation_base=2,
        kernel_size=7,
        last_kernel_size=7,
        residual_kernel_size=3,
        compress=2,
        lstm_layers=1,
        dimension=32,
        backbone_dim=32,
        backbone_intermediate_dim=64,
        backbone_layers=1,
        pos_net=True,
        n_fft=1280,
        encoder_init_gain=None,
    ),
}

#: Keys of the ``model`` config section for audio (besides ``preset``): the preset entries above.
AUDIO_MODEL_KEYS = tuple(AUDIO_PRESETS["official-24k"].keys())


# ----------------------------------------------------------------------------------------------------------
# Encoder (causal SEANet)
# ----------------------------------------------------------------------------------------------------------


def _pad1d(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    """``F.pad`` that also reflects when the signal is shorter than the padding (zero-extends it first)."""
    if mode != "reflect":
        return F.pad(x, (left, right), mode=mode)
    length = x.shape[-1]
    extra = max(left, right) - length + 1 if length <= max(left, right) else 0
    if extra:
        x = F.pad(x, (0, extra))
    out = F.pad(x, (left, right), mode="reflect")
    return out[..., : out.shape[-1] - extra] if extra else out


class _WeightNormConv1d(nn.Module):
    """Holds the weight-normed ``nn.Conv1d`` as ``.conv`` (EnCodec's NormConv1d nesting, for key names)."""

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        self.conv = weight_norm(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class CausalConv1d(nn.Module):
    """Weight-normed conv whose output at time ``t`` depends on inputs up to ``t`` (plus EnCodec's rule).

    Padding: ``(k - 1) * dilation + 1 - stride`` samples on the left; on the right only what makes the last
    window complete, so a length ``L`` that is a multiple of ``stride`` gives ``L / stride`` outputs.
    Input ``(B, C_in, L)`` -> ``(B, C_out, ceil(L / stride))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        pad_mode: str = "reflect",
    ) -> None:
        super().__init__()
        self.conv = _WeightNormConv1d(nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation))
        self.stride = stride
        self.effective_kernel = (kernel_size - 1) * dilation + 1
        self.pad_mode = pad_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        left = self.effective_kernel - self.stride
        frames = math.ceil((length - self.effective_kernel + left) / self.stride + 1)
        right = (frames - 1) * self.stride + self.effective_kernel - left - length
        return self.conv(_pad1d(x, left, right, self.pad_mode))


class SEANetResidualBlock(nn.Module):
    """``shortcut(x) + block(x)``; block = ELU, k3 dilated conv to ``dim // compress``, ELU, k1 conv to ``dim``."""

    def __init__(self, dim: int, *, kernel_size: int, dilation: int, compress: int, pad_mode: str) -> None:
        super().__init__()
        hidden = dim // compress
        self.block = nn.Sequential(
            nn.ELU(),
            CausalConv1d(dim, hidden, kernel_size, dilation=dilation, pad_mode=pad_mode),
            nn.ELU(),
            CausalConv1d(hidden, dim, 1, pad_mode=pad_mode),
        )
        # EnCodec's encoder uses a learned k1 conv as the skip path (true_skip=False)
        self.shortcut = CausalConv1d(dim, dim, 1, pad_mode=pad_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.block(x)


class SkipLSTM(nn.Module):
    """Multi-layer LSTM over conv-layout features ``(B, C, T)`` with an identity skip connection."""

    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, num_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.permute(2, 0, 1)  # (T, B, C): the official LSTM is sequence-first
        out, _ = self.lstm(seq)
        return (out + seq).permute(1, 2, 0)


class SEANetEncoder(nn.Module):
    """Causal SEANet encoder: waveform ``(B, 1, T)`` -> features ``(B, dimension, T / hop)``.

    Args:
        channels: audio channels (1).
        n_filters: width after the first conv; doubled by every downsampling stage.
        ratios: the decoder-order ratios; the encoder downsamples by them in reverse order.
        n_residual_layers: residual blocks per stage (dilations ``dilation_base ** j``).
        kernel_size, last_kernel_size, residual_kernel_size: kernel of the first conv, last conv, residual convs.
        compress: channel reduction inside residual blocks.
        lstm_layers: LSTM depth at the end (0 disables the LSTM).
        dimension: output feature size (the token dimension).
        pad_mode: padding mode of the causal convolutions.
        init_gain: ``None`` (official) keeps PyTorch's default initialisation. A number redraws every conv
            weight from ``N(0, init_gain**2 / fan_in)`` and zeroes the biases. Why: with the default draw
            (weight variance ``1 / (3 fan_in)``) the time-varying part of the features shrinks about 2.5x per
            stage while the bias-driven constant part does not, so at initialisation every frame gives almost
            the same token and every frame picks the same code; ``init_gain=1.0`` keeps the tokens' spread
            near the scale of a randomly initialised codebook (docs/audio.md).
    """

    def __init__(
        self,
        *,
        channels: int = 1,
        n_filters: int = 32,
        ratios=(8, 5, 4, 2),
        n_residual_layers: int = 1,
        dilation_base: int = 2,
        kernel_size: int = 7,
        last_kernel_size: int = 7,
        residual_kernel_size: int = 3,
        compress: int = 2,
        lstm_layers: int = 2,
        dimension: int = 512,
        pad_mode: str = "reflect",
        init_gain: float | None = None,
    ) -> None:
        super().__init__()
        if init_gain is not None and not (isinstance(init_gain, (int, float)) and not isinstance(init_gain, bool) and 0 < init_gain < math.inf):
            raise ValueError(f"init_gain must be a positive number or None (PyTorch's default initialisation), got {init_gain!r}")
        ratios = [int(r) for r in ratios]
        if not ratios or any(r < 1 for r in ratios):
            raise ValueError(f"ratios must be a non-empty list of positive integers, got {ratios}")
        self.ratios = list(reversed(ratios))
        self.hop_length = math.prod(self.ratios)
        self.dimension = dimension
        width = n_filters
        layers: list[nn.Module] = [CausalConv1d(channels, width, kernel_size, pad_mode=pad_mode)]
        for ratio in self.ratios:
            for j in range(n_residual_layers):
                layers.append(
                    SEANetResidualBlock(
                        width, kernel_size=residual_kernel_size, dilation=dilation_base**j, compress=compress, pad_mode=pad_mode
                    )
                )
            layers += [nn.ELU(), CausalConv1d(width, width * 2, 2 * ratio, stride=ratio, pad_mode=pad_mode)]
            width *= 2
        if lstm_layers:
            layers.append(SkipLSTM(width, lstm_layers))
        layers += [nn.ELU(), CausalConv1d(width, dimension, last_kernel_size, pad_mode=pad_mode)]
        self.model = nn.Sequential(*layers)
        if init_gain is not None:
            self._redraw_conv_weights(float(init_gain))

    @torch.no_grad()
    def _redraw_conv_weights(self, gain: float) -> None:
        for module in self.modules():
            if isinstance(module, CausalConv1d):
                conv = module.conv.conv
                direction = conv.parametrizations.weight.original1  # (C_out, C_in, k)
                fan_in = direction.shape[1] * direction.shape[2]
                weight = torch.randn_like(direction) * (gain / math.sqrt(fan_in))
                direction.copy_(weight)
                # weight norm: g = |v| per output channel, so the effective weight is exactly the draw
                conv.parametrizations.weight.original0.copy_(weight.norm(dim=(1, 2), keepdim=True))
                conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# ----------------------------------------------------------------------------------------------------------
# Decoder (Vocos backbone + ISTFT head)
# ----------------------------------------------------------------------------------------------------------


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class PosNetResBlock(nn.Module):
    """GroupNorm(32) -> swish -> k3 conv, twice (dropout before the second conv), plus the identity."""

    def __init__(self, dim: int, *, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(32, dim, eps=1e-6)
        self.conv1 = nn.Conv1d(dim, dim, 3, padding=1)
        self.norm2 = nn.GroupNorm(32, dim, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        return x + h


class PosNetAttention(nn.Module):
    """Single-head self-attention over time with k1-conv projections, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(32, dim, eps=1e-6)
        self.q = nn.Conv1d(dim, dim, 1)
        self.k = nn.Conv1d(dim, dim, 1)
        self.v = nn.Conv1d(dim, dim, 1)
        self.proj_out = nn.Conv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = (proj(h).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, T, C)
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj_out(out.transpose(1, 2))


class ConvNeXtBlock(nn.Module):
    """1-D ConvNeXt block: depthwise k7 conv, LayerNorm, GELU MLP, layer scale, residual. ``(B, C, T)``."""

    def __init__(self, dim: int, intermediate_dim: int, layer_scale: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.dwconv(x).transpose(1, 2))
        h = self.pwconv2(self.act(self.pwconv1(h))) * self.gamma
        return x + h.transpose(1, 2)


class VocosBackbone(nn.Module):
    """Features ``(B, input_channels, T')`` -> hidden states ``(B, T', dim)``."""

    def __init__(self, *, input_channels: int, dim: int, intermediate_dim: int, num_layers: int, pos_net: bool = True) -> None:
        super().__init__()
        if pos_net and dim % 32:
            raise ValueError(f"backbone_dim must be a multiple of 32 (GroupNorm(32) in the pos-net), got {dim}")
        self.embed = nn.Conv1d(input_channels, dim, 7, padding=3)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.convnext = nn.ModuleList([ConvNeXtBlock(dim, intermediate_dim, 1.0 / num_layers) for _ in range(num_layers)])
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)
        # Vocos initialises convs and linears as trunc-normal(0.02) with zero bias; the pos-net, added by
        # WavTokenizer after that initialisation, keeps PyTorch's defaults.
        for module in self.modules():
            if isinstance(module, (nn.Conv1d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        if pos_net:
            self.pos_net = nn.Sequential(
                PosNetResBlock(dim),
                PosNetResBlock(dim),
                PosNetAttention(dim),
                PosNetResBlock(dim),
                PosNetResBlock(dim),
                nn.GroupNorm(32, dim, eps=1e-6),
            )
        else:
            self.pos_net = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_net(self.embed(x))
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        for block in self.convnext:
            x = block(x)
        return self.final_layer_norm(x.transpose(1, 2))


class SameISTFT(nn.Module):
    """Inverse STFT with "same" padding: ``F`` frames -> ``F * hop`` samples.

    ``torch.istft`` only trims ``center=True`` padding and refuses windows whose squared sum vanishes at the
    edges (NOLA); a vocoder wants the conv-style "same" framing instead, where ``(n_fft - hop) / 2`` samples
    are trimmed from both ends. This is the overlap-add written out: inverse real FFT of each frame, Hann
    synthesis window, overlap-add, division by the overlapped squared window.
    Input: complex ``(B, n_fft // 2 + 1, F)``; output ``(B, F * hop)``.
    """

    def __init__(self, *, n_fft: int, hop_length: int) -> None:
        super().__init__()
        if (n_fft - hop_length) % 2:
            raise ValueError(f"n_fft - hop_length must be even for 'same' padding, got n_fft={n_fft}, hop={hop_length}")
        if hop_length > n_fft:
            raise ValueError(f"hop_length ({hop_length}) must not exceed n_fft ({n_fft})")
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True))

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        if spec.dim() != 3 or spec.shape[1] != self.n_fft // 2 + 1:
            raise ValueError(f"expected a complex spectrum (B, {self.n_fft // 2 + 1}, frames), got {tuple(spec.shape)}")
        frames = spec.shape[-1]
        pad = (self.n_fft - self.hop_length) // 2
        full = (frames - 1) * self.hop_length + self.n_fft
        chunks = torch.fft.irfft(spec, n=self.n_fft, dim=1) * self.window[None, :, None]  # (B, n_fft, F)
        out = F.fold(chunks, output_size=(1, full), kernel_size=(1, self.n_fft), stride=(1, self.hop_length))[:, 0, 0]
        envelope = F.fold(
            self.window.square()[None, :, None].expand(1, -1, frames),
            output_size=(1, full),
            kernel_size=(1, self.n_fft),
            stride=(1, self.hop_length),
        )[0, 0, 0]
        out, envelope = out[:, pad : full - pad], envelope[pad : full - pad]
        return out / envelope.clamp_min(1e-11)


class ISTFTHead(nn.Module):
    """Hidden states ``(B, T', dim)`` -> waveform ``(B, T' * hop)`` through a predicted complex STFT."""

    def __init__(self, *, dim: int, n_fft: int, hop_length: int, max_magnitude: float = 1e2) -> None:
        super().__init__()
        self.out = nn.Linear(dim, n_fft + 2)
        self.istft = SameISTFT(n_fft=n_fft, hop_length=hop_length)
        self.max_magnitude = float(max_magnitude)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        log_mag, phase = self.out(h).float().transpose(1, 2).chunk(2, dim=1)
        # exp can overflow early in training; the clip bounds the spectrum (and the NaN risk) at 100
        mag = torch.exp(log_mag).clamp(max=self.max_magnitude)
        spec = torch.complex(mag * torch.cos(phase), mag * torch.sin(phase))
        return self.istft(spec)


class VocosDecoder(nn.Module):
    """Quantized features ``(B, dimension, T')`` -> waveform ``(B, 1, T' * hop)``."""

    def __init__(self, *, input_channels: int, dim: int, intermediate_dim: int, num_layers: int, n_fft: int, hop_length: int, pos_net: bool = True) -> None:
        super().__init__()
        self.backbone = VocosBackbone(input_channels=input_channels, dim=dim, intermediate_dim=intermediate_dim, num_layers=num_layers, pos_net=pos_net)
        self.head = ISTFTHead(dim=dim, n_fft=n_fft, hop_length=hop_length)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(z)).unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------


class AudioTokenizer(nn.Module):
    """SEANet encoder -> quantizer -> Vocos/ISTFT decoder.

    Args:
        quantizer: a channel-first quantizer whose ``dim`` equals ``dimension``.
        sample_rate: the rate the model works at (inputs must already be at this rate).
        dimension: token dimension (encoder output = quantizer dim = backbone input).
        n_fft: ISTFT size of the head (hop = the encoder's hop).
        encoder_init_gain: ``None`` (official) or the gain of the encoder's variance-preserving conv
            initialisation (see :class:`SEANetEncoder` ``init_gain``); only affects a freshly built model.
        the other keywords: see :data:`AUDIO_PRESETS` / :class:`SEANetEncoder` / :class:`VocosBackbone`.

    Shapes: ``x`` is ``(B, 1, T)`` in [-1, 1]; ``forward(x) -> (x_hat (B, 1, T), QuantizerOutput)`` with
    ``indices`` ``(B, ceil(T / hop))``; ``encode(x) -> QuantizerOutput``;
    ``decode_indices(indices (B, T')) -> (B, 1, T' * hop)``.
    """

    def __init__(
        self,
        *,
        quantizer: Quantizer,
        sample_rate: int,
        n_filters: int = 32,
        ratios=(8, 5, 4, 2),
        n_residual_layers: int = 1,
        dilation_base: int = 2,
        kernel_size: int = 7,
        last_kernel_size: int = 7,
        residual_kernel_size: int = 3,
        compress: int = 2,
        lstm_layers: int = 2,
        dimension: int = 512,
        backbone_dim: int = 768,
        backbone_intermediate_dim: int = 2304,
        backbone_layers: int = 12,
        pos_net: bool = True,
        n_fft: int = 1280,
        encoder_init_gain: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(quantizer, Quantizer):
            raise TypeError(f"quantizer must be a simvq Quantizer, got {type(quantizer).__name__}")
        if quantizer.dim != dimension:
            raise ValueError(f"quantizer dim ({quantizer.dim}) must equal the encoder dimension ({dimension})")
        if not quantizer.channel_first:
            raise ValueError("the audio tokenizer passes (B, dim, T') features: build the quantizer with channel_first=True")
        if not isinstance(sample_rate, int) or sample_rate < 1:
            raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
        self.sample_rate = sample_rate
        self.encoder = SEANetEncoder(
            n_filters=n_filters,
            ratios=ratios,
            n_residual_layers=n_residual_layers,
            dilation_base=dilation_base,
            kernel_size=kernel_size,
            last_kernel_size=last_kernel_size,
            residual_kernel_size=residual_kernel_size,
            compress=compress,
            lstm_layers=lstm_layers,
            dimension=dimension,
            init_gain=encoder_init_gain,
        )
        self.hop_length = self.encoder.hop_length
        self.quantize = quantizer
        self.decoder = VocosDecoder(
            input_channels=dimension,
            dim=backbone_dim,
            intermediate_dim=backbone_intermediate_dim,
            num_layers=backbone_layers,
            n_fft=n_fft,
            hop_length=self.hop_length,
            pos_net=pos_net,
        )

    # ----- properties ---------------------------------------------------------------------------------
    @property
    def tokens_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def bitrate(self) -> float:
        """Bits per second: ``tokens/s * index_levels * log2(K)`` (:func:`~simvq.modalities.base.bits_per_token`)."""
        return self.tokens_per_second * bits_per_token(self.quantize)

    # ----- API ----------------------------------------------------------------------------------------
    def _check_wave(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a waveform tensor (B, 1, T), got {type(x).__name__}")
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"expected a mono waveform of shape (B, 1, T), got {tuple(x.shape)}; use x[:, None] for (B, T)")
        if x.shape[-1] == 0:
            raise ValueError("expected a waveform with at least one sample, got T = 0")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point waveform in [-1, 1], got dtype {x.dtype}")
        remainder = x.shape[-1] % self.hop_length
        if remainder:
            x = F.pad(x, (0, self.hop_length - remainder))
        return x

    def encode(self, x: torch.Tensor) -> QuantizerOutput:
        """Waveform ``(B, 1, T)`` -> QuantizerOutput with ``indices`` ``(B, ceil(T / hop))``."""
        return self.quantize(self.encoder(self._check_wave(x)))

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        """Quantized features ``(B, dimension, T')`` -> waveform ``(B, 1, T' * hop)``."""
        return self.decoder(quantized)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Token indices ``(B, T')`` -> waveform ``(B, 1, T' * hop)``."""
        if indices.dim() != 2 + (self.quantize.index_levels > 1):
            raise ValueError(f"expected indices of shape (B, T'), got {tuple(indices.shape)}")
        return self.decode(self.quantize.decode_indices(indices))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        length = x.shape[-1] if isinstance(x, torch.Tensor) else 0
        q = self.encode(x)
        return self.decode(q.quantized)[..., :length], q


# ----------------------------------------------------------------------------------------------------------
# Building from a config
# ----------------------------------------------------------------------------------------------------------


def resolve_audio_model_config(model_cfg: Mapping | None) -> dict:
    """``model`` config section -> full keyword set: the preset's values overridden by explicit keys."""
    model_cfg = {k: v for k, v in dict(model_cfg or {}).items() if v is not None}
    preset = model_cfg.pop("preset", None) or "official-24k"
    if preset not in AUDIO_PRESETS:
        raise ValueError(f"unknown audio preset {preset!r}; choose one of {sorted(AUDIO_PRESETS)}")
    unknown = sorted(set(model_cfg) - set(AUDIO_MODEL_KEYS))
    if unknown:
        raise ValueError(f"unknown audio model key(s) {unknown}; valid keys are ['preset', {', '.join(repr(k) for k in AUDIO_MODEL_KEYS)}]")
    resolved = copy.deepcopy(AUDIO_PRESETS[preset])
    resolved.update(model_cfg)
    return resolved


def build_audio_tokenizer(config: Mapping, quantizer_cfg: Mapping | None = None) -> AudioTokenizer:
    """Build an :class:`AudioTokenizer` from a config.

    Called either with the full config (``model`` and ``quantizer`` sections) or, as
    :func:`simvq.modalities.build_tokenizer` does, with the ``model`` section and the ``quantizer`` section.
    ``model.preset`` picks an entry of :data:`AUDIO_PRESETS` (default ``official-24k``); other ``model`` keys
    override it. ``quantizer.name`` + keywords go to :func:`simvq.quantizers.build_quantizer`; ``dim`` is filled
    from the model (``dimension``) and ``channel_first`` is forced to True.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}")
    if quantizer_cfg is None:
        model_cfg, quantizer_cfg = config.get("model"), config.get("quantizer")
    else:
        model_cfg = config
    model_kwargs = resolve_audio_model_config(model_cfg)
    qcfg = dict(quantizer_cfg or {"name": "simvq"})
    name = qcfg.pop("name", "simvq")
    if qcfg.get("dim") not in (None, model_kwargs["dimension"]):
        raise ValueError(f"quantizer.dim ({qcfg['dim']}) must equal model.dimension ({model_kwargs['dimension']}) or be omitted")
    qcfg["dim"] = model_kwargs["dimension"]
    qcfg["channel_first"] = True
    return AudioTokenizer(quantizer=build_quantizer(name, **qcfg), **model_kwargs)


def is_official_audio_state_dict(state_dict: Mapping) -> bool:
    """True for a state dict laid out as the official audio model (``backbone.*`` and ``head.*`` at the top)."""
    keys = set(state_dict)
    has_head = "head.out.weight" in keys or "model_ema.headoutweight" in keys
    has_backbone = "backbone.embed.weight" in keys or "model_ema.backboneembedweight" in keys
    return has_head and has_backbone


def _official_name(ours: str) -> str | None:
    """Our parameter name -> the official one (None if the official model has no such tensor)."""
    name = ours.replace(".parametrizations.weight.original0", ".weight_g").replace(".parametrizations.weight.original1", ".weight_v")
    if name.startswith("decoder.backbone.") or name.startswith("decoder.head."):
        return name[len("decoder.") :]
    if name.startswith("encoder.") or name.startswith("quantize."):
        return name
    return None


def convert_official_audio_state_dict(state_dict: Mapping, model: nn.Module, *, use_ema: bool = True) -> dict:
    """Map an official SimVQ audio ``state_dict`` onto ``model`` (an :class:`AudioTokenizer`).

    The official Lightning checkpoint keeps the SEANet encoder under ``encoder.*`` (old-style weight norm:
    ``weight_g`` / ``weight_v``), the Vocos backbone and ISTFT head under ``backbone.*`` / ``head.*``, the
    quantizer under ``quantize.*``, an unused SEANet *decoder* under ``decoder.*``, the discriminators under
    ``loss.*`` and EMA copies under ``model_ema.<name without dots>``. We keep encoder, quantizer, backbone and
    head; ``weight_g``/``weight_v`` become ``parametrizations.weight.original0``/``original1``; the SEANet decoder
    and the discriminators are dropped. With ``use_ema`` the EMA copy of a tensor is taken when present (the
    paper evaluates EMA weights).

    Returns a state dict for ``model.load_state_dict(..., strict=True)`` (usage counters excepted: they start
    at zero). Raises ValueError naming the missing or mis-shaped tensors.
    """
    own = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    mismatched: list[str] = []
    for ours, target in own.items():
        if ours.endswith("usage.counts"):
            continue
        official = _official_name(ours)
        if official is None:
            continue
        ema_key = "model_ema." + official.replace(".", "")
        if use_ema and ema_key in state_dict:
            tensor = state_dict[ema_key]
        elif official in state_dict:
            tensor = state_dict[official]
        else:
            if ours.endswith("istft.window"):
                converted[ours] = target.clone()  # a constant: absent from some exports
                continue
            missing.append(official)
            continue
        tensor = torch.as_tensor(tensor)
        if tuple(tensor.shape) != tuple(target.shape):
            mismatched.append(f"{official}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}")
            continue
        converted[ours] = tensor.to(target.dtype)
    if missing or mismatched:
        lines = []
        if missing:
            lines.append(f"{len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:5]}")
        if mismatched:
            lines.append(f"{len(mismatched)} tensor(s) with other shapes, e.g. {mismatched[:5]}")
        raise ValueError(
            "the checkpoint does not match this audio model (" + "; ".join(lines) + "); check the preset "
            "(official-24k) and quantizer.codebook_size against the checkpoint"
        )
    return converted


def infer_official_audio_model(state_dict: Mapping) -> dict:
    """The ``model`` section of an official-layout audio state dict, read from tensor shapes.

    Widths, depths, strides (the strided convs have kernel ``2 * ratio``), LSTM depth, backbone size and the
    head's ``n_fft`` come from the tensors; the sample rate is not stored and is taken as the official 24 kHz.
    """

    def shape(key: str) -> tuple:
        for k in (key, key.replace("weight_v", "weight")):
            if k in state_dict:
                return tuple(state_dict[k].shape)
        raise ValueError(f"official audio checkpoint lacks {key!r}; it does not have the official layout")

    model: dict = {"preset": "official-24k", "sample_rate": 24000}
    model["n_filters"] = shape("encoder.model.0.conv.conv.weight_v")[0]
    convs = sorted(
        {int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.model.") and k.endswith(".conv.conv.weight_v") and k.count(".") == 5}
    )
    strided = [i for i in convs if i > 0 and shape(f"encoder.model.{i}.conv.conv.weight_v")[2] % 2 == 0]
    model["ratios"] = [shape(f"encoder.model.{i}.conv.conv.weight_v")[2] // 2 for i in reversed(strided)]
    lstm = {int(k.split("_l")[-1]) for k in state_dict if k.startswith("encoder.model.") and ".lstm.weight_ih_l" in k}
    model["lstm_layers"] = len(lstm)
    model["dimension"] = shape("backbone.embed.weight")[1]
    model["backbone_dim"] = shape("backbone.embed.weight")[0]
    model["backbone_intermediate_dim"] = shape("backbone.convnext.0.pwconv1.weight")[0]
    model["backbone_layers"] = len({k.split(".")[2] for k in state_dict if k.startswith("backbone.convnext.")})
    model["pos_net"] = any(k.startswith("backbone.pos_net.") for k in state_dict)
    model["n_fft"] = shape("head.out.weight")[0] - 2
    return model


def convert_official_state_dict(state_dict: Mapping, use_ema: bool = True) -> tuple[dict, dict]:
    """An official audio checkpoint's ``state_dict`` -> ``(tokenizer state dict, model and quantizer sections)``.

    The architecture is read from the tensor shapes (:func:`infer_official_audio_model`; the released models
    are ``official-24k``); the codebook size comes from ``quantize.embedding.weight``, and the quantizer is
    SimVQ when ``quantize.embedding_proj.*`` is present (plain VQ otherwise). Used by
    :func:`simvq.checkpoints.convert_official`.
    """
    codebook = state_dict.get("quantize.embedding.weight")
    if codebook is None or codebook.dim() != 2:
        raise ValueError("official audio checkpoint lacks quantize.embedding.weight (K, d); it does not have the official layout")
    k = int(codebook.shape[0])
    name = "simvq" if "quantize.embedding_proj.weight" in state_dict else "vq"
    config = {"model": infer_official_audio_model(state_dict), "quantizer": {"name": name, "codebook_size": k}}
    model = build_audio_tokenizer(config)
    converted = convert_official_audio_state_dict(state_dict, model, use_ema=use_ema)
    own = model.state_dict()
    own.update(converted)
    model.load_state_dict(own)
    return model.state_dict(), config
