"""Official SimVQ image checkpoints (Open-MAGVIT2 CNN, REFERENCE §4) -> this library's image tokenizer.

The official ``encoder.*`` / ``decoder.*`` / ``quantize.*`` names load into
:class:`~simvq.modalities.image.model.ImageTokenizer` unchanged; the architecture is read from tensor shapes.
"""

from __future__ import annotations

from typing import Mapping

import torch

from simvq.modalities.image.model import IMAGE_PRESETS, build_image_tokenizer


def select_official_weights(state_dict: Mapping[str, torch.Tensor], *, use_ema: bool = True, prefixes=("encoder.", "decoder.", "quantize.")) -> dict[str, torch.Tensor]:
    """Tokenizer tensors (keys under ``prefixes``) from an official state dict, raw or EMA.

    The official EMA (taming's ``LitEma``) stores a copy of every trainable parameter as
    ``model_ema.<name with the dots removed>``. Those names are mapped back by matching them against the
    dot-free raw names; tensors without an EMA copy (the frozen codebook ``C``, buffers) keep their raw values.
    ``loss.*`` (discriminator, LPIPS) and everything outside ``prefixes`` is dropped.
    """
    raw = {k: v for k, v in state_dict.items() if k.startswith(tuple(prefixes))}
    if not raw:
        raise ValueError(f"the checkpoint has no keys under {list(prefixes)}; not a SimVQ tokenizer checkpoint")
    if not use_ema:
        return dict(raw)
    ema = {k[len("model_ema."):]: v for k, v in state_dict.items() if k.startswith("model_ema.")}
    ema.pop("decay", None)
    ema.pop("num_updates", None)
    if not ema:
        raise ValueError(
            "the checkpoint holds no EMA weights (no model_ema.* keys); convert the raw weights instead "
            "(use_ema=False, or --no-ema on the command line)"
        )
    by_flat: dict[str, str] = {}
    for key in raw:
        flat = key.replace(".", "")
        if flat in by_flat:
            raise ValueError(f"raw names {by_flat[flat]!r} and {key!r} collide once dots are removed; EMA names are ambiguous")
        by_flat[flat] = key
    out = dict(raw)
    replaced = 0
    for flat, value in ema.items():
        key = by_flat.get(flat)
        if key is None:
            continue  # EMA copy of a loss.* parameter (discriminator) or of something we drop
        if tuple(value.shape) != tuple(raw[key].shape):
            raise ValueError(f"EMA tensor model_ema.{flat} has shape {tuple(value.shape)} but {key} has {tuple(raw[key].shape)}")
        out[key] = value
        replaced += 1
    if replaced == 0:
        raise ValueError("none of the model_ema.* tensors matches an encoder/decoder/quantizer parameter")
    return out


def infer_official_image_config(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Model and quantizer sections inferred from tensor shapes; unlisted settings from ``official-128``.

    ``quantize.embedding.weight`` is ``(K, d)``; widths from ``encoder.conv_in`` and each level's first
    ResBlock; depth from the ``encoder.down.{i}`` / ``block.{j}`` indices.
    """

    def need(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise ValueError(f"official image checkpoint lacks {key!r}; it does not have the official layout")
        return state_dict[key]

    codebook = need("quantize.embedding.weight")
    if codebook.dim() != 2:
        raise ValueError(f"quantize.embedding.weight should be (K, d), got shape {tuple(codebook.shape)}")
    k, d = codebook.shape
    conv_in = need("encoder.conv_in.weight")
    ch, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    levels = sorted({int(key.split(".")[2]) for key in state_dict if key.startswith("encoder.down.")})
    if levels != list(range(len(levels))):
        raise ValueError(f"encoder.down levels are not contiguous: {levels}")
    blocks = sorted({int(key.split(".")[4]) for key in state_dict if key.startswith("encoder.down.0.block.")})
    ch_mult = []
    for level in levels:
        width = int(need(f"encoder.down.{level}.block.0.conv1.weight").shape[0])
        if width % ch:
            raise ValueError(f"level {level} width {width} is not a multiple of ch={ch}")
        ch_mult.append(width // ch)
    z = int(need("encoder.conv_out.weight").shape[0])
    if z != d:
        raise ValueError(f"encoder.conv_out gives {z} channels but the codebook has dimension {d}")
    preset = IMAGE_PRESETS["official-128"]
    model = {
        "in_channels": in_channels,
        "out_channels": int(need("decoder.conv_out.weight").shape[0]),
        "ch": ch,
        "ch_mult": ch_mult,
        "num_res_blocks": len(blocks),
        "z_channels": z,
        "norm_groups": preset.get("norm_groups", 32),
    }
    if "quantize.embedding_proj.weight" in state_dict:
        quantizer = {"name": "simvq", "codebook_size": int(k)}
    else:  # a plain VQ baseline trained with the same code base
        quantizer = {"name": "vq", "codebook_size": int(k)}
    return {"modality": "image", "model": model, "quantizer": quantizer}


def is_official_image_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """The Open-MAGVIT2 CNN: ``encoder.conv_in.weight`` is a 4-D conv and there are ``encoder.down.*`` levels."""
    conv_in = state_dict.get("encoder.conv_in.weight")
    return conv_in is not None and conv_in.dim() == 4 and any(k.startswith("encoder.down.") for k in state_dict)


def convert_official_image(state_dict: Mapping[str, torch.Tensor], use_ema: bool) -> tuple[dict, dict]:
    """An official image checkpoint's ``state_dict`` -> ``(tokenizer state dict, config sections)``."""
    weights = select_official_weights(state_dict, use_ema=use_ema)
    config = infer_official_image_config(weights)
    model = build_image_tokenizer(config["model"], config["quantizer"])
    own = model.state_dict()
    # our model has counters (quantize.usage.*) that the official one lacks: they keep their fresh values
    missing = [k for k in own if k not in weights and ".usage." not in k]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"official weights do not map onto the image tokenizer: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, value in weights.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"{key}: official shape {tuple(value.shape)} != expected {tuple(own[key].shape)}")
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in weights.items()}})
    return model.state_dict(), config


__all__ = ["convert_official_image", "infer_official_image_config", "is_official_image_state_dict", "select_official_weights"]
