"""Token priors on audio tokenizers: windows, held-out bits/token and bits/s, sampling to wav, eval-prior, errors.

The data are synthetic wav files of known lengths (a folder data set), so every count and sample is checked
against the files read here with soundfile, not against the code's own data path. The tokenizer is the
`audio/speech-tiny` preset with untrained weights (16 kHz, hop 320, 50 tokens/s, K = 64).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from simvq.checkpoints import load_tokenizer, save_model_dir
from simvq.cli import main
from simvq.config import load_config
from simvq.modalities import build_tokenizer

RATE, HOP, FRAMES = 16000, 320, 8
WINDOW = FRAMES * HOP  # 2,560 samples = 0.16 s
EVAL_LENGTHS = (15200, 8000, 4321, 2000, 2559)  # windows: 5, 3, 1, 0, 0 (each remainder dropped)
TRAIN_LENGTHS = (9000, 12000, 7001, 16000, 11000, 5000)


def _clip(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / RATE
    wave = 0.3 * np.sin(2 * np.pi * (120 + 40 * seed) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(n)
    return np.round(wave * 32767) / 32767  # exactly representable in 16-bit PCM


@pytest.fixture(scope="module")
def audio_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio_data")
    for split, lengths in (("train", TRAIN_LENGTHS), ("eval", EVAL_LENGTHS)):
        (root / split).mkdir()
        for i, n in enumerate(lengths):
            sf.write(root / split / f"clip_{i}.wav", _clip(n, i + (100 if split == "eval" else 0)), RATE, subtype="PCM_16")
    return root


def _tokenizer_dir(root, audio_folders, name, **data):
    overrides = ["data.dataset=folder", f"data.path={audio_folders / 'train'}", f"data.eval_path={audio_folders / 'eval'}",
                 "data.eval_max_seconds=null"] + [f"data.{k}={v}" for k, v in data.items()]
    config = load_config("audio/speech-tiny", overrides)
    torch.manual_seed(0)
    directory = root / name / "model"
    save_model_dir(directory, build_tokenizer(config), config)
    return directory


@pytest.fixture(scope="module")
def tokenizer_dir(audio_folders, tmp_path_factory):
    return _tokenizer_dir(tmp_path_factory.mktemp("tok"), audio_folders, "tiny")


TINY = ["model.width=32", "model.depth=2", "model.heads=2", f"data.frames={FRAMES}", "data.crops=3", "data.batch_size=6",
        "data.eval_batch_size=4", "optim.lr=1e-2", "optim.warmup_steps=2", "trainer.log_every=10", "trainer.checkpoint_every=100",
        "eval.samples=4", "eval.batch_size=4"]


@pytest.fixture(scope="module")
def trained_prior(tokenizer_dir, tmp_path_factory):
    from simvq.prior.train import train_prior

    out = tmp_path_factory.mktemp("prior") / "run"
    result = train_prior(tokenizer_dir, out, "prior/speech-cpu", overrides=TINY, max_steps=20, progress=False)
    return out, result


def _held_out_windows_by_hand(audio_folders) -> torch.Tensor:
    """Consecutive non-overlapping windows of every held-out file, read here with soundfile: ``(N, 1, WINDOW)``."""
    out = []
    for i in range(len(EVAL_LENGTHS)):
        wave, rate = sf.read(audio_folders / "eval" / f"clip_{i}.wav", dtype="float32")
        assert rate == RATE
        out += [wave[k * WINDOW : (k + 1) * WINDOW] for k in range(len(wave) // WINDOW)]
    return torch.from_numpy(np.stack(out))[:, None]


# ----- windows -------------------------------------------------------------------------------------------------
def test_held_out_windows_are_consecutive_non_overlapping_and_counted(audio_folders, tokenizer_dir):
    from simvq.checkpoints import load_model_dir
    from simvq.prior.data import data_config, prior_datasets

    _, tok_config = load_model_dir(tokenizer_dir)
    train, held_out = prior_datasets(data_config(tok_config, {}), {"frames": FRAMES, "crops": 3})
    assert len(held_out) == sum(n // WINDOW for n in EVAL_LENGTHS) == 9
    expected = _held_out_windows_by_hand(audio_folders)
    got = torch.stack([held_out[i] for i in range(len(held_out))])
    assert got.shape == (9, 1, WINDOW) and torch.equal(got, expected)
    # 3 crops of each training clip, each a contiguous stretch of its file of exactly FRAMES tokens' samples
    assert len(train) == 3 * len(TRAIN_LENGTHS)
    tok = load_tokenizer(tokenizer_dir)
    for j in (0, 4, 17):
        crop = train[(j, 0)]
        assert crop.shape == (1, WINDOW)
        source, _ = sf.read(audio_folders / "train" / f"clip_{j // 3}.wav", dtype="float32")
        starts = [s for s in range(len(source) - WINDOW + 1) if np.array_equal(source[s : s + WINDOW], crop[0].numpy())]
        assert starts, j
        with torch.no_grad():
            assert tok.encode(crop[None]).indices.shape == (1, FRAMES)


def test_a_window_that_does_not_encode_to_frames_tokens_is_refused():
    from simvq.prior.data import as_grid

    assert as_grid(torch.zeros(2, FRAMES, dtype=torch.long), FRAMES).shape == (2, 1, FRAMES)
    with pytest.raises(ValueError, match="not \\(B, 8\\)"):
        as_grid(torch.zeros(2, FRAMES + 1, dtype=torch.long), FRAMES)
    with pytest.raises(ValueError, match="single-level"):
        as_grid(torch.zeros(2, FRAMES, 2, dtype=torch.long), FRAMES)


# ----- training and held-out figures against a float64 hand computation ------------------------------------------
@pytest.mark.slow
def test_held_out_bits_per_token_and_per_second_equal_a_hand_computation(trained_prior, tokenizer_dir, audio_folders):
    from safetensors.torch import load_file

    from simvq.prior.train import load_prior

    out, result = trained_prior
    prior, cfg = load_prior(out)
    assert prior.grid == (1, FRAMES) and prior.num_classes == 0 and prior.codebook_size == 64
    assert cfg["model"]["grid"] == [1, FRAMES] and cfg["data"]["frames"] == FRAMES
    # the held-out tokens are the hand-cut windows encoded by the tokenizer
    tok = load_tokenizer(tokenizer_dir)
    with torch.no_grad():
        tokens = tok.encode(_held_out_windows_by_hand(audio_folders)).indices
    assert tokens.shape == (9, FRAMES)
    assert torch.equal(load_file(str(out / "tokens" / "eval.safetensors"))["tokens"].long(), tokens[:, None])
    assert len(load_file(str(out / "tokens" / "train.safetensors"))["tokens"]) == 3 * len(TRAIN_LENGTHS)
    # mean -log2 p(t_i | t_<i) from the prior's own logits, in float64
    with torch.no_grad():
        logits = prior(tokens[:, :-1]).double()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    bits = float(-logp.mean() / math.log(2))
    m = result.metrics
    assert m["bits_per_token"] == pytest.approx(bits, rel=2e-6)
    assert m["bits_per_second"] == pytest.approx(bits * RATE / HOP, rel=2e-6)  # 50 tokens/s
    assert m["tokens_per_second"] == tok.tokens_per_second == 50.0
    assert m["bits_per_window"] == pytest.approx(bits * FRAMES, rel=2e-6)
    assert m["windows"] == 9 and "bits_per_image" not in m and "images" not in m
    # stored where the image path stores its metrics
    assert json.loads((out / "history.json").read_text())["held_out"]["bits_per_second"] == pytest.approx(m["bits_per_second"])
    # the prior learned something: its loss fell from the uniform log(64)
    assert result.history[-1]["loss_nats"] < result.history[0]["loss_nats"]


def test_token_cache_is_reused_only_for_the_same_window_length(tokenizer_dir, tmp_path):
    from simvq.checkpoints import load_model_dir
    from simvq.prior.data import data_config, load_or_encode, prior_datasets
    from simvq.prior.train import tokenizer_hash

    _, tok_config = load_model_dir(tokenizer_dir)
    tok = load_tokenizer(tokenizer_dir)
    dcfg = data_config(tok_config, {})
    key = tokenizer_hash(tok_config)
    _, held_out = prior_datasets(dcfg, {"frames": FRAMES})
    first, labels, reused = load_or_encode(tmp_path, tok, key, dcfg, held_out, "eval", frames=FRAMES)
    assert not reused and labels is None and first.shape == (9, 1, FRAMES)
    again, _, reused = load_or_encode(tmp_path, tok, key, dcfg, held_out, "eval", frames=FRAMES)
    assert reused and torch.equal(again, first)
    # as many windows (9) of twice the length: the cache of 8-token windows is not taken for them
    longer = [0.1 * torch.randn(1, 2 * WINDOW, generator=torch.Generator().manual_seed(i)) for i in range(9)]
    tokens, _, reused = load_or_encode(tmp_path, tok, key, dcfg, longer, "eval", frames=2 * FRAMES)
    assert not reused and tokens.shape == (9, 1, 2 * FRAMES)


# ----- sampling -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sample_writes_wavs_that_decode_from_the_saved_indices(trained_prior, tokenizer_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    out, _ = trained_prior
    target = tmp_path / "s"
    assert main(["sample", "--prior", str(out), "--n", "3", "--seed", "5", "--out", str(target)]) == 0
    names = sorted(p.name for p in target.iterdir() if not p.name.startswith("."))
    assert names == ["indices.safetensors", "sample.json", "sample_000.wav", "sample_001.wav", "sample_002.wav"]
    indices = load_file(str(target / "indices.safetensors"))["indices"]
    assert indices.shape == (3, 1, FRAMES) and int(indices.max()) < 64
    tok = load_tokenizer(tokenizer_dir)
    with torch.no_grad():
        reference = tok.decode_indices(indices[:, 0]).clamp(-1, 1)
    for i in range(3):
        wave, rate = sf.read(target / f"sample_{i:03d}.wav", dtype="float32")
        assert rate == RATE and wave.shape == (WINDOW,) and sf.info(target / f"sample_{i:03d}.wav").subtype == "PCM_16"
        assert np.abs(wave - reference[i, 0].numpy()).max() <= 1.0 / 32768 + 1e-6
    assert json.loads((target / "sample.json").read_text())["seed"] == 5
    # a smaller --n with --force leaves no earlier sample behind
    assert main(["sample", "--prior", str(out), "--n", "1", "--out", str(target), "--force"]) == 0
    assert sorted(p.name for p in target.glob("sample_*")) == ["sample_000.wav"]
    capsys.readouterr()


# ----- eval-prior -----------------------------------------------------------------------------------------------
class _FakeDNSMOS:
    """Scores a waveform by its length and RMS, so the means can be computed here by hand."""

    def __init__(self):
        self.lengths = []

    def __call__(self, wave):
        self.lengths.append(len(wave))
        rms = float(np.sqrt(np.mean(np.asarray(wave, dtype=np.float64) ** 2)))
        return {"dnsmos_sig": rms, "dnsmos_bak": 1.0, "dnsmos_ovrl": 2 * rms, "dnsmos_p808": 3.0}


def test_dnsmos_proxy_means_and_unavailable_dnsmos(monkeypatch):
    from simvq.modalities.audio import metrics, prior

    gen = torch.Generator().manual_seed(0)
    samples = 0.1 * torch.randn(3, 1, WINDOW, generator=gen)
    refs = 0.2 * torch.randn(2, 1, WINDOW, generator=gen)
    fake = _FakeDNSMOS()
    res = prior.prior_sample_metrics(samples, refs, RATE, dnsmos=fake)
    # each window is tiled to DNSMOS's 9.01 s input at 16 kHz
    assert fake.lengths == [int(metrics.DNSMOS_WINDOW_S * 16000)] * 5
    rms = lambda x: np.sqrt(np.mean(np.resize(x.double().numpy().reshape(-1), 144160) ** 2))  # noqa: E731
    assert res["dnsmos_samples"]["dnsmos_ovrl"] == pytest.approx(np.mean([2 * rms(s) for s in samples]), rel=1e-6)
    assert res["dnsmos_reconstructed_held_out"]["dnsmos_sig"] == pytest.approx(np.mean([rms(r) for r in refs]), rel=1e-6)
    assert res["dnsmos_samples_n"] == 3 and res["dnsmos_reference_n"] == 2 and "proxy" in res["sample_quality_proxy"]

    def missing(*a, **k):
        raise RuntimeError("DNSMOS needs onnxruntime: `pip install onnxruntime`")

    monkeypatch.setattr(metrics, "DNSMOS", missing)
    res = prior.prior_sample_metrics(samples, refs, RATE)
    assert "onnxruntime" in res["dnsmos_unavailable"] and "dnsmos_samples" not in res


@pytest.mark.slow
def test_eval_prior_reports_bits_per_second_and_the_proxy_not_image_metrics(trained_prior, tmp_path, monkeypatch):
    from simvq.modalities.audio import metrics

    monkeypatch.setattr(metrics, "DNSMOS", _FakeDNSMOS)  # the real one costs ~0.3 s a window; tested above
    out, result = trained_prior
    target = tmp_path / "eval.json"
    assert main(["eval-prior", "--prior", str(out), "--samples", "4", "--out", str(target)]) == 0
    res = json.loads(target.read_text())
    assert res["bits_per_token"] == pytest.approx(result.metrics["bits_per_token"], rel=1e-6)
    assert res["bits_per_second"] == pytest.approx(res["bits_per_token"] * 50, rel=1e-9)
    assert res["nll_windows"] == res["held_out_windows"] == 9 and res["samples"] == 4
    assert res["dnsmos_samples_n"] == 4 and res["dnsmos_reference_n"] == 4 and "dnsmos_ovrl" in res["dnsmos_samples"]
    assert {"gfid", "precision", "recall", "class_accuracy"} <= set(res["not_computed"]["metrics"])
    assert not {"gfid", "proxy_gfid_classifier", "precision", "recall", "class_accuracy", "bits_per_image"} & set(res)


# ----- user errors: one line, exit code 2, nothing written ---------------------------------------------------------
def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for word in words:
        assert word in err[0], err[0]


def test_a_held_out_split_shorter_than_one_window_is_refused(tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "p"
    # the longest held-out clip is 15,200 samples: 47 tokens of 320; a window of 48 tokens does not fit
    argv = ["prior", "train", "--tokenizer", str(tokenizer_dir), "--config", "prior/speech-cpu", "--out", str(out), "data.frames=48"]
    assert main(argv) == 2
    _one_line_error(capsys, "no window of data.frames=48", "lower data.frames to at most 47")
    assert not out.exists()


def test_an_audio_tokenizer_needs_data_frames_and_an_image_one_refuses_it(tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["prior", "train", "--tokenizer", str(tokenizer_dir), "--config", "prior/fashion-cpu", "--out", str(out)]) == 2
    _one_line_error(capsys, "audio tokenizer", "set data.frames")
    config = load_config("image/digits-tiny")
    image_dir = tmp_path / "img" / "model"
    save_model_dir(image_dir, build_tokenizer(config), config)
    assert main(["prior", "train", "--tokenizer", str(image_dir), "--config", "prior/speech-cpu", "--out", str(out)]) == 2
    _one_line_error(capsys, "data.frames is for audio tokenizers")
    assert not out.exists()


@pytest.mark.slow
def test_class_and_guidance_on_an_audio_prior_are_refused(trained_prior, tmp_path, capsys):
    out, _ = trained_prior
    for extra, words in ((["--class", "1"], ("unconditional",)), (["--class", "0", "--cfg-scale", "2"], ("unconditional",)),
                         (["--cfg-scale", "2"], ("needs --class",))):
        assert main(["sample", "--prior", str(out), "--n", "2", "--out", str(tmp_path / "s"), *extra]) == 2
        _one_line_error(capsys, *words)
    assert not (tmp_path / "s").exists()
