"""Training infrastructure on a tiny model: overfitting, exact resume, divergence, EMA, atomic checkpoints, DDP."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simvq.training import EMA, train

TINY = ["trainer.num_threads=1", "trainer.loggers=[csv]"]


def evals_util_of(result):
    return next(h["eval_utilization"] for h in result.history if "eval_utilization" in h)


def test_ema_update_matches_hand_computation():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.fill_(0.5)
    ema = EMA(model, decay=0.9, warmup=True)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, -2.0]]))
    ema.update(model)  # n = 0: decay min(0.9, 1/10) = 0.1
    assert torch.allclose(ema.shadow_0, torch.tensor([[0.1 * 1 + 0.9 * 3, 0.1 * 2 + 0.9 * -2]]))
    ema.update(model)  # n = 1: decay min(0.9, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.shadow_0, d * torch.tensor([[2.8, -1.6]]) + (1 - d) * torch.tensor([[3.0, -2.0]]))
    live = model.weight.detach().clone()
    with ema.swapped(model):
        assert torch.allclose(model.weight, ema.shadow_0)
    assert torch.equal(model.weight, live)  # live weights come back
    plain = EMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.bias.fill_(1.5)
    plain.update(model)
    assert torch.allclose(plain.shadow_1, torch.tensor([0.9 * 0.5 + 0.1 * 1.5]))
    # EMA state lives in the state dict, so checkpoints carry it
    assert {"shadow_0", "shadow_1", "num_updates"} <= set(plain.state_dict())


@pytest.mark.slow
def test_overfits_one_batch(tmp_path):
    from simvq.checkpoints import load_tokenizer
    from simvq.config import load_config
    from simvq.modalities import build_datasets
    from simvq.modalities.image.metrics import psnr_per_image

    overrides = TINY + ["data.train_limit=16", "optim.lr=3e-3", "loss.gan_weight=0", "trainer.log_every=10",
                        "trainer.checkpoint_every=0", "trainer.eval_every=60", "data.eval_limit=64"]
    cfg = load_config("image/digits-tiny", overrides)
    train_set, _ = build_datasets(cfg)
    x = torch.stack([train_set[i] for i in range(16)])
    result = train(cfg, out_dir=tmp_path / "run", max_steps=60, progress=False)
    l1 = [h["l1"] for h in result.history if "l1" in h]
    assert len(l1) == 6 and not result.diverged
    assert l1[-1] < 0.4 * l1[0], l1
    model = load_tokenizer(result.model_dir)
    with torch.no_grad():
        before = psnr_per_image(x, torch.zeros_like(x)).mean()  # predicting grey for everything
        after = psnr_per_image(x, model.reconstruct(x)).mean()
    assert after > 20.0 and after > before + 10.0, (before, after)
    # grids and logs were written in the run folder
    assert result.samples and result.samples[-1].suffix == ".png" and result.samples[-1].is_file()
    rows = list(csv.DictReader(open(tmp_path / "run" / "logs" / "version_0" / "metrics.csv")))
    assert [float(r["eval/utilization"]) for r in rows if r.get("eval/utilization")] == [evals_util_of(result)]
    rows = [r for r in rows if r.get("train/utilization")]
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40, 50, 60]
    assert 0 < float(rows[-1]["train/utilization"]) <= 1
    # the periodic evaluation ran once, on the 64 held-out images, with EMA weights
    evals = [h for h in result.history if "eval_utilization" in h]
    assert [h["step"] for h in evals] == [60] and evals[0]["eval_items"] == 64
    assert evals[0]["eval_tokens"] == 64 * 64 and 0 < evals[0]["eval_utilization"] <= 1


@pytest.mark.slow
def test_quantizer_lr_moves_the_quantizer_at_its_own_rate(tmp_path):
    from simvq.config import load_config
    from simvq.modalities import build_tokenizer

    overrides = TINY + ["optim.lr=0.001", "optim.quantizer_lr=0.05", "optim.ema_decay=null", "optim.warmup_steps=0",
                        "optim.weight_decay=0", "trainer.checkpoint_every=0"]
    torch.manual_seed(0)
    start = build_tokenizer(load_config("image/digits-tiny", overrides)).state_dict()
    result = train("image/digits-tiny", out_dir=tmp_path / "run", max_steps=1, progress=False, overrides=overrides,
                   init_state={k: v.clone() for k, v in start.items()})
    end = load_file(result.model_dir / "model.safetensors")
    # Adam's first step moves every parameter with a gradient by lr * g / (|g| + eps), i.e. by its group's lr
    for key, lr in (("quantize.embedding_proj.weight", 0.05), ("quantize.embedding_proj.bias", 0.05),
                    ("encoder.conv_in.weight", 0.001), ("decoder.conv_out.weight", 0.001)):
        step = (end[key] - start[key]).abs().flatten()
        moved = step[step > 0]
        assert moved.numel() > step.numel() // 2, key
        torch.testing.assert_close(moved.median(), torch.tensor(lr), rtol=1e-3, atol=0), key
    assert torch.equal(end["quantize.embedding.weight"], start["quantize.embedding.weight"])  # C stays frozen


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    # GAN on from step 0, EMA, warm-up: every piece of state must survive the interruption
    overrides = TINY + ["trainer.log_every=3", "trainer.checkpoint_every=0", "optim.warmup_steps=4"]
    full = train("image/digits-tiny", out_dir=tmp_path / "full", max_steps=12, progress=False, overrides=overrides)
    half = train("image/digits-tiny", out_dir=tmp_path / "split", max_steps=6, progress=False, overrides=overrides)
    assert half.steps == 6 and (tmp_path / "split" / "checkpoints" / "last.ckpt").is_file()
    rest = train("image/digits-tiny", out_dir=tmp_path / "split", max_steps=12, progress=False, overrides=overrides)
    assert rest.steps == 12 and full.steps == 12
    a = load_file(full.model_dir / "model.safetensors")
    b = load_file(rest.model_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the resumed history continues the interrupted one and equals the uninterrupted run's
    strip = lambda h: [{k: v for k, v in e.items() if k != "time_s"} for e in h]  # noqa: E731
    assert strip(rest.history) == strip(full.history)
    # the optimiser and discriminator states resumed too (not only the tokenizer weights)
    ca = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    cb = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)
    for k, v in ca["state_dict"].items():
        assert torch.equal(v, cb["state_dict"][k]), k
    # without resume an existing run is never overwritten
    with pytest.raises(FileExistsError, match="already holds a training run"):
        train("image/digits-tiny", out_dir=tmp_path / "split", max_steps=14, progress=False, resume=False, overrides=overrides)
    # resuming with a different model is refused instead of silently mixing runs
    saved = (tmp_path / "split" / "config.yaml").read_text()
    with pytest.raises(ValueError, match="different model/quantizer config"):
        train("image/digits-tiny", out_dir=tmp_path / "split", max_steps=14, progress=False,
              overrides=overrides + ["quantizer.codebook_size=32"])
    assert (tmp_path / "split" / "config.yaml").read_text() == saved
    # asking for no more steps than done exports without training
    again = train("image/digits-tiny", out_dir=tmp_path / "split", max_steps=12, progress=False, overrides=overrides)
    assert again.steps == 12 and again.history == rest.history


@pytest.mark.slow
def test_divergence_stops_and_is_reported(tmp_path):
    overrides = TINY + ["optim.lr=1e12", "loss.gan_weight=0", "trainer.log_every=1", "trainer.checkpoint_every=1"]
    result = train("image/digits-tiny", out_dir=tmp_path / "run", max_steps=40, progress=False, overrides=overrides)
    assert result.diverged and result.steps < 40
    assert result.history[-1]["diverged"] is True and result.diverged_reason
    # the last checkpoint written is from a finite step and still loads
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["simvq"]["step"] <= result.steps


def test_atomic_checkpoint_never_leaves_a_broken_file(tmp_path):
    from simvq.training.callbacks import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3), "bad": Boom()}, path)
    assert io.load_checkpoint(path)["step"] == 1  # the old checkpoint survived intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


@pytest.mark.slow
def test_ddp_two_cpu_processes_reduce_usage_across_ranks(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "simvq.cli", "train", "--config", "image/digits-tiny", "--out", str(out),
           "--max-steps", "4", "--quiet", "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
           "trainer.log_every=2", "trainer.checkpoint_every=0", "trainer.num_threads=1"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model" / "model.safetensors").is_file()
    rows = list(csv.DictReader(open(out / "logs" / "version_0" / "metrics.csv")))
    # 2 steps x 2 ranks x batch 16 x 8x8 tokens: the counts of both ranks were summed
    assert [float(r["train/tokens"]) for r in rows] == [2 * 2 * 16 * 64] * 2
