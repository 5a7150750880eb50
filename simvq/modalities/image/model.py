"""Image tokenizer: the Open-MAGVIT2-style CNN encoder/decoder used by the official SimVQ image recipe.

Layout (official ``improved_model.py``; no attention anywhere):

Encoder, input ``(B, in_channels, H, W)``:
    ``conv_in`` 3x3 no bias -> for each level ``i``: ``num_res_blocks`` ResBlocks to ``ch * ch_mult[i]``,
    then (all levels but the last) a stride-2 3x3 ``downsample`` conv with bias -> ``num_res_blocks`` mid
    ResBlocks -> GroupNorm -> swish -> 1x1 ``conv_out`` (bias) to ``z_channels``.
    Output ``(B, z_channels, H / f, W / f)`` with ``f = 2 ** (len(ch_mult) - 1)``.
Decoder, input ``(B, z_channels, h, w)``:
    ``conv_in`` 3x3 with bias to ``ch * ch_mult[-1]`` -> ``num_res_blocks`` mid ResBlocks -> for each level
    from the deepest: ``num_res_blocks`` ResBlocks to ``ch * ch_mult[i]``, then (all levels but level 0) an
    ``Upsampler``: 3x3 conv to 4x channels + depth-to-space x2 (DCR order) -> GroupNorm -> swish ->
    3x3 ``conv_out`` (bias) to ``out_channels``.
ResBlock: GroupNorm(32, eps 1e-6) -> swish -> 3x3 conv (no bias), twice; 1x1 no-bias ``nin_shortcut`` when
    the width changes.

Module and parameter names follow the official code (``down.{i}.block.{j}.conv1.weight``,
``mid_block.{j}``, ``up.{i}.upsample.conv1``, ...), so an official checkpoint's ``encoder.*`` / ``decoder.*``
keys load into :class:`ImageTokenizer` unchanged. ``up`` is indexed by level (``up[0]`` is the
full-resolution level) although the decoder runs it from the deepest level first, as the official code does.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from simvq.quantizers import build_quantizer
from simvq.quantizers.base import Quantizer, QuantizerOutput

#: Model settings (the ``model`` section of a config, without ``preset``). Image size is a data setting:
#: any ``H, W`` divisible by ``2 ** (len(ch_mult) - 1)`` works.
IMAGE_PRESETS: dict[str, dict] = {
    # The official ImageNet 128x128 model: x8 down-sampling, 16x16 = 256 tokens of dimension 128.
    "official-128": {
        "in_channels": 3,
        "out_channels": 3,
        "ch": 128,
        "ch_mult": [1, 2, 2, 4],
        "num_res_blocks": 2,
        "z_channels": 128,
    },
    # CPU-sized colour model for 32x32 crops: x4 down-sampling -> 8x8 = 64 tokens.
    "small-rgb-32": {
        "in_channels": 3,
        "out_channels": 3,
        "ch": 32,
        "ch_mult": [1, 2, 2],
        "num_res_blocks": 1,
        "z_channels": 64,
    },
    # The same for grey images (Fashion-MNIST 28x28 padded to 32x32): 8x8 = 64 tokens.
    "small-grey-32": {
        "in_channels": 1,
        "out_channels": 1,
        "ch": 32,
        "ch_mult": [1, 2, 2],
        "num_res_blocks": 1,
        "z_channels": 64,
    },
}

MODEL_KEYS = ("in_channels", "out_channels", "ch", "ch_mult", "num_res_blocks", "z_channels", "norm_groups")


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups != 0:
        raise ValueError(
            f"GroupNorm with {groups} groups needs a channel count divisible by {groups}, got {channels}; "
            f"choose ch (and ch * ch_mult) as multiples of {groups} or change norm_groups"
        )
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """Pre-activation residual block without bias: ``(B, in_ch, H, W) -> (B, out_ch, H, W)``."""

    def __init__(self, *, in_channels: int, out_channels: int, norm_groups: int = 32) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = _group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = _group_norm(out_channels, norm_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        # the official name for the 1x1 projection of the residual path (only when the width changes)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h + skip


def depth_to_space(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Depth-to-space in DCR order: ``(B, C * s * s, H, W) -> (B, C, H * s, W * s)``.

    Channel ``(i * s + j) * C + c`` goes to output channel ``c`` at offset ``(i, j)`` inside each ``s x s``
    block. This is the order the official Upsampler uses; ``F.pixel_shuffle`` uses the other (CRD) order
    and would scramble official weights.
    """
    b, c, h, w = x.shape
    s2 = block_size * block_size
    if c % s2 != 0:
        raise ValueError(f"depth_to_space needs channels divisible by {s2}, got {c}")
    x = x.reshape(b, block_size, block_size, c // s2, h, w)
    x = x.permute(0, 3, 4, 1, 5, 2)  # (B, C, H, s_i, W, s_j)
    return x.reshape(b, c // s2, h * block_size, w * block_size)


class Upsampler(nn.Module):
    """x2 up-sampling: 3x3 conv to 4x channels then DCR depth-to-space. ``(B, C, H, W) -> (B, C, 2H, 2W)``."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels * 4, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depth_to_space(self.conv1(x), 2)


def _check_arch(ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, norm_groups: int) -> tuple:
    for name, value in (("ch", ch), ("num_res_blocks", num_res_blocks), ("z_channels", z_channels), ("norm_groups", norm_groups)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(ch_mult, (str, bytes)) or not isinstance(ch_mult, Sequence) or len(ch_mult) == 0:
        raise ValueError(f"ch_mult must be a non-empty list of positive integers, got {ch_mult!r}")
    mult = tuple(ch_mult)
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in mult):
        raise ValueError(f"ch_mult must be a non-empty list of positive integers, got {ch_mult!r}")
    return mult


class Encoder(nn.Module):
    """``(B, in_channels, H, W) -> (B, z_channels, H / f, W / f)``, ``f = 2 ** (len(ch_mult) - 1)``."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 128,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        mult = _check_arch(ch, ch_mult, num_res_blocks, z_channels, norm_groups)
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
        self.in_channels = in_channels
        self.num_levels = len(mult)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1, bias=False)
        self.down = nn.ModuleList()
        width = ch
        for level, m in enumerate(mult):
            stage = nn.Module()
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(in_channels=width, out_channels=ch * m, norm_groups=norm_groups))
                width = ch * m
            stage.block = blocks
            if level < self.num_levels - 1:
                stage.downsample = nn.Conv2d(width, width, kernel_size=3, stride=2, padding=1)
            self.down.append(stage)
        self.mid_block = nn.ModuleList(
            ResBlock(in_channels=width, out_channels=width, norm_groups=norm_groups) for _ in range(num_res_blocks)
        )
        self.norm_out = _group_norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, z_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            for block in stage.block:
                h = block(h)
            if level < self.num_levels - 1:
                h = stage.downsample(h)
        for block in self.mid_block:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """``(B, z_channels, h, w) -> (B, out_channels, h * f, w * f)``; the output is not clamped."""

    def __init__(
        self,
        *,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 128,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        mult = _check_arch(ch, ch_mult, num_res_blocks, z_channels, norm_groups)
        if not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels must be a positive integer, got {out_channels!r}")
        self.num_levels = len(mult)
        width = ch * mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, kernel_size=3, padding=1, bias=True)
        self.mid_block = nn.ModuleList(
            ResBlock(in_channels=width, out_channels=width, norm_groups=norm_groups) for _ in range(num_res_blocks)
        )
        stages: list[nn.Module] = []
        for level in reversed(range(self.num_levels)):
            stage = nn.Module()
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(in_channels=width, out_channels=ch * mult[level], norm_groups=norm_groups))
                width = ch * mult[level]
            stage.block = blocks
            if level > 0:
                stage.upsample = Upsampler(channels=width)
            stages.insert(0, stage)
        # indexed by level so that official keys up.{level}.* line up
        self.up = nn.ModuleList(stages)
        self.norm_out = _group_norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid_block:
            h = block(h)
        for level in reversed(range(self.num_levels)):
            stage = self.up[level]
            for block in stage.block:
                h = block(h)
            if level > 0:
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class ImageTokenizer(nn.Module):
    """Encoder -> quantizer -> decoder for images ``(B, C, H, W)`` in ``[-1, 1]``.

    Args:
        in_channels, out_channels: image channels (``out_channels`` defaults to ``in_channels``).
        ch, ch_mult, num_res_blocks, z_channels: widths as in the official model (see module docstring).
        norm_groups: GroupNorm groups (official 32).
        quantizer: a :class:`~simvq.quantizers.base.Quantizer` with ``dim == z_channels`` and
            ``channel_first=True``.

    Attributes ``encoder``, ``quantize``, ``decoder`` carry the official names, so official state-dict keys
    ``encoder.*``, ``quantize.*``, ``decoder.*`` load directly.
    """

    def __init__(
        self,
        *,
        quantizer: Quantizer,
        in_channels: int = 3,
        out_channels: int | None = None,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 128,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        if not isinstance(quantizer, Quantizer):
            raise TypeError(
                f"quantizer must be a simvq Quantizer (e.g. simvq.quantizers.build_quantizer('simvq', ...)), "
                f"got {type(quantizer).__name__}"
            )
        if quantizer.dim != z_channels:
            raise ValueError(
                f"quantizer.dim ({quantizer.dim}) must equal z_channels ({z_channels}); build the quantizer "
                f"with dim={z_channels}"
            )
        if not quantizer.channel_first:
            raise ValueError("the image tokenizer feeds (B, z_channels, h, w) features: build the quantizer with channel_first=True")
        out_channels = in_channels if out_channels is None else out_channels
        arch = dict(ch=ch, ch_mult=tuple(ch_mult) if isinstance(ch_mult, Sequence) else ch_mult,
                    num_res_blocks=num_res_blocks, z_channels=z_channels, norm_groups=norm_groups)
        self.encoder = Encoder(in_channels=in_channels, **arch)
        self.quantize = quantizer
        self.decoder = Decoder(out_channels=out_channels, **arch)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.z_channels = z_channels
        self.downsample_factor = 2 ** (len(arch["ch_mult"]) - 1)

    # ----- helpers ------------------------------------------------------------------------------------
    def _check_images(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"images must be floating point in [-1, 1], got dtype {x.dtype}; use x.float() / 127.5 - 1")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"images must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
                + ("; channels-last input? use x.permute(0, 3, 1, 2)" if x.dim() == 4 and x.shape[-1] == self.in_channels else "")
            )
        f = self.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"image height and width must be multiples of {f} (the down-sampling factor), got "
                f"{x.shape[2]}x{x.shape[3]}; crop or pad the images"
            )

    def token_shape(self, height: int, width: int) -> tuple[int, int]:
        """Token grid ``(h, w)`` for an image of ``height x width`` pixels."""
        return height // self.downsample_factor, width // self.downsample_factor

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's last weight (used by adaptive GAN weighting schemes)."""
        return self.decoder.conv_out.weight

    # ----- public API -----------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> QuantizerOutput:
        """Quantize images ``(B, C, H, W)``: ``indices`` are ``(B, H/f, W/f)``."""
        self._check_images(x)
        return self.quantize(self.encoder(x))

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        """Decoder on quantized features ``(B, z_channels, h, w)``; output is not clamped."""
        return self.decoder(quantized)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Images ``(B, out_channels, h * f, w * f)`` from code indices ``(B, h, w)`` (not clamped)."""
        if isinstance(indices, torch.Tensor) and indices.dim() < 3:
            raise ValueError(f"indices must have shape (B, h, w), got {tuple(indices.shape)}")
        return self.decoder(self.quantize.decode_indices(indices))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """``x`` ``(B, C, H, W)`` -> ``(x_hat, QuantizerOutput)``; ``x_hat`` is raw (unclamped), as the
        training losses use it."""
        out = self.encode(x)
        return self.decoder(out.quantized), out

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation reconstruction: ``forward`` clamped to ``[-1, 1]`` (the official evaluation clamps)."""
        x_hat, _ = self(x)
        return x_hat.clamp(-1.0, 1.0)


def resolve_model_config(model_cfg: dict) -> dict:
    """Expand ``model_cfg`` (optionally naming a ``preset``) into the full keyword set of the tokenizer.

    Keys given next to ``preset`` override the preset's values. Unknown keys raise a ``ValueError`` that lists
    the valid keys.
    """
    if not isinstance(model_cfg, dict):
        raise TypeError(f"model config must be a dict, got {type(model_cfg).__name__}")
    cfg = dict(model_cfg)
    cfg.pop("modality", None)
    preset = cfg.pop("preset", None)
    unknown = sorted(set(cfg) - set(MODEL_KEYS))
    if unknown:
        raise ValueError(f"unknown image model key(s) {unknown}; valid keys: {['preset', *MODEL_KEYS]}")
    if preset is not None:
        if preset not in IMAGE_PRESETS:
            raise ValueError(f"unknown image model preset {preset!r}; choose one of {sorted(IMAGE_PRESETS)}")
        cfg = {**copy.deepcopy(IMAGE_PRESETS[preset]), **cfg}
    full = {"in_channels": 3, "out_channels": None, "ch": 128, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 2,
            "z_channels": 128, "norm_groups": 32}
    full.update(cfg)
    if full["out_channels"] is None:
        full["out_channels"] = full["in_channels"]
    full["ch_mult"] = list(full["ch_mult"]) if isinstance(full["ch_mult"], (list, tuple)) else full["ch_mult"]
    return full


def build_image_tokenizer(model_cfg: dict, quantizer_cfg: dict) -> ImageTokenizer:
    """Build an :class:`ImageTokenizer` from the ``model`` and ``quantizer`` config sections.

    ``quantizer_cfg`` is ``{"name": ..., **keyword arguments}``; its ``dim`` is filled with ``z_channels``
    (a different explicit ``dim`` is an error).
    """
    model = resolve_model_config(model_cfg)
    if not isinstance(quantizer_cfg, dict) or "name" not in quantizer_cfg:
        raise ValueError(f"quantizer config must be a dict with a 'name' key (e.g. name: simvq), got {quantizer_cfg!r}")
    qcfg = dict(quantizer_cfg)
    name = qcfg.pop("name")
    dim = qcfg.pop("dim", None)
    if dim is not None and dim != model["z_channels"]:
        raise ValueError(
            f"quantizer.dim={dim} differs from model.z_channels={model['z_channels']}; drop quantizer.dim "
            "(it is filled from the model) or make them equal"
        )
    quantizer = build_quantizer(name, dim=model["z_channels"], **qcfg)
    return ImageTokenizer(quantizer=quantizer, **model)
