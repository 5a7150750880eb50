"""Image tokenizer training: L1 (+ L2) + perceptual + non-saturating GAN (fixed weight) + quantizer loss;
PatchGAN discriminator with the hinge loss (REFERENCE §2)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from simvq.losses import adversarial
from simvq.modalities.base import Task
from simvq.modalities.image.discriminator import NLayerDiscriminator
from simvq.modalities.image.perceptual import PerceptualLoss


class ImageTask(Task):
    """Images: L1 (+ L2) + perceptual + non-saturating GAN (fixed weight) + quantizer loss; PatchGAN, hinge."""

    def build_discriminator(self) -> nn.Module | None:
        loss = self.config["loss"]
        if loss["gan_weight"] <= 0:
            return None
        return NLayerDiscriminator(
            in_channels=self.config["model"]["out_channels"], ndf=loss["disc_channels"], n_layers=loss["disc_layers"]
        )

    def build_loss_modules(self) -> nn.Module | None:
        loss = self.config["loss"]
        if loss["perceptual_weight"] <= 0:
            return None
        module = PerceptualLoss(
            net=loss["perceptual_net"], backbone_weights=loss["perceptual_weights"], fallback=loss["perceptual_fallback"]
        )
        module.requires_grad_(False)
        return module.eval()

    def gan_active(self, step: int) -> bool:
        loss = self.config["loss"]
        return loss["gan_weight"] > 0 and step >= loss["gan_start_step"]

    def generator_loss(self, *, x, x_hat, quant, discriminator, loss_modules, step: int):
        w = self.config["loss"]
        x_hat32, x32 = x_hat.float(), x.float()
        l1 = (x_hat32 - x32).abs().mean()
        total = w["l1_weight"] * l1
        logs = {"l1": l1}
        if w["l2_weight"] > 0:
            l2 = (x_hat32 - x32).pow(2).mean()
            total = total + w["l2_weight"] * l2
            logs["l2"] = l2
        if loss_modules is not None and w["perceptual_weight"] > 0:
            a, b = x, x_hat
            if getattr(loss_modules, "lpips", None) is not None and a.shape[1] == 1:
                a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)  # LPIPS nets read RGB
            perceptual = loss_modules(a, b).float()
            total = total + w["perceptual_weight"] * perceptual
            logs["perceptual"] = perceptual
        if discriminator is not None and self.gan_active(step):
            gan = adversarial.generator_loss(w["gen_gan_loss"], discriminator(x_hat))
            total = total + w["gan_weight"] * gan
            logs["gan_g"] = gan
        total = total + w["quantizer_weight"] * quant.loss.float()
        logs.update(quant_loss=quant.loss, commitment=quant.commitment_loss, codebook=quant.codebook_loss)
        if quant.aux_loss is not None:
            logs["aux"] = quant.aux_loss
        logs["loss"] = total
        return total, {k: v.detach().float() for k, v in logs.items()}

    def discriminator_loss(self, *, x, x_hat, discriminator, step: int):
        logits_real = discriminator(x)
        logits_fake = discriminator(x_hat)
        loss = adversarial.discriminator_loss(self.config["loss"]["disc_loss"], logits_real, logits_fake)
        logs = {
            "disc_loss": loss.detach().float(),
            "logits_real": logits_real.detach().float().mean(),
            "logits_fake": logits_fake.detach().float().mean(),
        }
        return loss, logs

    def save_samples(self, x: torch.Tensor, x_hat: torch.Tensor, path: Path) -> Path:
        path = Path(path).with_suffix(".png")
        save_image_grid([x, x_hat], path)
        return path


def save_image_grid(rows: list[torch.Tensor], path: str | Path, *, pad: int = 2) -> None:
    """Write rows of images ``(N, C, H, W)`` in ``[-1, 1]`` as one PNG (row ``i`` = ``rows[i]``)."""
    from PIL import Image

    rows = [r.detach().float().clamp(-1, 1).cpu() for r in rows]
    n, c, h, w = rows[0].shape
    grid = torch.ones(c, len(rows) * (h + pad) + pad, n * (w + pad) + pad)
    for i, r in enumerate(rows):
        for j in range(n):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, top : top + h, left : left + w] = r[j]
    arr = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[:, :, 0] if c == 1 else arr).save(path)


__all__ = ["ImageTask", "save_image_grid"]
