"""GAN losses on discriminator logits (any shape, e.g. PatchGAN ``(B, 1, h, w)``).

The official image recipe: discriminator trained with the hinge loss, generator with the non-saturating
loss at a fixed weight (0.1) from step 0 (no adaptive weight, no warm-up). The official non-saturating
generator loss first averages each image's patch logits and then applies ``softplus(-mean)``; that order is
kept here (``generator_loss("non_saturating")``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_image_mean(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() == 0:
        raise ValueError("logits need a batch dimension, got a scalar")
    return logits.float().reshape(logits.shape[0], -1).mean(dim=1)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on every logit: ``0.5 * (mean(softplus(-real)) + mean(softplus(fake)))``."""
    return 0.5 * (F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean())


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on per-image mean logits: ``mean(softplus(-mean_real)) + mean(softplus(mean_fake))``."""
    return F.softplus(-_per_image_mean(logits_real)).mean() + F.softplus(_per_image_mean(logits_fake)).mean()


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """``mean_b softplus(-mean_patches(logits_fake[b]))``: the official generator loss (-log sigmoid)."""
    return F.softplus(-_per_image_mean(logits_fake)).mean()


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """``-mean(logits_fake)`` (the generator side of the hinge GAN)."""
    return -logits_fake.float().mean()


def vanilla_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating cross-entropy on every logit: ``mean(softplus(-fake))``."""
    return F.softplus(-logits_fake.float()).mean()


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss, "non_saturating": non_saturating_d_loss}
G_LOSSES = {"non_saturating": non_saturating_g_loss, "hinge": hinge_g_loss, "vanilla": vanilla_g_loss}


def discriminator_loss(kind: str, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator loss by name (``"hinge"`` official, ``"vanilla"``, ``"non_saturating"``)."""
    if kind not in D_LOSSES:
        raise ValueError(f"unknown discriminator loss {kind!r}; choose one of {sorted(D_LOSSES)}")
    return D_LOSSES[kind](logits_real, logits_fake)


def generator_loss(kind: str, logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss by name (``"non_saturating"`` official, ``"hinge"``, ``"vanilla"``)."""
    if kind not in G_LOSSES:
        raise ValueError(f"unknown generator loss {kind!r}; choose one of {sorted(G_LOSSES)}")
    return G_LOSSES[kind](logits_fake)


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
