"""``simvq tune`` command-line arguments (the CLI only parses; the work is in :mod:`simvq.tune.study`)."""

from __future__ import annotations

import argparse

from simvq.argtypes import fraction, positive_int
from simvq.tune.objective import OBJECTIVES, parse_weights
from simvq.tune.report import write_outputs
from simvq.tune.space import SPACE_DIR
from simvq.tune.study import PRUNERS, STUDY_NAME, tune

HELP = "Search one quantizer's training settings on your config and data (Optuna; resumable)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    shipped = ", ".join(sorted(p.stem for p in SPACE_DIR.glob("*.yaml")))
    parser.add_argument("--config", required=True, help="your preset name or YAML config (model, data, training)")
    parser.add_argument("--quantizer", required=True, help=f"quantizer family to tune (default spaces: {shipped})")
    parser.add_argument("--space", default=None, help="search-space YAML (default: the family's shipped space)")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--trials", type=positive_int, default=None,
                       help="finished trials the study should hold (default 20); a rerun adds only the missing ones")
    limit.add_argument("--budget", default=None, help="stop starting trials after this time, e.g. 30m, 90s, 2h")
    parser.add_argument("--objective", choices=OBJECTIVES, default="psnr",
                        help="held-out psnr or utilization (maximised), proxy/real fid (minimised), or weighted "
                             "(default: %(default)s)")
    parser.add_argument("--weights", default=None,
                        help="terms of --objective weighted, e.g. psnr=1,utilization=10,fid=-0.1 (default: psnr=1,utilization=10)")
    parser.add_argument("--min-utilization", type=fraction, default=None,
                        help="constraint: the best trial must use at least this fraction of the codes (e.g. 0.9)")
    parser.add_argument("--jobs", type=positive_int, default=1, help="trials side by side in separate processes")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="training steps per trial (default: the config's trainer.max_steps)")
    parser.add_argument("--segments", type=positive_int, default=3,
                        help="evaluations per trial that the median pruner sees (default: %(default)s)")
    parser.add_argument("--eval-limit", type=positive_int, default=None,
                        help="held-out items per evaluation (default: the config's data.eval_limit, else 256)")
    parser.add_argument("--seed", type=int, default=0, help="TPE sampler seed (default: %(default)s)")
    parser.add_argument("--storage", default=None,
                        help="Optuna RDB URL shared by several machines, e.g. postgresql://user:pw@host/db "
                             "(default: sqlite:///OUT/study.db)")
    parser.add_argument("--study-name", default=STUDY_NAME, help="study name in --storage (default: %(default)s)")
    parser.add_argument("--pruner", choices=PRUNERS, default="median",
                        help="stop poor trials early: median (from the third trial, below the median at the same "
                             "step), hyperband (Optuna's Hyperband over the segments) or none (default: %(default)s)")
    parser.add_argument("--no-pruning", action="store_true", help="train every trial to the end (= --pruner none)")
    parser.add_argument("--validation", type=positive_int, default=None, metavar="N",
                        help="score trials on the last N items of the training split (trials train without them) "
                             "instead of the held-out split, which then stays untouched by the search")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the base config, e.g. --set data.batch_size=32 (repeatable)")
    parser.add_argument("--out", required=True, help="study folder; rerunning the same command resumes it")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    pruner = "none" if args.no_pruning else args.pruner
    trials = args.trials if args.trials is not None or args.budget is not None else 20
    study, settings = tune(
        args.config, quantizer=args.quantizer, out=args.out, space=args.space, trials=trials, budget=args.budget,
        objective=args.objective, weights=parse_weights(args.weights), min_utilization=args.min_utilization,
        jobs=args.jobs, steps=args.steps, segments=args.segments, eval_limit=args.eval_limit,
        overrides=args.overrides, storage=args.storage, study_name=args.study_name, seed=args.seed, pruner=pruner,
        validation=args.validation,
        progress=not args.quiet,
    )
    result = write_outputs(study, settings)
    best = result["best"]
    if best is None:
        print(f"simvq tune: no trial completed; see {args.out}/trials.csv")
        return 1
    params = ", ".join(f"{k}={v}" for k, v in best.params.items())
    print(f"best trial {best.number}: {settings.objective} {best.value:.4g} ({params})")
    print(f"wrote {args.out}/best.yaml (simvq train --config {args.out}/best.yaml), trials.csv, report.md, plots/")
    return 0


__all__ = ["HELP", "add_arguments", "run"]
