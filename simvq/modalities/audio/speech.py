"""A deterministic speech corpus built offline with a speech synthesiser (espeak-ng).

No speech data set ships with a package, so the built-in audio corpus is synthesised: a few hundred varied
English sentences (hand-written ones plus sentences composed from word lists by a seeded generator), each
spoken by several voices (espeak-ng's English accents x voice variants, with a drawn speaking rate and
pitch), resampled to the requested rate and written as 16-bit PCM wav. Train and evaluation splits are held
out **by sentence** (no evaluation sentence is ever heard in training, in any voice).

Layout of the output folder::

    DIR/manifest.jsonl              one JSON object per clip: split, path, sentence_id, text, voice, rate,
                                    pitch, seconds
    DIR/corpus.json                 the parameters it was built with (a rebuild with the same ones is a no-op)
    DIR/{train,eval}/s0123_v2.wav

The same parameters and the same espeak-ng version give byte-identical files. Festival and piper are not
used (only espeak-ng is required); without espeak-ng the builder names the Debian package to install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from simvq.io import check_output
from simvq.modalities.audio.signal import resample

#: Default size of the built-in corpus. 150 held-out sentences x 4 voices (~46 minutes, ~138,000 tokens at 50
#: tokens/s) give ~34 tokens per code at K = 4096: with the 30 held-out sentences of an earlier default
#: (~6.7 tokens per code) held-out utilisation measured the sample size, not the codebook (docs/audio.md).
CORPUS_SENTENCES = 500
CORPUS_VOICES_PER_SENTENCE = 4
CORPUS_EVAL_FRACTION = 0.3

MANIFEST = "manifest.jsonl"
CORPUS_INFO = "corpus.json"
CORPUS_VERSION = 1

# English accents of espeak-ng and its voice variants (male, female, and a few character voices).
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7",
    "f1", "f2", "f3", "f4", "f5",
    "Alicia", "Andy", "Annie", "belinda", "david", "ed", "linda", "michel", "paul", "steph", "quincy", "robert",
)

_HAND_WRITTEN = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "She sells sea shells by the sea shore every summer morning.",
    "A large black cat slept quietly on the warm windowsill all afternoon.",
    "How much wood would a woodchuck chuck if a woodchuck could chuck wood?",
    "We will meet at half past seven in front of the old railway station.",
    "The museum opens at nine and closes at five on weekdays.",
    "Could you tell me the way to the nearest post office, please?",
    "Twelve thousand four hundred and sixty people attended the concert.",
    "Thunder rolled across the valley as the first drops of rain began to fall.",
    "My grandmother kept her recipes in a battered tin box above the stove.",
    "The committee postponed its decision until the report was finished.",
    "Bright yellow leaves drifted slowly down onto the quiet pond.",
    "Is it true that the bridge will be closed for repairs next week?",
    "He measured the distance twice before cutting the heavy oak plank.",
    "Our flight was delayed by fog, so we waited in the crowded lounge.",
    "The children laughed when the puppy chased its own tail in circles.",
    "Fresh bread, strong coffee and a newspaper made a perfect breakfast.",
    "Nobody expected the small team from the north to win the championship.",
    "Turn left at the fountain, then walk straight on for about two hundred metres.",
    "The scientist recorded the temperature every hour throughout the night.",
    "Why did the lighthouse keeper leave the lamp burning in daylight?",
    "A gentle breeze carried the scent of pine needles through the open door.",
    "The orchestra tuned their instruments while the audience found their seats.",
    "Remember to switch off the lights and lock the back door before you leave.",
    "Several ships were anchored in the harbour, waiting for the tide to turn.",
    "Her voice echoed through the empty hall like a bell in a cathedral.",
    "The price of apples rose sharply after the late frost in April.",
    "I have never seen so many stars as on that clear night in the desert.",
    "The old clock in the hallway struck midnight with twelve slow chimes.",
    "Good evening, and welcome to the annual meeting of the garden society.",
    "The engineer explained how the pump lifts water from the deep well.",
    "Zebras, giraffes and elephants gathered around the muddy water hole.",
    "Would you rather travel by train through the mountains or by boat along the coast?",
    "The letter arrived three weeks late, crumpled and stained with coffee.",
    "Quietly, the thief climbed through the window and vanished into the night.",
    "Each student must hand in the assignment before Friday at noon.",
    "The baker wakes at four every morning to prepare the dough.",
    "Measure the flour carefully, then add the eggs one at a time.",
    "Heavy snow blocked the mountain pass for nearly a fortnight.",
)

_SUBJECTS = (
    "the farmer", "my neighbour", "a young doctor", "the old sailor", "our teacher", "the tired driver",
    "a curious child", "the gardener", "her brother", "the pilot", "a famous painter", "the mayor",
    "the librarian", "a quiet student", "the fisherman", "his aunt", "the captain", "a travelling musician",
)
_VERBS = (
    "found", "painted", "carried", "repaired", "noticed", "borrowed", "described", "sold", "collected",
    "followed", "photographed", "discovered", "cleaned", "measured", "delivered", "opened",
)
_ADJECTIVES = (
    "small", "heavy", "bright", "ancient", "wooden", "broken", "golden", "narrow", "silver", "purple",
    "enormous", "fragile", "dusty", "shiny", "crooked", "peculiar",
)
_OBJECTS = (
    "basket", "ladder", "lantern", "violin", "bicycle", "umbrella", "map", "teapot", "suitcase", "clock",
    "mirror", "boat", "kettle", "blanket", "telescope", "notebook", "statue", "chair",
)
_PLACES = (
    "near the market", "behind the church", "in the attic", "beside the lake", "under the bridge",
    "at the top of the hill", "in the crowded square", "outside the bakery", "along the canal",
    "in the back garden", "on the station platform", "next to the library",
)
_TIMES = (
    "yesterday morning", "last winter", "on a rainy Tuesday", "just before sunset", "early in the spring",
    "after the storm", "during the holidays", "late at night", "three days ago", "at dawn",
)
_LATER = ("tomorrow", "the weekend", "next spring", "the evening", "the rain stops", "the guests arrive")
_NUMBERS = ("two", "three", "seven", "eleven", "fifteen", "twenty", "forty two", "a hundred")


def _composed_sentence(rng: np.random.Generator) -> str:
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    form = int(rng.integers(5))
    subject, verb, adj, obj = pick(_SUBJECTS), pick(_VERBS), pick(_ADJECTIVES), pick(_OBJECTS)
    place, time = pick(_PLACES), pick(_TIMES)
    if form == 0:
        s = f"{subject} {verb} a {adj} {obj} {place} {time}."
    elif form == 1:
        s = f"{time}, {subject} {verb} {pick(_NUMBERS)} {adj} {obj}s {place}."
    elif form == 2:
        s = f"Did {subject} really say that the {adj} {obj} was {place}?"
    elif form == 3:
        s = f"{subject} {verb} the {obj}, and then {pick(_SUBJECTS)} {pick(_VERBS)} it {place}."
    else:
        s = f"If the {obj} is too {adj}, {subject} will leave it {place} until {pick(_LATER)}."
    return s[0].upper() + s[1:]


def make_sentences(count: int, *, seed: int = 0) -> list[str]:
    """``count`` distinct sentences: the hand-written ones first, then seeded compositions."""
    if count < 1:
        raise ValueError(f"the corpus needs at least one sentence, got {count}")
    out = list(_HAND_WRITTEN[:count])
    seen = set(out)
    rng = np.random.default_rng([seed, 101])
    while len(out) < count:
        s = _composed_sentence(rng)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def find_engine() -> str:
    """Path of espeak-ng (or espeak); FileNotFoundError naming the Debian package when neither exists."""
    for name in ("espeak-ng", "espeak"):
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(
        "no speech synthesiser found to build the speech corpus: install espeak-ng "
        "(Debian/Ubuntu: `apt-get install espeak-ng`), or train on a folder of recordings with "
        "data.dataset=folder data.path=DIR"
    )


def _synthesise(engine: str, text: str, voice: str, rate: int, pitch: int, sample_rate: int) -> np.ndarray:
    import soundfile as sf

    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "clip.wav"
        cmd = [engine, "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", str(wav), "--", text]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if result.returncode != 0 or not wav.is_file():
            raise RuntimeError(f"{Path(engine).name} failed for voice {voice!r}: {result.stderr.strip() or result.returncode}")
        data, rate_in = sf.read(str(wav), dtype="float32", always_2d=True)
    wave = resample(data[:, 0], rate_in, sample_rate)
    # espeak leaves long silences at both ends; keep 50 ms around the speech
    loud = np.flatnonzero(np.abs(wave) > 1e-3)
    if loud.size:
        margin = int(0.05 * sample_rate)
        wave = wave[max(0, loud[0] - margin) : loud[-1] + margin]
    peak = float(np.abs(wave).max()) if wave.size else 0.0
    if peak > 0.95:  # resampling can overshoot; keep a margin below full scale for int16
        wave = wave * (0.95 / peak)
    return wave


def _corpus_params(*, sample_rate, num_sentences, voices_per_sentence, eval_fraction, seed) -> dict:
    return {
        "version": CORPUS_VERSION,
        "sample_rate": int(sample_rate),
        "num_sentences": int(num_sentences),
        "voices_per_sentence": int(voices_per_sentence),
        "eval_fraction": float(eval_fraction),
        "seed": int(seed),
    }


def build_speech_corpus(
    out_dir: str | Path,
    *,
    sample_rate: int = 16000,
    num_sentences: int = CORPUS_SENTENCES,
    voices_per_sentence: int = CORPUS_VOICES_PER_SENTENCE,
    eval_fraction: float = CORPUS_EVAL_FRACTION,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Synthesise the corpus into ``out_dir``; returns the manifest path.

    Args:
        sample_rate: rate of the written wav files (16-bit PCM).
        num_sentences: distinct sentences; ``round(eval_fraction * num_sentences)`` (at least 1) are held out.
        voices_per_sentence: how many voices speak each sentence (distinct accent/variant pairs).
        seed: fixes sentences, voices, rates, pitches and the split.

    A folder that already holds a corpus built with the same parameters is left as it is; any other
    non-empty folder is refused (nothing is overwritten).
    """
    out_dir = Path(out_dir).expanduser()
    params = _corpus_params(
        sample_rate=sample_rate, num_sentences=num_sentences, voices_per_sentence=voices_per_sentence,
        eval_fraction=eval_fraction, seed=seed,
    )
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must lie in (0, 1), got {eval_fraction}")
    if num_sentences < 2:
        raise ValueError(f"num_sentences must be >= 2 (one for training, one held out), got {num_sentences}")
    if not 1 <= voices_per_sentence <= len(ACCENTS) * len(VARIANTS):
        raise ValueError(f"voices_per_sentence must lie in [1, {len(ACCENTS) * len(VARIANTS)}], got {voices_per_sentence}")
    if not isinstance(sample_rate, int) or sample_rate < 8000:
        raise ValueError(f"sample_rate must be an integer >= 8000, got {sample_rate!r}")
    check_output(out_dir, kind="dir", force=True)  # a file there is an error; a non-empty folder is checked below
    info = out_dir / CORPUS_INFO
    if info.is_file():
        existing = json.loads(info.read_text())
        if existing == params and (out_dir / MANIFEST).is_file():
            return out_dir / MANIFEST
        raise FileExistsError(
            f"{out_dir} already holds a speech corpus built with other parameters ({existing}); "
            "choose another --out folder or delete that one"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty and holds no speech corpus; choose an empty or new folder")
    engine = find_engine()
    import soundfile as sf

    rng = np.random.default_rng([seed, 202])
    sentences = make_sentences(num_sentences, seed=seed)
    n_eval = max(1, round(eval_fraction * num_sentences))
    eval_ids = set(rng.permutation(num_sentences)[:n_eval].tolist())
    pairs = [(a, v) for a in ACCENTS for v in VARIANTS]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # built beside the destination and renamed into place, so the corpus appears whole or not at all
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        rows = []
        for sid, text in enumerate(sentences):
            split = "eval" if sid in eval_ids else "train"
            (staging / split).mkdir(exist_ok=True)
            chosen = rng.choice(len(pairs), size=voices_per_sentence, replace=False)
            for k, pair_index in enumerate(chosen.tolist()):
                accent, variant = pairs[pair_index]
                voice = f"{accent}+{variant}"
                rate = int(rng.integers(130, 196))
                pitch = int(rng.integers(25, 76))
                wave = _synthesise(engine, text, voice, rate, pitch, sample_rate)
                rel = f"{split}/s{sid:04d}_v{k}.wav"
                sf.write(str(staging / rel), wave, sample_rate, subtype="PCM_16")
                rows.append({"split": split, "path": rel, "sentence_id": sid, "text": text, "voice": voice,
                             "rate": rate, "pitch": pitch, "seconds": round(wave.shape[0] / sample_rate, 3)})
            if progress and (sid + 1) % 50 == 0:
                print(f"  {sid + 1}/{num_sentences} sentences synthesised", flush=True)
        with open(staging / MANIFEST, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, sort_keys=True) + "\n")
        (staging / CORPUS_INFO).write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir / MANIFEST


def read_manifest(root: str | Path) -> list[dict]:
    """Rows of a corpus manifest (FileNotFoundError with the build command when absent)."""
    path = Path(root).expanduser() / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no speech corpus at {Path(root)} ({MANIFEST} missing); build it with `simvq data speech --out {root}`")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def ensure_speech_corpus(
    root: str | Path,
    *,
    sample_rate: int,
    num_sentences: int = CORPUS_SENTENCES,
    voices_per_sentence: int = CORPUS_VOICES_PER_SENTENCE,
    eval_fraction: float = CORPUS_EVAL_FRACTION,
) -> Path:
    """The corpus at ``root``, built first when the folder does not hold one yet."""
    root = Path(root).expanduser()
    if (root / MANIFEST).is_file():
        info = root / CORPUS_INFO
        if info.is_file():
            rate = json.loads(info.read_text()).get("sample_rate")
            if rate != sample_rate:
                raise ValueError(
                    f"the speech corpus at {root} is at {rate} Hz but the model runs at {sample_rate} Hz; "
                    f"build one at {sample_rate} Hz with `simvq data speech --out DIR --sample-rate {sample_rate}`"
                )
        return root / MANIFEST
    print(f"building the speech corpus in {root} (espeak-ng, {num_sentences} sentences) ...", flush=True)
    return build_speech_corpus(
        root, sample_rate=sample_rate, num_sentences=num_sentences, voices_per_sentence=voices_per_sentence,
        eval_fraction=eval_fraction, progress=True,
    )


__all__ = ["ACCENTS", "VARIANTS", "build_speech_corpus", "ensure_speech_corpus", "find_engine", "make_sentences", "read_manifest"]
