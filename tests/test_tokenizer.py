"""simvq.Tokenizer: from_pretrained / save_pretrained, encode / decode of every input kind, properties, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import simvq
from simvq import Tokenizer
from simvq.checkpoints import save_model_dir
from simvq.config import load_config
from simvq.modalities import build_tokenizer


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    cfg = load_config("image/digits-tiny")
    torch.manual_seed(0)
    return save_model_dir(tmp_path_factory.mktemp("img") / "model", build_tokenizer(cfg), cfg)


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    cfg = load_config("audio/speech-tiny")
    torch.manual_seed(0)
    return save_model_dir(tmp_path_factory.mktemp("aud") / "model", build_tokenizer(cfg), cfg)


def test_readme_snippet(image_dir):
    # the snippet of docs/deploy.md (and README), on a tiny model
    import simvq

    tok = simvq.Tokenizer.from_pretrained(image_dir)  # a folder, or a Hub id such as "owner/simvq-photos"
    images = torch.rand(4, tok.in_channels, 16, 16)  # (B, C, H, W) in [0, 1]
    indices = tok.encode(images)  # (B, 8, 8) int64 in [0, tok.codebook_size)
    recon = tok.decode(indices)  # (B, C, H, W) in [0, 1]
    assert indices.shape == (4, 8, 8) and recon.shape == images.shape
    assert tok.grid_shape == (8, 8) and tok.bitrate == 64 * 6


def test_image_encode_matches_model_and_decode(image_dir):
    tok = Tokenizer.from_pretrained(image_dir)
    x = torch.rand(3, 1, 16, 24)
    idx = tok.encode(x)
    with torch.no_grad():  # independent reference: the module on [-1, 1] inputs
        ref = tok.model.encode(x * 2 - 1).indices
        ref_img = ((tok.model.decode_indices(ref) + 1) / 2).clamp(0, 1)
    assert idx.dtype == torch.int64 and torch.equal(idx, ref)
    assert torch.allclose(tok.decode(idx), ref_img, atol=1e-6)
    assert torch.equal(tok.encode(x, batch_size=2), idx)
    # uint8 input is x * 255
    u8 = (x * 255).round().to(torch.uint8)
    assert torch.equal(tok.encode(u8), tok.encode(u8.float() / 255))
    # (C, H, W) is a batch of one
    assert torch.equal(tok.encode(x[0]), idx[:1])
    out = tok.decode(idx, output="uint8")
    assert out.dtype == torch.uint8 and torch.equal(out, (tok.decode(idx) * 255).round().to(torch.uint8))


def test_image_paths_and_pil(image_dir, tmp_path):
    from PIL import Image

    tok = Tokenizer.from_pretrained(image_dir)
    arr = (np.random.default_rng(0).random((16, 16)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    want = tok.encode(torch.from_numpy(arr)[None, None])
    assert torch.equal(tok.encode(tmp_path / "a.png"), want)
    assert torch.equal(tok.encode([Image.fromarray(arr), str(tmp_path / "a.png")]), want.repeat(2, 1, 1))
    pil = tok.decode(want, output="pil")
    assert len(pil) == 1 and pil[0].size == (16, 16)


def test_save_pretrained_hf_layout_roundtrip(image_dir, tmp_path):
    tok = Tokenizer.from_pretrained(image_dir)
    out = tok.save_pretrained(tmp_path / "hf")
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["quantizer"]["codebook_size"] == 64
    (out / "config.yaml").unlink()  # a pure Hugging Face folder loads too
    again = Tokenizer.from_pretrained(out)
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(again.encode(x), tok.encode(x))
    with pytest.raises(FileExistsError):
        tok.save_pretrained(out)


def test_missing_folder_and_bad_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    pytest.importorskip("huggingface_hub")
    with pytest.raises(FileNotFoundError, match="Hub"):
        Tokenizer.from_pretrained("simvq-test-owner/no-such-model", local_files_only=True, cache_dir=tmp_path)


def test_decode_errors_one_line(image_dir):
    tok = Tokenizer.from_pretrained(image_dir)
    with pytest.raises(ValueError, match=r"\[0, 64\).*\[64, 64\]") as err:
        tok.decode(torch.full((1, 8, 8), 64))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        tok.decode(torch.zeros(8, dtype=torch.long))
    with pytest.raises(TypeError):
        tok.decode(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="multiples of 2"):
        tok.encode(torch.rand(1, 1, 15, 16))


def test_audio_encode_resamples_and_decodes(audio_dir, tmp_path):
    import soundfile as sf

    tok = Tokenizer.from_pretrained(audio_dir)
    assert (tok.sample_rate, tok.hop_length, tok.tokens_per_second) == (16000, 320, 50.0)
    assert tok.bitrate == 50 * 6
    t = np.arange(8000) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    idx = tok.encode(torch.from_numpy(wave)[None])
    with torch.no_grad():
        ref = tok.model.encode(torch.from_numpy(wave)[None, None]).indices
    assert torch.equal(idx, ref) and idx.shape == (1, 25)
    assert torch.equal(tok.encode(torch.from_numpy(wave)[None, None]), idx)  # (B, 1, T)
    # 8 kHz input is resampled to 16 kHz: same as resampling by hand first
    from simvq.modalities.audio.data import resample

    low = resample(wave, 16000, 8000)
    assert torch.equal(tok.encode(torch.from_numpy(low)[None], sample_rate=8000), tok.encode(torch.from_numpy(resample(low, 8000, 16000))[None]))
    sf.write(tmp_path / "a.wav", low, 8000)
    assert tok.encode(tmp_path / "a.wav").shape == (1, 25)
    out = tok.decode(idx, length=7999)
    assert out.shape == (1, 1, 7999) and float(out.abs().max()) <= 1.0
    with pytest.raises(ValueError, match=r"\(B, T'\)"):
        tok.decode(torch.zeros(1, 2, 3, dtype=torch.long))


def test_dtype_and_lazy_export():
    assert simvq.Tokenizer is Tokenizer
    cfg = load_config("image/digits-tiny")
    tok = Tokenizer(build_tokenizer(cfg), cfg, dtype=torch.float64)
    x = torch.rand(2, 1, 16, 16)
    assert tok.encode(x).shape == (2, 8, 8) and tok.decode(tok.encode(x)).dtype == torch.float32
    with pytest.raises(ValueError):
        Tokenizer(build_tokenizer(cfg), cfg, dtype=torch.int32)
