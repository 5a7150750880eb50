"""``simvq compare`` for audio tokenizers: defaults, ``--data`` handling and the report's sections as data.

Plain data and small functions only: :mod:`simvq.compare` reads them (this module imports nothing above
:mod:`simvq.modalities`).
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import torch

from simvq.modalities.audio.data import AUDIO_EXTENSIONS, audio_file_splits

log = logging.getLogger("simvq.compare")

#: how the report and the CLI help name this modality's items
NOUN = "audio"
#: what an unset argument means: K = 4096 (the paper's smallest audio codebook), one seed and five quantizers,
#: sized so the default audio compare finishes in about a quarter of an hour on a 2-core CPU (docs/compare.md);
#: utilisation over every held-out utterance; quality on 30 (DNSMOS and CREPE are slow on a CPU)
DEFAULTS = dict(config="compare/audio", quantizers=("simvq", "vq", "ema_vq", "fsq", "lfq"), codebook_sizes=(4096,),
                seeds=(0,), budget="300", usage_items=None, eval_limit=30, retrofit=False)
#: --data names of the built-in audio data sets -> config data.dataset (the espeak-ng corpus of
#: simvq.modalities.audio.speech, built on first use in ~/.cache/simvq)
BUILTIN_DATA = {"speech": "speech"}
#: what is scored does not change what is trained: a new --eval-limit re-evaluates finished runs instead of
#: training them again (``data.eval_limit`` is left out of the run key)
EVAL_LIMIT_REEVALUATES = True
#: build the data sets once before the runs start (a corpus synthesised on first use must not be built by
#: parallel workers at the same time)
BUILD_DATA_FIRST = True
#: without --jobs on a CPU, start every run at once when they fit 3 per core (long, equally long runs)
PACK_JOBS = True


def holds_files(path: Path, has_suffix) -> bool:
    """Whether folder ``path`` holds wav/flac files (``has_suffix(path, suffixes)`` searches recursively)."""
    return has_suffix(path, tuple(AUDIO_EXTENSIONS))


def data_changes(data: str, base: dict, preset_is_default: bool) -> dict:
    """``--data`` of an audio comparison: ``speech`` (the built-in corpus) or a folder of wav/flac files.

    A folder's held-out split is ``data.eval_fraction`` of its files (every n-th in sorted order) unless the
    config names an evaluation folder (``data.eval_path``).
    """
    text = str(data)
    if text in BUILTIN_DATA:
        return {"data": {"dataset": BUILTIN_DATA[text], "path": None, "eval_path": None}}
    path = Path(text).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"--data {text!r}: no such folder of wav/flac files (or built-in audio data set: "
                                f"{', '.join(BUILTIN_DATA)})")
    return {"data": {"dataset": "folder", "path": str(path)}}


def check_data(data: dict) -> None:
    """A folder's train/held-out split exists (checked before training; scanning reads only file headers)."""
    if data.get("dataset") != "folder":
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bad files are skipped (and reported again when the runs read the folder)
        try:
            train, evals = audio_file_splits(data)
        except ValueError as err:
            raise ValueError(f"{err}; a folder needs at least two readable wav/flac files (one is held out), or set "
                             "data.eval_path to a separate evaluation folder") from None
    log.info("audio folder %s: %d training and %d held-out files", data.get("path"), len(train), len(evals))


def save_reconstructions(model, eval_set, work: Path, count: int = 3, max_seconds: float = 6.0) -> dict:
    """Three held-out utterances (first, middle, last; at most 6 s each) and their reconstructions."""
    n = len(eval_set)
    picks = sorted({round(i * (n - 1) / max(count - 1, 1)) for i in range(min(count, n))})
    limit = int(max_seconds * model.sample_rate)
    originals, recons = [], []
    with torch.no_grad():
        for i in picks:
            x = eval_set[i][..., :limit]
            x_hat, _ = model(x[None])
            originals.append(x[0])
            recons.append(x_hat[0, 0, : x.shape[-1]].clamp(-1, 1))
    recon = work / "reconstructions.pt"
    torch.save({"original": originals, "reconstruction": recons, "indices": picks,
                "sample_rate": int(model.sample_rate)}, recon)
    return {"reconstructions": str(recon)}


def usage_fields(items: int, samples: int, config: dict) -> dict:
    """What the usage measurement records beyond the counts: seconds of audio."""
    return {"seconds": samples / float(config["model"]["sample_rate"])}


def progress_text(ev: dict) -> str | None:
    """The per-run progress line's quality part (None: not evaluated)."""
    if "pesq" not in ev:
        return None
    return (f"PESQ {ev['pesq']:.2f}, STOI {ev.get('stoi', float('nan')):.3f}, "
            f"mel distance {ev.get('mel_distance', float('nan')):.3f}")


# ----- the report ------------------------------------------------------------------------------------
#: SimVQ paper, audio table (LibriTTS test-clean / test-other, 24 kHz; REFERENCE.md §3). Published figures of
#: full-size models trained on LibriTTS with GAN losses: shown beside ours, never mixed with them.
PUBLISHED_LIBRITTS = [
    # method, kbps, utilisation % (clean, other), UTMOS, PESQ, STOI, V/UV F1 (each: test-clean, test-other)
    ("Encodec", 3.0, None, (2.31, 2.09), (2.05, 2.05), (0.90, 0.88), (0.92, 0.89)),
    ("Vocos", 3.0, None, (3.53, 3.06), (2.40, 2.19), (0.92, 0.90), (0.94, 0.91)),
    ("WavTokenizer", 0.9, (100.0, 100.0), (3.74, 3.43), (2.01, 2.26), (0.89, 0.89), (0.92, 0.92)),
    ("SimVQ K=4096", 0.9, (100.0, 100.0), (4.00, 3.51), (2.33, 2.08), (0.91, 0.88), (0.94, 0.91)),
    ("SimVQ K=8192", 0.975, (99.4, 99.4), (4.03, 3.52), (2.42, 2.15), (0.92, 0.88), (0.94, 0.92)),
    ("SimVQ K=65,536", 1.2, (99.4, 99.0), (4.03, 3.52), (2.54, 2.26), (0.93, 0.90), (0.94, 0.92)),
    ("SimVQ K=262,144", 1.35, (95.6, 94.7), (4.03, 3.53), (2.61, 2.31), (0.93, 0.90), (0.95, 0.93)),
]

#: PESQ (wide-band) runs from 1.0 (its floor) to 4.64; below this every reconstruction is poor
PESQ_LOW = 1.5

#: the verdict's parameters (see simvq.compare.verdict)
VERDICT = dict(
    held_out="speech",
    perplexity=True,
    one_seed_note=True,
    quality=[("pesq", "PESQ", "2f", True, ""), ("stoi", "STOI", "3f", True, ""),
             ("mel_distance", "mel distance", "3f", False, ""), ("dnsmos_ovrl", "DNSMOS OVRL", "2f", True, ""),
             ("vuv_f1", "V/UV F1", "3f", True, "")],
    pair="{label} {a} against {b} ({diff}{better}{note})",
    pairs_line="K={size}: SimVQ against plain VQ: {parts}.",
    rank="{word} {label} {top} ({value}, {gap} ahead of {second}{within})",
    rank_alone=None,
    rank_level="{word} {label} {top} ({value}, level with {second} at this precision)",
    rank_min_rows=2,
    rank_line_needs_quality=False,
    collapsed="{label} ({util}%)",
    low_quality=("pesq", PESQ_LOW,
                 "Every run's PESQ is below {limit} (highest {highest:.2f}; the scale starts at 1.0): at this budget "
                 "all reconstructions are coarse, and differences of a few hundredths in PESQ, STOI or DNSMOS are not "
                 "a ranking of the quantizers' quality."),
    retrofit=("mel_distance", "3f", "mel distance ", ""),
)


def _n(count, noun: str) -> str:
    return f"{count} {noun}" + ("" if str(count) == "1" else "s")


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _usage_set(runs: list[dict]) -> str:
    sets = sorted({(r["usage_eval"].get("items"), round(r["usage_eval"].get("seconds") or 0.0, 1), r["usage_eval"]["tokens"])
                   for r in runs if r.get("usage_eval")})
    if not sets:
        return "the held-out set"
    if len(sets) == 1:
        n, sec, tok = sets[0]
        return f"{_n(f'{n:,}', 'held-out utterance')} ({_duration(sec)} of audio, {tok:,} tokens)"
    return "held-out utterances (" + ", ".join(f"{n:,}" for n, _, _ in sets) + " depending on the run)"


def _quality_set(runs: list[dict]) -> str:
    sets = sorted({(r["eval"].get("items"), round(float(r["eval"].get("seconds") or 0.0), 1)) for r in runs if r.get("eval")})
    if not sets:
        return "the held-out utterances"
    if len(sets) == 1:
        n, sec = sets[0]
        return f"the first {_n(f'{n:,}', 'held-out utterance')} ({_duration(sec)})"
    return "the first held-out utterances (" + ", ".join(f"{n:,}" for n, _ in sets) + " depending on the run)"


def _data_text(d: dict) -> str:
    if d["dataset"] == "speech":
        where = f" at {d['path']}" if d.get("path") else ""
        text = (f"`speech`: the built-in espeak-ng corpus{where} (synthetic English speech, "
                f"{_n(d['corpus_sentences'], 'sentence')} x {_n(d['corpus_voices_per_sentence'], 'voice')}; held-out "
                "sentences are never heard in training)")
    else:
        held = (f"evaluation folder {d['eval_path']}" if d.get("eval_path") else
                f"every n-th file held out (data.eval_fraction {d['eval_fraction'] if d['eval_fraction'] is not None else 0.1:g})")
        text = f"`{d['dataset']}` at {d.get('path')} ({held})"
    if d.get("eval_dataset"):
        text += f"; evaluated on `{d['eval_dataset']}`"
    return text


def _crepe(runs: list[dict]) -> list[str]:
    return sorted({r["eval"].get("vuv_model") for r in runs if r.get("eval", {}).get("vuv_model")})


def _has_utmos(results: dict) -> bool:
    return any("utmos" in e["metrics"] for e in results["summary"])


def setup_lines(results: dict) -> list[str]:
    """The report's Setup bullets on model, data, loss and how usage and quality are measured."""
    base, runs = results["base_config"], results["runs"]
    m, d, o, loss = base["model"], base["data"], base["optim"], base["loss"]
    hop = math.prod(m["ratios"])
    gan = loss["gan_weight"] or loss["feature_matching_weight"]
    crepe = _crepe(runs)
    lines = [
        f"Model: audio tokenizer `{m['preset']}` at {m['sample_rate']} Hz: causal SEANet encoder ({m['n_filters']} "
        f"filters, strides {list(reversed(m['ratios']))}: hop {hop} = {m['sample_rate'] / hop:g} tokens/s, "
        f"{m['lstm_layers']}-layer LSTM), {m['dimension']}-d tokens, Vocos decoder ({_n(m['backbone_layers'], 'ConvNeXt block')} "
        f"of width {m['backbone_dim']}, inverse-STFT head n_fft {m['n_fft']})"
        + (f"; encoder initialised N(0, gain²/fan_in) with gain {m['encoder_init_gain']:g}" if m.get("encoder_init_gain") else "")
        + ".",
        f"Data: {_data_text(d)}; training on random {d['segment_seconds']:g} s crops, batch {d['batch_size']}.",
        f"Loss: {loss['mel_weight']:g} x log-mel L1 + {loss['quantizer_weight']:g} x quantizer loss"
        + (f" + MPD/MRD GAN (weight {loss['gan_weight']:g}) with feature matching" if gan else
           " (GAN terms off for every quantizer alike: the discriminators triple a CPU step)")
        + f"; Adam lr {o['lr']:g}, betas {o['betas']}, warm-up {o['warmup_steps']} steps, gradient clipping "
        f"{o['grad_clip'] if o['grad_clip'] else 'off'}; weight EMA {o['ema_decay'] if o['ema_decay'] else 'off'} "
        "(evaluation uses the EMA weights).",
        f"Utilisation = codes used at least once over {_usage_set(runs)} / K (perplexity and dead codes over the "
        "same tokens): covering K codes needs many tokens, so this set is larger than the one for the quality metrics.",
        f"Quality over {_quality_set(runs)}, each reconstructed whole and passed through 16-bit PCM "
        "(`simvq.evaluation.evaluate`): PESQ wide-band at 16 kHz (1.0-4.64), STOI (0-1), DNSMOS P.835 OVRL (1-5; the "
        "`speechmos` ONNX models), V/UV F1 of CREPE voicing (threshold 0.21"
        + (f"; model {', '.join(crepe)}" if crepe else "")
        + "), mel distance (mean L1 of natural-log mel spectrograms; lower is better). Bitrate = tokens/s x log2 K.",
    ]
    if crepe and all(c.endswith("tiny") for c in crepe):
        lines.append("V/UV F1 uses CREPE `tiny` on a CPU (the paper's is `full`, ~50x slower here; set "
                     "SIMVQ_CREPE_MODEL=full to use it): comparable between our runs, not with the paper's numbers.")
    unavailable: dict = {}
    for r in runs:
        unavailable.update(r.get("eval_unavailable") or {})
    for name, reason in sorted(unavailable.items()):
        lines.append(f"Not computed: {name}: {reason.rstrip('.')}.")
    return lines


def columns(results: dict) -> list[tuple]:
    """The results table's quality columns: (header, summary key, format, how: "stat" or "kilo")."""
    crepe = _crepe(results["runs"])
    cols = [("PESQ", "pesq", "2f", "stat"), ("STOI", "stoi", "3f", "stat"), ("DNSMOS OVRL", "dnsmos_ovrl", "2f", "stat"),
            ("V/UV F1" + (f" ({', '.join(crepe)})" if crepe else ""), "vuv_f1", "3f", "stat"),
            ("mel distance", "mel_distance", "3f", "stat")]
    if _has_utmos(results):
        cols.append(("UTMOS", "utmos", "2f", "stat"))
    return cols + [("kbps", "bitrate_bps", "3f", "kilo")]


def figures(results: dict) -> list[tuple[str, str]]:
    """(figure name, caption) in report order."""
    base = results["base_config"]
    m, d = base["model"], base["data"]
    hop = math.prod(m["ratios"])
    sizes = sorted({e["requested_size"] for e in results["summary"]})
    window = base["trainer"]["log_every"] * d["batch_size"] * math.ceil(round(d["segment_seconds"] * m["sample_rate"]) / hop)
    visible = ", ".join(f"{min(1.0, window / k) * 100:.0f}% of K = {k}" for k in sizes)
    return [
        ("utilization_over_steps", "Codebook utilisation over training: codes used per logging window of "
                                   f"{base['trainer']['log_every']} steps ({window:,} training tokens, so at most "
                                   f"{visible} can show)"),
        ("quality", "Held-out utilisation and quality per quantizer (largest K; error bars: std over seeds)"),
        ("code_usage", "Sorted code-usage histograms on the held-out set (largest K, first seed)"),
        ("spectrograms", "Log-mel spectrograms of held-out utterances: original and each quantizer's reconstruction "
                         "(largest K, first seed)"),
        ("loss_curves", "Training losses"),
        ("codebook_scaling", "Codebook-size scaling: held-out utilisation, PESQ and mel distance against K"),
        ("retrofit", "Retrofit experiment"),
    ]


def _pair(v) -> str:
    return "-" if v is None else f"{v[0]:g} / {v[1]:g}"


def published(results: dict) -> dict:
    """The published-figures section: heading, paragraph, table header and rows."""
    return dict(
        heading="Published figures (SimVQ paper, LibriTTS at 24 kHz; another scale, not ours)",
        paragraph="The paper's audio table (LibriTTS test-clean / test-other): 24 kHz models with 512-d tokens and a "
                  "768-wide Vocos decoder, trained with MPD/MRD(/DAC) GAN losses on LibriTTS and evaluated on real "
                  "recorded speech. They are not comparable in absolute value with the small CPU runs above"
                  + (" (no UTMOS here: its weights are not available offline; DNSMOS is a different MOS predictor)"
                     if not _has_utmos(results) else "")
                  + ". At that scale SimVQ uses 95-100% of its codes at every size.",
        header=["method", "kbps", "utilisation % (clean / other)", "UTMOS", "PESQ", "STOI", "V/UV F1"],
        rows=[[r[0], f"{r[1]:g}", _pair(r[2]), _pair(r[3]), _pair(r[4]), _pair(r[5]), _pair(r[6])]
              for r in PUBLISHED_LIBRITTS],
    )


def published_json() -> dict:
    """The published table as results.json stores it."""
    keys = ("method", "kbps", "utilization_pct", "utmos", "pesq", "stoi", "vuv_f1")
    return {"published_libritts": {
        "note": "SimVQ paper, LibriTTS test-clean / test-other, 24 kHz models (REFERENCE.md §3); published, not ours",
        "rows": [dict(zip(keys, (row[0], row[1], *(None if v is None else {"test_clean": v[0], "test_other": v[1]}
                                                    for v in row[2:])))) for row in PUBLISHED_LIBRITTS],
    }}


#: everything else the one renderer (simvq.compare.report) needs
REPORT = dict(
    title="simvq compare (audio): does SimVQ fix codebook collapse on speech, and at what cost?",
    load_average=True,
    spread="Figures are mean ± sample standard deviation over seeds; with one seed a single value. A difference "
           "smaller than the sum of both spreads is reported as within the seed spread.",
    timing=True,
    steps_per_s_format="2f",
    after_table=["More per run in `results.json` (DNSMOS SIG/BAK/P.808, periodicity and pitch errors, wall times, "
                 "peak memory, training histories).", ""],
    retrofit_columns=[("PESQ", "pesq", "2f"), ("STOI", "stoi", "3f"), ("mel distance", "mel_distance", "3f")],
    retrofit_keys=("utilization", "perplexity", "dead_codes", "pesq", "stoi", "mel_distance", "dnsmos_ovrl", "vuv_f1"),
    spec_fields=("modality", "usage_items", "retrofit"),
    setup_lines=setup_lines,
    columns=columns,
    figures=figures,
    published=published,
    published_json=published_json,
)

#: the figures (simvq.compare.plots); one K: the quality bars say what a scaling figure would
PLOTS = dict(
    figures=("utilization_over_steps", "quality", "code_usage", "spectrograms", "loss_curves", "codebook_scaling",
             "retrofit"),
    scaling_panels=[("utilization", 100.0, "held-out utilisation (%)", ("ceiling",)), ("pesq", 1.0, "held-out PESQ (wide-band)"),
                    ("mel_distance", 1.0, "held-out mel distance (lower is better)")],
    scaling_min_sizes=2,
    retrofit_quality=("mel_distance", "mel distance (lower is better)"),
)

__all__ = ["BUILD_DATA_FIRST", "BUILTIN_DATA", "PACK_JOBS", "DEFAULTS", "EVAL_LIMIT_REEVALUATES", "NOUN", "PESQ_LOW", "PLOTS", "PUBLISHED_LIBRITTS",
           "REPORT", "VERDICT", "check_data", "data_changes", "holds_files", "progress_text", "save_reconstructions",
           "usage_fields"]
