"""``simvq compare``: the same model, data, steps and seeds with each quantizer, and a report.

It answers an adopter's question: if I put SimVQ in place of my VQ layer, does collapse go away, does
quality improve, and what does it cost? For image tokenizers and for audio tokenizers (the base config's
``modality``; ``--data speech``, a folder of wav/flac files or ``--config compare/audio`` select audio). See
``docs/compare.md``.

- :mod:`simvq.compare.runner`: the modality and its defaults, the plan (quantizer variants x codebook sizes x
  seeds), argument checks done before any training, resumable execution (one JSON file per finished run), the
  retrofit experiment.
- :mod:`simvq.compare.report`: ``results.json``, ``report.md`` / ``report.html`` and the verdict.
- :mod:`simvq.compare.plots`: the PNG figures.
"""

from simvq.compare.runner import (
    DEFAULT,
    DEFAULT_CODEBOOK_SIZES,
    DEFAULT_QUANTIZERS,
    DEFAULT_SEEDS,
    MODALITY_DEFAULTS,
    VARIANTS,
    Budget,
    CompareSpec,
    parse_budget,
    plan_runs,
    run_compare,
)

__all__ = [
    "Budget",
    "DEFAULT",
    "MODALITY_DEFAULTS",
    "CompareSpec",
    "DEFAULT_CODEBOOK_SIZES",
    "DEFAULT_QUANTIZERS",
    "DEFAULT_SEEDS",
    "VARIANTS",
    "parse_budget",
    "plan_runs",
    "run_compare",
]
