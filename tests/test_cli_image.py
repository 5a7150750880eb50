"""`simvq train / eval / encode / decode` as a user runs them (subprocesses), on tiny models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simvq.checkpoints import load_tokenizer, save_model_dir
from simvq.config import load_config
from simvq.modalities import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def simvq(*args, timeout=180):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "simvq.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _model_dir(path, overrides=()):
    torch.manual_seed(0)
    cfg = load_config("image/digits-tiny", list(overrides))
    save_model_dir(path, build_tokenizer(cfg), cfg)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_encode_decode_round_trip(tmp_path, images):
    model_dir = _model_dir(tmp_path / "model")
    tokens = tmp_path / "tokens.npz"
    enc = simvq("encode", "--model", model_dir, images, "--out", tokens, "--device", "cpu")
    assert enc.returncode == 0, enc.stderr
    assert "encoded 3 image(s)" in enc.stdout
    dec = simvq("decode", "--model", model_dir, tokens, "--out", tmp_path / "decoded", "--device", "cpu")
    assert dec.returncode == 0, dec.stderr
    # reference: the same model in this process, encode -> decode_indices -> uint8
    model = load_tokenizer(model_dir)
    for i in range(3):
        x = torch.from_numpy(np.array(Image.open(images / f"im{i}.png"))).float()[None, None] / 127.5 - 1
        with torch.no_grad():
            idx = model.encode(x).indices
            ref = model.decode_indices(idx)[0, 0].clamp(-1, 1)
        ref_u8 = ((ref + 1) * 127.5).round().to(torch.uint8).numpy()
        got = np.array(Image.open(tmp_path / "decoded" / f"im{i}.png"))
        assert got.shape == (16, 16)
        assert np.abs(got.astype(int) - ref_u8.astype(int)).max() <= 1
    # decoding again into the same folder refuses to overwrite
    again = simvq("decode", "--model", model_dir, tokens, "--out", tmp_path / "decoded", "--device", "cpu")
    assert again.returncode == 2 and "--force" in again.stderr
    # another model (different codebook size) refuses the tokens with a clear message
    other = _model_dir(tmp_path / "other", ["quantizer.codebook_size=32"])
    bad = simvq("decode", "--model", other, tokens, "--out", tmp_path / "bad", "--device", "cpu")
    assert bad.returncode == 2
    assert "different model" in bad.stderr and "codebook size 64" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_token_file_records_what_decoding_needs(tmp_path):
    from simvq.tokens import config_hash
    from simvq.tokens import check_compatible, load_tokens, save_tokens

    cfg = load_config("image/digits-tiny")
    path = save_tokens(tmp_path / "t.npz", [torch.tensor([[1, 63], [0, 5]])], names=["a.png"], modality="image",
                       codebook_size=64, config_hash=config_hash(cfg))
    tf = load_tokens(path)
    assert tf.shapes == [(2, 2)] and tf.tokens[0].tolist() == [[1, 63], [0, 5]] and tf.codebook_size == 64
    check_compatible(tf, cfg, 64)
    with pytest.raises(ValueError, match="modality 'image' vs the model's 'audio'"):
        check_compatible(tf, {**cfg, "modality": "audio"}, 64)
    with pytest.raises(ValueError, match="config hash"):
        check_compatible(tf, load_config("image/digits-tiny", ["model.ch=8"]), 64)
    with pytest.raises(ValueError, match="outside"):
        save_tokens(tmp_path / "u.npz", [torch.tensor([64])], names=["x"], modality="image", codebook_size=64,
                    config_hash="h")


def test_eval_writes_json(tmp_path):
    model_dir = _model_dir(tmp_path / "model")
    out = tmp_path / "eval.json"
    proc = simvq("eval", "--model", model_dir, "--limit", "40", "--out", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["items"] == 40 and result["codebook_size"] == 64
    # 40 images x 8x8 tokens were counted, and utilisation is the used fraction of the 64 codes
    assert result["tokens"] == 40 * 64
    assert result["utilization"] == pytest.approx(result["used_codes"] / 64)
    assert "psnr_official_batch64" in result and "psnr_per_image" in result and "ssim_x100" in result


def test_train_reports_config_errors_cleanly(tmp_path):
    proc = simvq("train", "--config", "image/digits-tiny", "--out", tmp_path / "run", "optim.learning_rate=1")
    assert proc.returncode == 2
    assert "optim.learning_rate" in proc.stderr and "valid keys in 'optim': lr, betas" in proc.stderr
    assert "Traceback" not in proc.stderr
    missing = simvq("train", "--config", "image/digits-tiny", "--out", tmp_path / "run2", "data.dataset=folder",
                    f"data.path={tmp_path / 'nothing'}")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
