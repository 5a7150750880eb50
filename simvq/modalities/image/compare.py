"""``simvq compare`` for image tokenizers: defaults, ``--data`` handling and the report's sections as data.

Plain data and small functions only: :mod:`simvq.compare` reads them (this module imports nothing above
:mod:`simvq.modalities`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from simvq.modalities.image.data import IMAGE_EXTENSIONS, build_image_datasets, list_images

#: how the report and the CLI help name this modality's items
NOUN = "images"
#: what an unset ``simvq compare`` argument means (quantizers None: every variant)
DEFAULTS = dict(config="compare/default", quantizers=None, codebook_sizes=(1024, 8192), seeds=(0, 1), budget="150",
                usage_items=2048, eval_limit=None, retrofit=True,
                size_limits={"ibq": 1024, "vq_cosine": 1024, "vq_rotation": 1024, "vq_kmeans": 1024})
#: what an unset argument means for a named compare preset (``--config NAME``), over :data:`DEFAULTS`. A
#: preset name only: a YAML path, or your own config with ``base: compare/scaling``, takes :data:`DEFAULTS`.
#: ``compare/scaling``: the codebook-scaling question (REFERENCE.md §2: SimVQ 1,024 .. 262,144 codes) with the
#: families that claim to scale (IBQ, FSQ, LFQ) and the two that collapse (VQ, EMA VQ), sized for 30 minutes on a
#: 2-core CPU: one seed, 300 steps, utilisation over 4,096 held-out images (1,048,576 tokens: 4 per code at
#: K = 262,144, where a perfectly uniform quantizer would show 98.2%; the report gives the Good-Turing coverage),
#: IBQ up to K = 4,096 (its (N, K) softmax costs 2.1 s per step at 16,384 and 10 s at 65,536 on one core); no
#: retrofit experiment (it answers another question). ``compare/scaling-gpu``: the same question without the
#: cuts (every quantizer at every K, two seeds, 3,000 steps of batch 32, usage over all 10,000 held-out images).
PRESET_DEFAULTS = {
    "compare/scaling": dict(quantizers=("simvq", "vq", "ema_vq", "ibq", "fsq", "lfq"),
                            codebook_sizes=(1024, 4096, 16384, 65536, 262144), seeds=(0,), budget="300",
                            usage_items=4096, retrofit=False, size_limits={"ibq": 4096}),
    "compare/scaling-gpu": dict(quantizers=("simvq", "vq", "ema_vq", "ibq", "fsq", "lfq"),
                                codebook_sizes=(1024, 4096, 16384, 65536, 262144), seeds=(0, 1), budget="3000",
                                usage_items=None, retrofit=False, size_limits={}),
    # compare/default's tokenizers (150 steps) plus one prior/compare-cpu prior per run: 20 tokenizers and 20
    # priors, 25.3 min on an idle 2-core CPU with --jobs 2 (measured; docs/generation.md)
    "compare/generation": dict(quantizers=("simvq", "vq", "ema_vq", "fsq", "lfq"), codebook_sizes=(1024, 8192),
                               seeds=(0, 1), retrofit=False, generation=True, prior_config="prior/compare-cpu"),
}
#: --data names of the built-in data sets -> (config data.dataset, natural channels, image size)
BUILTIN_DATA = {
    "photos": ("photos", 3, 32),
    "fashion": ("fashion_mnist", 1, 32),
    "fashion_mnist": ("fashion_mnist", 1, 32),
    "digits": ("digits", 1, 16),
}
#: a new ``data.eval_limit`` changes what is trained (it is part of the run key)
EVAL_LIMIT_REEVALUATES = False
#: build the data sets once before the runs start (a corpus synthesised on first use must not be built by
#: parallel workers at the same time)
BUILD_DATA_FIRST = False
#: without --jobs on a CPU, start every run at once when they fit 3 per core (long, equally long runs)
PACK_JOBS = False

_IDX_TRAIN = r"train-images-idx3-ubyte(\.gz)?"


def holds_files(path: Path, has_suffix) -> bool:
    """Whether folder ``path`` holds images (or Fashion-MNIST IDX files); ``has_suffix(path, suffixes)``
    searches it recursively."""
    if any(re.fullmatch(_IDX_TRAIN, p.name) for p in path.iterdir()):
        return True
    return has_suffix(path, tuple(IMAGE_EXTENSIONS))


def data_changes(data: str, base: dict, preset_is_default: bool) -> dict:
    """``{section: changes}`` that ``--data`` implies for a resolved image config ``base``."""
    change = _data_section(data, base, preset_is_default)
    model = {}
    if preset_is_default and "channels" in change:
        model = {"in_channels": change["channels"], "out_channels": change["channels"]}
    return {"data": change, "model": model}


def _data_section(text: str, base: dict, preset_is_default: bool) -> dict:
    if text in BUILTIN_DATA:
        dataset, channels, size = BUILTIN_DATA[text]
        change = {"dataset": dataset, "path": None, "eval_path": None}
        if preset_is_default or dataset == "fashion_mnist":
            change["image_size"] = size if preset_is_default else max(base["data"]["image_size"], size)
        change["channels"] = channels if preset_is_default else base["model"]["in_channels"]
        return change
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"--data {text!r} is not a built-in data set ({', '.join(BUILTIN_DATA)}) and no such folder exists; "
            "give an existing image folder, a folder of Fashion-MNIST IDX files, or a built-in name"
        )
    if not path.is_dir():
        raise NotADirectoryError(f"--data {text!r} is a file; give a folder of images (JPEG/PNG) or of IDX files")
    names = [p.name for p in path.iterdir()]
    channels = 3 if preset_is_default else base["model"]["in_channels"]
    if any(re.fullmatch(_IDX_TRAIN, n) for n in names):
        if not any(re.fullmatch(r"t10k-images-idx3-ubyte(\.gz)?", n) for n in names):
            raise FileNotFoundError(f"{path} holds train-images-idx3-ubyte but no t10k-images-idx3-ubyte (the held-out split)")
        return {"dataset": "fashion_mnist", "path": str(path), "channels": 1 if preset_is_default else channels,
                "image_size": max(32, base["data"]["image_size"])}
    if not list_images(path):  # raises for an empty folder with the reason
        raise FileNotFoundError(f"no JPEG/PNG images under {path}")
    return {"dataset": "folder", "path": str(path), "eval_path": None, "channels": channels}


def check_data(data: dict) -> None:
    """Image folders were checked by :func:`data_changes`; nothing more to read before training."""


def usage_coverage(config: dict, items: int | None) -> dict:
    """What the usage measurement of a run with this resolved ``config`` reads, found before training.

    Returns ``items`` (held-out images measured: ``items``, or the whole split when None or larger),
    ``split`` (images in the held-out split), ``tokens_per_item`` (tokens of one image: its height and
    width divided by the encoder's down-sampling, ``2 ** (len(ch_mult) - 1)``) and ``tokens``.
    """
    data = dict(config["data"], eval_limit=None)
    _, held_out = build_image_datasets(data, seed=config.get("seed", 0))
    split = len(held_out)
    factor = 2 ** (len(config["model"]["ch_mult"]) - 1)
    height, width = held_out[0].shape[-2:] if split else (0, 0)
    per_item = (int(height) // factor) * (int(width) // factor)
    used = split if items is None else min(int(items), split)
    return {"items": used, "split": split, "tokens_per_item": per_item, "tokens": used * per_item}


def save_reconstructions(model, eval_set, work: Path, count: int = 8) -> dict:
    """The first ``count`` held-out images and their reconstructions, for the side-by-side figure."""
    n = min(count, len(eval_set))
    x = torch.stack([eval_set[i] for i in range(n)])
    with torch.no_grad():
        x_hat, _ = model(x)
    recon = work / "reconstructions.pt"
    torch.save({"original": x, "reconstruction": x_hat.clamp(-1, 1)}, recon)
    return {"reconstructions": str(recon)}


def usage_fields(items: int, samples: int, config: dict) -> dict:
    """What the usage measurement records beyond the counts: the number of images."""
    return {"images": items}


def progress_text(ev: dict) -> str | None:
    """The per-run progress line's quality part (None: not evaluated)."""
    psnr = ev.get("psnr_official_batch64")
    return None if psnr is None else f"PSNR {psnr:.2f} dB"


# ----- the report ------------------------------------------------------------------------------------
#: SimVQ paper, Table (ImageNet-1k 128x128, 50k validation images; REFERENCE.md §2). Published figures, at
#: a scale this CPU comparison does not reach: shown beside ours, never mixed with them.
PUBLISHED_IMAGENET = [
    # method, K, utilisation %, rFID, LPIPS, PSNR, SSIM x100
    ("VQGAN", 65536, 1.4, 3.74, 0.17, 22.20, 70.6),
    ("VQGAN (EMA)", 65536, 4.5, 3.23, 0.15, 22.89, 72.3),
    ("VQGAN-FC (low-dim factorised)", 65536, 100.0, 2.63, 0.13, 23.79, 77.5),
    ("FSQ", 64000, 100.0, 2.80, 0.13, 23.63, 75.8),
    ("LFQ", 65536, 100.0, 2.88, 0.13, 23.60, 77.2),
    ("VQGAN-LC", 65536, 100.0, 2.40, 0.13, 23.98, 77.3),
    ("SimVQ", 1024, 100.0, 3.67, 0.16, 22.34, 70.8),
    ("SimVQ", 8192, 100.0, 2.98, 0.14, 23.23, 74.7),
    ("SimVQ", 65536, 100.0, 2.24, 0.12, 24.15, 78.4),
    ("SimVQ", 262144, 100.0, 1.99, 0.11, 24.68, 80.3),
]

#: the verdict's parameters (see simvq.compare.verdict): quality metrics (key, label, format, higher is
#: better, unit) and the sentence shapes
VERDICT = dict(
    held_out="data",
    perplexity=False,
    one_seed_note=False,
    quality=[("psnr_official_batch64", "PSNR", "2f", True, " dB")],
    pair="{label} {a}{unit} for SimVQ against {b}{unit} for plain VQ ({diff}{unit}{note})",
    pairs_line="K={size}: {parts}.",
    rank="{word} {label} {top} ({value}{unit}), {gap}{unit} ahead of {second}{within_paren}",
    rank_alone="{word} {label} {top} ({value}{unit})",
    rank_level=None,
    rank_min_rows=1,
    rank_line_needs_quality=True,
    collapsed="{label}",
    low_quality=None,
    retrofit=("psnr_official_batch64", "2f", "", " dB"),
)

#: the perceptual column: the first of these that any run has
_PERCEPTUAL = (("rfid", "rFID"), ("lpips_vgg", "LPIPS (VGG)"), ("proxy_fid_random_conv", "proxy FID*"))


def _perceptual(summary: list[dict]):
    return next(((k, label) for k, label in _PERCEPTUAL if any(k in e["metrics"] for e in summary)), None)


def _usage_set(runs: list[dict]) -> str:
    sizes = sorted({(r["usage_eval"]["images"], r["usage_eval"]["tokens"]) for r in runs if r.get("usage_eval")})
    if not sizes:
        return "the evaluation set"
    if len(sizes) == 1:
        return f"{sizes[0][0]:,} held-out images ({sizes[0][1]:,} tokens)"
    return "held-out images (" + ", ".join(f"{n:,}" for n, _ in sizes) + " depending on the run)"


def setup_lines(results: dict) -> list[str]:
    """The report's Setup bullets on model, data, loss and how usage is measured."""
    base = results["base_config"]
    m, d, o, loss = base["model"], base["data"], base["optim"], base["loss"]
    off = [x for x, w in (("no perceptual loss", loss["perceptual_weight"]), ("no GAN", loss["gan_weight"])) if not w]
    lines = [
        f"Model: Open-MAGVIT2-style CNN tokenizer, ch {m['ch']}, ch_mult {m['ch_mult']}, {m['num_res_blocks']} res "
        f"block(s) per level, code dimension {m['z_channels']} (x{2 ** (len(m['ch_mult']) - 1)} down-sampling).",
        f"Data: `{d['dataset']}`{' at ' + str(d['path']) if d.get('path') else ''}, {d['image_size']}x{d['image_size']} "
        f"images, {d['channels']} channel(s), batch {d['batch_size']}; reconstruction metrics on the held-out split"
        f"{' (first ' + str(d['eval_limit']) + ' images)' if d.get('eval_limit') else ''}.",
        f"Loss: L1 x{loss['l1_weight']}"
        + (f" + perceptual x{loss['perceptual_weight']}" if loss["perceptual_weight"] else "")
        + (f" + GAN x{loss['gan_weight']}" if loss["gan_weight"] else "")
        + " + quantizer loss"
        + ("" if not off else f" ({', '.join(off)}: cheaper, and not what the comparison measures)")
        + f"; Adam lr {o['lr']}, betas {o['betas']}; weight EMA {o['ema_decay'] if o['ema_decay'] else 'off'}.",
        f"Utilisation = codes used at least once over {_usage_set(results['runs'])} / K (perplexity and dead codes "
        "over the same set): covering K codes needs many tokens, so this set is larger than the one for the "
        "reconstruction metrics. PSNR (batch-64) is the official convention (MSE averaged over a batch of 64, then "
        "PSNR, averaged over batches); per-image PSNR reads higher.",
    ]
    pq = _perceptual(results["summary"])
    if pq and pq[0] == "proxy_fid_random_conv":
        lines.append("*proxy FID: Frechet distance of features of a fixed random conv net (no Inception weights "
                     "on this machine); comparable between our runs only, not an rFID.")
    return lines


def columns(results: dict) -> list[tuple]:
    """The results table's quality columns: (header, summary key, format, how: "stat" or "kilo")."""
    cols = [("PSNR dB", "psnr_official_batch64", "2f", "stat"), ("SSIM x100", "ssim_x100", "1f", "stat")]
    pq = _perceptual(results["summary"])
    if pq:
        cols.append((pq[1], pq[0], "3f", "stat"))
    return cols


def figures(results: dict) -> list[tuple[str, str]]:
    """(figure name, caption) in report order."""
    return [
        ("utilization_over_steps", "Codebook utilisation over training (per logging window of training tokens)"),
        ("codebook_scaling", "Codebook-size scaling: held-out utilisation (dashed: what uniform use of all K codes would "
                             "show on the tokens counted), perplexity and reconstruction quality against K (error bars: "
                             "std over seeds)"),
        ("step_time", "Cost against K: training seconds per step and peak memory per run (runs side by side share "
                      "the CPU: compare within one report only)"),
        ("code_usage", "Sorted code-usage histograms on the held-out set (largest K, first seed)"),
        ("reconstructions", "Reconstructions side by side (largest K, first seed; top row: originals)"),
        ("loss_curves", "Training losses"),
        ("retrofit", "Retrofit experiment"),
    ]


def published(results: dict) -> dict:
    """The published-figures section: heading, paragraph, table header and rows."""
    return dict(
        heading="Published figures (SimVQ paper, ImageNet-1k 128x128; another scale)",
        paragraph="These are the paper's numbers for full-size models trained 50 epochs on ImageNet with perceptual "
                  "and GAN losses. They are not comparable in absolute value with the small CPU runs above. At that "
                  "scale plain VQ uses 1.4% of 65,536 codes and SimVQ all of them at every size.",
        header=["method", "K", "utilisation %", "rFID", "LPIPS", "PSNR", "SSIM x100"],
        rows=[[str(r[0]), f"{r[1]:,}", f"{r[2]:g}", f"{r[3]:.2f}", f"{r[4]:.2f}", f"{r[5]:.2f}", f"{r[6]:.1f}"]
              for r in PUBLISHED_IMAGENET],
    )


def published_json() -> dict:
    """The published table as results.json stores it."""
    keys = ("method", "codebook_size", "utilization_pct", "rfid", "lpips", "psnr", "ssim_x100")
    return {"published_imagenet": [dict(zip(keys, row)) for row in PUBLISHED_IMAGENET]}


#: everything else the one renderer (simvq.compare.report) needs
REPORT = dict(
    title="simvq compare: does SimVQ fix codebook collapse, and at what cost?",
    load_average=False,
    spread="Figures are mean ± sample standard deviation over seeds. A difference smaller than the sum of both "
           "spreads is reported as within the seed spread.",
    timing=False,
    steps_per_s_format="1f",
    after_table=[],
    retrofit_columns=[("PSNR dB", "psnr_official_batch64", "2f"), ("SSIM x100", "ssim_x100", "1f")],
    retrofit_keys=("utilization", "perplexity", "dead_codes", "psnr_official_batch64", "ssim_x100"),
    spec_fields=(),
    setup_lines=setup_lines,
    columns=columns,
    figures=figures,
    published=published,
    published_json=published_json,
)

#: the figures (simvq.compare.plots): which to draw, the scaling panels (key, scale, axis label), the
#: retrofit figure's quality axis, and the fewest codebook sizes that make a scaling figure
PLOTS = dict(
    figures=("utilization_over_steps", "codebook_scaling", "step_time", "code_usage", "reconstructions", "loss_curves", "retrofit"),
    scaling_panels=[("utilization", 100.0, "held-out utilisation (%)", ("ceiling",)),
                    ("perplexity", 1.0, "held-out perplexity of code use", ("log",)),
                    ("psnr_official_batch64", 1.0, "held-out PSNR (dB, batch-64)"),
                    ("ssim_x100", 1.0, "held-out SSIM x100"),
                    ("proxy_fid_random_conv", 1.0, "proxy FID (random-conv features; not rFID)"),
                    ("rfid", 1.0, "rFID (Inception)")],
    scaling_min_sizes=1,
    retrofit_quality=("psnr_official_batch64", "PSNR (dB, batch-64)"),
)

__all__ = ["BUILD_DATA_FIRST", "BUILTIN_DATA", "PACK_JOBS", "DEFAULTS", "PRESET_DEFAULTS", "EVAL_LIMIT_REEVALUATES", "NOUN", "PLOTS", "PUBLISHED_IMAGENET", "REPORT", "VERDICT", "check_data", "data_changes",
           "holds_files", "progress_text", "save_reconstructions", "usage_coverage", "usage_fields"]
