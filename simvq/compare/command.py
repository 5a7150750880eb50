"""``simvq compare`` command-line arguments (the CLI only parses; the work is in :mod:`simvq.compare.runner`)."""

from __future__ import annotations

import argparse
import sys

from simvq.compare.runner import (
    BUILTIN_DATA,
    DEFAULT_BUDGET,
    DEFAULT_CODEBOOK_SIZES,
    DEFAULT_CONFIG,
    DEFAULT_SEEDS,
    VARIANTS,
    CompareSpec,
    run_compare,
)

HELP = "Compare SimVQ with other quantizers (same model, data, steps, seeds) and write a report."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantizers", default=None,
                        help=f"comma-separated variants (default: all): {', '.join(VARIANTS)}")
    parser.add_argument("--codebook-sizes", default=",".join(map(str, DEFAULT_CODEBOOK_SIZES)),
                        help="comma-separated codebook sizes K (FSQ maps each to its recommended levels, LFQ needs "
                             "powers of two; default: %(default)s)")
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                        help="comma-separated training seeds; two or more give mean ± spread (default: %(default)s)")
    parser.add_argument("--budget", default=DEFAULT_BUDGET,
                        help="steps per run (e.g. 500) or a total time split across runs (e.g. 5m, 90s); "
                             "default: %(default)s steps")
    parser.add_argument("--data", default=None,
                        help=f"built-in data set ({', '.join(sorted(BUILTIN_DATA))}), an image folder, or a folder of "
                             "Fashion-MNIST IDX files (default: the config's data; the compare preset uses fashion)")
    parser.add_argument("--config", default=None,
                        help=f"your model preset or YAML config (its quantizer section is replaced per run); "
                             f"default: {DEFAULT_CONFIG}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key of the base config, e.g. --set optim.lr=1e-3 (repeatable)")
    parser.add_argument("--out", default="compare-report", help="report folder (default: %(default)s); "
                        "finished runs inside it are reused")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs trained side by side in separate processes (default: CPU cores, at most 4; "
                             "1 on a GPU)")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="evaluate on at most this many held-out images (default: the config's data.eval_limit)")
    parser.add_argument("--usage-images", default="2048",
                        help="held-out images for utilisation, perplexity and dead codes ('all': the whole held-out "
                             "split); more than the metrics use, since covering K codes needs many tokens "
                             "(default: %(default)s)")
    parser.add_argument("--no-retrofit", action="store_true", help="skip the retrofit experiment")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--list", action="store_true", help="list the quantizer variants and exit")


def _usage_images(text: str) -> int | None:
    if str(text).strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--usage-images must be a positive integer or 'all', got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    if args.list:
        width = max(map(len, VARIANTS))
        for key, v in VARIANTS.items():
            print(f"{key:<{width}}  {v.label}: {v.note}")
        return 0
    spec = CompareSpec(
        quantizers=args.quantizers if args.quantizers is not None else list(VARIANTS),
        quantizers_given=args.quantizers is not None,
        codebook_sizes=args.codebook_sizes,
        seeds=args.seeds,
        budget=args.budget,
        data=args.data,
        config=args.config,
        out=args.out,
        retrofit=not args.no_retrofit,
        eval_limit=args.eval_limit,
        usage_images=_usage_images(args.usage_images),
        overrides=args.overrides,
    )
    try:
        results = run_compare(spec, progress=not args.quiet, jobs=args.jobs)
    except (NotADirectoryError, FileExistsError) as err:
        raise ValueError(str(err)) from err
    print("\n".join(f"- {line}" for line in results["verdict"]))
    print(f"report: {spec.out}/report.md (also report.html, results.json, plots/)", file=sys.stderr)
    return 0


__all__ = ["HELP", "add_arguments", "run"]
