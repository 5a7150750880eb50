"""Quantizers behind one interface (see :class:`simvq.quantizers.base.Quantizer`)."""

from simvq.quantizers.base import Quantizer, QuantizerOutput, TokenResult, rotation_trick, straight_through, vq_loss_terms
from simvq.quantizers.search import nearest_code
from simvq.quantizers.simvq import SimVQ
from simvq.quantizers.vq import VectorQuantizer

__all__ = [
    "Quantizer",
    "QuantizerOutput",
    "TokenResult",
    "SimVQ",
    "VectorQuantizer",
    "nearest_code",
    "rotation_trick",
    "straight_through",
    "vq_loss_terms",
]
