"""Kill and resume: a resumed run continues exactly (logged windows, usage per rank, RNG, weights).

The kill is simulated right after the checkpoint of step ``KILL_AT`` is written, in the middle of a logging
window (``log_every`` does not divide ``KILL_AT``), which is where a real ``kill -9`` leaves partial sums.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "loss.gan_weight=0.0", "data.batch_size=8", "trainer.log_every=3", "trainer.checkpoint_every=1",
    "trainer.accelerator=cpu", "trainer.loggers=[csv]", "trainer.num_threads=1",
]


class _Killed(Exception):
    pass


def _train_logged(out, max_steps, *, kill_at=None, monkeypatch):
    """Train digits-tiny in this process; returns (result or None, rng digests seen at each step start)."""
    from simvq.training import callbacks, module, train

    seen: dict[int, str] = {}
    orig_step = module.TokenizerModule.training_step
    orig_ckpt = callbacks.PeriodicCheckpoint.on_train_batch_end

    def training_step(self, batch, batch_idx):
        seen[self.step] = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
        return orig_step(self, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, *args):
        orig_ckpt(self, trainer, pl_module, *args)
        if kill_at is not None and pl_module.step == kill_at:
            raise _Killed  # as if killed right after the checkpoint was written

    monkeypatch.setattr(module.TokenizerModule, "training_step", training_step)
    monkeypatch.setattr(callbacks.PeriodicCheckpoint, "on_train_batch_end", on_train_batch_end)
    try:
        result = train("image/digits-tiny", out_dir=out, overrides=TINY, max_steps=max_steps, progress=False)
    except _Killed:
        result = None
    monkeypatch.undo()
    return result, seen


def _train_entries(history):
    return [{k: v for k, v in h.items() if k != "time_s"} for h in history if "loss" in h or "utilization" in h]


@pytest.mark.slow
def test_kill_mid_window_then_resume_matches_uninterrupted(tmp_path, monkeypatch):
    full, full_rng = _train_logged(tmp_path / "full", 6, monkeypatch=monkeypatch)
    killed, _ = _train_logged(tmp_path / "run", 6, kill_at=4, monkeypatch=monkeypatch)
    assert killed is None and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    # a kill during a checkpoint write leaves a temporary file: resuming removes it
    stale = tmp_path / "run" / "checkpoints" / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"partial")
    resumed, resumed_rng = _train_logged(tmp_path / "run", 6, monkeypatch=monkeypatch)
    assert not stale.exists()
    assert resumed.steps == full.steps == 6
    # the window 4..6 straddles the kill: its loss means and usage equal the uninterrupted run's
    assert _train_entries(resumed.history) == _train_entries(full.history)
    # the RNG is where the uninterrupted run had it at every resumed step
    assert {s: resumed_rng[s] for s in (4, 5)} == {s: full_rng[s] for s in (4, 5)}
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in opt_a:
        for name in opt_a[i]:
            assert torch.equal(torch.as_tensor(opt_a[i][name]), torch.as_tensor(opt_b[i][name])), (i, name)


_DRIVER = textwrap.dedent(
    """
    import os, sys
    from simvq.training import callbacks

    orig = callbacks.PeriodicCheckpoint.on_train_batch_end

    def patched(self, trainer, pl_module, *args):
        orig(self, trainer, pl_module, *args)
        if os.environ.get("SIMVQ_TEST_KILL_AT") and pl_module.step == int(os.environ["SIMVQ_TEST_KILL_AT"]):
            trainer.strategy.barrier()
            os._exit(9)  # like kill -9: no clean-up, no final checkpoint

    callbacks.PeriodicCheckpoint.on_train_batch_end = patched
    from simvq.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)


def _ddp_train(driver, out, *, kill_at=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("SIMVQ_TEST_KILL_AT", None)
    if kill_at is not None:
        env["SIMVQ_TEST_KILL_AT"] = str(kill_at)
    args = [
        sys.executable, str(driver), "train", "--config", "image/digits-tiny", "--out", str(out), "--quiet",
        "--max-steps", "3", *TINY, "trainer.log_every=2", "trainer.strategy=ddp", "trainer.devices=2",
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=900, env=env, cwd=str(driver.parent))


@pytest.mark.slow
def test_ddp_kill_at_step_1_then_resume_logs_the_uninterrupted_window(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    full = _ddp_train(driver, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _ddp_train(driver, tmp_path / "run", kill_at=1)
    assert killed.returncode != 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["simvq"]["step"] == 1
    resumed = _ddp_train(driver, tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    h_full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)["simvq"]["history"]
    h_run = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["simvq"]["history"]
    util_full = [(h["step"], h["utilization"]) for h in h_full if "utilization" in h]
    util_run = [(h["step"], h["utilization"]) for h in h_run if "utilization" in h]
    print("DDP window utilisation: uninterrupted", util_full, "resumed", util_run)
    # the window of steps 1..2 holds the counts of both ranks at step 1, as in the uninterrupted run
    assert util_run == util_full
    assert _train_entries(h_run) == _train_entries(h_full)
