"""Build any quantizer by name, as configs name them (``quantizer: {name: fsq, codebook_size: 1024}``)."""

from __future__ import annotations

import inspect
import math

from simvq.quantizers.base import Quantizer
from simvq.quantizers.ema import EMAVectorQuantizer
from simvq.quantizers.factorized import FactorizedVectorQuantizer
from simvq.quantizers.fsq import FSQ
from simvq.quantizers.lc import LCVectorQuantizer
from simvq.quantizers.lfq import LFQ
from simvq.quantizers.residual import ResidualQuantizer
from simvq.quantizers.simvq import SimVQ
from simvq.quantizers.vq import VectorQuantizer

QUANTIZERS: dict[str, type[Quantizer]] = {
    "simvq": SimVQ,
    "vq": VectorQuantizer,
    "ema_vq": EMAVectorQuantizer,
    "factorized_vq": FactorizedVectorQuantizer,
    "lc_vq": LCVectorQuantizer,
    "fsq": FSQ,
    "lfq": LFQ,
    "residual": ResidualQuantizer,
}

# Table 1 of the FSQ paper (Mentzer et al. 2023): levels that approximate a target codebook size.
FSQ_RECOMMENDED_LEVELS: dict[int, list[int]] = {
    2**8: [8, 6, 5],
    2**10: [8, 5, 5, 5],
    2**12: [7, 5, 5, 5, 5],
    2**14: [8, 8, 8, 6, 5],
    2**16: [8, 8, 8, 5, 5, 5],
}


def fsq_levels_for(codebook_size: int) -> list[int]:
    """The FSQ paper's recommended levels for a target codebook size.

    Accepts the target (``2**8, 2**10, 2**12, 2**14, 2**16``) or the exact size of a recommended set
    (e.g. 1000 for ``[8, 5, 5, 5]``). The FSQ codebook has ``prod(levels)`` codes, which is close to but
    not equal to the power of two (``2**16 -> [8, 8, 8, 5, 5, 5]``, 64,000 codes).
    """
    if not isinstance(codebook_size, int) or isinstance(codebook_size, bool):
        raise TypeError(f"codebook_size must be an integer, got {codebook_size!r}")
    if codebook_size in FSQ_RECOMMENDED_LEVELS:
        return list(FSQ_RECOMMENDED_LEVELS[codebook_size])
    for levels in FSQ_RECOMMENDED_LEVELS.values():
        if math.prod(levels) == codebook_size:
            return list(levels)
    options = ", ".join(f"2**{k.bit_length() - 1} -> {v}" for k, v in FSQ_RECOMMENDED_LEVELS.items())
    raise ValueError(
        f"no recommended FSQ levels for codebook_size={codebook_size}; supported sizes: {options}. "
        "For other sizes pass levels=[...] explicitly (codebook_size = prod(levels))"
    )


def build_quantizer(name: str, **kwargs) -> Quantizer:
    """Construct the quantizer called ``name`` with its keyword arguments.

    Names: ``"simvq"``, ``"vq"``, ``"ema_vq"``, ``"factorized_vq"``, ``"lc_vq"``, ``"fsq"``, ``"lfq"``,
    ``"residual"``. For ``"fsq"``, ``codebook_size`` may be given instead of ``levels`` and is mapped through
    :func:`fsq_levels_for`. Unknown names raise ``ValueError``, unknown keywords ``TypeError``; both list
    the valid choices.
    """
    if not isinstance(name, str) or name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; valid names: {', '.join(QUANTIZERS)}")
    cls = QUANTIZERS[name]
    if name == "fsq" and "codebook_size" in kwargs:
        size = kwargs.pop("codebook_size")
        levels = fsq_levels_for(size) if size is not None else None
        if "levels" in kwargs and levels is not None and math.prod(kwargs["levels"]) != math.prod(levels):
            raise ValueError(
                f"fsq got codebook_size={size} and levels={kwargs['levels']} (prod {math.prod(kwargs['levels'])}); "
                "pass only one of them"
            )
        if levels is not None:
            kwargs.setdefault("levels", levels)
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        valid = [p for p in params if p != "self"]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise TypeError(f"quantizer {name!r} got unknown argument(s) {unknown}; valid arguments: {valid}")
    return cls(**kwargs)
