"""simvq: collapse-free vector quantization (SimVQ, arXiv 2411.02038) with baselines, tokenizers and evaluation.

The public API: the quantizers (one interface), codebook usage statistics, ``retrofit`` (swap a trained
model's VQ layers for SimVQ without changing its outputs), and the model/training/evaluation entry points,
which are imported lazily so that ``import simvq`` stays light.
"""

__version__ = "0.1.0"

from simvq.quantizers import (  # noqa: E402
    FSQ,
    LFQ,
    EMAVectorQuantizer,
    FactorizedVectorQuantizer,
    LCVectorQuantizer,
    Quantizer,
    QuantizerOutput,
    ResidualQuantizer,
    SimVQ,
    VectorQuantizer,
    build_quantizer,
    fsq_levels_for,
    kmeans_init,
    nearest_code,
)
from simvq.retrofit import retrofit  # noqa: E402
from simvq.usage import CodebookUsage, UsageStats  # noqa: E402

_LAZY = {
    "build_tokenizer": ("simvq.modalities", "build_tokenizer"),
    "load_tokenizer": ("simvq.checkpoints", "load_tokenizer"),
    "Tokenizer": ("simvq.tokenizer", "Tokenizer"),
    "train": ("simvq.training", "train"),
    "evaluate": ("simvq.evaluation", "evaluate"),
    "run_compare": ("simvq.compare", "run_compare"),
}


def __getattr__(name):
    # Lightning, the models and the metrics load on first use only.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'simvq' has no attribute {name!r}")


__all__ = [
    "__version__",
    "CodebookUsage",
    "EMAVectorQuantizer",
    "FSQ",
    "FactorizedVectorQuantizer",
    "LCVectorQuantizer",
    "LFQ",
    "Quantizer",
    "QuantizerOutput",
    "ResidualQuantizer",
    "SimVQ",
    "UsageStats",
    "VectorQuantizer",
    "build_quantizer",
    "fsq_levels_for",
    "kmeans_init",
    "nearest_code",
    "retrofit",
    *_LAZY,
]
