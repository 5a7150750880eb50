"""The image modality's config sections (``model``, ``loss``, ``data``) and their cross-section checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from simvq.modalities.base import check_positive
from simvq.modalities.image.model import resolve_model_config

DATASETS = ("photos", "fashion_mnist", "digits", "folder")


@dataclass
class ImageModelConfig:
    """The image tokenizer (Open-MAGVIT2-style CNN, REFERENCE §2, :mod:`simvq.modalities.image.model`).

    ``preset`` names an entry of ``simvq.modalities.image.model.IMAGE_PRESETS`` (``official-128``, ``small-rgb-32``,
    ``small-grey-32``); keys given next to it override the preset; unset keys take the official values.
    ``ch * ch_mult[i]`` channels at level ``i``; ``len(ch_mult) - 1`` stride-2 downsamplings;
    ``z_channels`` is the code dimension (the quantizer's ``dim``). The resolved config stores every key.
    """

    preset: Optional[str] = None
    in_channels: Optional[int] = None
    out_channels: Optional[int] = None
    ch: Optional[int] = None
    ch_mult: Optional[list[int]] = None
    num_res_blocks: Optional[int] = None
    z_channels: Optional[int] = None
    norm_groups: Optional[int] = None


@dataclass
class ImageLossConfig:
    """Image tokenizer loss: ``l1 + perceptual + gan (non-saturating) + quantizer``, PatchGAN with hinge.

    ``perceptual_weights`` is a local file with torchvision's VGG16 weights for LPIPS (nothing is
    downloaded; also read from ``SIMVQ_LPIPS_VGG_WEIGHTS``). Without it, ``perceptual_fallback:
    multiscale-ssim`` trains with the labelled offline stand-in (``error`` refuses to); with
    ``perceptual_weight: 0`` no perceptual term is computed. ``gan_weight`` is fixed (no adaptive
    weight); the generator's GAN term and the discriminator updates start at ``gan_start_step``.
    ``gan_weight: 0`` trains without a discriminator.
    """

    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 1.0
    perceptual_net: str = "vgg"
    perceptual_weights: Optional[str] = None
    perceptual_fallback: str = "multiscale-ssim"
    gan_weight: float = 0.1
    gen_gan_loss: str = "non_saturating"
    disc_loss: str = "hinge"
    gan_start_step: int = 0
    disc_channels: int = 64
    disc_layers: int = 3
    quantizer_weight: float = 1.0


@dataclass
class ImageDataConfig:
    """Image data (see :mod:`simvq.modalities.image.data`); ``batch_size`` is per device (global = x devices x nodes).

    ``dataset``: ``photos`` (colour photos shipped with scikit-image / scikit-learn, random crops at
    ``scales``, eval photos ``eval_sources`` held out), ``fashion_mnist`` (IDX files under ``path``,
    default ``/usr/share/datasets/fashion-mnist``; 28x28 padded to 32), ``digits`` (scikit-learn 8x8
    digits upsampled to ``image_size``; for tests) or ``folder`` (any nested folder of JPEG/PNG files,
    ImageNet layout: resize the short side to ``image_size``, random crop for training, centre crop for
    evaluation; ``eval_path`` is the validation folder, otherwise ``eval_fraction`` of the files is held out).
    """

    dataset: str = "photos"
    path: Optional[str] = None
    eval_path: Optional[str] = None
    image_size: int = 32
    channels: int = 3
    scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    eval_sources: list[str] = field(default_factory=lambda: ["chelsea", "flower"])
    eval_stride: Optional[int] = None
    eval_fraction: float = 0.1
    train_limit: Optional[int] = None
    eval_limit: Optional[int] = None
    batch_size: int = 32
    eval_batch_size: int = 64
    num_workers: int = 0
    verify_images: bool = True



def finalize_image_config(cfg: dict) -> dict:
    """Expand the model section (preset + overrides + official defaults) into every keyword, then check the
    values that span sections."""
    cfg["model"] = resolve_model_config({k: v for k, v in cfg["model"].items() if v is not None})
    d, m = cfg["data"], cfg["model"]
    if d["dataset"] not in DATASETS:
        raise ValueError(f"data.dataset must be one of {', '.join(DATASETS)}, got {d['dataset']!r}")
    if d["dataset"] == "folder" and not d["path"]:
        raise ValueError("data.dataset 'folder' needs data.path (a folder of JPEG/PNG images)")
    if d["channels"] not in (1, 3):
        raise ValueError(f"data.channels must be 1 (grey) or 3 (RGB), got {d['channels']!r}")
    if d["channels"] != m["in_channels"]:
        raise ValueError(
            f"data.channels ({d['channels']}) and model.in_channels ({m['in_channels']}) must match"
        )
    for key in ("image_size", "batch_size", "eval_batch_size"):
        check_positive(cfg, key, "data", allow_none=False)
    check_positive(cfg, "num_workers", "data", allow_none=False, allow_zero=True)
    if not 0 < d["eval_fraction"] < 1:
        raise ValueError(f"data.eval_fraction must lie in (0, 1), got {d['eval_fraction']!r}")
    if not d["scales"] or any(s < 1 for s in d["scales"]):
        raise ValueError(f"data.scales must be a non-empty list of numbers >= 1, got {d['scales']!r}")
    factor = 2 ** (len(m["ch_mult"]) - 1)
    if d["image_size"] % factor:
        raise ValueError(
            f"data.image_size ({d['image_size']}) must be divisible by the model's downsampling factor "
            f"{factor} (2 ** (len(model.ch_mult) - 1))"
        )
    for key in ("l1_weight", "l2_weight", "perceptual_weight", "gan_weight", "quantizer_weight", "gan_start_step"):
        check_positive(cfg, key, "loss", allow_none=False, allow_zero=True)
    return cfg


__all__ = ["DATASETS", "ImageDataConfig", "ImageLossConfig", "ImageModelConfig", "finalize_image_config"]
