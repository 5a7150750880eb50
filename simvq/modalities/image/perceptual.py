"""Perceptual distances: LPIPS (VGG16 / AlexNet) written without torchvision, and an offline fallback loss.

LPIPS (Zhang et al. 2018, v0.1), as the ``lpips`` package computes it:
    1. inputs in ``[-1, 1]`` are scaled per channel: ``(x - shift) / scale`` with
       shift ``(-0.030, -0.088, -0.188)`` and scale ``(0.458, 0.448, 0.450)``;
    2. five feature taps of the backbone (VGG16: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3;
       AlexNet: relu1..relu5);
    3. each tap is unit-normalised over channels: ``f / (sqrt(sum_c f^2) + 1e-10)``;
    4. the squared difference is weighted per channel by the calibrated linear heads (non-negative
       1x1 convs, ``lin{k}.model.1.weight`` in the ``lpips`` wheel's ``weights/v0.1/{vgg,alex}.pth``),
       averaged over space and summed over the five taps.

Weights: the small linear heads ship inside the ``lpips`` wheel (the package itself is never imported: it
needs torchvision). The backbone weights do not ship with any package; pass a local file holding
torchvision's ``vgg16`` / ``alexnet`` state dict (keys ``features.N.weight`` / ``features.N.bias``; the
``classifier.*`` keys are ignored) as ``backbone_weights=`` or through the environment variables
``SIMVQ_LPIPS_VGG_WEIGHTS`` / ``SIMVQ_LPIPS_ALEX_WEIGHTS``.

Offline fallback for training (:class:`PerceptualLoss` when the VGG weights are absent): a multi-scale
structural loss, ``mean over scales of (1 - SSIM)`` with an 11x11 Gaussian window (sigma 1.5) on the image
and its 2x / 4x average-pooled versions (as many as fit the window, at most 3). SSIM compares local means,
contrasts and correlations, so, like LPIPS, it penalises blur and lost texture that L1 alone tolerates;
it needs no learned weights. It is NOT LPIPS: its values are not comparable with LPIPS figures, and
:attr:`PerceptualLoss.name` says which one is in use.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
BACKBONE_ENV = {"vgg": "SIMVQ_LPIPS_VGG_WEIGHTS", "alex": "SIMVQ_LPIPS_ALEX_WEIGHTS"}
NETS = ("vgg", "alex")

# torchvision's ``features`` Sequential, layer by layer: ("conv", in, out, kernel, stride, padding),
# ("relu",), ("pool", kernel, stride). Indices in these lists are the state-dict indices.
_VGG16_LAYERS: list[tuple] = []
for _c_in, _c_out, _n in ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)):
    for _i in range(_n):
        _VGG16_LAYERS += [("conv", _c_in if _i == 0 else _c_out, _c_out, 3, 1, 1), ("relu",)]
    _VGG16_LAYERS.append(("pool", 2, 2))
_VGG16_LAYERS.pop()  # LPIPS stops at relu5_3: the last max-pool is never used
_ALEX_LAYERS: list[tuple] = [
    ("conv", 3, 64, 11, 4, 2), ("relu",), ("pool", 3, 2),
    ("conv", 64, 192, 5, 1, 2), ("relu",), ("pool", 3, 2),
    ("conv", 192, 384, 3, 1, 1), ("relu",),
    ("conv", 384, 256, 3, 1, 1), ("relu",),
    ("conv", 256, 256, 3, 1, 1), ("relu",),
]  # fmt: skip
# indices of the ReLUs whose outputs LPIPS compares
_TAPS = {"vgg": (3, 8, 15, 22, 29), "alex": (1, 4, 7, 9, 11)}
_LAYERS = {"vgg": _VGG16_LAYERS, "alex": _ALEX_LAYERS}
TAP_CHANNELS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}


class BackboneFeatures(nn.Module):
    """The LPIPS backbone (VGG16 up to relu5_3, or AlexNet's conv part): ``(B, 3, H, W) -> 5 feature maps``.

    ``features.N`` matches torchvision's indices, so torchvision state dicts load key for key.
    """

    def __init__(self, *, net: str = "vgg") -> None:
        super().__init__()
        if net not in NETS:
            raise ValueError(f"net must be one of {NETS}, got {net!r}")
        layers: list[nn.Module] = []
        for spec in _LAYERS[net]:
            if spec[0] == "conv":
                _, c_in, c_out, k, s, p = spec
                layers.append(nn.Conv2d(c_in, c_out, kernel_size=k, stride=s, padding=p))
            elif spec[0] == "relu":
                layers.append(nn.ReLU())
            else:
                layers.append(nn.MaxPool2d(kernel_size=spec[1], stride=spec[2]))
        self.features = nn.Sequential(*layers)
        self.net = net
        self.taps = _TAPS[net]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                outs.append(x)
        return outs


def lpips_heads_file(net: str) -> Path:
    """Path of the calibrated linear heads inside the installed ``lpips`` wheel (never imported)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the LPIPS linear heads come from the 'lpips' wheel, which is not installed; install it without "
            "its dependencies: pip install --no-deps lpips"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / f"{net}.pth"
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS heads file {path} is missing; reinstall with pip install --no-deps lpips")
    return path


def _torch_load_tensors(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file or non-tensor pickle content
        raise ValueError(f"could not read weights from {path} with torch.load(weights_only=True): {err}") from err
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return obj


def resolve_backbone_weights(net: str, weights: str | os.PathLike | None) -> Path | None:
    """The backbone weights file from the argument, else from the environment variable; None when neither.

    A path that is given but does not exist is an error (a typo must not silently select the fallback).
    """
    if net not in NETS:
        raise ValueError(f"net must be one of {NETS}, got {net!r}")
    from simvq.io import local_weights_file

    return local_weights_file(weights, BACKBONE_ENV[net], f"LPIPS {net} backbone weights")


def load_backbone_weights(module: BackboneFeatures, path: str | os.PathLike) -> None:
    """Load torchvision ``vgg16`` / ``alexnet`` weights (``features.N.*`` keys) into ``module``."""
    state = _torch_load_tensors(Path(path))
    feats = {}
    for key, value in state.items():
        name = key[len("features."):] if key.startswith("features.") else key
        if name.split(".")[0].isdigit():
            feats[name] = value
    own = module.features.state_dict()
    missing = sorted(set(own) - set(feats), key=lambda k: int(k.split(".")[0]))
    if missing:
        raise ValueError(
            f"{path} lacks LPIPS {module.net} backbone keys {['features.' + k for k in missing[:4]]}"
            f"{' ...' if len(missing) > 4 else ''}; expected torchvision's {'vgg16' if module.net == 'vgg' else 'alexnet'} "
            "state dict (keys features.N.weight / features.N.bias)"
        )
    for key, ref in own.items():
        if tuple(feats[key].shape) != tuple(ref.shape):
            raise ValueError(
                f"{path}: features.{key} has shape {tuple(feats[key].shape)}, expected {tuple(ref.shape)} "
                f"for the {module.net} backbone"
            )
    module.features.load_state_dict({k: feats[k].float() for k in own})


def normalize_channels(feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalise ``(B, C, H, W)`` features over channels (LPIPS's ``eps`` outside the square root)."""
    return feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance. ``forward(x, y)`` with images ``(B, C, H, W)`` in ``[-1, 1]`` -> ``(B,)``.

    Grey images (``C == 1``) are repeated to three channels. All weights are frozen.

    Args:
        net: ``"vgg"`` or ``"alex"``.
        backbone_weights: local torchvision state-dict file; default from ``SIMVQ_LPIPS_{VGG,ALEX}_WEIGHTS``.
        heads_weights: file with the linear heads (default: the ``lpips`` wheel's v0.1 file).
        random_backbone: build the backbone with random weights drawn from ``seed`` instead of loading them
            (for tests; such values are NOT LPIPS). Without it, missing backbone weights are an error.
        seed: seed of the random backbone.
    """

    def __init__(
        self,
        *,
        net: str = "vgg",
        backbone_weights: str | os.PathLike | None = None,
        heads_weights: str | os.PathLike | None = None,
        random_backbone: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = BackboneFeatures(net=net)
        self.net = net
        if random_backbone:
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in self.backbone.parameters():
                    if p.dim() > 1:  # He-normal: features neither vanish nor explode through 13 layers
                        p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / p[0].numel()) ** 0.5)
                    else:
                        p.zero_()
            self.backbone_source = f"random(seed={seed})"
        else:
            path = resolve_backbone_weights(net, backbone_weights)
            if path is None:
                raise FileNotFoundError(
                    f"LPIPS-{net} needs the ImageNet {'VGG16' if net == 'vgg' else 'AlexNet'} backbone weights, which "
                    "no package ships and which cannot be downloaded here: save torchvision's "
                    f"{'vgg16' if net == 'vgg' else 'alexnet'}(weights='DEFAULT').state_dict() to a .pth file on a "
                    f"machine with internet access and pass it as backbone_weights= or set {BACKBONE_ENV[net]}"
                )
            load_backbone_weights(self.backbone, path)
            self.backbone_source = str(path)
        heads_path = Path(heads_weights) if heads_weights is not None else lpips_heads_file(net)
        heads = _torch_load_tensors(heads_path)
        for k, channels in enumerate(TAP_CHANNELS[net]):
            key = f"lin{k}.model.1.weight"
            if key not in heads or tuple(heads[key].shape) != (1, channels, 1, 1):
                raise ValueError(f"{heads_path} is not an LPIPS-{net} heads file: expected {key} of shape (1, {channels}, 1, 1)")
            self.register_buffer(f"head{k}", heads[key].float().reshape(1, channels, 1, 1).clone())
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @property
    def name(self) -> str:
        return f"lpips-{self.net}" if not self.backbone_source.startswith("random") else f"random-backbone-{self.net}"

    def train(self, mode: bool = True):
        # a frozen metric network: always in eval mode
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS expects two (B, 3, H, W) or (B, 1, H, W) images of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        dtype = self.shift.dtype
        fx = self.backbone((x.to(dtype) - self.shift) / self.scale)
        fy = self.backbone((y.to(dtype) - self.shift) / self.scale)
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for k, (a, b) in enumerate(zip(fx, fy)):
            # features may be bf16/fp16 under autocast; normalise and compare them in fp32
            diff = (normalize_channels(a.float()) - normalize_channels(b.float())).pow(2)
            total = total + (diff * getattr(self, f"head{k}")).sum(dim=1).mean(dim=(1, 2))
        return total


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    return g / g.sum()


def ssim_torch(
    x: torch.Tensor, y: torch.Tensor, *, data_range: float = 2.0, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Differentiable SSIM per image ``(B,)`` for ``(B, C, H, W)`` inputs (mean over channels and pixels).

    Gaussian-weighted local statistics over the ``valid`` region (no padding), population covariances,
    ``K1 = 0.01``, ``K2 = 0.03``. Equals ``skimage.metrics.structural_similarity(gaussian_weights=True,
    sigma=sigma, use_sample_covariance=False)`` for ``window = 2 * int(3.5 * sigma + 0.5) + 1``.
    """
    if x.shape[-1] < window or x.shape[-2] < window:
        raise ValueError(f"SSIM window {window} is larger than the image {tuple(x.shape[-2:])}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        # variances are differences of near-equal moments: in bf16/fp16 they cancel to noise
        return _ssim_fp32(x.float(), y.float(), data_range, window, sigma)


def _ssim_fp32(x: torch.Tensor, y: torch.Tensor, data_range: float, window: int, sigma: float) -> torch.Tensor:
    c = x.shape[1]
    g = _gaussian_window(window, sigma, x.device, x.dtype)
    kh = g.view(1, 1, window, 1).expand(c, 1, window, 1)
    kw = g.view(1, 1, 1, window).expand(c, 1, 1, window)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable depthwise Gaussian filter, valid region
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1)


def multiscale_ssim_loss(x: torch.Tensor, y: torch.Tensor, *, max_scales: int = 3, window: int = 11) -> torch.Tensor:
    """``mean over scales of (1 - SSIM)``: full resolution, then 2x average-pooled, while the window fits.

    Images in ``[-1, 1]`` (data range 2). Returns a scalar.
    """
    losses = []
    for _ in range(max_scales):
        if min(x.shape[-2:]) < window:
            break
        losses.append(1.0 - ssim_torch(x, y, data_range=2.0, window=window).mean())
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    if not losses:
        raise ValueError(f"images {tuple(x.shape[-2:])} are smaller than the SSIM window {window}")
    return torch.stack(losses).mean()


class PerceptualLoss(nn.Module):
    """The training perceptual term: LPIPS-VGG when its backbone weights are available, else a fallback.

    ``forward(x, x_hat)`` with images in ``[-1, 1]`` -> scalar (batch mean). :attr:`name` is ``"lpips-vgg"``
    or ``"fallback-multiscale-ssim"`` and must be logged with every result that used it.

    Args:
        net: LPIPS backbone (``"vgg"`` as the official recipe trains; ``"alex"`` possible).
        backbone_weights: local torchvision state dict; default from the environment variable.
        fallback: ``"multiscale-ssim"`` (see module docstring) or ``"error"`` to refuse training without LPIPS.
    """

    FALLBACKS = ("multiscale-ssim", "error")

    def __init__(self, *, net: str = "vgg", backbone_weights: str | os.PathLike | None = None, fallback: str = "multiscale-ssim") -> None:
        super().__init__()
        if fallback not in self.FALLBACKS:
            raise ValueError(f"fallback must be one of {self.FALLBACKS}, got {fallback!r}")
        path = resolve_backbone_weights(net, backbone_weights)
        if path is None and fallback == "error":
            # let LPIPS raise its explanation of where to get the weights
            LPIPS(net=net)
        if path is not None:
            self.lpips: LPIPS | None = LPIPS(net=net, backbone_weights=path)
            self.name = f"lpips-{net}"
        else:
            self.lpips = None
            self.name = "fallback-multiscale-ssim"
            log.warning(
                "perceptual loss: LPIPS-%s backbone weights not given (set %s); training with the OFFLINE FALLBACK "
                "'fallback-multiscale-ssim' = mean over scales of (1 - SSIM), which is not LPIPS",
                net,
                BACKBONE_ENV[net],
            )

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        if self.lpips is not None:
            return self.lpips(x, x_hat).mean()
        return multiscale_ssim_loss(x, x_hat)


__all__ = [
    "BACKBONE_ENV",
    "BackboneFeatures",
    "LPIPS",
    "LPIPS_SCALE",
    "LPIPS_SHIFT",
    "PerceptualLoss",
    "TAP_CHANNELS",
    "load_backbone_weights",
    "lpips_heads_file",
    "multiscale_ssim_loss",
    "normalize_channels",
    "resolve_backbone_weights",
    "ssim_torch",
]
