"""The audio modality's training task: SEANet/Vocos tokenizer, log-mel + VQ + MPD/MRD(/DAC) GAN losses, speech
sample figures (spectrograms and a few listenable wav pairs).

Loss (REFERENCE §3): ``45 * logmel_L1 + 1000 * VQ loss + (MPD + MRD hinge) + (MPD + MRD feature matching)``,
plus the DAC discriminator's least-squares and feature-matching terms when ``loss.dac_weight > 0``.
The official recipe's NaN/Inf failures are handled by the shared loop's warm-up and gradient clipping,
which the audio presets switch on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from simvq.modalities.audio.data import AudioEvalSet
from simvq.modalities.audio.discriminators import (
    AudioDiscriminator,
    audio_discriminator_loss,
    audio_generator_loss,
    uses_gan,
)
from simvq.modalities.audio.spectral import MelReconstructionLoss, MelSpectrogram, safe_log
from simvq.modalities.base import Task


class AudioTask(Task):
    """Audio tokenizer training (see the module docstring)."""

    def build_discriminator(self) -> nn.Module | None:
        loss = self.config["loss"]
        return AudioDiscriminator.from_loss_config(loss) if uses_gan(loss) else None

    def build_loss_modules(self) -> nn.Module | None:
        loss = self.config["loss"]
        return MelReconstructionLoss(
            sample_rate=self.config["model"]["sample_rate"], n_fft=loss["mel_n_fft"], hop_length=loss["mel_hop"], n_mels=loss["mel_n_mels"]
        )

    def gan_active(self, step: int) -> bool:
        loss = self.config["loss"]
        return uses_gan(loss) and step >= loss["gan_start_step"]

    def generator_loss(self, *, x, x_hat, quant, discriminator, loss_modules, step: int):
        return audio_generator_loss(
            x=x, x_hat=x_hat, quant=quant, mel_loss=loss_modules, discriminator=discriminator, loss=self.config["loss"],
            gan_active=self.gan_active(step),
        )

    def discriminator_loss(self, *, x, x_hat, discriminator, step: int):
        return audio_discriminator_loss(x=x, x_hat=x_hat, discriminator=discriminator, loss=self.config["loss"])

    def collate_samples(self, items: list[torch.Tensor]) -> torch.Tensor:
        """Sample utterances of different lengths -> one batch, cropped to the shortest."""
        return AudioEvalSet.collate(items)

    def save_samples(self, x: torch.Tensor, x_hat: torch.Tensor, path: Path) -> Path:
        path = Path(path).with_suffix(".png")
        rate = self.config["model"]["sample_rate"]
        save_spectrogram_comparison(x, x_hat, path, sample_rate=rate)
        import soundfile as sf

        for i in range(min(2, x.shape[0])):  # a couple of listenable pairs next to the plot
            sf.write(path.with_name(f"{path.stem}_{i}_original.wav"), x[i, 0].detach().cpu().clamp(-1, 1).numpy(), rate, subtype="PCM_16")
            sf.write(path.with_name(f"{path.stem}_{i}_reconstruction.wav"), x_hat[i, 0].detach().cpu().clamp(-1, 1).numpy(), rate, subtype="PCM_16")
        return path


def save_spectrogram_comparison(x: torch.Tensor, x_hat: torch.Tensor, path: str | Path, *, sample_rate: int, titles=("original", "reconstruction"), max_rows: int = 4) -> Path:
    """Plot log-mel spectrograms of originals (left) and reconstructions (right), one row per clip, as PNG.

    ``x``, ``x_hat``: ``(B, 1, T)``; at most ``max_rows`` clips are drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mel = MelSpectrogram(sample_rate=sample_rate, n_fft=1024, hop_length=256, n_mels=80)
    rows = min(max_rows, x.shape[0])
    fig, axes = plt.subplots(rows, 2, figsize=(10, 2.2 * rows), squeeze=False)
    with torch.no_grad():
        specs = [safe_log(mel(t[:rows].detach().float().cpu())).numpy() for t in (x, x_hat)]
    vmin, vmax = float(specs[0].min()), float(specs[0].max())
    seconds = x.shape[-1] / sample_rate
    for r in range(rows):
        for c in range(2):
            ax = axes[r][c]
            ax.imshow(specs[c][r], origin="lower", aspect="auto", vmin=vmin, vmax=vmax, extent=(0, seconds, 0, 80), cmap="magma")
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c])
            if r == rows - 1:
                ax.set_xlabel("seconds")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


__all__ = ["AudioTask", "save_spectrogram_comparison"]
