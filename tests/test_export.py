"""ONNX export: ONNX Runtime against PyTorch for every quantizer family, image and audio; the matmul ISTFT
against the model's ISTFT; `simvq export` and its errors."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from simvq import Tokenizer  # noqa: E402
from simvq.checkpoints import save_model_dir  # noqa: E402
from simvq.cli import main  # noqa: E402
from simvq.config import load_config  # noqa: E402
from simvq.export import MatmulISTFT, export_onnx, export_torchscript, verify_export  # noqa: E402
from simvq.modalities import build_tokenizer  # noqa: E402

FAMILIES = {
    "simvq": [],
    "simvq_cosine": ["quantizer.l2_normalize=true"],
    "vq": ["quantizer.name=vq"],
    "vq_cosine": ["quantizer.name=vq", "quantizer.l2_normalize=true"],
    "ema_vq": ["quantizer.name=ema_vq"],
    "fsq": ["quantizer.name=fsq", "quantizer.codebook_size=256"],
    "lfq": ["quantizer.name=lfq"],
    "residual": ["quantizer.name=residual", "quantizer.num_quantizers=2", "quantizer.quantizer=simvq"],
}


def _tok(preset: str, overrides: list[str]) -> Tokenizer:
    torch.manual_seed(0)
    cfg = load_config(preset, overrides)
    return Tokenizer(build_tokenizer(cfg), cfg)


def _spread_codes(tok: Tokenizer) -> None:
    """Give VQ codebooks codes at the encoder's feature scale (the uniform(-1/K, 1/K) init puts every code
    near zero, where the random-weight features' indices would all be near-ties)."""
    from simvq.quantizers import VectorQuantizer

    for q in tok.model.modules():
        if isinstance(q, VectorQuantizer):
            with torch.no_grad():
                q.embedding.weight.normal_(0, 0.5)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("preset", ["image/digits-tiny", "audio/speech-tiny"])
def test_onnx_matches_pytorch(tmp_path, preset, family):
    tok = _tok(preset, FAMILIES[family])
    _spread_codes(tok)
    gen = torch.Generator().manual_seed(1)
    if tok.is_audio:  # held-out inputs of other lengths than the traced example (12 frames)
        t = torch.arange(tok.hop_length * 37) / tok.sample_rate
        x = torch.stack([0.3 * torch.sin(2 * torch.pi * f * t) for f in (110.0, 220.0, 440.0)])
        x = (x + 0.05 * torch.randn(x.shape, generator=gen))[:, None]
    else:
        x = torch.rand(6, tok.in_channels, 24, 16, generator=gen)
    info = export_onnx(tok, tmp_path)
    assert (tmp_path / "encoder.onnx").is_file() and (tmp_path / "decoder.onnx").is_file()
    manifest = json.loads((tmp_path / "export.json").read_text())
    assert manifest == json.loads(json.dumps(info))
    assert manifest["codebook_size"] == tok.codebook_size and manifest["index_levels"] == tok.index_levels
    r = verify_export(tok, tmp_path, x)
    per_item = 37 if tok.is_audio else (24 // tok.downsample_factor) * (16 // tok.downsample_factor)
    assert r["tokens"] == x.shape[0] * per_item * tok.index_levels
    assert r["agreement"] >= 0.999, r
    assert r["decoder_max_abs"] <= 1e-4, r


def test_indices_and_codes_differ_between_models(tmp_path):
    """The check can fail: ONNX files of one model disagree with another model's PyTorch indices."""
    a, b = _tok("image/digits-tiny", []), _tok("image/digits-tiny", ["seed=1"])
    torch.manual_seed(5)
    b = Tokenizer(build_tokenizer(b.config), b.config)
    export_onnx(a, tmp_path)
    r = verify_export(b, tmp_path, torch.rand(4, 1, 16, 16))
    assert r["agreement"] < 0.9 or r["decoder_max_abs"] > 1e-3


def test_matmul_istft_matches_model_istft():
    from simvq.modalities.audio.model import SameISTFT

    istft = SameISTFT(n_fft=1280, hop_length=320)
    ours = MatmulISTFT(n_fft=1280, hop_length=320, window=istft.window)
    gen = torch.Generator().manual_seed(0)
    mag = torch.exp(torch.randn(2, 641, 23, generator=gen)).clamp(max=100)
    phase = torch.rand(2, 641, 23, generator=gen) * 6.3
    want = istft(torch.complex(mag * torch.cos(phase), mag * torch.sin(phase)))
    got = ours(mag * torch.cos(phase), mag * torch.sin(phase))
    assert got.shape == want.shape == (2, 23 * 320)
    assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))


def test_matmul_istft_hand_case():
    """One frame of a pure cosine at bin 1: irfft gives cos(2 pi t / n) * 2 / n."""
    n, hop = 8, 4
    window = torch.ones(n)
    ours = MatmulISTFT(n_fft=n, hop_length=hop, window=window)
    real = torch.zeros(1, n // 2 + 1, 1)
    real[0, 1, 0] = 1.0
    out = ours(real, torch.zeros_like(real))  # trims (n - hop) / 2 = 2 samples each side
    t = torch.arange(2, 6, dtype=torch.float64)
    assert torch.allclose(out[0].double(), torch.cos(2 * torch.pi * t / n) * 2 / n, atol=1e-7)


def test_torchscript_export_matches(tmp_path):
    tok = _tok("image/digits-tiny", [])
    export_torchscript(tok, tmp_path)
    enc, dec = torch.jit.load(str(tmp_path / "encoder.pt")), torch.jit.load(str(tmp_path / "decoder.pt"))
    x = torch.rand(3, 1, 32, 16)
    idx = tok.encode(x)
    assert torch.equal(enc(x), idx)
    assert (dec(idx) - tok.decode(idx)).abs().max() <= 1e-4


def _model_dir(tmp_path, preset="image/digits-tiny"):
    cfg = load_config(preset)
    torch.manual_seed(0)
    return save_model_dir(tmp_path / "model", build_tokenizer(cfg), cfg)


def test_cli_export_and_errors(tmp_path, capsys):
    model = _model_dir(tmp_path)
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(model), "--format", "onnx", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".simvq-output", "decoder.onnx", "encoder.onnx", "export.json"]
    capsys.readouterr()
    # existing output folder without --force: one line, exit 2
    assert main(["export", "--model", str(model), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0] and "--force" in err[0]
    assert main(["export", "--model", str(model), "--out", str(out), "--force"]) == 0
    # unknown format
    assert main(["export", "--model", str(model), "--format", "tflite", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown export format 'tflite'" in err[0]
    assert not (tmp_path / "x").exists()
    # never into the model folder
    assert main(["export", "--model", str(model), "--out", str(model), "--force"]) == 2
    assert "input" in capsys.readouterr().err
    assert sorted(p.name for p in model.iterdir()) == ["config.yaml", "model.safetensors"]


def test_opsets_outside_the_exporter_or_below_the_model_are_refused(tmp_path, capsys):
    from torch.onnx import _constants

    model = _model_dir(tmp_path, "audio/speech-tiny")
    cases = [(str(_constants.ONNX_MIN_OPSET - 1), "this torch exports ONNX opsets"),
             (str(_constants.ONNX_MAX_OPSET + 1), "this torch exports ONNX opsets"),
             ("9", "cannot express this model")]  # the audio backbone's attention needs opset 14
    for opset, words in cases:
        assert main(["export", "--model", str(model), "--out", str(tmp_path / "x"), "--opset", opset]) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert len(lines) == 1 and words in lines[0], lines
        assert not (tmp_path / "x").exists()


def test_large_codebook_constant_fits(tmp_path):
    """K = 262,144 codes of dimension 128 fold into a 128 MiB constant: the ONNX file holds it inline."""
    pytest.importorskip("onnx")
    tok = _tok("image/digits-tiny", ["quantizer.codebook_size=262144", "model.z_channels=128"])
    info = export_onnx(tok, tmp_path)
    size = (tmp_path / "encoder.onnx").stat().st_size
    assert 128 * 2**20 < size < 2**31 and not (tmp_path / "encoder.onnx.data").exists()
    r = verify_export(tok, tmp_path, torch.rand(2, 1, 16, 16))
    assert r["agreement"] >= 0.99 and r["decoder_max_abs"] <= 1e-4
    assert info["codebook_size"] == 262144
