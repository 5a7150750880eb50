"""``simvq compare``: the same model, data, steps and seeds with each quantizer, and a report.

It answers an adopter's question: if I put SimVQ in place of my VQ layer, does collapse go away, does
quality improve, and what does it cost? For image tokenizers and for audio tokenizers (the base config's
``modality``; ``--data speech``, a folder of wav/flac files or ``--config compare/audio`` select audio). See
``docs/compare.md``.

Imports run one way: ``runner`` (``run_compare``) > ``tuned`` / ``generation`` / ``retrofit`` > ``execute`` >
``measure`` / ``lc`` > ``plan`` > ``spec`` > ``modality`` > ``variants``; ``runner`` > ``report`` > ``verdict`` /
``retrofit_report`` / ``summary`` / ``plots`` > ``records``. ``tuned`` runs Optuna studies through
:mod:`simvq.tune`, ``generation`` trains token priors through :mod:`simvq.prior` (both below ``compare``).
Everything modality-specific (defaults, ``--data`` handling, report sections) is in
``simvq.modalities.<name>.compare``, reached through :func:`simvq.compare.modality.compare_module`.
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
