"""The quantizer variants of the comparison and how a requested codebook size maps to each."""

from __future__ import annotations

import math
from dataclasses import dataclass

from simvq.quantizers.factory import fsq_levels_for

@dataclass(frozen=True)
class Variant:
    """One quantizer setting of the comparison.

    Attributes:
        key: the name used on the command line (``--quantizers simvq,vq``).
        label: the name in tables and plots.
        quantizer: the config's ``quantizer`` section without ``codebook_size``.
        sizes: how a requested codebook size maps to the quantizer: ``"any"``, ``"fsq"`` (through
            :func:`simvq.quantizers.factory.fsq_levels_for`) or ``"pow2"`` (LFQ: ``2**bits``).
        note: one line for the report.
    """

    key: str
    label: str
    quantizer: dict
    sizes: str = "any"
    note: str = ""


VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        Variant("simvq", "SimVQ", {"name": "simvq"}, note="frozen random C, learned linear W (official setting)"),
        Variant("vq", "VQ", {"name": "vq"}, note="plain VQ-VAE codebook trained by the codebook loss"),
        Variant("ema_vq", "EMA VQ", {"name": "ema_vq"}, note="codebook as an exponential moving average"),
        Variant(
            "factorized_vq",
            "Factorised VQ",
            {"name": "factorized_vq", "codebook_dim": 4},
            note="low-dimensional (4-d) l2-normalised codebook between two projections (ViT-VQGAN)",
        ),
        Variant(
            "lc_vq",
            "VQGAN-LC",
            {"name": "lc_vq"},
            note="frozen codebook of k-means centroids of encoder features + learned projector",
        ),
        Variant("fsq", "FSQ", {"name": "fsq"}, sizes="fsq", note="finite scalar quantization, levels from the FSQ paper"),
        Variant("lfq", "LFQ", {"name": "lfq"}, sizes="pow2", note="lookup-free quantization with entropy loss"),
        Variant(
            "simvq_mlp",
            "SimVQ (MLP)",
            {"name": "simvq", "transform": "mlp"},
            note="non-linear reparameterisation: Linear-GELU-Linear instead of W",
        ),
        Variant(
            "simvq_learn_c",
            "SimVQ (C+W learned)",
            {"name": "simvq", "learnable_codebook": True},
            note="both C and W trained (the paper predicts C dominates and usage drops)",
        ),
        # today's strongest baselines (REFERENCE.md §6); not in the default list (see DEFAULT_QUANTIZERS)
        Variant(
            "ibq",
            "IBQ",
            {"name": "ibq"},
            note="index backpropagation: softmax over all K codes, every code gets gradient (Shi et al., arXiv 2412.02692)",
        ),
        Variant(
            "vq_cosine",
            "VQ (cosine)",
            {"name": "vq", "l2_normalize": True},
            note="plain VQ with l2-normalised tokens and codes (ViT-VQGAN; LlamaGen's codebook_l2_norm)",
        ),
        Variant(
            "vq_rotation",
            "VQ (rotation trick)",
            {"name": "vq", "rotation_trick": True},
            note="plain VQ with gradients through a rotation+rescale instead of straight-through (Fifty et al., arXiv 2410.06424)",
        ),
        Variant(
            "vq_kmeans",
            "VQ (k-means init)",
            {"name": "vq", "kmeans_init": True},
            note="plain VQ whose codes start as k-means centroids of the first training batch (vector-quantize-pytorch kmeans_init)",
        ),
    )
}
#: the variants an image ``simvq compare`` runs without ``--quantizers``: the nine of the original comparison and
#: today's baselines (``ibq``, ``vq_cosine``, ``vq_rotation``, ``vq_kmeans``); the latter four at the smaller
#: default size only (the image DEFAULTS' ``size_limits``), which keeps the default run within its 10 minutes on
#: 2 CPU cores
DEFAULT_QUANTIZERS = ("simvq", "vq", "ema_vq", "factorized_vq", "lc_vq", "fsq", "lfq", "simvq_mlp", "simvq_learn_c",
                      "ibq", "vq_cosine", "vq_rotation", "vq_kmeans")

def size_for(variant: Variant, requested: int) -> tuple[dict, int]:
    """``(quantizer keywords for this size, actual codebook size)``; ValueError when it cannot be done."""
    q = dict(variant.quantizer)
    if variant.sizes == "fsq":
        levels = fsq_levels_for(requested)  # ValueError lists the sizes it knows
        q["levels"] = levels
        return q, math.prod(levels)
    if variant.sizes == "pow2" and requested & (requested - 1):
        lower = 1 << (requested.bit_length() - 1)
        raise ValueError(f"LFQ needs a power-of-two codebook size (2**bits); {requested} is not one, use {lower} or {lower * 2}")
    q["codebook_size"] = requested
    return q, requested


__all__ = ["DEFAULT_QUANTIZERS", "VARIANTS", "Variant", "size_for"]
