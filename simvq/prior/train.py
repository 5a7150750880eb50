"""Training a token prior with Lightning: ``train_prior(tokenizer_dir, out_dir, config)``.

The run folder (``out_dir``) is also the prior's model folder::

    config.yaml            the full prior config, the sizes read from the tokenizer, and ``tokenizer:``
                           (its folder, absolute, and its config hash)
    model.safetensors      the prior's weights (written at the end, atomically)
    tokens/                the tokenizer's train / eval splits encoded once (reused by later runs)
    checkpoints/last.ckpt  Lightning checkpoint (atomic), resumed when the run is started again
    history.json           loss, learning rate and held-out bits/token per logging window

Batches are drawn by step index (a generator seeded with ``seed`` and the step), so a resumed run sees the
batches the interrupted one would have seen.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from simvq.io import atomic_path, save_file_atomic
from simvq.modalities import modality_of
from simvq.tokens import config_hash
from simvq.prior.config import SIZE_KEYS, load_prior_config, run_key
from simvq.prior.model import TokenPrior

log = logging.getLogger("simvq.prior")

CHECKPOINT = Path("checkpoints") / "last.ckpt"
MODEL_KEYS = ("width", "depth", "heads", "positions", "rope_base", "dropout", "label_dropout", "ffn_multiple_of")


# ----- tokenizer and prior folders -----------------------------------------------------------------------
def resolve_tokenizer_dir(path: str | Path) -> Path:
    """The tokenizer model folder: ``path`` itself, ``path/model`` for a training run folder, or the shipped
    tokenizer called ``path`` (:mod:`simvq.pretrained`) when no such folder exists.

    Raises FileNotFoundError / ValueError with one line naming the problem and the fix.
    """
    from simvq.pretrained import model_path

    shipped = model_path(str(path)) if not Path(path).expanduser().exists() else None
    path = shipped if shipped is not None else Path(path).expanduser()  # a shipped tokenizer by name (`simvq models`)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist; pass --tokenizer the model/ folder of a tokenizer "
                                "training run, or the name of a shipped tokenizer (`simvq models`)")
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder; pass --tokenizer the model/ folder of a tokenizer training run")
    for candidate in (path, path / "model"):
        if (candidate / "config.yaml").is_file() and (candidate / "model.safetensors").is_file():
            cfg = _read_yaml(candidate / "config.yaml")
            if isinstance(cfg, dict) and "quantizer" in cfg and "model" in cfg:
                return candidate.resolve()
            if (candidate / "model.safetensors").is_file() and isinstance(cfg, dict) and "tokenizer" in cfg:
                raise ValueError(f"{path} is a prior, not a tokenizer; pass --tokenizer the tokenizer's model/ folder")
    raise ValueError(
        f"{path} is not a tokenizer folder (config.yaml with model and quantizer sections + model.safetensors); "
        "pass the model/ folder written by `simvq train`"
    )


def _read_yaml(path: Path):
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid YAML ({err})") from err


def tokenizer_hash(config: dict) -> str:
    return config_hash(config)


def token_rate(tokenizer, config: dict) -> float | None:
    """Tokens per second of an audio tokenizer (the modality's rate), None for token grids (images)."""
    if modality_of(config).token_grid:
        return None
    return float(modality_of(config).rate(tokenizer, config)["tokens_per_second"])


def load_tokenizer_folder(path: str | Path, *, device="cpu"):
    """``(tokenizer module in eval mode, its config, its folder)``."""
    from simvq.checkpoints import load_model_dir, load_tokenizer

    folder = resolve_tokenizer_dir(path)
    _, config = load_model_dir(folder)
    return load_tokenizer(folder, device=device), config, folder


def build_prior(config: dict) -> TokenPrior:
    """The :class:`TokenPrior` a full (trained) prior config describes."""
    m = config["model"]
    missing = [k for k in SIZE_KEYS if k not in m]
    if missing:
        raise ValueError(f"prior config lacks model.{missing[0]}; it is written by training (is this a prior folder?)")
    return TokenPrior(
        codebook_size=int(m["codebook_size"]),
        grid=tuple(m["grid"]),
        num_classes=int(m["num_classes"]),
        **{k: m[k] for k in MODEL_KEYS},
    )


def load_prior(prior_dir: str | Path, *, device="cpu") -> tuple[TokenPrior, dict]:
    """``(prior in eval mode, its config)`` from a prior folder."""
    from simvq.checkpoints import load_model_dir

    prior_dir = Path(prior_dir).expanduser()
    if not prior_dir.is_dir():
        raise FileNotFoundError(f"prior folder {prior_dir} does not exist; pass --prior the --out folder of `simvq prior train`")
    if not (prior_dir / "model.safetensors").is_file():
        _not_a_prior(prior_dir)
    state, config = load_model_dir(prior_dir, device="cpu")
    if "tokenizer" not in config:
        raise ValueError(f"{prior_dir} holds a tokenizer, not a prior; pass --prior the --out folder of `simvq prior train`")
    prior = build_prior(config)
    prior.load_state_dict(state, strict=True)
    return prior.to(device).eval(), config


def _not_a_prior(folder: Path) -> None:
    """Raise the error that says what ``folder`` (which holds no ``model.safetensors``) is instead of a prior."""
    from simvq.io import RUN_MARKER, output_owner

    fix = "pass --prior the --out folder of `simvq prior train`"
    owner = output_owner(folder)
    if owner == "prior train" or (owner is None and (folder / CHECKPOINT).is_file() and not (folder / "config.yaml").exists()
                                  and not (folder / RUN_MARKER).exists()):
        if (folder / CHECKPOINT).is_file():
            raise FileNotFoundError(f"{folder} holds an unfinished prior run (no model.safetensors yet); run `simvq prior train` "
                                    "again to finish it")
        raise FileNotFoundError(f"{folder} holds a prior run that has not trained yet (no model.safetensors); run `simvq prior "
                                "train` again")
    if (folder / RUN_MARKER).is_file() or (folder / "model" / "model.safetensors").is_file():
        raise ValueError(f"{folder} is a tokenizer training run folder, not a prior; {fix} (the tokenizer is what "
                         "`simvq prior train --tokenizer` takes)")
    raise FileNotFoundError(f"{folder} is not a prior folder (no model.safetensors); {fix}")


def prior_tokenizer_path(prior_dir: str | Path) -> Path | None:
    """The tokenizer folder a prior folder's ``config.yaml`` names (None when it names none or cannot be read)."""
    try:
        cfg = _read_yaml(Path(prior_dir).expanduser() / "config.yaml")
    except (OSError, ValueError):
        return None
    tok = cfg.get("tokenizer") if isinstance(cfg, dict) else None
    path = tok.get("path") if isinstance(tok, dict) else None
    return Path(path) if isinstance(path, str) and path else None


def load_prior_with_tokenizer(prior_dir: str | Path, *, tokenizer_dir: str | Path | None = None, device="cpu"):
    """``(prior, prior config, tokenizer, tokenizer config)``, checked to belong together.

    The tokenizer is the one the prior's config names unless ``tokenizer_dir`` is given; a codebook size,
    token grid or tokenizer config hash that differs from the prior's is a ValueError.
    """
    prior, config = load_prior(prior_dir, device=device)
    ref = tokenizer_dir or config["tokenizer"]["path"]
    tokenizer, tok_config, _ = load_tokenizer_folder(ref, device=device)
    check_prior_matches(prior, config, tokenizer, tok_config, where=str(ref))
    return prior, config, tokenizer, tok_config


def check_prior_matches(prior: TokenPrior, config: dict, tokenizer, tok_config: dict, *, where: str) -> None:
    k = int(tokenizer.quantize.codebook_size)
    if k != prior.codebook_size:
        raise ValueError(
            f"the prior was trained on a codebook of {prior.codebook_size} codes but the tokenizer in {where} has {k}; "
            "use the tokenizer the prior was trained on (see tokenizer.path in the prior's config.yaml)"
        )
    size = tok_config.get("data", {}).get("image_size")
    factor = getattr(tokenizer, "downsample_factor", None)
    if size and factor:
        grid = (int(size) // factor, int(size) // factor)
        if grid != prior.grid:
            raise ValueError(
                f"the prior generates {prior.grid[0]}x{prior.grid[1]} token grids but the tokenizer in {where} makes "
                f"{grid[0]}x{grid[1]}; use the tokenizer the prior was trained on"
            )
    expected = config["tokenizer"].get("config_hash")
    if expected and tokenizer_hash(tok_config) != expected:
        raise ValueError(
            f"the tokenizer in {where} is not the one the prior was trained on (config hash "
            f"{tokenizer_hash(tok_config)} != {expected}); use the tokenizer named in the prior's config.yaml"
        )


# ----- Lightning ------------------------------------------------------------------------------------------
class StepBatches(torch.utils.data.IterableDataset):
    """Endless batches of row indices; batch ``s`` depends only on ``(seed, s)``."""

    def __init__(self, n: int, batch_size: int, seed: int, start) -> None:
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start

    def __iter__(self):
        step = int(self.start())
        while True:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            yield torch.randint(self.n, (self.batch_size,), generator=gen)
            step += 1


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or cosine down to ``min_ratio``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _lightning_module_class():
    import lightning as L

    class PriorModule(L.LightningModule):
        """Next-token cross-entropy on the cached token grids; AdamW with warm-up and cosine/constant LR."""

        def __init__(self, prior: TokenPrior, config: dict, tokens, labels, eval_tokens, eval_labels, progress) -> None:
            super().__init__()
            self.prior = prior
            self.config = config
            self.tokens, self.labels = tokens.reshape(len(tokens), -1), labels
            self.eval_tokens, self.eval_labels = eval_tokens, eval_labels
            self.history: list[dict] = []
            self.progress = progress
            self._window: list[float] = []
            self._t0 = time.perf_counter()
            self.train_time_s = 0.0

        def train_dataloader(self):
            c = self.config
            batches = StepBatches(len(self.tokens), c["data"]["batch_size"], c["seed"], lambda: self.trainer.global_step)
            return torch.utils.data.DataLoader(batches, batch_size=None, num_workers=0)

        def training_step(self, index, batch_idx):
            index = index.cpu()
            seq = self.tokens[index].to(self.device)
            labels = None if self.labels is None else self.labels[index].to(self.device)
            loss = self.prior.loss(seq, labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the prior's loss is {loss.item()} at step {self.global_step}; lower optim.lr")
            self._window.append(float(loss.detach()))
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            step = self.global_step
            tcfg = self.config["trainer"]
            if step % tcfg["log_every"] == 0 or step >= tcfg["max_steps"]:
                entry = {
                    "step": step,
                    "loss_nats": sum(self._window) / max(1, len(self._window)),
                    "lr": self.trainer.optimizers[0].param_groups[0]["lr"],
                    "time_s": self.train_time_s + time.perf_counter() - self._t0,
                }
                if self.eval_tokens is not None:
                    from simvq.prior.likelihood import held_out_nll

                    nll = held_out_nll(self.prior, self.eval_tokens, self.eval_labels, batch_size=self.config["data"]["eval_batch_size"], limit=128)
                    entry["eval_bits_per_token"] = nll["bits_per_token"]
                    self.prior.train()
                self._window = []
                self.history.append(entry)
                if self.progress:
                    extra = f"  held-out {entry['eval_bits_per_token']:.3f} bits/token" if "eval_bits_per_token" in entry else ""
                    print(f"[prior] step {step}/{tcfg['max_steps']}  loss {entry['loss_nats']:.4f} nats/token{extra}  {entry['time_s']:.0f}s", flush=True)
            every = tcfg["checkpoint_every"]
            if step % every == 0 or step >= tcfg["max_steps"]:
                self._save_checkpoint()

        def _save_checkpoint(self) -> None:
            path = Path(self.trainer.default_root_dir) / CHECKPOINT
            with atomic_path(path) as tmp:
                self.trainer.save_checkpoint(tmp, weights_only=False)

        def configure_optimizers(self):
            o, t = self.config["optim"], self.config["trainer"]
            decay = [p for p in self.prior.parameters() if p.dim() >= 2]
            no_decay = [p for p in self.prior.parameters() if p.dim() < 2]
            opt = torch.optim.AdamW(
                [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
                lr=o["lr"], betas=tuple(o["betas"]),
            )
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: lr_factor(s, warmup=o["warmup_steps"], total=t["max_steps"], schedule=o["schedule"], min_ratio=o["min_lr_ratio"])
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def on_save_checkpoint(self, checkpoint: dict) -> None:
            checkpoint["simvq_prior"] = {
                "config": self.config,
                "history": self.history,
                "rng": torch.get_rng_state(),
                "train_time_s": self.train_time_s + time.perf_counter() - self._t0,
            }

        def on_load_checkpoint(self, checkpoint: dict) -> None:
            state = checkpoint.get("simvq_prior")
            if state is None:
                raise ValueError("this checkpoint was not written by `simvq prior train`; cannot resume it")
            if run_key(state["config"]) != run_key(self.config) or state["config"]["tokenizer"] != self.config["tokenizer"]:
                raise ValueError(
                    "the checkpoint in this run folder belongs to a prior with another model config or tokenizer; "
                    "use a new --out folder (nothing was changed)"
                )
            self.history = list(state["history"])
            self.train_time_s = float(state["train_time_s"])
            self._t0 = time.perf_counter()
            torch.set_rng_state(state["rng"])

    return PriorModule


# ----- the entry point --------------------------------------------------------------------------------------
@dataclass
class PriorTrainResult:
    prior_dir: Path
    history: list[dict]
    metrics: dict
    parameters: dict
    wall_time_s: float
    tokens_reused: bool
    config: dict = field(default_factory=dict)


def prepare_run(tokenizer_dir, config="prior/fashion-cpu", *, overrides=None, max_steps=None) -> tuple[dict, Path, dict]:
    """Validate everything that can be checked before training: ``(prior config, tokenizer folder, its config)``."""
    cfg = load_prior_config(config, overrides)
    if max_steps is not None:
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
        cfg["trainer"]["max_steps"] = max_steps
    folder = resolve_tokenizer_dir(tokenizer_dir)
    from simvq.checkpoints import load_model_dir

    _, tok_config = load_model_dir(folder)
    check_prior_data(cfg, tok_config, folder)
    cfg["tokenizer"] = {"path": str(folder), "config_hash": tokenizer_hash(tok_config)}
    return cfg, folder, tok_config


# settings that change neither the trained weights nor what is measured; trainer.max_steps is handled apart
UNCHECKED_KEYS = ("trainer.max_steps", "trainer.num_threads", "trainer.accelerator", "data.encode_batch_size", "data.eval_batch_size")


def _flat(cfg: dict, where: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{where}{key}."))
        else:
            out[f"{where}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def earlier_run(out_dir: str | Path) -> tuple[dict | None, int | None, bool]:
    """``(config, steps trained, finished)`` of the prior run in ``out_dir``: the config its checkpoint (or, without
    one, its ``config.yaml``) records; ``(None, None, False)`` when it holds neither."""
    out_dir = Path(out_dir)
    ckpt, finished = out_dir / CHECKPOINT, (out_dir / "model.safetensors").is_file()
    if ckpt.is_file():
        try:
            state = _load_ckpt(ckpt)
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is the same user-facing problem
            raise ValueError(f"{ckpt} cannot be read ({type(err).__name__}); pass --force to start the run again or choose "
                             "another --out") from None
        prior_state = state.get("simvq_prior") if isinstance(state, dict) else None
        if not isinstance(prior_state, dict) or not isinstance(prior_state.get("config"), dict):
            raise ValueError(f"{ckpt} was not written by `simvq prior train`; pass --force to start the run again or choose "
                             "another --out")
        return prior_state["config"], int(state.get("global_step", 0)), finished
    if finished and (out_dir / "config.yaml").is_file():
        cfg = _read_yaml(out_dir / "config.yaml")
        if isinstance(cfg, dict):
            return cfg, int(cfg.get("trainer", {}).get("max_steps", 0)), True
    return None, None, finished


def check_rerun(out_dir: str | Path, cfg: dict) -> str:
    """What ``prior train`` may do with the earlier run in its own folder ``out_dir`` for the new config ``cfg``
    (before anything is written): ``"new"`` (nothing trained there yet), ``"continue"`` (same settings, more
    steps, or an unfinished run to finish) or ``"done"`` (finished with the same settings and steps: nothing to do).

    A run whose recorded settings differ from ``cfg`` in anything that changes what is trained or measured, a
    finished run asked for fewer steps than it has, or a finished prior whose checkpoint is gone (so it cannot be
    continued) is a ValueError naming the problem and the fix (--force or another --out).
    """
    out_dir = Path(out_dir)
    recorded, steps, finished = earlier_run(out_dir)
    fix = "pass --force to train it again from the start or choose another --out (nothing was changed)"
    if recorded is None:
        if finished:
            raise ValueError(f"--out {out_dir} holds a prior without its config.yaml; {fix}")
        return "new"
    try:
        old = _flat(load_prior_config(recorded))
    except (ValueError, TypeError, KeyError):
        old = _flat(recorded)
    new = _flat(cfg)
    skip = set(UNCHECKED_KEYS) | {f"model.{k}" for k in SIZE_KEYS}
    differ = sorted(k for k in set(old) | set(new) if k not in skip and old.get(k) != new.get(k))
    if differ:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in differ[:4]) + (", ..." if len(differ) > 4 else "")
        raise ValueError(f"--out {out_dir} holds a prior run with other settings: {shown}; {fix}")
    max_steps = cfg["trainer"]["max_steps"]
    if max_steps < steps:
        raise ValueError(f"--out {out_dir} holds a prior run already trained for {steps} steps, more than max_steps {max_steps}; "
                         f"{fix}")
    if finished and not (out_dir / CHECKPOINT).is_file():
        if max_steps == steps:
            return "done"
        raise ValueError(f"--out {out_dir} holds a finished prior whose checkpoint ({CHECKPOINT}) is gone, so it cannot be "
                         f"trained further; {fix}")
    if finished and max_steps == steps:
        return "done"
    return "continue"


def check_prior_data(cfg: dict, tok_config: dict, folder) -> None:
    """What the prior models must fit the tokenizer's modality: 2-D token grids (images) take no
    ``data.frames``; token sequences (audio) need ``data.frames`` and a held-out split with at least one
    window of that length (its clips are read here, before any output folder is made)."""
    from simvq.prior.data import data_config, prior_datasets

    modality = modality_of(tok_config)
    data = cfg["data"]
    if modality.token_grid:
        for key, unset in (("frames", None), ("crops", 1)):
            if data[key] != unset:
                raise ValueError(f"data.{key} is for audio tokenizers; {folder} is a {modality.name} tokenizer with 2-D token "
                                 f"grids: drop data.{key}")
        return
    if not modality.prior_windows:
        raise ValueError(f"{folder} is a {modality.name} tokenizer; priors need a tokenizer with 2-D token grids (images) "
                         "or audio token sequences")
    if data["frames"] is None:
        raise ValueError(f"{folder} is a {modality.name} tokenizer: its prior models windows of data.frames tokens; set "
                         "data.frames (e.g. --config prior/speech-cpu, or data.frames=50 for 1 s at 50 tokens/s)")
    prior_datasets(data_config(tok_config, data), data)  # raises when the held-out split yields no window


def train_prior(
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    config: str | Path | dict = "prior/fashion-cpu",
    *,
    overrides: list[str] | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    resume: bool = True,
) -> PriorTrainResult:
    """Encode the tokenizer's data once, train a prior on the tokens, write the prior folder ``out_dir``.

    Args:
        tokenizer_dir: the tokenizer's model folder (or its training run folder holding ``model/``).
        out_dir: the prior's run / model folder (created; resumed when it holds ``checkpoints/last.ckpt``).
        config: a prior preset (``"prior/fashion-cpu"``), a YAML path or a dict; ``overrides`` apply on top.
        resume: with False an existing checkpoint in ``out_dir`` is an error instead of being continued.
    """
    from simvq.prior.data import data_config, load_or_encode, prior_datasets
    from simvq.prior.likelihood import held_out_nll

    wall0 = time.perf_counter()
    cfg, tok_folder, tok_config = prepare_run(tokenizer_dir, config, overrides=overrides, max_steps=max_steps)
    out_dir = Path(out_dir)
    ckpt = out_dir / CHECKPOINT
    if ckpt.exists() and not resume:
        raise FileExistsError(f"{out_dir} already holds a prior run ({ckpt}); resume it or choose another --out (nothing was overwritten)")
    tcfg = cfg["trainer"]
    if tcfg["num_threads"]:
        torch.set_num_threads(tcfg["num_threads"])
    from simvq.checkpoints import load_tokenizer

    tokenizer = load_tokenizer(tok_folder)
    dcfg = data_config(tok_config, cfg["data"])
    train_set, eval_set = prior_datasets(dcfg, cfg["data"])
    out_dir.mkdir(parents=True, exist_ok=True)
    frames, crops = cfg["data"]["frames"], cfg["data"]["crops"]
    unit = "images" if frames is None else "windows"

    def show(what):
        def report(done, total):
            if progress and (done == total or done % (cfg["data"]["encode_batch_size"] * 40) == 0):
                print(f"[prior] encoding {what} split: {done}/{total} {unit}", flush=True)
        return report

    thash = cfg["tokenizer"]["config_hash"]
    eb = cfg["data"]["encode_batch_size"]
    window = dict(frames=frames, crops=crops)
    tokens, labels, reused = load_or_encode(out_dir, tokenizer, thash, dcfg, train_set, "train", batch_size=eb, progress=show("train"), **window)
    eval_tokens, eval_labels, _ = load_or_encode(out_dir, tokenizer, thash, dcfg, eval_set, "eval", batch_size=eb, progress=show("eval"), **window)
    codebook_size = int(tokenizer.quantize.codebook_size)
    rate = token_rate(tokenizer, tok_config)
    del tokenizer
    k = int(tokens.max()) + 1
    if k > codebook_size:
        raise ValueError(f"token {k - 1} is outside the tokenizer's codebook of {codebook_size}; the token cache is stale, delete {out_dir / 'tokens'}")
    conditional = cfg["model"]["conditional"] and labels is not None
    num_classes = 0
    if conditional:  # the data set's classes, not only those in a limited split
        from simvq.prior.data import class_names

        names = class_names(out_dir)
        seen = max(int(labels.max()), int(eval_labels.max()) if eval_labels is not None else 0) + 1
        num_classes = max(len(names), seen) if names else seen
    cfg["model"].update(codebook_size=codebook_size, grid=list(tokens.shape[1:]), num_classes=num_classes)
    if not conditional:
        labels = eval_labels = None

    import lightning as L

    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    prior = build_prior(cfg)
    module = _lightning_module_class()(prior, cfg, tokens, labels, eval_tokens, eval_labels, progress)
    if progress:
        counts = prior.parameter_counts()
        print(f"[prior] {counts['total']:,} parameters (token embedding {counts['token_embedding']:,}, output layer "
              f"{counts['output_layer']:,}); {len(tokens):,} training {'grids' if frames is None else 'windows'} of "
              f"{prior.grid[0]}x{prior.grid[1]} tokens, "
              f"K={codebook_size}, {num_classes or 'no'} classes", flush=True)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*IterableDataset.*")
        warnings.filterwarnings("ignore", message=".*treespec.*")
        trainer = L.Trainer(
            accelerator=tcfg["accelerator"], devices=1, max_steps=tcfg["max_steps"], max_epochs=-1,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out_dir, log_every_n_steps=1,
            gradient_clip_val=cfg["optim"]["grad_clip"],
        )
        state = _load_ckpt(ckpt) if ckpt.exists() else None
        if state is None or int(state.get("global_step", 0)) < tcfg["max_steps"]:
            trainer.fit(module, ckpt_path=ckpt if state is not None else None, weights_only=True)
        else:  # already trained that far: the checkpoint's weights, read once
            module.on_load_checkpoint(state)
            module.prior.load_state_dict({k.removeprefix("prior."): v for k, v in state["state_dict"].items()})

    prior = module.prior.cpu().eval()
    metrics = held_out_nll(prior, eval_tokens, eval_labels, batch_size=cfg["data"]["eval_batch_size"], tokens_per_second=rate)
    metrics["wall_time_s"] = time.perf_counter() - wall0
    save_file_atomic(out_dir / "history.json", json.dumps({"history": module.history, "held_out": metrics}, indent=2))
    from simvq.checkpoints import save_model_dir

    save_model_dir(out_dir, prior.state_dict(), cfg, metadata={"kind": "simvq-token-prior", "steps": str(module.global_step)})
    return PriorTrainResult(
        prior_dir=out_dir, history=module.history, metrics=metrics, parameters=prior.parameter_counts(),
        wall_time_s=time.perf_counter() - wall0, tokens_reused=reused, config=cfg,
    )


def _load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


__all__ = [
    "PriorTrainResult", "build_prior", "check_prior_data", "check_prior_matches", "load_prior", "load_prior_with_tokenizer",
    "load_tokenizer_folder", "lr_factor", "prepare_run", "resolve_tokenizer_dir", "token_rate", "train_prior",
]
