"""Evaluation metrics; each result key says which convention (or offline proxy) produced it."""

from simvq.metrics.image import ImageMetrics, psnr, psnr_batch, psnr_per_image, ssim_per_image, to_official_uint8
from simvq.metrics.inception import FIDInceptionV3, RandomConvFeatures

__all__ = [
    "FIDInceptionV3",
    "ImageMetrics",
    "RandomConvFeatures",
    "psnr",
    "psnr_batch",
    "psnr_per_image",
    "ssim_per_image",
    "to_official_uint8",
]
