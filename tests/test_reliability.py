"""The bad-input matrix: every command, every class of bad input (missing, empty, truncated, corrupt,
wrong type, colliding output, interrupted write).

Each case asserts the exit code (2), that the message is one line naming the problem, and that every input
file is byte-identical afterwards. Training-based cases are marked slow.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simvq.checkpoints import save_model_dir
from simvq.cli import main
from simvq.config import load_config
from simvq.io import check_output, check_run_folder, mark_run_folder, save_file_atomic
from simvq.modalities import build_tokenizer


# ----- helpers --------------------------------------------------------------------------------------------
def run(capsys, *args):
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def digests(*paths) -> dict:
    """sha256 of every file under ``paths`` (files or folders)."""
    out = {}
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else []
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def assert_user_error(capsys, args, expect, inputs):
    before = digests(*inputs)
    assert before or not inputs or all(not Path(i).exists() for i in inputs)
    code, _, err = run(capsys, *args)
    lines = [ln for ln in err.splitlines() if ln.strip() and "Warning" not in ln and not ln.startswith("  ")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "error" in lines[0] and expect.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in err
    assert digests(*inputs) == before, "an input changed"


# ----- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_model(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config("image/digits-tiny")
    return save_model_dir(tmp_path_factory.mktemp("img") / "model", build_tokenizer(cfg), cfg)


@pytest.fixture(scope="module")
def audio_model(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config("audio/speech-tiny")
    return save_model_dir(tmp_path_factory.mktemp("aud") / "model", build_tokenizer(cfg), cfg)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, image_model, images):
    out = tmp_path_factory.mktemp("tok") / "tokens.npz"
    assert main(["encode", "--model", str(image_model), str(images), "--out", str(out), "--device", "cpu"]) == 0
    return out


def _truncate(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ----- the one output-safety helper -----------------------------------------------------------------------
def test_check_output_rules(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.yaml").write_text("x: 1\n")
    src = tmp_path / "in.txt"
    src.write_text("data")
    link = tmp_path / "link.txt"
    link.symlink_to(src)
    # an input, through a symlink or a relative path, even with force
    for path in (src, link, os.path.relpath(src)):
        with pytest.raises(ValueError, match="also an input"):
            check_output(path, inputs=[link if path == src else src], force=True)
    # a file inside an input folder, existing (even with force) or new: either would change the input
    with pytest.raises(ValueError, match="inside the input folder"):
        check_output(model / "config.yaml", inputs=[model], force=True)
    with pytest.raises(ValueError, match="inside the input folder"):
        check_output(model / "sub" / "new.json", inputs=[model])
    assert not (model / "sub").exists()
    # existing outputs only with force; the wrong kind of thing is an error either way
    with pytest.raises(FileExistsError, match="--force"):
        check_output(src)
    assert check_output(src, force=True) == src
    with pytest.raises(IsADirectoryError):
        check_output(model, force=True)
    with pytest.raises(NotADirectoryError):
        check_output(src, kind="dir", force=True)
    with pytest.raises(FileExistsError, match="not empty"):
        check_output(model, kind="dir")


def test_run_folder_marker(tmp_path):
    run_dir = tmp_path / "run"
    assert check_run_folder(run_dir, "abc") == "new"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("# mine\n")
    with pytest.raises(FileExistsError, match="not a simvq run folder"):
        check_run_folder(run_dir, "abc")
    assert check_run_folder(run_dir, "abc", inputs=[run_dir / "config.yaml"]) == "new"  # only the config read
    mark_run_folder(run_dir, "abc")
    assert check_run_folder(run_dir, "abc") == "resume"
    with pytest.raises(ValueError, match="different model/quantizer config"):
        check_run_folder(run_dir, "xyz")


def test_interrupted_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "eval.json"
    target.write_text("old")

    def crash(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        save_file_atomic(target, crash)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_interrupted_png_write_leaves_no_partial_image(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from simvq.modalities.image.data import save_image_file

    def crash(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(PILImage.Image, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_image_file(torch.zeros(1, 4, 4), tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


# ----- eval -----------------------------------------------------------------------------------------------
def test_eval_bad_inputs(capsys, tmp_path, image_model):
    m = image_model
    cases = [
        (["--model", tmp_path / "nope"], "does not exist"),  # missing
        (["--model", tmp_path], "not a complete model directory"),  # empty
        (["--model", m, "--batch-size", "0"], "--batch-size"),  # wrong value
        (["--model", m, "--limit", "-3"], "--limit"),
        (["--model", m, "--batch-size", "two"], "--batch-size"),
        (["--model", m, "--out", m / "model.safetensors", "--force"], "input folder"),  # colliding output
        (["--model", m, "--out", m / "config.yaml"], "input folder"),
        (["--model", m, "--out", m], "input"),
        (["--model", m, "--out", m / "new.json"], "input folder"),  # a new file inside the model folder
        (["--model", m, "--device", "tpu"], "not a device"),  # a device this torch does not know
        (["--model", m, "--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "device"),  # one this machine lacks
    ]
    for args, expect in cases:
        assert_user_error(capsys, ["eval", *args, "--device", "cpu"], expect, [m])

    truncated = _copy_model(m, tmp_path / "truncated")
    _truncate(m / "model.safetensors", truncated / "model.safetensors")
    assert_user_error(capsys, ["eval", "--model", truncated], "safetensors", [truncated])
    corrupt = _copy_model(m, tmp_path / "corrupt")
    (corrupt / "config.yaml").write_text("model: {ch: 16\n")
    assert_user_error(capsys, ["eval", "--model", corrupt], "not valid YAML", [corrupt])
    listed = _copy_model(m, tmp_path / "listed")
    (listed / "config.yaml").write_text("- 1\n- 2\n")
    assert_user_error(capsys, ["eval", "--model", listed], "mapping", [listed])
    # config.yaml disagrees with the weights (codebook size): a named mismatch, not a traceback
    mismatch = _copy_model(m, tmp_path / "mismatch")
    text = (mismatch / "config.yaml").read_text().replace("codebook_size: 64", "codebook_size: 128")
    (mismatch / "config.yaml").write_text(text)
    assert_user_error(capsys, ["eval", "--model", mismatch, "--device", "cpu"], "does not match model.safetensors", [mismatch])


def test_eval_out_exists_needs_force(capsys, tmp_path, image_model):
    out = tmp_path / "e.json"
    out.write_text("{}")
    assert_user_error(capsys, ["eval", "--model", image_model, "--out", out, "--usage-only", "--limit", "4"], "--force", [out, image_model])
    code, _, err = run(capsys, "eval", "--model", image_model, "--out", out, "--usage-only", "--limit", "4", "--device", "cpu", "--force")
    assert code == 0, err
    assert '"utilization"' in out.read_text()


# ----- encode ---------------------------------------------------------------------------------------------
def test_encode_bad_inputs(capsys, tmp_path, image_model, images):
    m = image_model
    out = tmp_path / "t.npz"
    (tmp_path / "empty").mkdir()
    bad_png = tmp_path / "bad" / "bad.png"
    bad_png.parent.mkdir()
    _truncate(images / "im0.png", bad_png, 0.4)
    text_png = tmp_path / "text" / "x.png"
    text_png.parent.mkdir()
    text_png.write_text("not an image")
    existing = tmp_path / "existing.npz"
    existing.write_bytes(b"keep me")
    cases = [
        ([tmp_path / "missing.png"], "neither", [m]),  # missing
        ([tmp_path / "empty"], "", [m]),  # empty folder
        ([bad_png], "", [m, bad_png]),  # truncated
        ([text_png], "", [m, text_png]),  # corrupt / wrong type
        ([images, "--size", "0"], "--size", [m, images]),  # wrong value
        ([images, "--size", "-16"], "--size", [m, images]),
    ]
    for extra, expect, inputs in cases:
        assert_user_error(capsys, ["encode", "--model", m, *extra[:1], "--out", out, *extra[1:], "--device", "cpu"], expect, inputs)
    # colliding outputs: an input image, the model's own files, an existing file without --force
    assert_user_error(capsys, ["encode", "--model", m, images, "--out", images / "im0.png", "--force"], "input", [m, images])
    assert_user_error(capsys, ["encode", "--model", m, images, "--out", m / "model.safetensors", "--force"], "input", [m, images])
    assert_user_error(capsys, ["encode", "--model", m, images, "--out", existing], "exists", [m, images, existing])
    # a new file inside an input folder, and a token file not named .npz: refused before any encoding
    assert_user_error(capsys, ["encode", "--model", m, images, "--out", images / "t.npz"], "input folder", [m, images])
    assert_user_error(capsys, ["encode", "--model", m, images, "--out", tmp_path / "t.txt"], "end in .npz", [m, images])
    assert not (images / "t.npz").exists() and not (tmp_path / "t.txt").exists()


# ----- decode ---------------------------------------------------------------------------------------------
def test_decode_bad_inputs(capsys, tmp_path, image_model, audio_model, tokens):
    m = image_model
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    truncated = _truncate(tokens, tmp_path / "truncated.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(os.urandom(512))
    no_meta = tmp_path / "plain.npz"
    np.savez(no_meta, a=np.zeros(3))
    cases = [
        (tmp_path / "missing.npz", "does not exist"),  # missing
        (empty, "truncated or corrupt"),  # empty
        (truncated, "truncated or corrupt"),  # truncated
        (corrupt, "truncated or corrupt"),  # corrupt
        (no_meta, "not a simvq token file"),  # wrong type
    ]
    for token_file, expect in cases:
        assert_user_error(capsys, ["decode", "--model", m, token_file, "--out", tmp_path / "dec"], expect, [m, token_file])
    # tokens of another model (wrong type for this model)
    assert_user_error(capsys, ["decode", "--model", audio_model, tokens, "--out", tmp_path / "dec"], "different model", [audio_model, tokens])
    # colliding outputs: the model folder, the token file itself, an existing PNG without --force
    assert_user_error(capsys, ["decode", "--model", m, tokens, "--out", m, "--force"], "input", [m, tokens])
    assert_user_error(capsys, ["decode", "--model", m, tokens, "--out", tokens, "--force"], "input", [m, tokens])
    dec = tmp_path / "dec2"
    dec.mkdir()
    (dec / "im0.png").write_bytes(b"mine")
    assert_user_error(capsys, ["decode", "--model", m, tokens, "--out", dec], "not empty", [m, tokens, dec])
    assert_user_error(capsys, ["decode", "--model", m, tokens, "--out", dec, "--force"], "not empty", [m, tokens, dec])
    # an index out of range in any item: refused before the first image is written
    with np.load(tokens) as npz:  # the file as written, its last item's indices set past the codebook
        arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(arrays["meta"].tobytes())
    last = f"tokens_{len(meta['names']) - 1}"
    arrays[last] = np.full(arrays[last].shape, np.iinfo(arrays[last].dtype).max, dtype=arrays[last].dtype)
    assert meta["codebook_size"] <= np.iinfo(arrays[last].dtype).max
    bad = tmp_path / "bad_index.npz"
    np.savez(bad, **arrays)
    assert_user_error(capsys, ["decode", "--model", m, bad, "--out", tmp_path / "dec3"], "must lie in", [m, bad])
    assert not (tmp_path / "dec3").exists()
    # a folder or a text file named as the token file: said for what it is, not "missing"
    text = tmp_path / "notes.txt"
    text.write_text("not tokens")
    assert_user_error(capsys, ["decode", "--model", m, tmp_path / "dec2", "--out", tmp_path / "dec4"], "is a folder", [m])
    assert_user_error(capsys, ["decode", "--model", m, text, "--out", tmp_path / "dec4"], "not a readable .npz", [m, text])
    assert not (tmp_path / "dec4").exists()


def test_decode_truncated_audio_tokens(capsys, tmp_path, audio_model):
    rate = 16000
    wav = tmp_path / "a.wav"
    import soundfile as sf

    sf.write(str(wav), (0.1 * np.sin(np.arange(rate // 2) / 5)).astype(np.float32), rate)
    tok = tmp_path / "a.npz"
    code, _, err = run(capsys, "encode", "--model", audio_model, wav, "--out", tok, "--device", "cpu")
    assert code == 0, err
    bad = _truncate(tok, tmp_path / "a_trunc.npz")
    assert_user_error(capsys, ["decode", "--model", audio_model, bad, "--out", tmp_path / "o.wav"], "truncated or corrupt", [audio_model, bad])
    # a decoded wav never replaces the encoded source without --force
    assert_user_error(capsys, ["decode", "--model", audio_model, tok, "--out", wav], "exists", [audio_model, tok, wav])


# ----- convert --------------------------------------------------------------------------------------------
def test_convert_bad_inputs(capsys, tmp_path, image_model):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, full)
    truncated = _truncate(full, tmp_path / "trunc.ckpt")
    listed = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], listed)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    images_dir = tmp_path / "a_folder"
    images_dir.mkdir()
    cases = [
        (tmp_path / "missing.ckpt", tmp_path / "o1", "not found"),  # missing
        (empty, tmp_path / "o2", "not a readable"),  # empty
        (truncated, tmp_path / "o3", "not a readable"),  # truncated
        (listed, tmp_path / "o4", "no state_dict"),  # wrong type
        (full, a_file, "not a folder"),  # colliding: a file
        (full, image_model, "already holds a model"),  # colliding: an existing model without --force
        (images_dir, tmp_path / "o5", "is a folder"),  # a folder named as the checkpoint
    ]
    for ckpt, out, expect in cases:
        assert_user_error(capsys, ["convert", "--from", "official", ckpt, out], expect, [ckpt, image_model, a_file])
        assert not (Path(out) / "model.safetensors").exists() or Path(out) == image_model
    # even with --force, the checkpoint read is never replaced by the weights written
    inside = tmp_path / "inside"
    inside.mkdir()
    ckpt = inside / "model.safetensors"
    ckpt.write_bytes(full.read_bytes())
    assert_user_error(capsys, ["convert", "--from", "official", ckpt, inside, "--force"], "input", [inside])


# ----- data -----------------------------------------------------------------------------------------------
def test_data_bad_inputs(capsys, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    assert_user_error(capsys, ["data", "speech", "--out", a_file], "not a folder", [a_file])
    assert_user_error(capsys, ["data", "speech", "--out", busy], "not empty", [busy])
    assert_user_error(capsys, ["data", "speech", "--out", tmp_path / "new", "--sentences", "0"], "--sentences", [])
    assert_user_error(capsys, ["data", "speech", "--out", tmp_path / "new", "--sample-rate", "-1"], "--sample-rate", [])


# ----- train (no training happens in these: every error comes before the first step) --------------------
TINY = ["trainer.max_steps=2", "loss.gan_weight=0.0", "data.batch_size=8", "trainer.loggers=[csv]"]


def test_train_bad_inputs(capsys, tmp_path, image_model):
    cfg_dir = tmp_path / "cfgs"
    cfg_dir.mkdir()
    empty = cfg_dir / "empty.yaml"
    empty.write_text("")
    broken = cfg_dir / "broken.yaml"
    broken.write_text("modality: image\nmodel: {ch: 16\n")
    listed = cfg_dir / "listed.yaml"
    listed.write_text("- 1\n- 2\n")
    truncated = _truncate(Path(__file__).resolve().parents[1] / "simvq" / "configs" / "image" / "digits-tiny.yaml", cfg_dir / "trunc.yaml", 0.37)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    out = tmp_path / "run"
    cases = [
        (["--config", cfg_dir / "missing.yaml"], "no config file"),  # missing
        (["--config", empty], "is empty"),  # empty
        (["--config", broken], "not valid YAML"),  # corrupt
        (["--config", listed], "mapping"),  # wrong type
        (["--config", "image/digits-tiny", "optim.betas=[0.5,"], "not valid YAML"),  # corrupt override
        (["--config", "image/digits-tiny", "trainer.log_every=abc"], "trainer.log_every"),  # wrong-type override
        (["--config", "image/digits-tiny", "--max-steps", "0"], "--max-steps"),
        (["--config", "image/digits-tiny", "--out", a_file], "not a folder"),  # colliding outputs
        (["--config", "image/digits-tiny", "--out", image_model], "model directory"),
        (["--config", "image/digits-tiny", "--out", other], "not a simvq run folder"),
    ]
    for args, expect in cases:
        if "--out" not in args:
            args = [*args, "--out", out]
        assert_user_error(capsys, ["train", *args, *TINY, "--quiet"], expect, [cfg_dir, image_model, other, a_file])
    # the truncated preset file fails with a one-line error too (whichever key it lost)
    code, _, err = run(capsys, "train", "--config", truncated, "--out", out, "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def _nan_speech_folder(root: Path) -> Path:
    import soundfile as sf

    rate = 16000
    for i in range(3):
        wave = (0.1 * np.sin(np.arange(rate) * (i + 1) / 7)).astype(np.float32)
        if i == 1:
            wave[1234] = np.nan
        sf.write(str(root / f"clip{i}.wav"), wave, rate, subtype="FLOAT")
    return root / "clip1.wav"


def test_nan_audio_sample_is_named_when_read(tmp_path):
    from simvq.modalities.audio.data import read_audio

    bad = _nan_speech_folder(tmp_path)
    with pytest.raises(ValueError, match=r"clip1\.wav.*sample 1234"):
        read_audio(bad, sample_rate=16000)


@pytest.mark.slow
def test_train_on_a_nan_clip_names_the_file_not_the_quantizer(capsys, tmp_path):
    folder = tmp_path / "speech"
    folder.mkdir()
    bad = _nan_speech_folder(folder)
    args = ["train", "--config", "audio/speech-tiny", "--out", tmp_path / "run", "--quiet", "data.dataset=folder",
            f"data.path={folder}", "data.train_limit=null", "trainer.max_steps=3", "data.batch_size=3",
            "data.eval_fraction=0.34"]
    before = digests(folder)
    code, _, err = run(capsys, *args)
    assert code == 2, err[-2000:]
    assert "clip1.wav" in err and "sample 1234" in err and "diverged" not in err
    assert digests(folder) == before
    assert str(bad) in err or bad.name in err


# ----- train: data loss -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_keeps_the_users_config_file_in_the_run_folder(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = run_dir / "config.yaml"
    text = Path(__file__).resolve().parents[1].joinpath("simvq/configs/image/digits-tiny.yaml").read_text()
    cfg.write_text("# my own notes: keep me\n" + text)
    before = digests(cfg)
    code, _, err = run(capsys, "train", "--config", cfg, "--out", run_dir, *TINY, "--quiet")
    assert code == 0, err
    assert digests(cfg) == before  # comments and all
    # the same command resumes that run folder; it still does not rewrite the file
    code, _, err = run(capsys, "train", "--config", cfg, "--out", run_dir, *TINY, "--max-steps", "3", "--quiet")
    assert code == 0, err
    assert digests(cfg) == before
    # another codebook size beside these weights is refused, nothing changes
    model = run_dir / "model"
    snapshot = digests(run_dir)
    assert_user_error(capsys, ["train", "--config", cfg, "--out", run_dir, *TINY, "quantizer.codebook_size=128", "--quiet"],
                      "different model/quantizer config", [run_dir])
    assert_user_error(capsys, ["train", "--config", "image/digits-tiny", "--out", model, *TINY, "quantizer.codebook_size=128", "--quiet"],
                      "model directory", [run_dir])
    assert digests(run_dir) == snapshot


# ----- precision --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true"])
def test_tiny_image_preset_trains_two_steps_under_every_accepted_precision(tmp_path, precision):
    from simvq.config import PRECISIONS
    from simvq.training import train

    assert precision in PRECISIONS
    try:
        result = train(
            "image/digits-tiny", out_dir=tmp_path / "run", progress=False,
            overrides=[*TINY, f"trainer.precision={precision}", "trainer.accelerator=cpu", "trainer.num_threads=1"],
        )
    except (ValueError, RuntimeError) as err:
        if precision == "16-mixed" and ("16-mixed" in str(err) or "CUDA" in str(err) or "float16" in str(err)):
            pytest.skip(f"Lightning/torch refuse 16-mixed on CPU: {err}")
        raise
    assert result.steps == 2 and not result.diverged, result.diverged_reason
    assert result.model_dir is not None


# ----- trainer settings and --init weights: refused before the run folder is made ---------------------------
def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_train_refuses_trainer_settings_this_machine_cannot_use(capsys, tmp_path):
    out = tmp_path / "run"
    cases = [
        ("trainer.devices=abc", "trainer.devices"),
        ("trainer.devices=0", "trainer.devices"),
        ("trainer.strategy=bogus", "trainer.strategy"),
        ("trainer.num_nodes=0", "trainer.num_nodes"),
        ("trainer.accelerator=bogus", "trainer.accelerator"),
    ]
    if not _importable("torch_xla"):
        cases.append(("trainer.accelerator=tpu", "trainer.accelerator"))
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        cases.append(("trainer.accelerator=gpu", "trainer.accelerator"))
    for setting, expect in cases:
        assert_user_error(capsys, ["train", "--config", "image/digits-tiny", "--out", out, "--max-steps", "1", *TINY,
                                   setting, "--quiet"], expect, [])
        assert not out.exists(), setting
    # the accelerator error says what this machine has
    code, _, err = run(capsys, "train", "--config", "image/digits-tiny", "--out", out, *TINY, "trainer.accelerator=bogus")
    assert code == 2 and "this machine has:" in err and "cpu" in err.split("this machine has:", 1)[1], err
    assert not out.exists()


def test_trainer_settings_lightning_accepts_pass_the_check():
    from simvq.training import check_trainer_settings

    for settings in ({"accelerator": "auto", "devices": "auto", "strategy": "auto"},
                     {"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"},
                     {"accelerator": "cpu", "devices": 1, "num_nodes": 2, "strategy": "ddp"},
                     load_config("image/digits-tiny")["trainer"]):
        check_trainer_settings(settings)


def test_train_init_from_a_model_of_another_config_is_one_line(capsys, tmp_path):
    torch.manual_seed(0)
    models = []
    for name, overrides in (("fsq", ["quantizer.name=fsq", "quantizer.codebook_size=256"]),
                            ("k128", ["quantizer.codebook_size=128"])):
        cfg = load_config("image/digits-tiny", overrides)
        models.append(save_model_dir(tmp_path / name, build_tokenizer(cfg), cfg))
    out = tmp_path / "run"
    for model in models:
        assert_user_error(capsys, ["train", "--config", "image/digits-tiny", "--out", out, "--max-steps", "1", *TINY,
                                   "--init", model, "--quiet"], "--init", [model])
        assert not out.exists()
    code, _, err = run(capsys, "train", "--config", "image/digits-tiny", "--out", out, *TINY, "--init", models[1], "--quiet")
    assert code == 2 and "quantize.embedding.weight 128x16 vs 64x16" in err and "config.yaml" in err, err
    assert not out.exists()
