"""Token prior: likelihood, sampling (KV cache, guidance), generation metrics, training, and input errors.

Every number is checked against an independent reference: a hand computation, float64 NumPy/SciPy, or a
second, naive implementation written here.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from simvq.io import prepare_output_dir as prepare_out_dir
from simvq.prior.command import (
    add_eval_prior_arguments,
    add_prior_train_arguments,
    add_sample_arguments,
    run_eval_prior,
    run_prior_train,
    run_sample,
)
from simvq.prior.config import load_prior_config
from simvq.prior.metrics import frechet_distance, held_out_nll, precision_recall
from simvq.prior.model import TokenPrior
from simvq.prior.sample import filter_logits, guided_logits, sample


def _parse(add, argv):
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


def _random_prior(**kw) -> TokenPrior:
    torch.manual_seed(0)
    args = dict(codebook_size=37, grid=(3, 4), num_classes=5, width=32, depth=2, heads=4)
    args.update(kw)
    prior = TokenPrior(**args).eval()
    with torch.no_grad():  # larger weights than the init: sharper, more varied distributions
        for p in prior.parameters():
            p.mul_(8.0)
    return prior


# ----- likelihood against a hand computation ---------------------------------------------------------------
def _known_prior(probs, grid):
    """A prior whose next-token distribution is ``probs`` at every position: attention and MLP outputs are
    zero, every embedding is the all-ones vector (RMS 1), and the output layer maps it to ``log probs``."""
    k, width = len(probs), 4
    prior = TokenPrior(codebook_size=k, grid=grid, num_classes=0, width=width, depth=2, heads=2, positions="learned")
    with torch.no_grad():
        for p in prior.parameters():
            p.zero_()
        prior.token_embedding.weight.fill_(1.0)
        prior.class_embedding.weight.fill_(1.0)
        prior.norm.weight.fill_(1.0)
        for block in prior.blocks:
            block.norm1.weight.fill_(1.0)
            block.norm2.weight.fill_(1.0)
        logp = torch.log(torch.tensor(probs, dtype=torch.float64))
        prior.head.weight.copy_((logp / width).float()[:, None].expand(k, width))
    return prior.eval()


def test_bits_per_token_equals_hand_computation():
    prior = _known_prior([0.5, 0.25, 0.125, 0.125], grid=(2, 2))
    tokens = torch.tensor([[[0, 1], [2, 3]], [[0, 0], [0, 1]]])
    # -log2 p: token 0 -> 1 bit, 1 -> 2 bits, 2 and 3 -> 3 bits
    bits = [1 + 2 + 3 + 3, 1 + 1 + 1 + 2]
    nll = held_out_nll(prior, tokens, batch_size=1)
    assert nll["bits_per_token"] == pytest.approx(sum(bits) / 8, abs=1e-6)
    assert nll["bits_per_image"] == pytest.approx(sum(bits) / 2, abs=1e-5)
    assert nll["nats_per_token"] == pytest.approx(sum(bits) / 8 * math.log(2), abs=1e-6)
    # and the model's loss (nats) agrees
    assert float(prior.loss(tokens).detach()) == pytest.approx(sum(bits) / 8 * math.log(2), abs=1e-6)


def test_parameter_counts_of_embedding_and_output_layer():
    prior = TokenPrior(codebook_size=262_144, grid=(2, 2), width=8, depth=1, heads=2)
    counts = prior.parameter_counts()
    assert counts["token_embedding"] == 262_144 * 8 and counts["output_layer"] == 8 * 262_144
    assert counts["total"] == sum(p.numel() for p in prior.parameters())
    # LlamaGen-B's shape: about 111 M parameters at K = 16,384
    cfg = load_prior_config("prior/llamagen-b")["model"]
    big = TokenPrior(codebook_size=16_384, grid=(16, 16), num_classes=1000, width=cfg["width"], depth=cfg["depth"],
                     heads=cfg["heads"], ffn_multiple_of=cfg["ffn_multiple_of"])
    assert 105e6 < big.parameter_counts()["total"] < 115e6


# ----- sampling -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_kv_cache_sampling_equals_uncached(positions):
    prior = _random_prior(positions=positions)
    for kwargs in ({}, {"classes": [0, 1, 2, 3, 4, 0], "top_k": 10, "top_p": 0.9, "temperature": 0.8},
                   {"classes": 2, "cfg_scale": 3.0}):
        cached = sample(prior, 6, seed=11, use_cache=True, **kwargs)
        plain = sample(prior, 6, seed=11, use_cache=False, **kwargs)
        assert cached.shape == (6, 3, 4) and cached.dtype == torch.int64
        assert torch.equal(cached, plain), kwargs
    # the draws are not degenerate: different seeds give different grids
    assert not torch.equal(sample(prior, 6, seed=1), sample(prior, 6, seed=2))


def _reference_sample(prior, labels, seed, scale=None):
    """Naive sampler: recompute the whole prefix, separate forward passes for cond / uncond, inverse CDF."""
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    tokens = torch.empty(n, 0, dtype=torch.long)
    null = torch.full_like(labels, prior.num_classes)
    with torch.no_grad():
        for _ in range(prior.seq_len):
            logits = prior(tokens, labels)[:, -1].double()
            if scale is not None:
                uncond = prior(tokens, null)[:, -1].double()
                logits = uncond + scale * (logits - uncond)
            p = torch.softmax(logits, -1).numpy()
            u = torch.rand(n, generator=gen).double().numpy()
            nxt = [int(np.searchsorted(np.cumsum(p[i]), u[i] * p[i].sum(), side="right")) for i in range(n)]
            tokens = torch.cat([tokens, torch.tensor(nxt)[:, None]], dim=1)
    return tokens.reshape(n, *prior.grid)


def test_cfg_scale_one_equals_conditional_sampling_and_guidance_matches_reference():
    prior = _random_prior()
    labels = torch.tensor([0, 1, 2, 3, 4, 4, 1])
    plain = _reference_sample(prior, labels, seed=5)
    assert torch.equal(sample(prior, 7, classes=labels, cfg_scale=1.0, seed=5), plain)
    guided = sample(prior, 7, classes=labels, cfg_scale=3.0, seed=5)
    assert torch.equal(guided, _reference_sample(prior, labels, seed=5, scale=3.0))
    assert not torch.equal(guided, plain)  # guidance changes the samples
    c, u = torch.randn(3, 37), torch.randn(3, 37)
    assert torch.equal(guided_logits(c, u, 1.0), c)
    assert torch.allclose(guided_logits(c, u, 2.5), u + 2.5 * (c - u), atol=1e-5)


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.allclose(filter_logits(logits, top_k=2), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    # nucleus 0.7: 0.5 + 0.3 reaches it, the rest go
    assert torch.allclose(filter_logits(logits, top_p=0.7), torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]]))
    assert torch.allclose(filter_logits(logits, top_p=0.4), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    t = filter_logits(logits, temperature=2.0)
    ref = np.sqrt([0.5, 0.3, 0.15, 0.05])
    assert np.allclose(t.numpy()[0], ref / ref.sum(), atol=1e-6)


def test_sampling_rejects_bad_classes_and_settings():
    prior = _random_prior()
    with pytest.raises(ValueError, match="class 5 is outside"):
        sample(prior, 2, classes=5)
    with pytest.raises(ValueError, match="unconditional"):
        sample(_random_prior(num_classes=0), 2, classes=0)
    with pytest.raises(ValueError, match="temperature"):
        sample(prior, 2, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        sample(prior, 2, top_p=0.0)


# ----- generation metrics -----------------------------------------------------------------------------------
class _FixedFeatures(torch.nn.Module):
    """A fixed linear map of the pixels (images in [0, 1]) to 6 features."""

    num_features = 6

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(16, 6, generator=torch.Generator().manual_seed(3)), requires_grad=False)

    def forward(self, x):
        return x.flatten(1) @ self.weight


def test_fid_equals_scipy_frechet_distance_in_float64():
    from scipy import linalg

    gen = torch.Generator().manual_seed(0)
    real = torch.rand(300, 1, 4, 4, generator=gen) * 2 - 1
    fake = (torch.rand(250, 1, 4, 4, generator=gen) * 1.6 - 0.9).clamp(-1, 1)
    feat = _FixedFeatures()
    value = frechet_distance(feat, real, fake, batch_size=64)
    with torch.no_grad():
        fr = feat((real + 1) / 2).double().numpy()
        ff = feat((fake + 1) / 2).double().numpy()
    mu1, mu2 = fr.mean(0), ff.mean(0)
    s1, s2 = np.cov(fr, rowvar=False), np.cov(ff, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    ref = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert ref > 0.1
    assert value == pytest.approx(ref, rel=1e-4)


def test_precision_recall_against_hand_computation():
    # 1-D points (a zero second coordinate); k = 3 radii worked out by hand:
    # real radii: 0 -> 3, 1 -> 2, 2 -> 2, 3 -> 3, 10 -> 9
    # fake radii: 0.2 -> 0.6, 0.4 -> 0.4, 0.6 -> 0.4, 0.8 -> 0.6, 30 -> 0.3, 30.1 -> 0.2, 30.2 -> 0.2, 30.3 -> 0.3
    real = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0])
    fake = torch.tensor([0.2, 0.4, 0.6, 0.8, 30.0, 30.1, 30.2, 30.3])
    pad = lambda v: torch.stack([v, torch.zeros_like(v)], dim=1)  # noqa: E731
    pr = precision_recall(pad(real), pad(fake), k=3)
    # precision: the four fakes near 0 lie in real balls, the four near 30 do not (20 > 9)
    assert pr["precision"] == pytest.approx(4 / 8)
    # recall: 0 and 1 lie in the balls of 0.2 / 0.8; 2, 3 and 10 in none
    assert pr["recall"] == pytest.approx(2 / 5)
    swapped = precision_recall(pad(fake), pad(real), k=3)
    assert swapped["precision"] == pytest.approx(2 / 5) and swapped["recall"] == pytest.approx(4 / 8)


# ----- configs and output folders -----------------------------------------------------------------------------
def test_prior_config_validation():
    cfg = load_prior_config("prior/fashion-cpu", ["model.width=64", "optim.lr=1e-3"])
    assert cfg["model"]["width"] == 64 and cfg["optim"]["lr"] == 1e-3
    with pytest.raises(ValueError, match="model.widht"):
        load_prior_config("prior/fashion-cpu", ["model.widht=64"])
    with pytest.raises(ValueError, match="optim.lr must be a number > 0"):
        load_prior_config("prior/fashion-cpu", ["optim.lr=0"])
    with pytest.raises(ValueError, match="heads"):
        load_prior_config("prior/fashion-cpu", ["model.heads=5"])
    with pytest.raises(ValueError, match="positions"):
        load_prior_config("prior/fashion-cpu", ["model.positions=alibi"])
    with pytest.raises(FileNotFoundError, match="prior/fashion-cpu"):
        load_prior_config("prior/nope")


def test_out_folder_rules(tmp_path):
    made = tmp_path / "run"
    out, earlier = prepare_out_dir(made, "sample")
    assert out.is_dir() and not earlier
    (out / "grid.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="--force"):
        prepare_out_dir(made, "sample")
    assert prepare_out_dir(made, "sample", force=True)[1]
    with pytest.raises(ValueError, match="not `simvq eval-prior`"):
        prepare_out_dir(made, "eval-prior", force=True)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        prepare_out_dir(foreign, "sample", force=True)
    assert (foreign / "notes.txt").read_text() == "keep" and not (foreign / ".simvq-output").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_out_dir(empty, "sample")
    inputs = tmp_path / "tok"
    inputs.mkdir()
    with pytest.raises(ValueError, match="overlaps the input"):
        prepare_out_dir(inputs / "sub", "prior train", inputs=[inputs])
    with pytest.raises(ValueError, match="overlaps the input"):
        prepare_out_dir(tmp_path, "prior train", inputs=[inputs])


def test_prior_train_rejects_bad_tokenizer_folders_before_training(tmp_path):
    args = _parse(add_prior_train_arguments, ["--tokenizer", str(tmp_path / "missing"), "--out", str(tmp_path / "p")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_prior_train(args)
    (tmp_path / "notatok").mkdir()
    (tmp_path / "notatok" / "config.yaml").write_text("a: 1\n")
    args = _parse(add_prior_train_arguments, ["--tokenizer", str(tmp_path / "notatok"), "--out", str(tmp_path / "p")])
    with pytest.raises(ValueError, match="not a tokenizer folder"):
        run_prior_train(args)
    assert not (tmp_path / "p").exists()


# ----- training on a tiny tokenizer -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from simvq.training import train

    result = train("image/digits-tiny", out_dir=tmp_path_factory.mktemp("tok"), max_steps=3, progress=False,
                   overrides=["trainer.loggers=[]", "trainer.checkpoint_every=1000"])
    return result.model_dir


TINY = ["model.width=32", "model.depth=2", "model.heads=2", "model.label_dropout=0.0", "data.batch_size=8",
        "data.train_limit=8", "data.eval_limit=8", "optim.lr=1e-2", "optim.warmup_steps=5", "optim.weight_decay=0.0",
        "trainer.log_every=50", "trainer.checkpoint_every=100", "eval.samples=12", "eval.batch_size=12",
        "eval.classifier_steps=30"]


@pytest.fixture(scope="module")
def trained_prior(tokenizer_dir, tmp_path_factory):
    from simvq.prior.train import train_prior

    out = tmp_path_factory.mktemp("prior") / "run"
    result = train_prior(tokenizer_dir, out, "prior/fashion-cpu", overrides=TINY, max_steps=200, progress=False)
    return out, result


@pytest.mark.slow
def test_prior_overfits_a_tiny_set_and_resumes(trained_prior, tokenizer_dir):
    from simvq.prior.train import load_prior, train_prior

    out, result = trained_prior
    losses = [h["loss_nats"] for h in result.history]
    assert losses[0] > 1.0 and losses[-1] < 0.1, losses
    # the held-out split here is the training data's neighbours, not the training set: only finiteness
    assert math.isfinite(result.metrics["bits_per_token"])
    prior, cfg = load_prior(out)
    assert prior.num_classes == 10 and prior.grid == (8, 8) and prior.codebook_size == 64
    assert cfg["tokenizer"]["path"] == str(tokenizer_dir.resolve())
    # training-set NLL under the saved weights agrees with the logged loss (independent recomputation)
    from safetensors.torch import load_file

    cached = load_file(str(out / "tokens" / "train.safetensors"))
    nll = held_out_nll(prior, cached["tokens"].long(), cached["labels"].long())
    assert nll["nats_per_token"] < 0.15
    # resume: more steps continue from the checkpoint and reuse the cached tokens
    again = train_prior(tokenizer_dir, out, "prior/fashion-cpu", overrides=TINY, max_steps=210, progress=False)
    assert again.tokens_reused and again.history[-1]["step"] == 210
    assert [h["step"] for h in again.history[: len(result.history)]] == [h["step"] for h in result.history]


@pytest.mark.slow
def test_sample_and_eval_commands(trained_prior, tmp_path):
    out, _ = trained_prior
    args = _parse(add_sample_arguments, ["--prior", str(out), "--n", "6", "--class", "3", "--cfg-scale", "2", "--out", str(tmp_path / "s")])
    assert run_sample(args) == 0
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert "grid.png" in files and "sample_005.png" in files and "indices.safetensors" in files
    from PIL import Image

    assert Image.open(tmp_path / "s" / "sample_000.png").size == (16, 16)
    with pytest.raises(ValueError, match="--force"):
        run_sample(args)
    args.force = True
    assert run_sample(args) == 0
    # user errors, all before sampling
    bad = _parse(add_sample_arguments, ["--prior", str(out), "--class", "10", "--out", str(tmp_path / "b")])
    with pytest.raises(ValueError, match="class 10 is outside"):
        run_sample(bad)
    bad = _parse(add_sample_arguments, ["--prior", str(out), "--cfg-scale", "2", "--out", str(tmp_path / "b")])
    with pytest.raises(ValueError, match="needs --class"):
        run_sample(bad)
    bad = _parse(add_sample_arguments, ["--prior", str(out), "--out", str(out / "x")])
    with pytest.raises(ValueError, match="overlaps the input"):
        run_sample(bad)
    assert not (tmp_path / "b").exists()

    result_file = tmp_path / "eval.json"
    args = _parse(add_eval_prior_arguments, ["--prior", str(out), "--samples", "12", "--out", str(result_file),
                                             "--classifier-dir", str(tmp_path / "cls")])
    assert run_eval_prior(args) == 0
    res = json.loads(result_file.read_text())
    assert res["samples"] == 12 and res["feature_space"] == "proxy_gfid_classifier"
    for key in ("bits_per_token", "bits_per_image", "proxy_gfid_classifier", "precision", "recall", "class_accuracy", "classifier_accuracy"):
        assert math.isfinite(res[key]), key
    assert res["bits_per_image"] == pytest.approx(res["bits_per_token"] * 64)
    with pytest.raises(FileExistsError, match="--force"):  # an existing output is replaced only with --force
        run_eval_prior(args)


@pytest.mark.slow
def test_prior_rejects_a_mismatched_tokenizer(trained_prior, tokenizer_dir):
    from simvq.checkpoints import load_tokenizer
    from simvq.prior.train import check_prior_matches, load_prior

    out, _ = trained_prior
    prior, cfg = load_prior(out)
    tok = load_tokenizer(tokenizer_dir)
    _, tok_cfg = __import__("simvq.checkpoints", fromlist=["load_model_dir"]).load_model_dir(tokenizer_dir)
    check_prior_matches(prior, cfg, tok, tok_cfg, where="tok")
    with pytest.raises(ValueError, match="codebook of 65 codes"):
        check_prior_matches(TokenPrior(codebook_size=65, grid=(8, 8)), cfg, tok, tok_cfg, where="tok")
    with pytest.raises(ValueError, match="4x4 token grids"):
        check_prior_matches(TokenPrior(codebook_size=64, grid=(4, 4)), cfg, tok, tok_cfg, where="tok")
    with pytest.raises(ValueError, match="a prior, not a tokenizer"):
        run_prior_train(_parse(add_prior_train_arguments, ["--tokenizer", str(out), "--out", str(out.parent / "q")]))


def test_the_cli_wires_the_generation_commands(tmp_path, capsys):
    from simvq.cli import main

    missing = tmp_path / "nothing"
    for argv, word in ((["prior", "train", "--tokenizer", str(missing), "--out", str(tmp_path / "p")], "tokenizer folder"),
                       (["sample", "--prior", str(missing), "--out", str(tmp_path / "s")], "prior folder"),
                       (["eval-prior", "--prior", str(missing)], "prior folder")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0] and "does not exist" in err[0], err
    assert not (tmp_path / "p").exists() and not (tmp_path / "s").exists()


@pytest.mark.slow
def test_eval_reuses_a_held_out_nll_only_when_it_covers_the_eval_split(trained_prior, tmp_path):
    from safetensors.torch import load_file

    from simvq.prior.metrics import evaluate_prior
    from simvq.prior.train import load_prior

    out, _ = trained_prior
    prior, _ = load_prior(out)
    cached = load_file(str(out / "tokens" / "eval.safetensors"))
    reference = held_out_nll(prior, cached["tokens"].long(), cached["labels"].long())  # the grids evaluation scores
    kwargs = dict(samples=4, classifier_dir=tmp_path / "cls", classifier_steps=2)
    given = {"bits_per_token": 1.5, "bits_per_image": 96.0, "images": len(cached["tokens"])}
    reused = evaluate_prior(out, held_out=given, **kwargs)
    assert (reused["bits_per_token"], reused["bits_per_image"]) == (1.5, 96.0)
    # a figure over another number of grids is not this prior's held-out figure: computed again
    other = evaluate_prior(out, held_out=dict(given, images=len(cached["tokens"]) - 1), **kwargs)
    assert other["bits_per_token"] == pytest.approx(reference["bits_per_token"], rel=1e-6)
    assert other["nll_images"] == len(cached["tokens"])


# ----- user errors of the commands: one line, exit 2, nothing written --------------------------------------------
def _snapshot(folder) -> dict:
    """Every file (bytes) and folder under ``folder``, by relative path."""
    from pathlib import Path

    folder = Path(folder)
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _cli_error(capsys, argv, *words):
    from simvq.cli import main

    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1 and "error" in err[0], err
    for word in words:
        assert word in err[0], (word, err[0])
    return err[0]


SMALL = [*TINY, "eval.classifier_steps=5"]


@pytest.fixture(scope="module")
def small_prior(tokenizer_dir, tmp_path_factory):
    """A 2-step prior made by the CLI (so its folder carries the `prior train` output marker)."""
    from simvq.cli import main

    out = tmp_path_factory.mktemp("small") / "prior"
    assert main(["prior", "train", "--tokenizer", str(tokenizer_dir), "--out", str(out), "--max-steps", "2", *SMALL]) == 0
    return out


def test_eval_prior_refuses_a_held_out_count_below_one(small_prior, tmp_path, capsys):
    before = _snapshot(small_prior)
    for value in ("0", "-1"):
        _cli_error(capsys, ["eval-prior", "--prior", str(small_prior), "--samples", "4", "--held-out", value,
                            "--classifier-dir", str(tmp_path / "cls"), "--out", str(tmp_path / "m.json")], "--held-out", ">= 1")
    assert _snapshot(small_prior) == before and not any(tmp_path.iterdir())


def test_sample_refuses_a_batch_size_below_one_before_making_its_folder(small_prior, tmp_path, capsys):
    before = _snapshot(small_prior)
    for value in ("0", "-3"):
        _cli_error(capsys, ["sample", "--prior", str(small_prior), "--n", "2", "--batch-size", value, "--out", str(tmp_path / "o1")],
                   "--batch-size", ">= 1")
    assert not (tmp_path / "o1").exists() and _snapshot(small_prior) == before
    with pytest.raises(ValueError, match="batch_size"):
        sample(_random_prior(), 2, batch_size=0)


def test_sample_and_eval_tell_a_tokenizer_run_from_an_unfinished_prior(small_prior, tokenizer_dir, tmp_path, capsys):
    import shutil

    run = tokenizer_dir.parent  # the tokenizer's training run folder (model/ inside)
    before = _snapshot(run)
    for argv in (["sample", "--prior", str(run), "--n", "2", "--out", str(tmp_path / "o1")],
                 ["eval-prior", "--prior", str(run), "--samples", "4", "--classifier-dir", str(tmp_path / "cls")]):
        line = _cli_error(capsys, argv, "tokenizer training run", "--prior", "prior train")
        assert "unfinished" not in line
    assert _snapshot(run) == before and not any(tmp_path.iterdir())
    # a prior run that has not finished yet is still named as one
    unfinished = tmp_path / "unfinished"
    shutil.copytree(small_prior, unfinished)
    (unfinished / "model.safetensors").unlink()
    (unfinished / "config.yaml").unlink()
    _cli_error(capsys, ["sample", "--prior", str(unfinished), "--n", "2", "--out", str(tmp_path / "o2")], "unfinished prior run")
    assert not (tmp_path / "o2").exists()


def test_eval_prior_checks_the_classifier_dir_before_any_work(small_prior, tmp_path, capsys):
    before = _snapshot(small_prior)
    afile = tmp_path / "cls"
    afile.write_text("not a folder")
    _cli_error(capsys, ["eval-prior", "--prior", str(small_prior), "--samples", "4", "--classifier-dir", str(afile),
                        "--out", str(tmp_path / "m.json")], "--classifier-dir", "folder")
    assert afile.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["cls"]
    # nor may the classifier's cache land in the prior folder
    _cli_error(capsys, ["eval-prior", "--prior", str(small_prior), "--samples", "4", "--classifier-dir", str(small_prior / "cls")],
               "--classifier-dir", "inside")
    assert _snapshot(small_prior) == before


def test_eval_prior_refuses_an_out_file_inside_the_prior_or_its_tokenizer(small_prior, tokenizer_dir, tmp_path, capsys):
    before, tok_before = _snapshot(small_prior), _snapshot(tokenizer_dir)
    for out in (small_prior / "m.json", tokenizer_dir / "m.json", small_prior / "sub" / "m.json"):
        _cli_error(capsys, ["eval-prior", "--prior", str(small_prior), "--samples", "4", "--classifier-dir", str(tmp_path / "cls"),
                            "--out", str(out)], "--out", "inside")
    assert _snapshot(small_prior) == before and _snapshot(tokenizer_dir) == tok_before and not any(tmp_path.iterdir())


def test_eval_prior_writes_nothing_into_the_prior_but_its_token_cache(small_prior, tmp_path, capsys):
    import shutil

    from simvq.cli import main

    prior = tmp_path / "prior"
    shutil.copytree(small_prior, prior)
    shutil.rmtree(prior / "tokens")
    before = _snapshot(prior)
    assert main(["eval-prior", "--prior", str(prior), "--samples", "4", "--classifier-dir", str(tmp_path / "cls"),
                 "--out", str(tmp_path / "m.json")]) == 0
    after = _snapshot(prior)
    assert {k: v for k, v in after.items() if not k.startswith("tokens")} == before
    assert sorted(k for k in after if k.startswith("tokens")) == ["tokens", "tokens/eval.safetensors"]


def test_prior_train_reruns_only_with_the_same_settings(small_prior, tokenizer_dir, tmp_path, capsys):
    import shutil

    from simvq.cli import main

    prior = tmp_path / "prior"
    shutil.copytree(small_prior, prior)
    before = _snapshot(prior)
    base = ["prior", "train", "--tokenizer", str(tokenizer_dir), "--out", str(prior)]
    # other settings (what is trained or measured): refused, naming the keys, nothing changed
    line = _cli_error(capsys, [*base, "--max-steps", "1", *SMALL, "data.train_limit=4", "eval.samples=4"],
                      "data.train_limit", "eval.samples", "--force", "--out")
    assert "trainer.max_steps" not in line
    _cli_error(capsys, [*base, "--max-steps", "2", *SMALL, "optim.lr=0.5"], "optim.lr", "--force")
    # fewer steps than the finished run has: refused
    _cli_error(capsys, [*base, "--max-steps", "1", *SMALL], "2 steps", "--force")
    assert _snapshot(prior) == before
    # the same settings and steps: nothing to do, nothing rewritten
    capsys.readouterr()
    assert main([*base, "--max-steps", "2", *SMALL]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert _snapshot(prior) == before
    # more steps with the same settings continue the run
    assert main([*base, "--max-steps", "3", *SMALL]) == 0
    history = json.loads((prior / "history.json").read_text())["history"]
    assert history[-1]["step"] == 3
    assert "max_steps: 3" in (prior / "config.yaml").read_text()


def test_tokenizer_is_found_by_its_folder_or_a_shipped_name(tmp_path):
    from simvq.pretrained import list_models, model_path
    from simvq.prior.train import resolve_tokenizer_dir

    name = next(iter(list_models()))
    assert resolve_tokenizer_dir(name) == model_path(name).resolve()
    with pytest.raises(FileNotFoundError, match="shipped tokenizer"):
        resolve_tokenizer_dir(tmp_path / "no-such-tokenizer")
