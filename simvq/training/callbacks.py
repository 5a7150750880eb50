"""Callbacks and plugins of the shared training loop: atomic checkpoints, sample grids, a progress bar."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from simvq.evaluation import evaluate
from simvq.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, fsyncs it, then renames it over the
    target: a crash (or a full disk) mid-write never leaves a truncated ``last.ckpt`` behind.

    Loading uses ``torch.load(weights_only=True)``: simvq checkpoints hold only tensors and plain types.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return torch.load(path, map_location=map_location if map_location is not None else "cpu", weights_only=True)


class PeriodicCheckpoint(L.Callback):
    """Saves ``last.ckpt`` every ``every`` steps and when training stops (not after a divergence, so the
    last good checkpoint survives)."""

    def __init__(self, path: str | Path, *, every: int) -> None:
        self.path = Path(path)
        self.every = int(every)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.diverged:
            return
        periodic = self.every > 0 and pl_module.step % self.every == 0 and pl_module.steps_this_run > 0
        if periodic or (trainer.should_stop and pl_module.steps_this_run > 0):
            trainer.save_checkpoint(self.path, weights_only=False)


class SampleGrids(L.Callback):
    """Writes reconstruction grids (EMA weights, fixed evaluation samples) every ``every`` steps and at the
    end, to ``folder/step_XXXXXXX.png`` (the task picks the format)."""

    def __init__(self, folder: str | Path, *, every: int, num_samples: int) -> None:
        self.folder = Path(folder)
        self.every = int(every)
        self.num_samples = int(num_samples)
        self.written: list[Path] = []
        self._batch = None

    def _samples(self, pl_module):
        if self._batch is None:
            ds = pl_module.eval_set
            n = min(self.num_samples, len(ds))
            # spread over the evaluation set rather than the first few neighbours
            idx = torch.linspace(0, len(ds) - 1, n).round().long().tolist()
            # a task may batch items of different sizes its own way (audio: utterances of different lengths)
            collate = pl_module.task.collate_samples
            self._batch = collate([ds[i] for i in idx])
        return self._batch

    def _write(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0 or self.num_samples == 0:
            return
        x, x_hat = pl_module.reconstruct_samples(self._samples(pl_module))
        path = pl_module.task.save_samples(x, x_hat, self.folder / f"step_{pl_module.step:07d}")
        self.written.append(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every > 0 and pl_module.step % self.every == 0 and not trainer.should_stop:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if not pl_module.diverged and pl_module.steps_this_run > 0:
            self._write(trainer, pl_module)


class PeriodicEval(L.Callback):
    """Evaluates the EMA weights on the whole evaluation set every ``every`` steps (rank 0; the other ranks
    wait). Results go to the history as ``eval_*`` keys and to the loggers as ``eval/*``."""

    def __init__(self, *, every: int) -> None:
        self.every = int(every)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every <= 0 or pl_module.step % self.every != 0 or pl_module.diverged:
            return
        if trainer.global_rank == 0:
            with pl_module.ema_weights():
                result = evaluate(
                    pl_module.model, pl_module.eval_set, config=pl_module.config, device=pl_module.device,
                    distributed=False,
                )
            pl_module.model.train()
            numbers = {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            pl_module.history.append({"step": pl_module.step, **{f"eval_{k}": v for k, v in numbers.items()}})
            for logger in pl_module.loggers:
                logger.log_metrics({f"eval/{k}": v for k, v in numbers.items()}, step=pl_module.step)
        trainer.strategy.barrier()


class StepProgress(L.Callback):
    """A tqdm bar over steps (Lightning's bar counts optimiser steps, two per batch with a GAN)."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.bar = None

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=pl_module.step, unit="step", dynamic_ncols=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if pl_module.history and pl_module.history[-1].get("step") == pl_module.step:
            h = pl_module.history[-1]
            post = {k: f"{h[k]:.4g}" for k in ("loss", "l1", "utilization", "perplexity") if k in h}
            self.bar.set_postfix(post, refresh=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


__all__ = ["AtomicCheckpointIO", "PeriodicCheckpoint", "PeriodicEval", "SampleGrids", "StepProgress"]
