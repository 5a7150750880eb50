"""Training losses: perceptual (LPIPS or its labelled offline fallback) and adversarial."""

from simvq.losses.adversarial import (
    D_LOSSES,
    G_LOSSES,
    discriminator_loss,
    generator_loss,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
    vanilla_d_loss,
    vanilla_g_loss,
)
from simvq.losses.perceptual import LPIPS, PerceptualLoss, multiscale_ssim_loss, ssim_torch

__all__ = [
    "D_LOSSES",
    "G_LOSSES",
    "LPIPS",
    "PerceptualLoss",
    "discriminator_loss",
    "generator_loss",
    "hinge_d_loss",
    "hinge_g_loss",
    "multiscale_ssim_loss",
    "non_saturating_d_loss",
    "non_saturating_g_loss",
    "ssim_torch",
    "vanilla_d_loss",
    "vanilla_g_loss",
]
