"""Library side of the prior commands; ``simvq.cli`` only registers them::

    simvq prior train --tokenizer DIR [--config prior/PRESET] [key=value ...] --out DIR
    simvq sample --prior DIR --n 64 [--class 3] [--cfg-scale S] [--temperature T] [--top-k K] [--top-p P] --out DIR
    simvq eval-prior --prior DIR [--samples N] [--out FILE]

Each command has ``add_<name>_arguments(parser)`` and ``run_<name>(args) -> int``. User errors raise
ValueError / FileNotFoundError with one line naming the problem and the fix (the CLI maps them to exit code
2), all before any training or sampling starts.

Output folders: a command writes into a folder that does not exist yet, an empty one, or one it created
earlier (marked by ``.simvq-output`` naming the command). ``prior train`` resumes its own folder; ``sample``
replaces its own outputs only with ``--force``. A folder that another command or a person made is never
written to, and no output may be, or lie inside, an input folder (``--force`` does not change that).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from simvq.io import check_output, prepare_output_dir



def _overrides(values) -> list[str]:
    bad = [v for v in values or [] if "=" not in v]
    if bad:
        raise ValueError(f"unexpected argument {bad[0]!r}: config overrides look like key.sub=value (e.g. trainer.max_steps=300)")
    return list(values or [])


# ----- simvq prior train --------------------------------------------------------------------------------------
def add_prior_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="the tokenizer's model folder (or its training run folder, or a "
                        "shipped tokenizer's name: `simvq models`)")
    parser.add_argument("--config", default="prior/fashion-cpu",
                        help="prior preset (prior/fashion-cpu, prior/llamagen-b; audio tokenizers: prior/speech-cpu) or YAML file")
    parser.add_argument("--out", required=True, help="the prior's run folder (resumed when it holds an unfinished run)")
    parser.add_argument("--max-steps", type=int, default=None, help="override trainer.max_steps")
    parser.add_argument("--force", action="store_true", help="start this command's earlier run in --out again instead of resuming it")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.width=192")


def run_prior_train(args) -> int:
    from simvq.prior.train import CHECKPOINT, check_rerun, prepare_run, train_prior

    overrides = _overrides(args.overrides)
    # everything a user can get wrong is checked before the folder is touched or training starts
    cfg, tok_folder, _ = prepare_run(args.tokenizer, args.config, overrides=overrides, max_steps=args.max_steps)
    out, earlier = prepare_output_dir(args.out, "prior train", inputs=[tok_folder], force=args.force, resume=True)
    # an earlier run here (prepare_output_dir wrote nothing into it) is continued only with the same settings
    if earlier and not args.force and check_rerun(out, cfg) == "done":
        steps = cfg["trainer"]["max_steps"]
        print(f"{out} already holds this prior, trained for {steps} steps with these settings; nothing to do (a larger "
              "--max-steps continues it, --force trains it again)")
        return 0
    if earlier and args.force:
        for name in (str(CHECKPOINT), "model.safetensors", "config.yaml", "history.json"):
            (out / name).unlink(missing_ok=True)
    result = train_prior(tok_folder, out, args.config, overrides=overrides, max_steps=args.max_steps)
    m, p = result.metrics, result.parameters
    print(f"prior written to {out}: {p['total']:,} parameters (token embedding {p['token_embedding']:,}, output layer {p['output_layer']:,})")
    if "bits_per_second" in m:  # audio windows
        print(f"held-out: {m['bits_per_token']:.4f} bits/token, {m['bits_per_second']:.1f} bits/s ({m['tokens_per_second']:g} tokens/s), "
              f"{m['bits_per_window']:.1f} bits/window on {m['windows']} windows of {m['window_tokens']} tokens; "
              f"wall time {result.wall_time_s:.0f}s")
    else:
        print(f"held-out: {m['bits_per_token']:.4f} bits/token, {m['bits_per_image']:.1f} bits/image on {m['images']} images; "
              f"wall time {result.wall_time_s:.0f}s")
    return 0


# ----- simvq sample -----------------------------------------------------------------------------------------
def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prior", required=True, help="a prior folder (the --out of `simvq prior train`)")
    parser.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    parser.add_argument("--class", dest="class_id", type=int, default=None, help="class id for a class-conditional prior")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = none; needs --class)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--grid-scale", type=int, default=2, help="enlarge grid.png by this factor (nearest)")
    parser.add_argument("--out", required=True, help="output folder: sample_000.png ..., grid.png (audio: sample_000.wav ...), "
                        "indices.safetensors, sample.json")
    parser.add_argument("--force", action="store_true", help="replace this command's earlier outputs in --out")


def run_sample(args) -> int:
    from safetensors.torch import save_file

    from simvq.io import save_file_atomic
    from simvq.modalities import modality_of
    from simvq.prior.sample import check_sampling_args, decode, sample, save_image_grid, save_png, image_grid
    from simvq.prior.train import load_prior_with_tokenizer

    if args.cfg_scale != 1.0 and args.class_id is None:
        raise ValueError("--cfg-scale needs --class (guidance mixes the class with 'no class'); add --class or drop --cfg-scale")
    if args.grid_scale < 1:
        raise ValueError(f"--grid-scale must be >= 1, got {args.grid_scale}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1 (samples drawn at once), got {args.batch_size}")
    prior, config, tokenizer, tok_config = load_prior_with_tokenizer(args.prior)
    check_sampling_args(prior, args.n, args.class_id, args.temperature, args.top_k, args.top_p, args.cfg_scale)
    out, _ = prepare_output_dir(args.out, "sample", inputs=[args.prior, config["tokenizer"]["path"]], force=args.force)
    indices = sample(prior, args.n, classes=args.class_id, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     cfg_scale=args.cfg_scale, seed=args.seed, batch_size=args.batch_size)
    modality = modality_of(tok_config)
    decoded = decode(tokenizer, indices, token_grid=modality.token_grid)
    if modality.token_grid:
        for old in out.glob("sample_*.png"):  # a smaller --n must not leave earlier samples behind
            old.unlink()
        for i, image in enumerate(decoded):
            save_png(image_grid(image[None], nrow=1, pad=0), out / f"sample_{i:03d}.png")
        save_image_grid(decoded, out / "grid.png", nrow=8, scale=args.grid_scale)
        written = "grid.png, sample_000.png ..."
    else:  # audio windows: one wav file each, written by the modality
        modality.save_prior_samples(decoded, out, tok_config)
        written = "sample_000.wav ..."
    save_file_atomic(out / "indices.safetensors", lambda tmp: save_file({"indices": indices.contiguous()}, str(tmp)))
    settings = {"prior": str(Path(args.prior).resolve()), "n": args.n, "class": args.class_id, "cfg_scale": args.cfg_scale,
                "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    save_file_atomic(out / "sample.json", json.dumps(settings, indent=2) + "\n")
    print(f"{args.n} samples written to {out} ({written}, indices.safetensors)")
    return 0


# ----- simvq eval-prior -------------------------------------------------------------------------------------
def add_eval_prior_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prior", required=True, help="a prior folder (the --out of `simvq prior train`)")
    parser.add_argument("--samples", type=int, default=None, help="number of generated samples (default: the prior config's eval.samples)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--cfg-scale", type=float, default=None)
    parser.add_argument("--held-out", type=int, default=None, help="bits/token on the first N held-out grids (audio: windows) only (default: all)")
    parser.add_argument("--classifier-dir", default=None, help="cache folder of the proxy classifier (default ~/.cache/simvq/prior-classifiers)")
    parser.add_argument("--out", default=None, help="write the metrics as JSON to this file")
    parser.add_argument("--force", action="store_true", help="replace an earlier eval-prior --out file")


def run_eval_prior(args) -> int:
    from simvq.io import save_file_atomic
    from simvq.prior.metrics import default_cache_dir, evaluate_prior
    from simvq.prior.train import prior_tokenizer_path

    if args.samples is not None and args.samples < 4:
        raise ValueError(f"--samples must be >= 4 (an image prior's precision/recall uses 3 nearest neighbours), got {args.samples}")
    if args.held_out is not None and args.held_out < 1:
        raise ValueError(f"--held-out must be >= 1 (the number of held-out grids to score; leave it out for all), got {args.held_out}")
    # the prior and its tokenizer are inputs: nothing of this command's lands in them (the prior's own token cache aside)
    inputs = [p for p in (args.prior, prior_tokenizer_path(args.prior)) if p is not None]
    classifier_dir = Path(args.classifier_dir).expanduser() if args.classifier_dir else default_cache_dir()
    option = "--classifier-dir" if args.classifier_dir else "the classifier cache (SIMVQ_CACHE_DIR or ~/.cache/simvq)"
    if classifier_dir.exists() and not classifier_dir.is_dir():
        raise NotADirectoryError(f"{option} {classifier_dir} is a file; give a folder (it is created when missing)")
    check_output(classifier_dir, inputs=inputs, kind="any", option=option)  # never inside the prior or its tokenizer
    out = check_output(args.out, inputs=inputs, force=args.force) if args.out else None
    result = evaluate_prior(args.prior, samples=args.samples, seed=args.seed, cfg_scale=args.cfg_scale,
                            classifier_dir=classifier_dir, held_out_limit=args.held_out, progress=True)
    text = json.dumps(result, indent=2)
    if out is not None:
        save_file_atomic(out, text + "\n")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser of the three commands (``python -m simvq.prior.command``); ``simvq`` registers the same."""
    parser = argparse.ArgumentParser(prog="simvq-prior")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, add, run in (("train", add_prior_train_arguments, run_prior_train), ("sample", add_sample_arguments, run_sample),
                           ("eval-prior", add_eval_prior_arguments, run_eval_prior)):
        p = sub.add_parser(name)
        add(p)
        p.set_defaults(run=run)
    return parser


def main(argv=None) -> int:
    import sys

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "add_eval_prior_arguments", "add_prior_train_arguments", "add_sample_arguments", "run_eval_prior", "run_prior_train", "run_sample",
]
