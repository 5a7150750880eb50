"""`simvq <command>`: a thin command line over the library.

Subcommands register themselves in ``COMMANDS``: each entry is ``(help, add_arguments, run)``.
"""

from __future__ import annotations

import argparse
import sys

from simvq import __version__
from simvq.argtypes import device, positive_float, positive_int
from simvq.io import check_output


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the problem and where to look), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _one_line(err: BaseException) -> str:
    """A user error's message on one line (some libraries put newlines in theirs)."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="simvq", description="Collapse-free vector quantization (SimVQ).")
    parser.add_argument("--version", action="version", version=f"simvq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


COMMANDS: dict = {}


# ----- convert ---------------------------------------------------------------------------------------------
def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, choices=["official"], help="checkpoint format to read")
    p.add_argument("checkpoint", help="official SimVQ Lightning .ckpt file")
    p.add_argument("out_dir", help="model directory to write (config.yaml + model.safetensors)")
    p.add_argument("--no-ema", action="store_true", help="take the raw weights instead of the EMA weights")
    p.add_argument("--force", action="store_true", help="replace a model already in OUT_DIR")


def _convert_run(args: argparse.Namespace) -> int:
    from simvq.checkpoints import convert_official, read_model_metadata

    out = convert_official(args.checkpoint, args.out_dir, use_ema=not args.no_ema, overwrite=args.force)
    meta = read_model_metadata(out)
    print(f"wrote {out} ({meta.get('modality')} tokenizer, {meta.get('weights')} weights from {meta.get('source_file')})")
    return 0


COMMANDS["convert"] = ("Convert an official SimVQ checkpoint into a simvq model directory.", _convert_arguments, _convert_run)


# ----- train / eval / encode / decode ----------------------------------------------------------------
def _is_rank_zero() -> bool:
    import os

    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="preset name (e.g. image/photos-small) or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=2e-4 trainer.max_steps=500")
    p.add_argument(
        "--out",
        help="run folder (default runs/<config name>): new or empty, or a run simvq made for the same config, which is resumed",
    )
    p.add_argument("--max-steps", type=positive_int, help="stop after this many steps (overrides trainer.max_steps)")
    p.add_argument("--max-minutes", type=positive_float, help="stop after this many minutes of training")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar or model summary")
    p.add_argument("--eval", action="store_true", help="evaluate the exported model on the evaluation split afterwards")
    p.add_argument("--init", metavar="DIR",
                   help="start from the weights of this model folder (e.g. a `simvq retrofit` output) instead of a random init")


def _init_state(directory: str | None) -> dict | None:
    """The weights of ``--init DIR`` (every tokenizer weight must then be given: a partial start is a mistake)."""
    if directory is None:
        return None
    from simvq.checkpoints import load_model_dir

    state, _ = load_model_dir(directory)
    return state


def _train_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from simvq.training import train

    out = args.out or str(Path("runs") / Path(str(args.config)).with_suffix("").name)
    result = train(
        args.config,
        out_dir=out,
        overrides=args.overrides,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        progress=not args.quiet,
        resume=not args.no_resume,
        init_state=_init_state(args.init),
        init_strict=args.init is not None,
    )
    if not _is_rank_zero():
        return 0
    util = result.final("utilization")
    print(
        f"trained {result.steps} steps in {result.wall_time_s:.1f} s ({result.steps_per_s:.2f} steps/s); "
        f"last training-window utilisation {util if util is None else f'{100 * util:.1f}%'}; model: {result.model_dir}"
    )
    if result.diverged:
        print(f"simvq train: training diverged: {result.diverged_reason}", file=sys.stderr)
        return 1
    if args.eval and result.model_dir is not None:
        from simvq.evaluation import evaluate, format_result

        # the run folder is this command's own: its eval.json is replaced (force), its inputs never are
        print(format_result(evaluate(result.model_dir, out=Path(out) / "eval.json", force=True)))
    return 0


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (config.yaml + model.safetensors)")
    p.add_argument(
        "--data",
        help="evaluation data: an image folder, or photos / fashion_mnist / digits (default: the model's own evaluation split)",
    )
    p.add_argument("overrides", nargs="*", metavar="data.KEY=VALUE", help="changes to the data section, e.g. data.eval_limit=500")
    p.add_argument("--batch-size", type=positive_int, help="evaluation batch size (default data.eval_batch_size)")
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N items")
    p.add_argument("--device", type=device, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--out", help="write the metrics as JSON to this file (never over the model or the data)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--usage-only", action="store_true", help="only codebook usage (skip the reconstruction metrics)")


def _eval_run(args: argparse.Namespace) -> int:
    from simvq.config import parse_override
    from simvq.evaluation import evaluate, format_result

    data: object = args.data
    if args.overrides:
        from simvq.checkpoints import load_model_dir
        from simvq.modalities import modality_of

        changes = {}
        for text in args.overrides:
            keys, value = parse_override(text)
            if len(keys) != 2 or keys[0] != "data":
                raise ValueError(f"eval overrides must be data.KEY=VALUE, got {text!r}")
            changes[keys[1]] = value
        if isinstance(data, str):
            changes.update(modality_of(load_model_dir(args.model)[1]).data_changes(data))
        data = changes
    result = evaluate(
        args.model, data, batch_size=args.batch_size, device=args.device, limit=args.limit, out=args.out,
        metrics=not args.usage_only, progress=True, force=args.force,
    )
    print(format_result(result))
    return 0


def _encode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("images", nargs="+", help="image (or, for an audio model, wav/flac) files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="token file to write (.npz)")
    p.add_argument("--size", type=positive_int, help="resize the short side to SIZE and centre-crop (default: keep each image's size)")
    p.add_argument("--device", type=device, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")


def _device(name):
    import torch

    return torch.device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _encode_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from simvq.tokenizer import Tokenizer

    out = Path(args.out)
    check_output(out, inputs=[args.model, *args.images], force=args.force)  # never over an input (simvq.io)
    if out.suffix != ".npz":
        raise ValueError(f"--out {out}: token files end in .npz; name it e.g. {out.with_suffix('.npz').name}")
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists; pass --force to replace it")
    tok = Tokenizer.from_pretrained(args.model, device=_device(args.device))
    print(tok.encode_files(args.images, out, size=args.size))
    return 0


def _decode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (the one that encoded the tokens)")
    p.add_argument("tokens", help="token file written by simvq encode")
    p.add_argument("--out", required=True, help="folder for the decoded PNG images, new or empty (audio: a .wav file for one item, else a folder)")
    p.add_argument("--device", type=device, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--force", action="store_true", help="replace the files of an earlier `simvq decode` in --out")


def _decode_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from simvq.io import prepare_output_dir
    from simvq.tokenizer import Tokenizer
    from simvq.tokens import load_tokens

    check_output(args.out, inputs=[args.model, args.tokens], kind="any")  # never over an input (simvq.io)
    tokens = load_tokens(args.tokens)
    tok = Tokenizer.from_pretrained(args.model, device=_device(args.device))
    tokens = tok.check_tokens(tokens)  # every item, before anything is written
    if not (tok.is_audio and Path(args.out).suffix.lower() == ".wav"):  # a folder: new, empty or this command's own
        prepare_output_dir(args.out, "decode", inputs=[args.model, args.tokens], force=args.force)
    print(tok.decode_files(tokens, args.out, overwrite=args.force))
    return 0


# ----- `simvq data speech` ------------------------------------------------------------------------------
def _data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["speech"], help="speech: synthesise the built-in speech corpus with espeak-ng")
    p.add_argument("--out", required=True, help="folder to build the corpus in (new or empty)")
    p.add_argument("--sample-rate", type=positive_int, default=16000, help="rate of the written 16-bit wav files (default 16000)")
    from simvq.modalities.audio.speech import CORPUS_EVAL_FRACTION, CORPUS_SENTENCES, CORPUS_VOICES_PER_SENTENCE

    p.add_argument("--sentences", type=positive_int, default=CORPUS_SENTENCES, help=f"number of distinct sentences (default {CORPUS_SENTENCES})")
    p.add_argument("--voices-per-sentence", type=positive_int, default=CORPUS_VOICES_PER_SENTENCE, help=f"voices speaking each sentence (default {CORPUS_VOICES_PER_SENTENCE})")
    p.add_argument("--eval-fraction", type=float, default=CORPUS_EVAL_FRACTION, help=f"fraction of sentences held out for evaluation (default {CORPUS_EVAL_FRACTION})")
    p.add_argument("--seed", type=int, default=0)


def _data_run(args: argparse.Namespace) -> int:
    from simvq.modalities.audio.speech import build_speech_corpus, read_manifest

    manifest = build_speech_corpus(
        args.out, sample_rate=args.sample_rate, num_sentences=args.sentences,
        voices_per_sentence=args.voices_per_sentence, eval_fraction=args.eval_fraction, seed=args.seed, progress=True,
    )
    rows = read_manifest(manifest.parent)
    for split in ("train", "eval"):
        part = [r for r in rows if r["split"] == split]
        print(f"{split}: {len(part)} clips, {sum(r['seconds'] for r in part) / 60:.1f} min")
    print(f"wrote {manifest}")
    return 0


COMMANDS["data"] = ("Build a built-in data set (speech: an espeak-ng speech corpus).", _data_arguments, _data_run)
COMMANDS["train"] = ("Train a tokenizer from a config preset or YAML file.", _train_arguments, _train_run)
COMMANDS["eval"] = ("Evaluate a model directory: codebook usage and reconstruction metrics.", _eval_arguments, _eval_run)
COMMANDS["encode"] = ("Encode images or audio into a token file (.npz).", _encode_arguments, _encode_run)
COMMANDS["decode"] = ("Decode a token file back into images (PNG) or audio (wav).", _decode_arguments, _decode_run)


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    from simvq.compare.command import add_arguments

    add_arguments(parser)


def _compare_run(args: argparse.Namespace) -> int:
    from simvq.compare.command import run

    return run(args)


COMMANDS["compare"] = (
    "Compare SimVQ with other quantizers (same model, data, steps, seeds) and write a report.",
    _compare_arguments,
    _compare_run,
)


# ----- `simvq export` ------------------------------------------------------------------------------------
def _export_arguments(p: argparse.ArgumentParser) -> None:
    from simvq.export import add_arguments

    add_arguments(p)


def _export_run(args: argparse.Namespace) -> int:
    from simvq.export import run

    return run(args)


COMMANDS["export"] = ("Export a model folder to ONNX (encoder.onnx + decoder.onnx) or TorchScript.", _export_arguments, _export_run)


# ----- `simvq tune` --------------------------------------------------------------------------------------
def _tune_arguments(p: argparse.ArgumentParser) -> None:
    from simvq.tune.command import add_arguments

    add_arguments(p)


def _tune_run(args: argparse.Namespace) -> int:
    from simvq.tune.command import run

    return run(args)


COMMANDS["tune"] = ("Search one quantizer's training settings on your config and data (Optuna; resumable).",
                    _tune_arguments, _tune_run)


# ----- `simvq retrofit` ----------------------------------------------------------------------------------
def _retrofit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (or shipped tokenizer name) whose VQ layer is swapped for SimVQ")
    p.add_argument("--out", required=True, help="new model folder to write (never the input; new or empty)")
    p.add_argument("--dead-codes", choices=("keep", "respread", "fresh"), default="keep",
                   help="keep: exact swap (default); respread: redraw unused codes from the data's features; "
                        "fresh: new random C with W, b fitted to the used codes")
    p.add_argument("--data", help="data-set name or image folder that decides which codes are unused "
                                  "(default: the model's own training split)")
    p.add_argument("--limit", type=positive_int, default=2048, help="items of --data to run through the model (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of the redrawn codes and of the item sample")
    p.add_argument("--force", action="store_true", help="replace an earlier `simvq retrofit` output in --out")


def _retrofit_data(model_dir: str, config: dict, text: str | None, limit: int, seed: int):
    """Batches of model inputs: ``limit`` items of ``text`` (or of the model's training split)."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from simvq.config import resolve_config
    from simvq.modalities import build_datasets, modality_of

    cfg = resolve_config(config)
    if text is None:
        dataset = build_datasets(cfg)[0]
    else:
        modality = modality_of(cfg)
        changes = modality.data_changes(text)
        cfg["data"].update(changes)
        dataset, _ = modality.eval_dataset(resolve_config(cfg), changes)
    if len(dataset) == 0:
        raise ValueError(f"--data {text or 'training split of ' + model_dir} holds no items")
    if len(dataset) > limit:
        pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
        dataset = Subset(dataset, pick.tolist())
    return DataLoader(dataset, batch_size=64, shuffle=False)


def _retrofit_run(args: argparse.Namespace) -> int:
    import copy
    import json
    import warnings
    from pathlib import Path

    from simvq.checkpoints import load_model_dir, load_tokenizer, read_model_metadata, save_model_dir
    from simvq.io import prepare_output_dir
    from simvq.modalities import build_tokenizer
    from simvq.quantizers.simvq import SimVQ
    from simvq.retrofit import layer_config, retrofit

    state, config = load_model_dir(args.model)  # checks the folder before anything is written
    model = load_tokenizer(args.model)
    data = None
    if args.dead_codes != "keep":
        data = _retrofit_data(args.model, config, args.data, args.limit, args.seed)
    elif args.data is not None:
        raise ValueError("--data decides which codes are unused: use it with --dead-codes respread or fresh")
    with warnings.catch_warnings():  # what was skipped is said below, once
        warnings.simplefilter("ignore", UserWarning)
        result = retrofit(model, dead_codes=args.dead_codes, data=data, seed=args.seed)
    if not result:
        reasons = "; ".join(f"{k}: {v}" for k, v in result.skipped.items()) or "no VQ layer found"
        raise ValueError(f"{args.model}: nothing to retrofit ({reasons})")
    layers = [m for m in model.modules() if isinstance(m, SimVQ)]
    if len(result) != 1 or len(layers) != 1 or "quantizer" not in config:
        raise ValueError(f"{args.model}: simvq retrofit writes model folders with one quantizer; use simvq.retrofit() in Python")
    old_q = dict(config["quantizer"])
    new_config = copy.deepcopy(config)
    new_config["quantizer"] = layer_config(layers[0])  # the settings carried over (loss weights, cosine codes, search)
    check = build_tokenizer(new_config)
    try:  # the new folder must load as the model it describes
        check.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{args.model}: the retrofitted weights do not fit a SimVQ config ({str(err).splitlines()[0]})") from None
    out, _ = prepare_output_dir(args.out, "retrofit", inputs=[args.model], force=args.force)
    before = read_model_metadata(args.model) if (Path(args.model) / "model.safetensors").is_file() else {}
    report = result.dead_codes.get(result[0], {})
    metadata = {
        "retrofit_of": str(Path(args.model).resolve()) if Path(args.model).exists() else str(args.model),
        "retrofit_quantizer_before": str(old_q.get("name")),
        "retrofit_dead_codes": args.dead_codes,
        "retrofit_data": str(args.data or "training split") if args.dead_codes != "keep" else "",
        "retrofit_report": json.dumps(report, default=str),
        **{f"source_{k}": v for k, v in before.items() if k != "format"},
    }
    save_model_dir(out, model, new_config, metadata=metadata)
    extra = ""
    if report:
        extra = f"; {report['live']} live / {report['dead']} dead codes, dead codes from {report['source']}"
        if "fit_rms" in report:
            extra += f", fit residual {report['fit_rms']:.3g} RMS ({100 * report['fit_relative']:.1f}% of the live codes' spread)"
    print(f"retrofitted {', '.join(result)} of {args.model} to SimVQ (dead codes: {args.dead_codes}{extra}); model: {out}")
    print(f"train on: simvq train --config {out / 'config.yaml'} --init {out} --out RUN_DIR")
    return 0


COMMANDS["retrofit"] = ("Swap a model folder's VQ layer for SimVQ (exact, or reviving unused codes) into a new folder.",
                        _retrofit_arguments, _retrofit_run)


# ----- `simvq models` ---------------------------------------------------------------------------------
def _models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the model cards as JSON")


def _models_run(args: argparse.Namespace) -> int:
    import json

    from simvq.pretrained import list_models, model_path

    cards = list_models()
    if args.json:
        print(json.dumps(cards, indent=2))
        return 0
    for name, card in cards.items():
        figures = ", ".join(f"{k} {v}" for k, v in card.get("held_out", {}).items())
        print(f"{name}: {card['summary']}\n  held out: {figures}\n  folder: {model_path(name)}")
    return 0


COMMANDS["models"] = ("List the tokenizers shipped with simvq (usable offline by name, e.g. --model fashion-8k).",
                      _models_arguments, _models_run)


# ----- generation: `simvq prior train`, `simvq sample`, `simvq eval-prior` -----------------------------
def _prior_arguments(p: argparse.ArgumentParser) -> None:
    from simvq.prior.command import add_prior_train_arguments

    sub = p.add_subparsers(dest="prior_command", metavar="SUBCOMMAND", required=True)
    add_prior_train_arguments(sub.add_parser("train", help="train a token prior on a tokenizer's training tokens",
                                             description="Train an autoregressive token prior on a tokenizer's tokens."))


def _prior_run(args: argparse.Namespace) -> int:
    from simvq.prior.command import run_prior_train

    return run_prior_train(args)


def _sample_arguments(p: argparse.ArgumentParser) -> None:
    from simvq.prior.command import add_sample_arguments

    add_sample_arguments(p)


def _sample_run(args: argparse.Namespace) -> int:
    from simvq.prior.command import run_sample

    return run_sample(args)


def _eval_prior_arguments(p: argparse.ArgumentParser) -> None:
    from simvq.prior.command import add_eval_prior_arguments

    add_eval_prior_arguments(p)


def _eval_prior_run(args: argparse.Namespace) -> int:
    from simvq.prior.command import run_eval_prior

    return run_eval_prior(args)


COMMANDS["prior"] = ("Token priors: `simvq prior train --tokenizer DIR --out DIR` (generation).", _prior_arguments, _prior_run)
COMMANDS["sample"] = ("Sample images from a token prior and decode them (PNGs and a grid).", _sample_arguments, _sample_run)
COMMANDS["eval-prior"] = ("Generation metrics of a prior: bits/token, bits/image, gFID (or its labelled proxy), precision/recall.",
                          _eval_prior_arguments, _eval_prior_run)


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also follow options (`train --config X --out R optim.lr=1e-3`): argparse
    # leaves a second run of positionals over; take those, refuse anything else
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    if extra and (overrides != extra or not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(a for a in extra if a not in overrides or not hasattr(args, 'overrides'))}")
    if overrides:
        args.overrides = [*(args.overrides or []), *overrides]
    if args.command is None:
        parser.print_help()
        return 0
    _, _, run = COMMANDS[args.command]
    try:
        return int(run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as err:
        # user errors: one clear line, exit code 2; programming errors (TypeError, KeyError, ...) keep their
        # traceback
        print(f"simvq {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
