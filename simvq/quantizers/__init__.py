"""Quantizers behind one interface (see :class:`simvq.quantizers.base.Quantizer`)."""

from simvq.quantizers.base import Quantizer, QuantizerOutput, TokenResult, rotation_trick, straight_through, vq_loss_terms
from simvq.quantizers.registry import register_quantizer
from simvq.quantizers.search import nearest_code

# import order = registration order = the order names are listed in (error messages, QUANTIZERS)
from simvq.quantizers.simvq import SimVQ
from simvq.quantizers.vq import VectorQuantizer
from simvq.quantizers.ema import EMAVectorQuantizer
from simvq.quantizers.factorized import FactorizedVectorQuantizer
from simvq.quantizers.lc import LCVectorQuantizer, kmeans_init
from simvq.quantizers.fsq import FSQ
from simvq.quantizers.lfq import LFQ
from simvq.quantizers.ibq import IBQ
from simvq.quantizers.residual import ResidualQuantizer
from simvq.quantizers.factory import QUANTIZERS, build_quantizer, fsq_levels_for

__all__ = [
    "Quantizer",
    "QuantizerOutput",
    "TokenResult",
    "SimVQ",
    "VectorQuantizer",
    "EMAVectorQuantizer",
    "FactorizedVectorQuantizer",
    "FSQ",
    "LCVectorQuantizer",
    "LFQ",
    "IBQ",
    "ResidualQuantizer",
    "QUANTIZERS",
    "build_quantizer",
    "fsq_levels_for",
    "kmeans_init",
    "nearest_code",
    "register_quantizer",
    "rotation_trick",
    "straight_through",
    "vq_loss_terms",
]
