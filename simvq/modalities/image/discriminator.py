"""Image discriminator: the pix2pix PatchGAN (``NLayerDiscriminator``) the official image recipe trains.

Audio discriminators live in a separate module.
"""

from __future__ import annotations

import torch
from torch import nn


def init_discriminator_weights(module: nn.Module) -> None:
    """pix2pix initialisation: conv weights ``N(0, 0.02)``; BatchNorm weights ``N(1, 0.02)``, biases 0.

    Conv biases keep PyTorch's default initialisation, as in the official code.
    """
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: ``(B, in_channels, H, W) -> (B, 1, h, w)`` real/fake logits per overlapping patch.

    ``n_layers`` stride-2 4x4 convs (the first without normalisation), one stride-1 4x4 conv, then a
    stride-1 4x4 conv to one channel. Widths ``ndf * min(2**n, 8)``. Convs followed by BatchNorm carry no
    bias (BatchNorm has its own shift). For 128x128 inputs and the defaults the output is ``(B, 1, 14, 14)``
    (a 70x70 receptive field). Layer indices inside ``main`` match the official checkpoint keys
    (``loss.discriminator.main.{i}.*``).

    Args:
        in_channels: image channels (3 for RGB).
        ndf: width of the first layer (64).
        n_layers: number of stride-2 convs (3).
        norm: ``"batch"`` (official) or ``"none"`` (convs then get a bias).
    """

    def __init__(self, *, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("ndf", ndf), ("n_layers", n_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if norm not in ("batch", "none"):
            raise ValueError(f"norm must be 'batch' or 'none', got {norm!r}")
        use_bn = norm == "batch"

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=4, stride=stride, padding=1, bias=not use_bn)]
            if use_bn:
                layers.append(nn.BatchNorm2d(c_out))
            # the official code builds LeakyReLU(0.2, inplace=True); out-of-place here so that hooks and
            # feature taps are never overwritten
            layers.append(nn.LeakyReLU(0.2))
            return layers

        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += block(ndf * prev, ndf * mult, stride=2)
        prev, mult = mult, min(2**n_layers, 8)
        layers += block(ndf * prev, ndf * mult, stride=1)
        layers.append(nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.apply(init_discriminator_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"discriminator expects (B, {self.in_channels}, H, W) images, got {tuple(x.shape)}")
        return self.main(x)


__all__ = ["NLayerDiscriminator", "init_discriminator_weights"]
