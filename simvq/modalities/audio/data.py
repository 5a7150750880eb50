"""Audio data: folders of wav/flac files (LibriTTS layout or any nesting), the built-in speech corpus, and
real human speech from Debian's pocketsphinx-testdata.

Files are read with soundfile, mixed down to mono and resampled to the model's rate with
``scipy.signal.resample_poly`` (polyphase, exact rational ratio). Training items are ``(index, seed)`` pairs
(see :mod:`simvq.data`): a random crop of ``segment_seconds`` whose position depends only on the seed;
clips shorter than the crop are repeated end to end. Evaluation items are whole utterances ``(1, T)``.

Unreadable or empty files: reading one raises a ValueError naming the file; a folder scan skips them,
counts them and reports them (a warning naming the first few), so one bad file does not stop a run.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from simvq.io import save_file_atomic
from simvq.modalities.audio.signal import resample
from simvq.modalities.audio.speech import CORPUS_EVAL_FRACTION, CORPUS_SENTENCES, CORPUS_VOICES_PER_SENTENCE

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac")
POCKETSPHINX_DIR = Path("/usr/share/pocketsphinx/test/data")


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


def read_audio(path: str | Path, *, sample_rate: int) -> np.ndarray:
    """Mono float32 waveform of an audio file at ``sample_rate``, shape ``(T,)``, values in [-1, 1].

    Raises FileNotFoundError when the file does not exist and ValueError when it cannot be decoded, holds no
    samples, or is not finite.
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises LibsndfileError / RuntimeError / TypeError by format
        raise ValueError(f"cannot read audio file {path}: {err}; is it a valid wav/flac file?") from None
    if data.shape[0] == 0:
        raise ValueError(f"audio file {path} is empty (0 samples); remove it or replace it with a real recording")
    bad = ~np.isfinite(data)
    if bad.any():
        frame, channel = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"audio file {path} holds {int(bad.sum())} NaN/Inf sample(s), the first at sample {frame} "
            f"(channel {channel}); repair or remove that file"
        )
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return resample(wave, rate, sample_rate)


def check_audio_file(path: str | Path) -> str | None:
    """None if ``path`` opens as audio with at least one sample, else the reason it does not."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception as err:
        return f"unreadable ({err})".replace("\n", " ")
    if info.frames <= 0:
        return "empty (0 samples)"
    return None


def scan_audio_folder(root: str | Path, *, verify: bool = True) -> tuple[list[Path], list[tuple[Path, str]]]:
    """All wav/flac files under ``root`` (recursively, sorted) and the ``(path, reason)`` pairs skipped.

    With ``verify`` every file's header is opened; unreadable and empty files are skipped and reported by a
    warning naming the count and the first few files.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"audio folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    skipped: list[tuple[Path, str]] = []
    if verify:
        good = []
        for p in files:
            reason = check_audio_file(p)
            if reason is None:
                good.append(p)
            else:
                skipped.append((p, reason))
        files = good
    if skipped:
        shown = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
        warnings.warn(f"skipped {len(skipped)} bad audio file(s) under {root} (e.g. {shown})", stacklevel=2)
    return files, skipped


def pocketsphinx_clips(root: str | Path = POCKETSPHINX_DIR) -> list[Path]:
    """The real human speech clips of Debian's pocketsphinx-testdata (16 kHz wav), sorted.

    Raises FileNotFoundError naming the package when it is not installed.
    """
    root = Path(root)
    files = sorted(root.rglob("*.wav")) if root.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"no pocketsphinx test recordings under {root}; install them with `apt-get install pocketsphinx-testdata`"
        )
    return files


# ----------------------------------------------------------------------------------------------------------
# Data sets
# ----------------------------------------------------------------------------------------------------------


def random_crop(wave: np.ndarray, length: int, seed: int) -> np.ndarray:
    """A ``length``-sample crop at a position drawn from ``seed``; shorter clips are repeated to fill it."""
    if wave.shape[0] < length:
        wave = np.tile(wave, math.ceil(length / wave.shape[0]))
    start = int(np.random.default_rng(seed).integers(0, wave.shape[0] - length + 1))
    return wave[start : start + length]


class AudioTrainSet(Dataset):
    """Random crops for training; items are ``(index, seed)`` -> ``(1, segment_samples)`` float32 tensor."""

    def __init__(self, files: list[Path], *, sample_rate: int, segment_seconds: float = 1.0, segment_samples: int | None = None) -> None:
        if not files:
            raise ValueError("the audio training set has no files")
        if not segment_seconds > 0:
            raise ValueError(f"segment_seconds must be > 0, got {segment_seconds}")
        if segment_samples is not None and (isinstance(segment_samples, bool) or int(segment_samples) < 1):
            raise ValueError(f"segment_samples must be a positive integer, got {segment_samples!r}")
        self.files = list(files)
        self.sample_rate = int(sample_rate)
        # ``segment_samples`` (exact, e.g. a whole number of tokens) replaces ``segment_seconds`` when given
        self.segment = int(segment_samples) if segment_samples is not None else int(round(segment_seconds * sample_rate))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item) -> torch.Tensor:
        index, seed = item if isinstance(item, tuple) else (item, item)
        wave = read_audio(self.files[index], sample_rate=self.sample_rate)
        return torch.from_numpy(np.ascontiguousarray(random_crop(wave, self.segment, seed)))[None]


class AudioEvalSet(Dataset):
    """Whole utterances for evaluation; item ``i`` -> ``(1, T_i)`` float32 tensor.

    ``max_seconds`` crops each utterance to its first ``max_seconds`` (None: whole). ``collate`` batches
    utterances of different lengths by cropping them to the shortest (used for sample plots only; metrics
    run one utterance at a time).
    """

    def __init__(self, files: list[Path], *, sample_rate: int, max_seconds: float | None = None) -> None:
        if not files:
            raise ValueError("the audio evaluation set has no files")
        self.files = list(files)
        self.sample_rate = int(sample_rate)
        self.max_samples = None if max_seconds is None else int(round(max_seconds * sample_rate))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        wave = read_audio(self.files[index], sample_rate=self.sample_rate)
        if self.max_samples is not None:
            wave = wave[: self.max_samples]
        return torch.from_numpy(np.ascontiguousarray(wave))[None]

    @staticmethod
    def collate(items: list[torch.Tensor]) -> torch.Tensor:
        length = min(x.shape[-1] for x in items)
        return torch.stack([x[..., :length] for x in items])


# ----------------------------------------------------------------------------------------------------------
# Config section and builder
# ----------------------------------------------------------------------------------------------------------

AUDIO_DATASETS = ("speech", "folder")
FOLDER_EVAL_FRACTION = 0.1
EVAL_DATASETS = (None, "pocketsphinx")


def default_corpus_dir(
    sample_rate: int,
    sentences: int = CORPUS_SENTENCES,
    voices: int = CORPUS_VOICES_PER_SENTENCE,
    eval_fraction: float = CORPUS_EVAL_FRACTION,
) -> Path:
    """Where the built-in corpus with these parameters is cached (one folder per parameter set)."""
    return Path("~/.cache/simvq").expanduser() / f"speech-{sample_rate}hz-{sentences}s-{voices}v-{eval_fraction:g}e"


def _every_nth_split(files: list[Path], fraction: float) -> tuple[list[Path], list[Path]]:
    if not 0 < fraction < 1:
        raise ValueError(f"data.eval_fraction must lie in (0, 1), got {fraction}")
    step = max(2, round(1 / fraction))
    evals = files[::step]
    held = set(evals)
    return [f for f in files if f not in held], evals


def audio_file_splits(data_cfg: dict) -> tuple[list[Path], list[Path]]:
    """``(train_files, eval_files)`` for an ``AudioDataConfig`` dict (sample_rate filled)."""
    d = data_cfg
    rate = d.get("sample_rate")
    if not rate:
        raise ValueError("data.sample_rate is not set; it is filled from model.sample_rate by the config")
    dataset = d.get("dataset", "speech")
    if dataset == "speech":
        from simvq.modalities.audio.speech import ensure_speech_corpus, read_manifest

        sentences = d.get("corpus_sentences", CORPUS_SENTENCES)
        voices = d.get("corpus_voices_per_sentence", CORPUS_VOICES_PER_SENTENCE)
        fraction = d.get("eval_fraction")
        fraction = CORPUS_EVAL_FRACTION if fraction is None else fraction
        root = Path(d["path"]).expanduser() if d.get("path") else default_corpus_dir(rate, sentences, voices, fraction)
        ensure_speech_corpus(root, sample_rate=rate, num_sentences=sentences, voices_per_sentence=voices, eval_fraction=fraction)
        rows = read_manifest(root)
        train = [root / r["path"] for r in rows if r["split"] == "train"]
        evals = [root / r["path"] for r in rows if r["split"] == "eval"]
    elif dataset == "folder":
        if not d.get("path"):
            raise ValueError("data.dataset 'folder' needs data.path (a folder of wav/flac files)")
        files, _ = scan_audio_folder(d["path"])
        if d.get("eval_path"):
            train = files
            evals, _ = scan_audio_folder(d["eval_path"])
        else:
            fraction = d.get("eval_fraction")
            train, evals = _every_nth_split(files, FOLDER_EVAL_FRACTION if fraction is None else fraction)
    else:
        raise ValueError(f"data.dataset must be one of {AUDIO_DATASETS}, got {dataset!r}")
    if d.get("eval_dataset") == "pocketsphinx":
        evals = pocketsphinx_clips()
    elif d.get("eval_dataset") not in EVAL_DATASETS:
        raise ValueError(f"data.eval_dataset must be null or 'pocketsphinx', got {d.get('eval_dataset')!r}")
    if d.get("train_limit"):
        train = train[: d["train_limit"]]
    if d.get("eval_limit"):
        evals = evals[: d["eval_limit"]]
    if not train:
        raise ValueError(f"no training audio found for data.dataset={dataset!r} (path={d.get('path')!r})")
    if not evals:
        raise ValueError(f"no evaluation audio found for data.dataset={dataset!r}; set data.eval_path or eval_fraction")
    return train, evals


def build_audio_datasets(data_cfg: dict, *, seed: int = 0) -> tuple[AudioTrainSet, AudioEvalSet]:
    """``(train, eval)`` data sets of an audio config's ``data`` section (``seed`` is unused: crops are
    drawn from the per-sample seeds of the loader)."""
    train, evals = audio_file_splits(data_cfg)
    rate = int(data_cfg["sample_rate"])
    return (
        AudioTrainSet(train, sample_rate=rate, segment_seconds=data_cfg.get("segment_seconds", 1.0)),
        AudioEvalSet(evals, sample_rate=rate, max_seconds=data_cfg.get("eval_max_seconds")),
    )


# ----------------------------------------------------------------------------------------------------------
# Encoding audio files to token files and back (used by `simvq encode` / `simvq decode`)
# ----------------------------------------------------------------------------------------------------------


def encode_audio_files(tok, config: dict, files: list[Path], out: str | Path, *, device=None) -> Path:
    """Encode wav/flac ``files`` with an audio :class:`simvq.Tokenizer` ``tok`` into a token file (one
    ``(T',)`` sequence each; ``tok.encode`` reads and resamples each file).

    The token file records every input's length in samples at the model's rate so that decoding returns
    audio of the original length.
    """
    from simvq.tokens import config_hash, save_tokens

    tokens, names, lengths = [], [], []
    for f in files:
        wave = read_audio(f, sample_rate=tok.sample_rate)
        tokens.append(tok.encode(torch.from_numpy(wave))[0].cpu())
        names.append(Path(f).name)
        lengths.append(int(wave.shape[0]))
    return save_tokens(
        out, tokens, names=names, modality="audio", codebook_size=tok.codebook_size,
        config_hash=config_hash(config),
        extra={"sample_rate": int(tok.sample_rate), "hop_length": int(tok.hop_length), "lengths": lengths},
    )


def decode_audio_tokens(tok, token_file, out: str | Path, *, device=None, overwrite: bool = False) -> list[Path]:
    """Decode a token file into 16-bit PCM wav files at the model's rate with an audio :class:`simvq.Tokenizer`.

    ``out`` is a ``.wav`` path when the file holds one item, otherwise a folder (one ``<name>.wav`` per item).
    Existing files are not replaced unless ``overwrite``.
    """
    out = Path(out)
    n = len(token_file.tokens)
    if out.suffix.lower() == ".wav":
        if n != 1:
            raise ValueError(f"the token file holds {n} items; give a folder as --out to decode them all")
        targets = [out]
    else:
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out} exists and is not a folder")
        stems, targets = set(), []
        for i, name in enumerate(token_file.names):
            stem = Path(name).stem or f"audio_{i}"
            stem = stem if stem not in stems else f"{stem}_{i}"
            stems.add(stem)
            targets.append(out / f"{stem}.wav")
    for t in targets:
        if t.exists() and not overwrite:
            raise ValueError(f"{t} exists; pass --force to replace it or choose another --out")
    lengths = token_file.extra.get("lengths") or [None] * n
    for t, target, length in zip(token_file.tokens, targets, lengths):
        indices = torch.as_tensor(t, dtype=torch.long)
        if indices.dim() != 1 + (tok.index_levels > 1):
            raise ValueError(f"audio tokens must be 1-D sequences, got shape {tuple(indices.shape)}")
        wave = tok.decode(indices[None], length=length)[0, 0].cpu().numpy()
        write_wav(target, wave, int(tok.sample_rate))
    return targets


def write_wav(path: str | Path, wave, sample_rate: int) -> Path:
    """Write a mono waveform ``(T,)`` in [-1, 1] as a 16-bit PCM wav file, atomically (an interrupted write
    leaves no half file). The one wav writer of ``simvq decode`` and ``simvq sample``."""
    import soundfile as sf

    wave = np.asarray(wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"write_wav expects a mono waveform (T,), got shape {wave.shape}")
    wave = np.clip(wave, -1.0, 1.0)
    return save_file_atomic(path, lambda tmp: sf.write(str(tmp), wave, int(sample_rate), subtype="PCM_16", format="WAV"))


def list_audio_inputs(items: list[str]) -> list[Path]:
    """Files named on the command line, folders expanded to their wav/flac files (sorted, recursive)."""
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found, _ = scan_audio_folder(path)
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} is neither an audio file nor a folder")
    if not files:
        raise ValueError(f"no wav/flac files found in {items}")
    return files


__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioEvalSet",
    "AudioTrainSet",
    "audio_file_splits",
    "build_audio_datasets",
    "decode_audio_tokens",
    "encode_audio_files",
    "list_audio_inputs",
    "check_audio_file",
    "pocketsphinx_clips",
    "random_crop",
    "read_audio",
    "resample",
    "scan_audio_folder",
    "write_wav",
]
