"""Model directories (``config.yaml`` + ``model.safetensors``) and official-checkpoint conversion.

A *model directory* holds the full run config (``config.yaml``) and the tokenizer weights
(``model.safetensors``, EMA weights when training kept an EMA). Every file is written atomically
(:func:`simvq.io.save_file_atomic`). Loading never unpickles arbitrary
objects: weights come from safetensors, official ``.ckpt`` files through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Mapping

import torch
import yaml
from torch import nn

from simvq.config import resolve_config
from simvq.io import check_output, prepare_output_dir, save_file_atomic
from simvq.modalities import build_tokenizer, official_modality
from simvq.pretrained import model_path

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
FORMAT_TAG = "simvq-model-dir-v1"


# ----- model directories ----------------------------------------------------------------------------------
def _plain(obj):
    """Make a config YAML-safe: tuples -> lists, paths -> strings, numpy scalars -> Python numbers."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", None) == 0:
        return obj.item()
    return obj


def _tensors_for_saving(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor; it cannot go to safetensors")
        # safetensors refuses tensors that share memory: give every entry its own contiguous CPU copy
        out[key] = value.detach().to("cpu").clone().contiguous()
    return out


def save_model_dir(
    directory: str | os.PathLike,
    model: nn.Module | Mapping[str, torch.Tensor],
    config: dict,
    *,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``directory/model.safetensors`` and ``directory/config.yaml``, each atomically.

    Args:
        directory: created when missing. Other files in it are never touched.
        model: the tokenizer (its ``state_dict()`` is saved) or a state dict (e.g. EMA weights).
        config: the full config (nested dict); written as YAML.
        metadata: extra string key/values stored in the safetensors header (provenance).
        overwrite: when False, an existing model in ``directory`` is an error instead of being replaced.

    The weights are written before the config: a crash between the two leaves the new weights with the old
    config, never a config that points at missing weights.
    """
    from safetensors.torch import save_file

    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory; choose another output path")
    if not overwrite and ((directory / WEIGHTS_FILE).exists() or (directory / CONFIG_FILE).exists()):
        raise FileExistsError(f"{directory} already holds a model; choose an empty directory or allow overwriting")
    state = model.state_dict() if isinstance(model, nn.Module) else model
    tensors = _tensors_for_saving(state)
    text = yaml.safe_dump(_plain(config), sort_keys=False)
    meta = {"format": FORMAT_TAG}
    for key, value in (metadata or {}).items():
        meta[str(key)] = str(value)
    directory.mkdir(parents=True, exist_ok=True)
    save_file_atomic(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    save_file_atomic(directory / CONFIG_FILE, text)
    return directory


def load_model_dir(directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Read a model directory: returns ``(state_dict, config)``.

    Raises FileNotFoundError for a missing directory or file, ValueError for a corrupt safetensors file or
    an unreadable / non-mapping config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir() and model_path(str(directory)) is not None:
        directory = model_path(str(directory))  # a tokenizer shipped with the package (simvq models)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"model directory {directory} does not exist; it should hold {CONFIG_FILE} and {WEIGHTS_FILE} "
            "(written by training or by `simvq convert`)"
        )
    weights, cfg_path = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    for path in (cfg_path, weights):
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a complete model directory: {path.name} is missing")
    try:
        config = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_path} is not valid YAML ({err}); restore it or rewrite it from the run's config") from err
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path} must hold a mapping of config sections, got {type(config).__name__}")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{weights} is not a readable safetensors file (truncated or corrupt?): {err}; re-export the model"
        ) from err
    return state, config


def read_model_metadata(directory: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in ``model.safetensors`` (format tag, provenance of converted weights)."""
    from safetensors import safe_open

    with safe_open(str(Path(directory) / WEIGHTS_FILE), framework="pt") as fh:
        return dict(fh.metadata() or {})


def load_tokenizer(directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Build the tokenizer a model directory describes and load its weights (strict), in eval mode."""
    state, config = load_model_dir(directory, device="cpu")
    model = build_tokenizer(config)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensor shapes differ: config.yaml and model.safetensors disagree
        shapes = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        first = shapes[0].removeprefix("size mismatch for ") if shapes else _last_line(err)
        raise ValueError(
            f"{directory}: config.yaml does not match model.safetensors ({len(shapes) or 'some'} tensor(s) differ in "
            f"shape, e.g. {first}); was config.yaml edited or replaced? Restore the config the weights were trained with"
        ) from None
    if missing or unexpected:
        raise ValueError(
            f"{directory}: weights do not match the model its config.yaml describes "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}); was config.yaml edited?"
        )
    return model.to(device).eval()


# ----- reading official Lightning checkpoints -------------------------------------------------------------
class _InertObject:
    """Stand-in for a class that a checkpoint names outside torch's weights-only allowlist.

    Created instead of the real object: records its arguments and state, runs no foreign code.
    """

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        self._args = args
        self._kwargs = kwargs

    def __setstate__(self, state) -> None:
        self._state = state

    def __setitem__(self, key, value) -> None:  # dict-like classes are filled item by item
        self.__dict__.setdefault("_items", {})[key] = value

    def append(self, value) -> None:  # list-like classes
        self.__dict__.setdefault("_items_list", []).append(value)

    def extend(self, values) -> None:
        self.__dict__.setdefault("_items_list", []).extend(values)


def _last_line(err: BaseException) -> str:
    """The informative line of torch's long weights-only error messages."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.startswith("Check the documentation")]
    return lines[-1] if lines else type(err).__name__


def _torch_load_restricted(path: Path):
    """``torch.load(weights_only=True)``; when the file names classes outside the allowlist (Lightning
    checkpoints pickle hyper-parameter objects), retry with each such class replaced by an inert stub.

    Full (unrestricted) unpickling is never used: no class or function named by the file is ever imported
    or called, so a malicious checkpoint cannot run code.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_error = err
    from torch import serialization

    if not hasattr(serialization, "get_unsafe_globals_in_checkpoint"):
        raise ValueError(
            f"{path} holds non-tensor objects that torch.load(weights_only=True) refuses ({_last_line(first_error)}); this torch "
            "version cannot list them for a restricted load. Re-save only the weights on a trusted machine: "
            "torch.save({'state_dict': torch.load(path, weights_only=False)['state_dict']}, 'weights.ckpt')"
        ) from first_error
    try:
        names = serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # not a zip checkpoint (legacy format) or unreadable
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): torch.load(weights_only=True) "
            f"failed ({_last_line(first_error)}) and its objects could not be listed ({err})"
        ) from err
    log.warning(
        "%s names %d object type(s) outside torch's weights-only allowlist (%s); loading them as inert stubs "
        "(only the tensors are used)",
        path,
        len(names),
        ", ".join(names[:6]) + (" ..." if len(names) > 6 else ""),
    )
    stubs = [(type(name.rsplit(".", 1)[-1], (_InertObject,), {}), name) for name in names]
    try:
        with serialization.safe_globals(stubs):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} could not be read even with stubs for its non-tensor objects ({_last_line(err)}); re-save the "
            "state_dict alone on a trusted machine"
        ) from err


def read_official_state_dict(ckpt_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of an official Lightning ``.ckpt`` (a flat tensor dict is also accepted)."""
    path = Path(ckpt_path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the official checkpoint file (.ckpt)")
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint {path} not found")
    try:
        obj = _torch_load_restricted(path)
    except (RuntimeError, EOFError, OSError, IndexError, pickle.UnpicklingError) as err:  # IndexError: a text file
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated, corrupt or another kind of file?): "
                         f"{_last_line(err)}") from err
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path} holds no state_dict (got {type(obj).__name__}); is it a SimVQ training checkpoint?")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path}: the state_dict holds no tensors")
    return tensors


def convert_official(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, *, use_ema: bool = True, overwrite: bool = False) -> Path:
    """Convert an official SimVQ Lightning ``.ckpt`` into a model directory; returns ``out_dir``.

    Takes ``state_dict``, picks the EMA weights (``use_ema=True``, what the official evaluation uses) or the
    raw ones, drops ``loss.*`` (discriminator, LPIPS), infers codebook size and widths from tensor shapes, and
    writes ``config.yaml`` + ``model.safetensors``. ``out_dir`` must not already hold a model unless
    ``overwrite``.
    """
    ckpt_path = Path(ckpt_path)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder; choose a folder for the model")
    try:  # the cheap checks first: a folder holding files needs --force, and never holds the checkpoint
        check_output(out_dir, inputs=[ckpt_path], force=overwrite, kind="dir", option="OUT_DIR")
    except FileExistsError:
        raise FileExistsError(f"{out_dir} already holds a model or other files; choose another output directory, or pass "
                              "--force to replace an earlier `simvq convert` output") from None
    state_dict = read_official_state_dict(ckpt_path)  # everything is read and converted before anything is written
    modality = official_modality(state_dict)
    weights, sections = modality.convert_official(state_dict, use_ema)
    config = resolve_config({**sections, "modality": modality.name})  # the model dir stores a full config
    meta = {"source": "official", "source_file": ckpt_path.name, "weights": "ema" if use_ema else "raw", "modality": modality.name}
    # a new or empty folder, or this command's earlier output (replaced only with overwrite): never the
    # checkpoint's own folder or one somebody else made
    prepare_output_dir(out_dir, "convert", inputs=[ckpt_path], force=overwrite, option="OUT_DIR")
    return save_model_dir(out_dir, weights, config, metadata=meta, overwrite=True)


__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "convert_official",
    "load_model_dir",
    "load_tokenizer",
    "read_model_metadata",
    "read_official_state_dict",
    "save_model_dir",
]
