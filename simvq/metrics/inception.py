"""Feature extractors for Fréchet distances, written without torchvision.

:class:`FIDInceptionV3` is the InceptionV3 variant of pytorch-fid (the TensorFlow FID graph ported to
PyTorch): images in ``[0, 1]`` are resized to 299x299 (bilinear, ``align_corners=False``), scaled to
``[-1, 1]`` and mapped to the 2048-d pool3 features. It differs from torchvision's Inception in its
pooling: the average pools inside Mixed_5b-d, Mixed_6b-e and Mixed_7b exclude the zero padding, and Mixed_7c
max-pools in its pooling branch. Its weights (``pt_inception-2015-12-05-6726825d.pth``, pytorch-fid's
release) are not shipped by any package; pass a local copy as ``weights=`` or via
``SIMVQ_FID_INCEPTION_WEIGHTS``. Module names equal the weight file's keys (``Mixed_6e.branch7x7dbl_5.conv.weight``),
so it loads key for key (the classifier ``fc.*`` is not needed and ignored).

:class:`RandomConvFeatures` is the OFFLINE PROXY used when those weights are absent: a fixed, seeded
random-weight CNN. Fréchet distances in its 256-d feature space move with the same kinds of distribution
shift as rFID but are on another scale; they are reported as ``proxy_fid_random_conv`` and must never be
compared with published rFID values.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FID_WEIGHTS_ENV = "SIMVQ_FID_INCEPTION_WEIGHTS"
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_no_pad(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool ignores padded zeros: count_include_pad=False
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 / 5x5 / double 3x3 / pool branches -> ``224 + pool_features`` channels."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([a, b, c, d], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): ``384 + 96 + c_in`` channels."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions -> 768 channels."""

    def __init__(self, c_in: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)
        d = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([a, b, c, d], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): ``320 + 192 + c_in`` channels."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([a, b, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionE(nn.Module):
    """8x8 block with expanded filter banks -> 2048 channels.

    ``max_pool=False``: Mixed_7b (average pool without padding); ``True``: Mixed_7c of the FID graph,
    which max-pools in its pooling branch.
    """

    def __init__(self, c_in: int, *, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], dim=1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], dim=1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_no_pad(x)
        return torch.cat([a, b, c, self.branch_pool(pooled)], dim=1)


def resolve_fid_weights(weights: str | os.PathLike | None) -> Path | None:
    """The Inception weights file from the argument, else ``SIMVQ_FID_INCEPTION_WEIGHTS``; None when neither.

    A path that is given but missing is an error, so that a typo cannot silently switch to the proxy.
    """
    from simvq.io import local_weights_file

    return local_weights_file(weights, FID_WEIGHTS_ENV, "FID Inception weights")


class FIDInceptionV3(nn.Module):
    """pytorch-fid's InceptionV3: ``(B, 3, H, W)`` images in ``[0, 1]`` -> ``(B, 2048)`` pool3 features.

    Grey images (``C == 1``) are repeated to three channels. ``num_features`` tells torchmetrics the width.

    Args:
        weights: local ``pt_inception-2015-12-05-6726825d.pth``; default from ``SIMVQ_FID_INCEPTION_WEIGHTS``.
        random_init: skip loading (random weights; for tests only, the features are then meaningless).
        resize_input: bilinear resize to 299x299 first (pytorch-fid's default, used by the official evaluation).
    """

    num_features = 2048

    def __init__(self, *, weights: str | os.PathLike | None = None, random_init: bool = False, resize_input: bool = True) -> None:
        super().__init__()
        self.resize_input = resize_input
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        if random_init:
            self.weights_source = "random"
        else:
            path = resolve_fid_weights(weights)
            if path is None:
                raise FileNotFoundError(
                    f"rFID needs pytorch-fid's Inception weights ({FID_WEIGHTS_NAME}), which no package ships and "
                    "which cannot be downloaded here: fetch the file from the pytorch-fid GitHub release on a "
                    f"machine with internet access, then pass weights= or set {FID_WEIGHTS_ENV}"
                )
            self.load_weights(path)
            self.weights_source = str(path)
        self.requires_grad_(False)
        self.eval()

    def load_weights(self, path: str | os.PathLike) -> None:
        try:
            state = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"could not read Inception weights {path} with torch.load(weights_only=True): {err}") from err
        if not isinstance(state, dict):
            raise ValueError(f"{path} does not hold a state dict")
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own and not k.startswith(("fc.", "AuxLogits."))]
        if missing or unexpected:
            raise ValueError(
                f"{path} is not pytorch-fid's {FID_WEIGHTS_NAME}: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
        for key, ref in own.items():
            if tuple(state[key].shape) != tuple(ref.shape):
                raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}")
        self.load_state_dict({k: state[k] for k in own})

    def train(self, mode: bool = True):
        return super().train(False)  # BatchNorm must keep its running statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"FIDInceptionV3 expects (B, 3, H, W) images in [0, 1], got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = x.to(self.Conv2d_1a_3x3.conv.weight.dtype)
        if self.resize_input:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))


class RandomConvFeatures(nn.Module):
    """OFFLINE PROXY feature extractor: a fixed random-weight CNN, ``(B, C, H, W)`` in ``[0, 1]`` -> ``(B, 256)``.

    Images are resized to 64x64 and repeated to 3 channels when grey; four stride-2 3x3 conv + ReLU layers
    (widths 32, 64, 128, 256; about 15 M multiply-adds per image) with He-normal weights drawn from ``torch.Generator`` seeded with
    ``seed``; features are the global average of the last map. Deterministic for a given seed, so proxy
    values are comparable between runs of this library, never with rFID.
    """

    num_features = 256

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        widths = (3, 32, 64, 128, 256)
        strides = (2, 2, 2, 2)
        self.convs = nn.ModuleList()
        for c_in, c_out, s in zip(widths[:-1], widths[1:], strides):
            conv = nn.Conv2d(c_in, c_out, kernel_size=3, stride=s, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (c_in * 9)) ** 0.5)
                conv.bias.zero_()
            self.convs.append(conv)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"RandomConvFeatures expects (B, 3, H, W) images in [0, 1], got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x.float(), size=(64, 64), mode="bilinear", align_corners=False) * 2 - 1
        for conv in self.convs:
            x = F.relu(conv(x))
        return x.mean(dim=(2, 3))


__all__ = ["FIDInceptionV3", "FID_WEIGHTS_ENV", "FID_WEIGHTS_NAME", "RandomConvFeatures", "resolve_fid_weights"]
