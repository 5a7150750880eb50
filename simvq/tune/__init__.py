"""``simvq tune``: a hyperparameter search for one quantizer on the user's own config and data (Optuna).

Layer: above :mod:`simvq.training` and :mod:`simvq.evaluation`, below :mod:`simvq.compare` and the CLI.
Imports run one way: ``command`` > ``report`` > ``study`` > ``objective`` / ``space``. Optuna is imported
inside functions only, so ``import simvq.tune`` works without it. See ``docs/tune.md``.
"""

from simvq.tune.objective import OBJECTIVES
from simvq.tune.report import best_trial, write_outputs
from simvq.tune.space import Param, default_space_file, load_space, parse_space
from simvq.tune.study import TuneSettings, parse_budget, trial_config, tune

__all__ = [
    "OBJECTIVES",
    "Param",
    "TuneSettings",
    "best_trial",
    "default_space_file",
    "load_space",
    "parse_budget",
    "parse_space",
    "trial_config",
    "tune",
    "write_outputs",
]
