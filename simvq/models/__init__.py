"""Tokenizer models (encoder -> quantizer -> decoder) and their discriminators."""

from __future__ import annotations

from simvq.models.discriminators import NLayerDiscriminator
from simvq.models.image import IMAGE_PRESETS, ImageTokenizer, build_image_tokenizer

MODALITIES = ("image", "audio")


def build_tokenizer(config: dict):
    """Build the tokenizer a full config describes, dispatching on ``config["modality"]``.

    Uses the ``model`` and ``quantizer`` sections; the quantizer's ``dim`` is filled from the model.
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    modality = config.get("modality", "image")
    for section in ("model", "quantizer"):
        if section not in config:
            raise ValueError(f"config has no '{section}' section; a tokenizer config needs 'model' and 'quantizer'")
    if modality == "image":
        return build_image_tokenizer(config["model"], config["quantizer"])
    if modality == "audio":
        # imported lazily: the audio stack is optional and written separately
        from simvq.models.audio import build_audio_tokenizer

        return build_audio_tokenizer(config["model"], config["quantizer"])
    raise ValueError(f"unknown modality {modality!r}; choose one of {list(MODALITIES)}")


__all__ = ["IMAGE_PRESETS", "ImageTokenizer", "NLayerDiscriminator", "build_image_tokenizer", "build_tokenizer"]
