"""``simvq compare`` command-line arguments (the CLI only parses; the work is in :mod:`simvq.compare.runner`)."""

from __future__ import annotations

import argparse
import sys

from simvq.argtypes import positive_int
from simvq.compare.modality import DEFAULT_AUDIO_CONFIG, DEFAULT_CONFIG, MODALITY_DEFAULTS, compare_module
from simvq.compare.runner import run_compare
from simvq.compare.spec import DEFAULT, CompareSpec
from simvq.compare.variants import VARIANTS

HELP = "Compare SimVQ with other quantizers (same model, data, steps, seeds) and write a report."


def _defaults(key: str) -> str:
    def text(v):
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else "all" if v is None else str(v)

    return "; ".join(f"{compare_module(name).NOUN} {text(d[key])}" for name, d in MODALITY_DEFAULTS.items())


def _builtin_data() -> str:
    return "; ".join(f"{compare_module(name).NOUN}: {', '.join(sorted(compare_module(name).BUILTIN_DATA))}"
                     for name in MODALITY_DEFAULTS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantizers", default=None,
                        help=f"comma-separated variants: {', '.join(VARIANTS)} (default: "
                             f"{','.join(MODALITY_DEFAULTS['image']['quantizers'])} for images; "
                             f"{','.join(MODALITY_DEFAULTS['audio']['quantizers'])} for audio; --config compare/scaling: "
                             "its own list, see docs/compare.md)")
    parser.add_argument("--codebook-sizes", default=None,
                        help="comma-separated codebook sizes K (FSQ maps each to its recommended levels, LFQ needs "
                             f"powers of two; default: {_defaults('codebook_sizes')})")
    parser.add_argument("--seeds", default=None,
                        help=f"comma-separated training seeds; two or more give mean ± spread (default: {_defaults('seeds')})")
    parser.add_argument("--budget", default=None,
                        help="steps per run (e.g. 500) or a total time split across runs (e.g. 5m, 90s); "
                             f"default steps: {_defaults('budget')}")
    parser.add_argument("--data", default=None,
                        help=f"built-in data set ({_builtin_data()}), a folder of images or of wav/flac files, or a folder of "
                             "Fashion-MNIST IDX files (default: the config's data). Audio data selects the audio "
                             f"preset {DEFAULT_AUDIO_CONFIG} when no --config is given")
    parser.add_argument("--config", default=None,
                        help=f"your model preset or YAML config (its quantizer section is replaced per run; its "
                             f"modality, image or audio, decides the comparison's); default: {DEFAULT_CONFIG}, or "
                             f"{DEFAULT_AUDIO_CONFIG} for audio data")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key of the base config, e.g. --set optim.lr=1e-3 (repeatable)")
    parser.add_argument("--out", default="compare-report", help="report folder (default: %(default)s); "
                        "finished runs inside it are reused")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs trained side by side in separate processes (default: CPU cores, at most 4; "
                             "1 on a GPU; audio on a CPU: every run at once when they fit 3 per core)")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="quality metrics on at most this many held-out images or utterances (default: the "
                             "config's data.eval_limit; for audio 30 when the config sets none: DNSMOS and CREPE are "
                             "slow on a CPU)")
    parser.add_argument("--usage-items", "--usage-images", dest="usage_items", default=None,
                        help="held-out images or utterances for utilisation, perplexity and dead codes ('all': the "
                             "whole held-out split); more than the quality metrics use, since covering K codes needs "
                             f"many tokens (default: {_defaults('usage_items')})")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--retrofit", dest="retrofit", action="store_const", const=True, default=None,
                       help="run the retrofit experiment (default for images)")
    group.add_argument("--no-retrofit", dest="retrofit", action="store_const", const=False,
                       help="skip the retrofit experiment (default for audio)")
    gen = parser.add_mutually_exclusive_group()
    gen.add_argument("--generation", dest="generation", action="store_const", const=True, default=None,
                     help="train one token prior per run (same prior config, steps and seed) and add a generation "
                          "section: bits/token, bits/image, gFID or its labelled proxy, precision/recall, class "
                          "accuracy, sample grids (default for --config compare/generation; images only)")
    gen.add_argument("--no-generation", dest="generation", action="store_const", const=False,
                     help="no priors (the default except for compare/generation)")
    parser.add_argument("--prior-config", default=None, metavar="PRESET",
                        help="prior preset or YAML of every prior (default prior/compare-cpu; e.g. prior/fashion-cpu); "
                             "needs --generation")
    parser.add_argument("--prior-set", dest="prior_overrides", action="append", default=None, metavar="KEY=VALUE",
                        help="override a key of the prior config, e.g. --prior-set trainer.max_steps=400 (repeatable)")
    parser.add_argument("--tune", type=positive_int, default=0, metavar="N",
                        help="first give each quantizer an Optuna study of N trials (same budget for all), then run "
                             "the comparison again at each one's best settings; the report shows both (needs optuna; "
                             "see docs/tune.md)")
    parser.add_argument("--tune-budget", type=positive_int, default=None, metavar="STEPS",
                        help="training steps per tuning trial (default: half the steps per run)")
    parser.add_argument("--size-limit", dest="size_limits", action="append", default=None, metavar="VARIANT=K",
                        help="skip a quantizer's runs above codebook size K (repeatable; VARIANT=none lifts a "
                             "preset's limit; compare/scaling limits ibq to 4096 on a CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--list", action="store_true", help="list the quantizer variants and exit")


def _usage_items(text: str | None):
    if text is None:
        return DEFAULT
    if str(text).strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--usage-items must be a positive integer or 'all', got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    if args.list:
        width = max(map(len, VARIANTS))
        for key, v in VARIANTS.items():
            print(f"{key:<{width}}  {v.label}: {v.note}")
        return 0
    def given(value):
        return DEFAULT if value is None else value

    spec = CompareSpec(
        quantizers=given(args.quantizers),
        quantizers_given=args.quantizers is not None,
        codebook_sizes=given(args.codebook_sizes),
        seeds=given(args.seeds),
        budget=given(args.budget),
        data=args.data,
        config=args.config,
        out=args.out,
        retrofit=given(args.retrofit),
        eval_limit=args.eval_limit,
        usage_items=_usage_items(args.usage_items),
        overrides=args.overrides,
        generation=given(args.generation),
        prior_config=given(args.prior_config),
        prior_overrides=given(args.prior_overrides),
        size_limits=given(",".join(args.size_limits) if args.size_limits else None),
        tune=args.tune,
        tune_budget=args.tune_budget,
    )
    try:
        results = run_compare(spec, progress=not args.quiet, jobs=args.jobs)
    except (NotADirectoryError, FileExistsError) as err:
        raise ValueError(str(err)) from err
    print("\n".join(f"- {line}" for line in results["verdict"]))
    print(f"report: {spec.out}/report.md (also report.html, results.json, plots/)", file=sys.stderr)
    return 0


__all__ = ["HELP", "add_arguments", "run"]
