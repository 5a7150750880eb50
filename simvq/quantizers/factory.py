"""Build any quantizer by name, as configs name them (``quantizer: {name: fsq, codebook_size: 1024}``).

The registry itself lives in :mod:`simvq.quantizers.registry` (a leaf module, so quantizers such as the
residual stack can build others by name without an import cycle); this module imports every quantizer so
that all names are registered, and re-exports the public names.
"""

from __future__ import annotations

import simvq.quantizers.ema  # noqa: F401  (importing a quantizer module registers its class)
import simvq.quantizers.factorized  # noqa: F401
import simvq.quantizers.fsq  # noqa: F401
import simvq.quantizers.ibq  # noqa: F401
import simvq.quantizers.lc  # noqa: F401
import simvq.quantizers.lfq  # noqa: F401
import simvq.quantizers.residual  # noqa: F401
import simvq.quantizers.simvq  # noqa: F401
import simvq.quantizers.vq  # noqa: F401
from simvq.quantizers.fsq import FSQ_RECOMMENDED_LEVELS, fsq_levels_for
from simvq.quantizers.registry import QUANTIZERS, build_quantizer, register_quantizer

__all__ = ["FSQ_RECOMMENDED_LEVELS", "QUANTIZERS", "build_quantizer", "fsq_levels_for", "register_quantizer"]
