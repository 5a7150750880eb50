"""``train(config, out_dir=...)``: one entry point for the CLI, ``simvq compare`` and library users."""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from simvq.checkpoints import save_model_dir
from simvq.modalities import modality_of

log = logging.getLogger("simvq.training")


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        model_dir: ``out_dir/model`` (config.yaml + model.safetensors with EMA weights); None when the run
            diverged before any finite weights could be exported.
        history: one dict per logging window (``step``, the loss terms, ``utilization``, ``perplexity``,
            ``dead_codes``, ``lr``, ``time_s``); a resumed run includes the interrupted run's entries.
        wall_time_s: wall-clock seconds of this call, setup included.
        steps_per_s: training steps per second in this call (setup excluded).
        peak_memory_mb: peak accelerator memory (CUDA) or the process's peak resident memory (CPU).
        diverged: a NaN/Inf loss stopped the run (``diverged_reason`` says where).
        steps: steps completed in total (including those before a resume).
        run_dir, checkpoint, samples: the run folder, its ``last.ckpt`` and the grids written.
    """

    model_dir: Path | None
    history: list[dict]
    wall_time_s: float
    steps_per_s: float
    peak_memory_mb: float
    diverged: bool
    steps: int = 0
    run_dir: Path | None = None
    checkpoint: Path | None = None
    samples: list[Path] = field(default_factory=list)
    diverged_reason: str = ""
    config: dict = field(default_factory=dict)

    def final(self, key: str, default=None):
        """The last logged value of ``key`` (e.g. ``final("utilization")``)."""
        for entry in reversed(self.history):
            if key in entry:
                return entry[key]
        return default


def _strategy(name: str):
    if name in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"):
        from lightning.pytorch.strategies import DDPStrategy

        start = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}[name]
        # broadcast_buffers=False: each rank keeps its own usage counts (CodebookUsage sums them across ranks
        # when asked); the default would overwrite them with rank 0's every forward pass.
        # find_unused_parameters=True: the generator and the discriminator are updated by separate backward
        # passes, each of which leaves the other network's parameters unused.
        return DDPStrategy(find_unused_parameters=True, broadcast_buffers=False, start_method=start)
    return name


def _available_accelerators() -> list[str]:
    """Lightning's accelerator names that this machine can run (``auto`` always can)."""
    from lightning.pytorch.accelerators import AcceleratorRegistry

    names = []
    for name in AcceleratorRegistry.available_accelerators():
        try:
            if AcceleratorRegistry[name]["accelerator"].is_available():
                names.append(name)
        except Exception:  # noqa: BLE001 - e.g. a missing optional package: not available here
            pass
    return ["auto", *names]


def _lightning_message(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def check_trainer_settings(trainer: dict) -> None:
    """Refuse, as a one-line ValueError, ``trainer.accelerator`` / ``devices`` / ``num_nodes`` / ``strategy`` /
    ``precision`` settings that Lightning cannot use on this machine (an accelerator it lacks, ``devices=0``, an
    unknown strategy...). Lightning itself judges them: a throwaway Trainer is built from the settings, one key
    at a time, so the error names the key at fault; nothing is written. Called when training starts (not when a
    config is loaded: a config written on a GPU machine still loads on a CPU one)."""
    import lightning as L

    settings = {"accelerator": "auto", "devices": "auto", "num_nodes": 1, "strategy": "auto", "precision": "32-true"}
    available = ", ".join(_available_accelerators())
    fixes = {
        "accelerator": f"set it to one this machine has: {available}",
        "devices": "give a positive number of devices, a list of device indices, -1 (all) or auto; on a CPU, a "
                   "positive number of processes",
        "num_nodes": "give a positive number of machines (1 unless training on a cluster)",
        "strategy": "use auto, or a Lightning strategy this machine supports (ddp, ddp_spawn, ddp_fork, "
                    "ddp_notebook, fsdp, deepspeed... with their packages and accelerators)",
        "precision": f"use a precision this accelerator supports (e.g. 32-true); accelerators available: {available}",
    }
    # one stage per key (devices and num_nodes together), each adding its key to those already accepted
    for keys in (("accelerator",), ("devices", "num_nodes"), ("strategy",), ("precision",)):
        for key in keys:
            settings[key] = trainer.get(key, settings[key])
        try:
            with warnings.catch_warnings(), _QuietLightning(enabled=True):
                warnings.simplefilter("ignore")
                strategy = settings["strategy"]
                L.Trainer(
                    accelerator=settings["accelerator"], devices=settings["devices"], num_nodes=settings["num_nodes"],
                    strategy=_strategy(strategy) if isinstance(strategy, str) else strategy,
                    precision=settings["precision"], logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                )
        except Exception as err:  # noqa: BLE001 - whatever Lightning refuses the settings with
            key = keys[0]
            if len(keys) > 1 and "num_nodes" in str(err):
                key = "num_nodes"
            raise ValueError(
                f"trainer.{key}={settings[key]!r} cannot be used on this machine ({_lightning_message(err)}); "
                f"{fixes[key]} (nothing was written)"
            ) from None


def _peek_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ValueError(
            f"cannot read checkpoint {path} ({err}); move it away to start afresh, or pass resume=False with a new out_dir"
        ) from err
    if "simvq" not in ckpt:
        raise ValueError(f"{path} was not written by simvq training; cannot resume from it")
    return ckpt["simvq"]


def _legacy_hash(ckpt_path: Path) -> str | None:
    """The config hash of a run folder written before run markers existed (None: no checkpoint in it)."""
    if not ckpt_path.is_file():
        return None
    from simvq.tokens import config_hash

    return config_hash(_peek_checkpoint(ckpt_path)["config"])


def _same_path(a, b) -> bool:
    import os

    return os.path.realpath(a) == os.path.realpath(b)


def _is_global_rank_zero() -> bool:
    import os

    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _remove_stale_temp_files(folder: Path) -> None:
    """Temporary files an interrupted checkpoint write left behind (``.last.ckpt.*.tmp``, see atomic_path)."""
    if not folder.is_dir():
        return
    for tmp in folder.glob(".*.tmp"):
        log.info("removing %s, left by an interrupted checkpoint write", tmp)
        tmp.unlink(missing_ok=True)


def _reset_peak_memory() -> None:
    """Start a new peak-memory window: CUDA's allocator peak and, on Linux, the process's resident-set
    high-water mark (writing "5" to /proc/self/clear_refs resets VmHWM), so that a worker process that trains
    several runs one after another reports each run's own peak, not the largest of all its runs."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_memory_mb(device_type: str) -> float:
    """Peak memory since :func:`_reset_peak_memory`: CUDA allocator peak, else the peak resident set (VmHWM;
    where /proc is missing, the process's lifetime peak ``ru_maxrss``)."""
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except (ImportError, OSError):
        return float("nan")


def train(
    config,
    *,
    out_dir,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    progress: bool = True,
    resume: bool = True,
    overrides: list[str] | None = None,
    init_state: dict | None = None,
    init_strict: bool = False,
) -> TrainResult:
    """Train the tokenizer a config describes and export it to ``out_dir/model``.

    Args:
        config: a config dict, a preset name (``"image/photos-small"``) or a YAML path.
        out_dir: run folder: ``checkpoints/last.ckpt``, ``logs/`` (CSV), ``tb/`` (TensorBoard), ``samples/``
            (reconstruction grids), ``config.yaml`` and the exported ``model/``.
        max_steps, max_minutes: override ``trainer.max_steps`` / ``trainer.max_minutes``.
        progress: show a progress bar and the model summary (off: quiet, minimal callbacks); ``"steps"``: the
            step bar only (``simvq compare`` shows it within each of its many runs).
        resume: continue from ``out_dir/checkpoints/last.ckpt`` when it exists. With ``resume=False`` an
            existing checkpoint is an error (nothing is overwritten).
        overrides: ``key.sub=value`` strings applied to ``config`` first.
        init_state: starting weights for the tokenizer (a state dict, e.g. a retrofitted model or a k-means
            codebook), loaded into the freshly built model before the EMA copy is made. Only the given keys
            are loaded; ``init_strict=True`` also requires every model weight to be given (usage counters
            excepted). A resumed run continues from its checkpoint instead, as it should.

    Returns:
        :class:`TrainResult`. A NaN/Inf loss stops the run with ``diverged=True`` instead of raising.
    """
    from simvq.config import config_source_file, load_config, save_config
    from simvq.io import check_run_folder, mark_run_folder
    from simvq.tokens import config_hash

    wall0 = time.perf_counter()
    config_file = config_source_file(config)
    config = load_config(config, overrides)
    tcfg = config["trainer"]
    if max_steps is not None:
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
        tcfg["max_steps"] = max_steps
    if max_minutes is not None:
        if not max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0, got {max_minutes!r}")
        tcfg["max_minutes"] = float(max_minutes)
    if tcfg["max_steps"] is None and tcfg["max_epochs"] is None and tcfg["max_minutes"] is None:
        raise ValueError("set trainer.max_steps, trainer.max_epochs or trainer.max_minutes, or the run never ends")

    out_dir = Path(out_dir)
    ckpt_path = out_dir / "checkpoints" / "last.ckpt"
    this_hash = config_hash(config)
    # the run folder must be new, empty (apart from the config file read), or a run simvq made for this config
    check_run_folder(
        out_dir, this_hash, inputs=[config_file] if config_file is not None else [],
        legacy_hash=lambda: _legacy_hash(ckpt_path), option="out_dir (--out)",
    )
    resume_from = None
    if ckpt_path.exists():
        if not resume:
            raise FileExistsError(
                f"{out_dir} already holds a training run ({ckpt_path}); continue it (drop --no-resume; resume=True "
                "in Python) or choose another --out (nothing was overwritten)"
            )
        resume_from = ckpt_path
        previous = _peek_checkpoint(ckpt_path)

        if config_hash(previous["config"]) != this_hash:
            raise ValueError(
                f"{out_dir} holds a run trained with a different model/quantizer config; use a new out_dir "
                "(nothing was changed)"
            )
        done = int(previous["step"])
    else:
        done = 0
    # the config file read must survive byte for byte (comments included): it is not rewritten
    write_config = config_file is None or not _same_path(config_file, out_dir / "config.yaml")

    if tcfg["num_threads"] is not None:
        torch.set_num_threads(tcfg["num_threads"])
    # data errors (missing folder, no images) surface before the slow Lightning import
    task = modality_of(config).task(config)
    train_set, eval_set = task.build_datasets()
    # an accelerator, device count or strategy this machine cannot use: refused before the folder is made
    check_trainer_settings(tcfg)

    import lightning as L

    from simvq.training.callbacks import (
        AtomicCheckpointIO,
        PeriodicCheckpoint,
        PeriodicEval,
        SampleGrids,
        StepProgress,
    )
    from simvq.training.module import TokenizerModule, finite_state

    L.seed_everything(config["seed"], workers=True, verbose=False)
    module = TokenizerModule(
        config, task=task, train_set=train_set, eval_set=eval_set, max_minutes=tcfg["max_minutes"],
        init_state=init_state if resume_from is None else None, init_strict=init_strict,
    )
    # the folder is made and claimed once the model is built: a config the model refuses (a search path this
    # machine cannot run, say) leaves nothing behind that would block the corrected run
    out_dir.mkdir(parents=True, exist_ok=True)
    if _is_global_rank_zero():
        mark_run_folder(out_dir, this_hash)
        _remove_stale_temp_files(ckpt_path.parent)

    loggers = []
    if "csv" in tcfg["loggers"]:
        from lightning.pytorch.loggers import CSVLogger

        # a new version folder per (resumed) segment: CSVLogger would otherwise replace the earlier rows
        loggers.append(CSVLogger(out_dir, name="logs"))
    if "tensorboard" in tcfg["loggers"]:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(out_dir, name="tb", version="", default_hp_metric=False))
    samples = SampleGrids(out_dir / "samples", every=tcfg["sample_every"], num_samples=tcfg["num_samples"])
    callbacks = [samples]
    if tcfg["eval_every"] > 0:
        callbacks.append(PeriodicEval(every=tcfg["eval_every"]))
    # last, so a checkpoint written at step s already holds step s's evaluation in its history
    callbacks.append(PeriodicCheckpoint(ckpt_path, every=tcfg["checkpoint_every"]))

    quiet = _QuietLightning(enabled=progress is not True)
    with warnings.catch_warnings(), quiet:
        warnings.filterwarnings("ignore", message=".*treespec.*")  # Lightning vs newer torch, harmless
        # expected with an endless step-indexed loader and our own stopping rule
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
        warnings.filterwarnings("ignore", message=".*Your `IterableDataset` has `__len__` defined.*")
        warnings.filterwarnings("ignore", message=".*The number of training batches.*")
        trainer = L.Trainer(
            accelerator=tcfg["accelerator"],
            devices=tcfg["devices"],
            num_nodes=tcfg["num_nodes"],
            strategy=_strategy(tcfg["strategy"]),
            precision=tcfg["precision"],
            max_epochs=-1,
            max_steps=-1,
            logger=loggers or False,
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=progress is True,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            use_distributed_sampler=False,
            deterministic=tcfg["deterministic"],
            default_root_dir=out_dir,
            plugins=[AtomicCheckpointIO()],
            log_every_n_steps=1,
        )
        steps = tcfg["max_steps"]
        if tcfg["max_epochs"] is not None:
            global_batch = config["data"]["batch_size"] * trainer.world_size
            epoch_steps = math.ceil(tcfg["max_epochs"] * len(module.train_set) / global_batch)
            steps = epoch_steps if steps is None else min(steps, epoch_steps)
        module.max_steps = steps
        if progress:
            trainer.callbacks.append(StepProgress(steps))
        if trainer.global_rank == 0 and write_config:
            save_config(config, out_dir / "config.yaml")
        _reset_peak_memory()
        fit_t0 = time.perf_counter()
        if steps is not None and done >= steps:
            log.info("run in %s already reached step %d; exporting without training", out_dir, done)
            _restore_weights_only(module, ckpt_path)
        else:
            trainer.fit(module, ckpt_path=resume_from, weights_only=True)
        fit_time = time.perf_counter() - fit_t0

    model_dir = None
    if trainer.global_rank == 0:
        state = module.export_state_dict()
        if finite_state(state):
            meta = {"weights": "ema" if module.ema is not None else "live", "steps": str(module.step)}
            model_dir = Path(save_model_dir(out_dir / "model", {k: v.cpu() for k, v in state.items()}, config, metadata=meta))
        else:
            log.error("weights are not finite after divergence; no model exported (last good checkpoint: %s)", ckpt_path)
    if module.diverged:
        log.warning("training diverged: %s", module.diverged_reason)
    device_type = module.device.type
    return TrainResult(
        model_dir=model_dir,
        history=module.history,
        wall_time_s=time.perf_counter() - wall0,
        steps_per_s=module.steps_this_run / fit_time if fit_time > 0 and module.steps_this_run else 0.0,
        peak_memory_mb=_peak_memory_mb(device_type),
        diverged=module.diverged,
        steps=module.step,
        run_dir=out_dir,
        checkpoint=ckpt_path if ckpt_path.exists() else None,
        samples=list(samples.written),
        diverged_reason=module.diverged_reason,
        config=config,
    )


class _QuietLightning:
    """Silence Lightning's info lines (device summary, tips) for quiet runs such as ``simvq compare``."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.saved: list[tuple[logging.Logger, int]] = []

    def __enter__(self):
        if self.enabled:
            for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
                lg = logging.getLogger(name)
                self.saved.append((lg, lg.level))
                lg.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc) -> None:
        for lg, level in self.saved:
            lg.setLevel(level)
        self.saved.clear()


def _restore_weights_only(module, ckpt_path: Path) -> None:
    """Load a finished run's weights (model, EMA) and bookkeeping without starting the Trainer."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    module.load_state_dict(ckpt["state_dict"])
    module.on_load_checkpoint(ckpt)


__all__ = ["TrainResult", "check_trainer_settings", "train"]

