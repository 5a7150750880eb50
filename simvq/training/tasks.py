"""What a modality contributes to training: model, losses, discriminator, data, metrics, samples.

The LightningModule (:mod:`simvq.training.module`), :func:`simvq.training.train`, checkpointing, EMA, usage
logging and the CLI are shared by every modality. A modality subclasses :class:`Task` and registers it with
:func:`register_task`; ``config["modality"]`` selects it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn


class Task:
    """The modality-specific pieces of tokenizer training.

    Subclasses implement the methods below. ``step`` arguments are the number of completed training steps
    (generator updates) before the current batch.
    """

    modality: str = ""

    def __init__(self, config: dict) -> None:
        self.config = config

    # ----- building --------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The tokenizer (``encoder``, ``quantize``, ``decoder``; ``forward(x) -> (x_hat, QuantizerOutput)``)."""
        from simvq.models import build_tokenizer

        return build_tokenizer(self.config)

    def build_discriminator(self) -> nn.Module | None:
        """All discriminators as one module (None: train without a GAN)."""
        return None

    def build_loss_modules(self) -> nn.Module | None:
        """Modules the losses need (e.g. a perceptual network); not trained, not exported."""
        return None

    def build_datasets(self):
        """``(train, eval)`` data sets; training items ``(index, seed)``, see :mod:`simvq.data`."""
        from simvq.data import build_datasets

        return build_datasets(self.config)

    # ----- losses ----------------------------------------------------------------------------------
    def model_input(self, batch) -> torch.Tensor:
        """The tensor fed to the tokenizer from one loader batch."""
        return batch

    def gan_active(self, step: int) -> bool:
        return False

    def generator_loss(self, *, x, x_hat, quant, discriminator, loss_modules, step: int):
        """``(loss, logs)``: the scalar to minimise for the tokenizer and a dict of detached scalars."""
        raise NotImplementedError

    def discriminator_loss(self, *, x, x_hat, discriminator, step: int):
        """``(loss, logs)`` for the discriminator; ``x_hat`` is already detached."""
        raise NotImplementedError

    # ----- evaluation and samples ------------------------------------------------------------------
    def reconstruct(self, model: nn.Module, x: torch.Tensor):
        """Evaluation reconstruction ``(x_hat, QuantizerOutput)`` (clamped to the valid range)."""
        x_hat, quant = model(x)
        return x_hat.clamp(-1.0, 1.0), quant

    def save_samples(self, x: torch.Tensor, x_hat: torch.Tensor, path: Path) -> Path:
        """Write a small comparison of originals and reconstructions; returns the file written."""
        raise NotImplementedError

    def build_metrics(self, device):
        """An object with ``update(x, x_hat)`` and ``compute() -> dict`` for :func:`simvq.evaluation.evaluate`."""
        raise NotImplementedError


class ImageTask(Task):
    """Images: L1 (+ L2) + perceptual + non-saturating GAN (fixed weight) + quantizer loss; PatchGAN, hinge."""

    modality = "image"

    def build_discriminator(self) -> nn.Module | None:
        loss = self.config["loss"]
        if loss["gan_weight"] <= 0:
            return None
        from simvq.models.discriminators import NLayerDiscriminator

        return NLayerDiscriminator(
            in_channels=self.config["model"]["out_channels"], ndf=loss["disc_channels"], n_layers=loss["disc_layers"]
        )

    def build_loss_modules(self) -> nn.Module | None:
        loss = self.config["loss"]
        if loss["perceptual_weight"] <= 0:
            return None
        from simvq.losses.perceptual import PerceptualLoss

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
            from simvq.losses.adversarial import generator_loss

            gan = generator_loss(w["gen_gan_loss"], discriminator(x_hat))
            total = total + w["gan_weight"] * gan
            logs["gan_g"] = gan
        total = total + w["quantizer_weight"] * quant.loss.float()
        logs.update(quant_loss=quant.loss, commitment=quant.commitment_loss, codebook=quant.codebook_loss)
        if quant.aux_loss is not None:
            logs["aux"] = quant.aux_loss
        logs["loss"] = total
        return total, {k: v.detach().float() for k, v in logs.items()}

    def discriminator_loss(self, *, x, x_hat, discriminator, step: int):
        from simvq.losses.adversarial import discriminator_loss

        logits_real = discriminator(x)
        logits_fake = discriminator(x_hat)
        loss = discriminator_loss(self.config["loss"]["disc_loss"], logits_real, logits_fake)
        logs = {
            "disc_loss": loss.detach().float(),
            "logits_real": logits_real.detach().float().mean(),
            "logits_fake": logits_fake.detach().float().mean(),
        }
        return loss, logs

    def build_metrics(self, device):
        from simvq.metrics.image import ImageMetrics

        return ImageMetrics(device=device)

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


TASKS: dict[str, Callable[[dict], Task]] = {"image": ImageTask}


def register_task(modality: str, factory: Callable[[dict], Task]) -> None:
    """Make ``config["modality"] == modality`` train with ``factory(config)``."""
    TASKS[modality] = factory


def get_task(config: dict) -> Task:
    modality = config.get("modality", "image")
    if modality not in TASKS:
        if modality == "audio":
            import simvq.training.audio  # noqa: F401  (the audio task's module registers itself)
        if modality not in TASKS:
            raise ValueError(f"no training task for modality {modality!r}; registered: {sorted(TASKS)}")
    return TASKS[modality](config)


__all__ = ["ImageTask", "TASKS", "Task", "get_task", "register_task", "save_image_grid"]
