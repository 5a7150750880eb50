"""Losses shared by the modalities: the adversarial (GAN) objectives."""

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

__all__ = [
    "D_LOSSES",
    "G_LOSSES",
    "discriminator_loss",
    "generator_loss",
    "hinge_d_loss",
    "hinge_g_loss",
    "non_saturating_d_loss",
    "non_saturating_g_loss",
    "vanilla_d_loss",
    "vanilla_g_loss",
]
