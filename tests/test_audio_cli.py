"""`simvq encode` / `simvq decode` / `simvq data speech` for audio models, end to end through the CLI."""

import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from simvq.checkpoints import load_tokenizer, save_model_dir
from simvq.cli import main
from simvq.config import load_config
from simvq.modalities.audio.data import read_audio
from simvq.modalities import build_tokenizer
from simvq.tokens import load_tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = load_config("audio/speech-tiny")
    torch.manual_seed(0)
    model = build_tokenizer(config)
    directory = tmp_path_factory.mktemp("audio_model") / "model"
    save_model_dir(directory, model, config)
    return directory


def _speechlike(seconds, rate):
    t = np.arange(int(seconds * rate)) / rate
    wave = sum(np.sin(2 * np.pi * k * 150 * t) / k for k in range(1, 8)) * np.abs(np.sin(2 * np.pi * 1.5 * t))
    return (0.3 * wave / np.abs(wave).max()).astype(np.float32)


def test_encode_decode_round_trip_keeps_length_and_rate(model_dir, tmp_path, capsys):
    # 22.05 kHz input of a length that is no multiple of the hop: read at 16 kHz, decoded at 16 kHz, same length
    src = tmp_path / "in.wav"
    sf.write(src, _speechlike(0.73, 22050), 22050, subtype="PCM_16")
    expected_len = read_audio(src, sample_rate=16000).shape[0]
    assert expected_len % 320 != 0
    tokens = tmp_path / "tokens.npz"
    assert main(["encode", "--model", str(model_dir), str(src), "--out", str(tokens)]) == 0
    tf = load_tokens(tokens)
    assert tf.modality == "audio" and tf.tokens[0].shape == (int(np.ceil(expected_len / 320)),)
    out = tmp_path / "out.wav"
    assert main(["decode", "--model", str(model_dir), str(tokens), "--out", str(out)]) == 0
    info = sf.info(out)
    assert info.samplerate == 16000 and info.frames == expected_len and info.subtype == "PCM_16"
    # the file holds what the library decodes from the same tokens (up to 16-bit rounding)
    model = load_tokenizer(model_dir)
    with torch.no_grad():
        ref = model.decode_indices(torch.as_tensor(tf.tokens[0])[None])[0, 0, :expected_len].clamp(-1, 1).numpy()
    decoded, _ = sf.read(out, dtype="float32")
    assert np.abs(decoded - ref).max() <= 1.0 / 32768 + 1e-6
    # an existing output is not overwritten without --force
    assert main(["decode", "--model", str(model_dir), str(tokens), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_encode_reports_corrupt_and_empty_audio(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEfmt definitely not audio")
    assert main(["encode", "--model", str(model_dir), str(bad), "--out", str(tmp_path / "t.npz")]) == 2
    err = capsys.readouterr().err
    assert "bad.wav" in err and "cannot read audio" in err
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    assert main(["encode", "--model", str(model_dir), str(empty), "--out", str(tmp_path / "t.npz")]) == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "t.npz").exists()


def test_decode_refuses_tokens_from_another_model(model_dir, tmp_path, capsys):
    src = tmp_path / "in.wav"
    sf.write(src, _speechlike(0.5, 16000), 16000, subtype="PCM_16")
    tokens = tmp_path / "tokens.npz"
    assert main(["encode", "--model", str(model_dir), str(src), "--out", str(tokens)]) == 0
    config = load_config("audio/speech-tiny", ["quantizer.codebook_size=32"])
    other = tmp_path / "other"
    save_model_dir(other, build_tokenizer(config), config)
    assert main(["decode", "--model", str(other), str(tokens), "--out", str(tmp_path / "o.wav")]) == 2
    assert "codebook size" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_data_speech_command_builds_a_corpus(tmp_path, capsys):
    out = tmp_path / "corpus"
    assert main(["data", "speech", "--out", str(out), "--sentences", "2", "--voices-per-sentence", "1", "--eval-fraction", "0.5"]) == 0
    assert "train: 1 clips" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["corpus.json", "eval", "manifest.jsonl", "train"]
