"""``simvq compare``: the same model, data, steps and seeds with each quantizer, and a report.

It answers an adopter's question: if I put SimVQ in place of my VQ layer, does collapse go away, does
quality improve, and what does it cost? See ``docs/compare.md``.

- :mod:`simvq.compare.runner`: the plan (quantizer variants x codebook sizes x seeds), argument checks done
  before any training, resumable execution (one JSON file per finished run), the retrofit experiment.
- :mod:`simvq.compare.report`: ``results.json``, ``report.md`` / ``report.html`` and the verdict.
- :mod:`simvq.compare.plots`: the PNG figures.
"""

from simvq.compare.runner import (
    DEFAULT_CODEBOOK_SIZES,
    DEFAULT_QUANTIZERS,
    DEFAULT_SEEDS,
    VARIANTS,
    Budget,
    CompareSpec,
    parse_budget,
    plan_runs,
    run_compare,
)

__all__ = [
    "Budget",
    "CompareSpec",
    "DEFAULT_CODEBOOK_SIZES",
    "DEFAULT_QUANTIZERS",
    "DEFAULT_SEEDS",
    "VARIANTS",
    "parse_budget",
    "plan_runs",
    "run_compare",
]
