"""The LightningModule shared by every modality: manual GAN optimisation, EMA, usage logging, exact resume."""

from __future__ import annotations

import random
import time
from contextlib import contextmanager

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from simvq.training.ema import EMA
from simvq.data import train_loader
from simvq.modalities import Task, modality_of
from simvq.quantizers.base import NonFiniteInputError
from simvq.tokens import config_hash


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rng_state() -> dict:
    """Every RNG a training step could touch, in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except RuntimeError:  # a different number of GPUs: the data order does not depend on it
            pass


@contextmanager
def preserved_usage(model):
    """Run a block (samples, evaluation) without counting its codes in the training usage window."""
    usage = getattr(getattr(model, "quantize", None), "usage", None)
    saved = usage.counts.clone() if usage is not None else None
    try:
        yield
    finally:
        if usage is not None:
            usage.counts.copy_(saved)


class TokenizerModule(L.LightningModule):
    """Trains a tokenizer (and its discriminator) for any registered modality.

    A *step* is one batch: a generator update, then a discriminator update when the GAN is active. The
    step counter, EMA, usage counters, optimiser states, RNG states and the logged history are all in the
    checkpoint, and the data order is a function of the step (see :mod:`simvq.data`), so a resumed run
    continues exactly where the interrupted one stopped.

    Args:
        config: a resolved config (:func:`simvq.config.resolve_config`).
        task: the modality's :class:`~simvq.modalities.Task` (default: from ``config["modality"]``).
        train_set, eval_set: data sets (built by the task when omitted).
        max_steps: stop after this many steps (None: no step limit).
        max_minutes: stop after this much training time in this process (None: no limit).
        init_state, init_strict: starting weights (see :func:`simvq.training.train`).
    """

    def __init__(
        self,
        config: dict,
        *,
        task: Task | None = None,
        train_set=None,
        eval_set=None,
        max_steps: int | None = None,
        max_minutes: float | None = None,
        init_state: dict | None = None,
        init_strict: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.config = config
        self.task = task if task is not None else modality_of(config).task(config)
        self.model = self.task.build_model()
        if init_state is not None:
            load_initial_weights(self.model, init_state, strict=init_strict)
        self.discriminator = self.task.build_discriminator()
        # frozen loss networks are kept out of the module tree: not in checkpoints, not wrapped by DDP
        self._loss_modules = [self.task.build_loss_modules()]
        optim = config["optim"]
        self.ema = (
            EMA(self.model, decay=optim["ema_decay"], warmup=optim["ema_warmup"]) if optim["ema_decay"] is not None else None
        )
        if train_set is None or eval_set is None:
            built = self.task.build_datasets()
            train_set = built[0] if train_set is None else train_set
            eval_set = built[1] if eval_set is None else eval_set
        self.train_set, self.eval_set = train_set, eval_set
        self.max_steps = max_steps
        self.max_minutes = max_minutes
        self.step = 0
        self.history: list[dict] = []
        self.diverged = False
        self.diverged_reason = ""
        self.steps_this_run = 0
        self._window: dict[str, tuple] = {}
        self._window_count = 0
        self._resume_rng: dict | None = None
        self._fit_start = time.perf_counter()
        self._train_time = 0.0

    # ----- Lightning hooks ---------------------------------------------------------------------------
    @property
    def loss_modules(self):
        return self._loss_modules[0]

    def setup(self, stage: str) -> None:
        if self.loss_modules is not None:
            self.loss_modules.to(self.device)

    def on_fit_start(self) -> None:
        if self.loss_modules is not None:
            self.loss_modules.to(self.device)
        self._fit_start = time.perf_counter()

    def configure_optimizers(self):
        o = self.config["optim"]
        opt_g = torch.optim.Adam(self._generator_groups(), lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])
        if self.discriminator is None:
            return opt_g
        disc_lr = o["disc_lr"] if o["disc_lr"] is not None else o["lr"]
        opt_d = torch.optim.Adam(
            self.discriminator.parameters(), lr=disc_lr, betas=tuple(o["betas"]), weight_decay=o["weight_decay"]
        )
        return [opt_g, opt_d]

    def _generator_groups(self) -> list[dict]:
        """The generator's trainable parameters as Adam groups: one, or with ``optim.quantizer_lr`` the
        quantizer's parameters in a second group named ``"quantizer"`` (its rate set by :meth:`_set_lr`)."""
        o = self.config["optim"]
        quantize = getattr(self.model, "quantize", None)
        separate = o["quantizer_lr"] is not None and quantize is not None
        own = [p for p in quantize.parameters() if p.requires_grad] if separate else []
        ids = {id(p) for p in own}
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad and id(p) not in ids]}]
        if own:
            groups.append({"params": own, "lr": o["quantizer_lr"], "name": "quantizer"})
        return groups

    def train_dataloader(self):
        d = self.config["data"]
        return train_loader(
            self.train_set,
            batch_size=d["batch_size"],
            seed=self.config["seed"],
            rank=self.global_rank,
            world_size=self.trainer.world_size if self._trainer is not None else 1,
            start_step=self.step,  # restored from the checkpoint before Lightning asks for the loader
            num_workers=d["num_workers"],
            pin_memory=self.device.type == "cuda",
        )

    def _usage_buffers(self) -> dict[str, torch.Tensor]:
        """The usage-count buffers of the tokenizer (state-dict key of this module -> tensor)."""
        return {f"model.{name}": buf for name, buf in self.model.named_buffers() if name.endswith("usage.counts")}

    def _per_rank(self, value: torch.Tensor) -> torch.Tensor:
        """``(world, *value.shape)``: ``value`` from every rank (collective under DDP: every rank calls)."""
        value = value.detach()
        if _world_size() == 1:
            return value[None].cpu().clone()
        parts = [torch.empty_like(value) for _ in range(_world_size())]
        dist.all_gather(parts, value.contiguous())
        return torch.stack(parts).cpu()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the partly filled logging window of every rank: its usage counts (the state dict holds rank 0's
        # only) and its loss sums, so a resumed run logs that window as the uninterrupted run does
        keys = sorted(self._window)
        window = {
            "count": self._per_rank(torch.tensor(self._window_count, dtype=torch.long, device=self.device)),
            "usage": {k: self._per_rank(v) for k, v in self._usage_buffers().items()},
            "sums": {k: self._per_rank(torch.as_tensor(self._window[k][0], device=self.device)) for k in keys},
            "counts": {
                k: self._per_rank(torch.tensor(self._window[k][1], dtype=torch.long, device=self.device)) for k in keys
            },
        }
        checkpoint["simvq"] = {
            "step": self.step,
            "history": self.history,
            "config": self.config,
            "rng": rng_state(),
            "train_time_s": self._train_time + (time.perf_counter() - self._fit_start),
            "window": window,
            "world_size": _world_size(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("simvq")
        if state is None:
            raise ValueError("this checkpoint was not written by simvq training (no 'simvq' entry); cannot resume it")
        if config_hash(state["config"]) != config_hash(self.config):
            raise ValueError(
                "the checkpoint in this run folder was trained with a different model/quantizer config; "
                "use a new out_dir, or pass resume=False after moving the old run away"
            )
        self.step = int(state["step"])
        self.history = list(state["history"])
        self._train_time = float(state.get("train_time_s", 0.0))
        set_rng_state(state["rng"])
        # Lightning builds the training loader (which draws from the global RNG) after this hook: restore
        # the RNG again right before the first resumed step
        self._resume_rng = state["rng"]
        window = state.get("window")
        if window is not None:
            self._restore_window(window, checkpoint.get("state_dict", {}), int(state.get("world_size", 1)))

    def _restore_window(self, window: dict, state_dict: dict, saved_world: int) -> None:
        """This rank's partly filled logging window (runs before Lightning loads ``state_dict``)."""
        world, rank = _world_size(), self.global_rank
        for key, per_rank in window["usage"].items():
            if key not in state_dict:
                continue
            # same world size: each rank continues its own counts; otherwise rank 0 takes the sum (the
            # window's all-reduced usage is the same either way)
            if saved_world == world:
                counts = per_rank[rank]
            else:
                counts = per_rank.sum(0) if rank == 0 else torch.zeros_like(per_rank[0])
            state_dict[key] = counts.clone()
        if saved_world == world:
            self._window = {
                k: (window["sums"][k][rank].to(self.device), int(window["counts"][k][rank])) for k in window["sums"]
            }
            self._window_count = int(window["count"][rank])
        # with another world size the loss window starts afresh (its means could not be split by rank)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None

    # ----- training ----------------------------------------------------------------------------------
    def _set_lr(self, optimizers) -> None:
        o = self.config["optim"]
        warm = o["warmup_steps"]
        factor = min(1.0, (self.step + 1) / warm) if warm > 0 else 1.0
        base = [o["lr"], o["disc_lr"] if o["disc_lr"] is not None else o["lr"]]
        for opt, lr in zip(optimizers, base):
            for group in opt.param_groups:
                own = o["quantizer_lr"] if group.get("name") == "quantizer" else None
                group["lr"] = (own if own is not None else lr) * factor

    def _any_rank(self, *flags: bool) -> list[bool]:
        """Element-wise OR of boolean flags over all ranks (so every rank takes the same branch)."""
        if _world_size() == 1:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v > 0) for v in t.tolist()]

    def _clip(self, opt) -> None:
        clip = self.config["optim"]["grad_clip"]
        if clip is not None:
            self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def training_step(self, batch, batch_idx):
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        opt_g = opts[0]
        self._set_lr(opts)
        x = self.task.model_input(batch)
        step = self.step

        error = ""
        try:
            x_hat, quant = self.model(x)
            g_loss, logs = self.task.generator_loss(
                x=x, x_hat=x_hat, quant=quant, discriminator=self.discriminator, loss_modules=self.loss_modules, step=step
            )
            if not bool(torch.isfinite(g_loss)):
                error = f"generator loss is {float(g_loss)} at step {step}"
        except NonFiniteInputError as err:  # the quantizer refuses NaN/Inf features
            error = f"step {step}: {err}"
        (bad,) = self._any_rank(bool(error))
        if bad:
            self._diverge(error or f"another rank reported a non-finite loss at step {step}")
            return None

        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        self._clip(opt_g)
        opt_g.step()

        if self.discriminator is not None and self.task.gan_active(step):
            opt_d = opts[1]
            d_loss, d_logs = self.task.discriminator_loss(
                x=x, x_hat=x_hat.detach(), discriminator=self.discriminator, step=step
            )
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            self._clip(opt_d)
            opt_d.step()
            logs.update(d_logs)

        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        self.steps_this_run += 1
        for k, v in logs.items():
            # (sum, count) per key: terms such as the GAN losses start part-way through a window
            total, count = self._window.get(k, (0.0, 0))
            self._window[k] = (total + v, count + 1)
        self._window_count += 1

        last = self.max_steps is not None and self.step >= self.max_steps
        out_of_time = (
            self.max_minutes is not None and time.perf_counter() - self._fit_start >= 60.0 * self.max_minutes
        )
        # every rank must agree to stop at the same step (the wall clock differs slightly between ranks),
        # and to log at the same step (logging all-reduces)
        last, out_of_time = self._any_rank(last, out_of_time)
        if self.step % self.config["trainer"]["log_every"] == 0 or last or out_of_time:
            self._log_window()
        if last or out_of_time:
            self.trainer.should_stop = True
        return None

    def _diverge(self, reason: str) -> None:
        self.diverged = True
        self.diverged_reason = reason
        self.trainer.should_stop = True
        entry = {"step": self.step, "diverged": True, "reason": reason}
        self.history.append(entry)

    def _log_window(self) -> None:
        if self._window_count == 0:
            return
        keys = sorted(self._window)
        means = torch.stack([self._window[k][0] / self._window[k][1] for k in keys])
        if _world_size() > 1:
            dist.all_reduce(means, op=dist.ReduceOp.SUM)
            means = means / _world_size()
        entry: dict = {"step": self.step}
        entry.update({k: float(v) for k, v in zip(keys, means.tolist())})
        usage = self.model.quantize.usage.compute()  # summed over ranks under DDP
        entry.update(usage.as_dict())
        self.model.quantize.usage.reset()
        entry["lr"] = float(self.optimizers()[0].param_groups[0]["lr"]) if isinstance(self.optimizers(), list) else float(
            self.optimizers().param_groups[0]["lr"]
        )
        elapsed = self._train_time + (time.perf_counter() - self._fit_start)
        entry["time_s"] = elapsed
        self.history.append(entry)
        self._window, self._window_count = {}, 0
        if self.global_rank == 0:
            metrics = {f"train/{k}": v for k, v in entry.items() if k != "step" and isinstance(v, (int, float))}
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.step)
                logger.save()  # flush now: a killed run keeps its log

    # ----- EMA weights ------------------------------------------------------------------------------
    @contextmanager
    def ema_weights(self):
        """Run a block with the EMA weights (the live ones when EMA is off)."""
        if self.ema is None:
            yield self.model
        else:
            with self.ema.swapped(self.model):
                yield self.model

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The tokenizer's weights for the model directory: EMA averages when EMA is on."""
        if self.ema is None:
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return self.ema.averaged_state_dict(self.model)

    @torch.no_grad()
    def reconstruct_samples(self, batch: torch.Tensor):
        """``(x, x_hat)`` for a batch, with EMA weights, without touching the usage window."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.ema_weights(), preserved_usage(self.model):
                # under a "true" precision (bf16-true, 64-true) the weights are not float32: feed their dtype
                x = batch.to(self.device, dtype=_weight_dtype(self.model))
                x_hat, _ = self.task.reconstruct(self.model, x)
                x, x_hat = x.float(), x_hat.float()
        finally:
            self.model.train(was_training)
        return x, x_hat


def _weight_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _shape(t) -> str:
    return "x".join(map(str, tuple(t.shape))) or "scalar"


def init_mismatch(model, state_dict: dict, *, strict: bool) -> str:
    """What keeps ``state_dict`` from loading into ``model`` ("" when it fits): the first few keys whose shapes
    differ, that the model lacks, or (``strict``) that the weights lack (usage counters excepted)."""
    own = model.state_dict()
    differ = [k for k, v in state_dict.items() if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    differ.sort(key=lambda k: k.endswith("usage.counts"))  # the counters follow the codebook: named last
    shapes = [f"{k} {_shape(state_dict[k])} vs {_shape(own[k])}" for k in differ]
    unexpected = [k for k in state_dict if k not in own]
    missing = [k for k in own if k not in state_dict and not k.endswith("usage.counts")] if strict else []
    parts = []
    for what, keys in (("shape differs for", shapes), ("the model has no", unexpected), ("the weights lack", missing)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            parts.append(f"{what} {', '.join(keys[:3])}{more}")
    return "; ".join(parts)


def load_initial_weights(model, state_dict: dict, *, strict: bool) -> None:
    """Load starting weights into a freshly built tokenizer (only the given keys unless ``strict``).

    Weights that do not fit the model the config builds are a ValueError naming the first keys at fault (the
    usual cause: ``--init`` of a model trained with another model/quantizer config)."""
    problem = init_mismatch(model, state_dict, strict=strict)
    if problem:
        raise ValueError(
            f"the initial weights (--init) do not fit the model this config builds: {problem}; train with the "
            "config the --init model was trained with (--config INIT/config.yaml) or start without --init"
        )
    model.load_state_dict(state_dict, strict=False)


def finite_state(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


__all__ = ["TokenizerModule", "finite_state", "load_initial_weights", "preserved_usage", "rng_state", "set_rng_state"]
