"""The tokenizers shipped inside the package load offline by name and reproduce their cards."""

from pathlib import Path

import pytest
import torch

import simvq
from simvq.cli import main
from simvq.modalities.image.data import FASHION_MNIST_DIR
from simvq.pretrained import list_models, model_path


def test_the_shipped_models_are_listed_with_cards():
    cards = list_models()
    assert {"fashion-8k", "speech-4k"} <= set(cards)
    for name, card in cards.items():
        assert card["command"].startswith("simvq train") and card["held_out"]["utilization"] > 0.5
        assert (model_path(name) / "model.safetensors").stat().st_size < 16 * 2**20  # a few MB each
    assert model_path("../configs") is None and model_path("nope") is None


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="Debian dataset-fashion-mnist is not installed")
def test_fashion_8k_reconstructs_held_out_images_as_its_card_says():
    """256 held-out images through the Tokenizer API (a second path to the card's `simvq eval`): batch-of-64
    PSNR within 1 dB of the card, and a large share of the codes in use even on 65,536 tokens."""
    from simvq.modalities import build_datasets

    tok = simvq.Tokenizer.from_pretrained("fashion-8k")
    _, held_out = build_datasets(tok.config)
    x = torch.stack([held_out[i] for i in range(256)])            # [-1, 1]
    images = (x + 1) / 2
    indices = tok.encode(images)
    recon = tok.decode(indices)
    # PSNR of uint8 images over batches of 64 (the official convention, data range 255)
    a = (images * 255).round()
    b = (recon * 255).round()
    psnr = torch.stack([10 * torch.log10(255.0**2 / (a[i:i + 64] - b[i:i + 64]).pow(2).mean()) for i in range(0, 256, 64)]).mean()
    card = list_models()["fashion-8k"]["held_out"]
    assert abs(float(psnr) - card["psnr_official_batch64"]) < 1.0, (float(psnr), card)
    assert indices.unique().numel() > 0.3 * 8192  # 65,536 tokens cover most of the 8,192 codes


def test_speech_4k_round_trips_a_second_of_audio():
    tok = simvq.Tokenizer.from_pretrained("speech-4k")
    t = torch.arange(16000) / 16000
    wave = (0.3 * torch.sin(2 * torch.pi * 220 * t))[None]     # (1, T) at 16 kHz
    indices = tok.encode(wave, sample_rate=16000)
    assert indices.shape == (1, 50) and indices.dtype == torch.int64 and int(indices.max()) < 4096
    out = tok.decode(indices)
    assert out.shape == (1, 1, 16000) and bool(torch.isfinite(out).all())
    assert tok.tokens_per_second == 50 and tok.bitrate == pytest.approx(50 * 12)


def test_cli_takes_a_shipped_name_and_lists_the_models(tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "shirt.png"
    Image.fromarray((torch.rand(32, 32) * 255).to(torch.uint8).numpy()).save(image)
    assert main(["encode", "--model", "fashion-8k", str(image), "--out", str(tmp_path / "t.npz")]) == 0
    assert main(["decode", "--model", "fashion-8k", str(tmp_path / "t.npz"), "--out", str(tmp_path / "dec")]) == 0
    assert (tmp_path / "dec" / "shirt.png").is_file()
    capsys.readouterr()
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "fashion-8k" in out and "speech-4k" in out
