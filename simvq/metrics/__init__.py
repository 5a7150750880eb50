"""Metrics shared by the modalities: the FID feature network (InceptionV3 with pytorch-fid weights) and its
labelled offline proxy. Each modality's own metrics live in its package."""

from simvq.metrics.inception import FIDInceptionV3, RandomConvFeatures

__all__ = ["FIDInceptionV3", "RandomConvFeatures"]
