"""simvq: collapse-free vector quantization (SimVQ, arXiv 2411.02038) with baselines, tokenizers and evaluation."""

__version__ = "0.1.0"

from simvq.quantizers import Quantizer, QuantizerOutput, SimVQ, VectorQuantizer, nearest_code  # noqa: E402
from simvq.usage import CodebookUsage, UsageStats  # noqa: E402

__all__ = [
    "__version__",
    "CodebookUsage",
    "Quantizer",
    "QuantizerOutput",
    "SimVQ",
    "UsageStats",
    "VectorQuantizer",
    "nearest_code",
]
