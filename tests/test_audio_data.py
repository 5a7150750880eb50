"""Audio data: reading, bad files, crops, folder splits and the synthetic speech corpus."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from simvq.modalities.audio.data import (
    AudioEvalSet,
    AudioTrainSet,
    build_audio_datasets,
    random_crop,
    read_audio,
    resample,
    scan_audio_folder,
)
from simvq.modalities.audio.speech import build_speech_corpus, find_engine, make_sentences, read_manifest

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None and shutil.which("espeak") is None, reason="espeak-ng not installed")


def _tone(seconds, rate, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_read_audio_resamples_and_mixes_down(tmp_path):
    stereo = np.stack([_tone(0.5, 22050), _tone(0.5, 22050)], axis=1)
    sf.write(tmp_path / "a.wav", stereo, 22050, subtype="PCM_16")
    x = read_audio(tmp_path / "a.wav", sample_rate=16000)
    assert x.dtype == np.float32 and x.shape == (8000,)
    # a 440 Hz tone stays a 440 Hz tone after 22050 -> 16000 Hz
    spectrum = np.abs(np.fft.rfft(x))
    assert abs(np.argmax(spectrum) * 16000 / len(x) - 440.0) < 3
    assert resample(x, 16000, 16000) is not None and resample(x, 16000, 24000).shape == (12000,)


def test_corrupt_and_empty_files_raise_clear_errors(tmp_path):
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x01garbage that is not audio" * 10)
    sf.write(tmp_path / "empty.wav", np.zeros((0,), np.float32), 16000, subtype="PCM_16")
    with pytest.raises(ValueError, match=r"cannot read audio file .*corrupt\.wav"):
        read_audio(tmp_path / "corrupt.wav", sample_rate=16000)
    with pytest.raises(ValueError, match=r"empty\.wav is empty"):
        read_audio(tmp_path / "empty.wav", sample_rate=16000)
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        read_audio(tmp_path / "missing.wav", sample_rate=16000)


def test_folder_scan_skips_counts_and_reports_bad_files(tmp_path):
    nested = tmp_path / "speaker1" / "chapter2"
    nested.mkdir(parents=True)
    for i in range(3):
        sf.write(nested / f"good{i}.flac", _tone(0.2, 16000), 16000)
    (nested / "bad.wav").write_bytes(b"not audio at all")
    sf.write(tmp_path / "empty.wav", np.zeros((0,), np.float32), 16000)
    (tmp_path / "notes.txt").write_text("ignored")
    with pytest.warns(UserWarning, match=r"skipped 2 bad audio file"):
        files, skipped = scan_audio_folder(tmp_path)
    assert [f.name for f in files] == ["good0.flac", "good1.flac", "good2.flac"]
    assert sorted(p.name for p, _ in skipped) == ["bad.wav", "empty.wav"]
    with pytest.raises(FileNotFoundError):
        scan_audio_folder(tmp_path / "nope")


def test_crops_repeat_short_clips_and_depend_only_on_the_seed(tmp_path):
    short = np.arange(5, dtype=np.float32)
    crop = random_crop(short, 12, seed=3)
    # the crop is a window of the clip repeated end to end
    assert all(crop[i + 1] == (crop[i] + 1) % 5 for i in range(11))
    sf.write(tmp_path / "a.wav", _tone(2.0, 16000), 16000, subtype="PCM_16")
    sf.write(tmp_path / "b.wav", _tone(0.3, 16000, 300), 16000, subtype="PCM_16")
    ds = AudioTrainSet([tmp_path / "a.wav", tmp_path / "b.wav"], sample_rate=16000, segment_seconds=1.0)
    a1, a2, a3 = ds[(0, 11)], ds[(0, 11)], ds[(0, 12)]
    assert a1.shape == (1, 16000) and ds[(1, 5)].shape == (1, 16000)
    assert np.array_equal(a1, a2) and not np.array_equal(a1, a3)
    ev = AudioEvalSet([tmp_path / "a.wav", tmp_path / "b.wav"], sample_rate=16000)
    assert ev[0].shape == (1, 32000) and ev[1].shape == (1, 4800)  # whole utterances
    assert AudioEvalSet.collate([ev[0], ev[1]]).shape == (2, 1, 4800)


def test_folder_datasets_hold_out_every_nth_file(tmp_path):
    for i in range(10):
        sf.write(tmp_path / f"{i:02d}.wav", _tone(0.4, 16000, 200 + 10 * i), 16000, subtype="PCM_16")
    train, evals = build_audio_datasets({"dataset": "folder", "path": str(tmp_path), "sample_rate": 16000, "eval_fraction": 0.2, "segment_seconds": 0.25})
    assert len(train) == 8 and len(evals) == 2
    assert not set(train.files) & set(evals.files)
    with pytest.raises(ValueError, match="data.path"):
        build_audio_datasets({"dataset": "folder", "sample_rate": 16000})
    # without eval_fraction a folder holds out every 10th file; with an evaluation folder, none
    train, evals = build_audio_datasets({"dataset": "folder", "path": str(tmp_path), "sample_rate": 16000, "eval_fraction": None})
    assert len(train) == 9 and len(evals) == 1
    held = tmp_path / "held"
    held.mkdir()
    sf.write(held / "x.wav", _tone(0.4, 16000), 16000, subtype="PCM_16")
    train, evals = build_audio_datasets({"dataset": "folder", "path": str(tmp_path), "eval_path": str(held), "sample_rate": 16000})
    assert len(evals) == 1 and evals.files[0].name == "x.wav" and len(train) == 11  # the whole folder, nested file included


def test_sentences_are_distinct_and_deterministic():
    a, b = make_sentences(250), make_sentences(250)
    assert a == b and len(set(a)) == 250
    assert make_sentences(250, seed=1) != a


def test_missing_engine_names_the_debian_package(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install espeak-ng"):
        find_engine()


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@needs_espeak
def test_speech_corpus_is_deterministic_and_held_out_by_sentence(tmp_path):
    kwargs = dict(sample_rate=16000, num_sentences=4, voices_per_sentence=2, eval_fraction=0.25)
    build_speech_corpus(tmp_path / "a", **kwargs)
    build_speech_corpus(tmp_path / "b", **kwargs)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # byte-identical rebuild
    rows = read_manifest(tmp_path / "a")
    assert len(rows) == 8
    train_ids = {r["sentence_id"] for r in rows if r["split"] == "train"}
    eval_ids = {r["sentence_id"] for r in rows if r["split"] == "eval"}
    assert len(eval_ids) == 1 and not train_ids & eval_ids
    for r in rows:
        info = sf.info(tmp_path / "a" / r["path"])
        assert info.samplerate == 16000 and info.subtype == "PCM_16" and info.frames > 8000
        assert len({x["voice"] for x in rows if x["sentence_id"] == r["sentence_id"]}) == 2
    # rebuilding with the same parameters is a no-op; other parameters or a foreign folder are refused
    before = _digest(tmp_path / "a")
    build_speech_corpus(tmp_path / "a", **kwargs)
    assert _digest(tmp_path / "a") == before
    with pytest.raises(FileExistsError, match="other parameters"):
        build_speech_corpus(tmp_path / "a", **{**kwargs, "num_sentences": 5})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        build_speech_corpus(tmp_path / "c", **kwargs)
    assert (tmp_path / "c" / "mine.txt").read_text() == "user data"
    train, evals = build_audio_datasets({"dataset": "speech", "path": str(tmp_path / "a"), "sample_rate": 16000})
    assert len(train) == 6 and len(evals) == 2
    assert json.loads((tmp_path / "a" / "corpus.json").read_text())["sample_rate"] == 16000
