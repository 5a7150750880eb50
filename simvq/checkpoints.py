"""Model directories (``config.yaml`` + ``model.safetensors``), atomic writes, official-checkpoint conversion.

A *model directory* holds the full run config (``config.yaml``) and the tokenizer weights
(``model.safetensors``, EMA weights when training kept an EMA). Every file is written atomically: to a
temporary file in the same folder, flushed to disk, then moved over the target with ``os.replace``, so a
crash leaves either the old file or the new one, never half a file. Loading never unpickles arbitrary
objects: weights come from safetensors, official ``.ckpt`` files through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
import yaml
from torch import nn

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
FORMAT_TAG = "simvq-model-dir-v1"


# ----- atomic writes ------------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    """Persist a rename (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    Use for writers that want a file name (``torch.save``, ``safetensors.save_file``)::

        with atomic_path("out/last.ckpt") as tmp:
            torch.save(obj, tmp)

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # the data must be on disk before the rename makes it visible
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def save_file_atomic(path: str | os.PathLike, data: bytes | str | Callable[[Path], None]) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    ``data`` is bytes, text (UTF-8), or a callable that writes the file at the temporary path it is given.
    """
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        elif isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        elif callable(data):
            data(tmp)
        else:
            raise TypeError(f"data must be bytes, str or a callable(path), got {type(data).__name__}")
    return Path(path)


def local_weights_file(weights: str | os.PathLike | None, env_var: str, what: str) -> Path | None:
    """A network-weights file from the argument, else from ``env_var``; None when neither is set.

    Nothing is downloaded. A path that is given but missing is an error naming where it came from, so a
    typo cannot silently switch a metric or loss to its offline stand-in.
    """
    source = "argument"
    if weights is None:
        weights = os.environ.get(env_var) or None
        source = f"environment variable {env_var}"
    if weights is None:
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at {path} (from the {source})")
    return path


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
    from simvq.models import build_tokenizer

    state, config = load_model_dir(directory, device="cpu")
    model = build_tokenizer(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
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
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint {path} not found")
    try:
        obj = _torch_load_restricted(path)
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {err}") from err
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path} holds no state_dict (got {type(obj).__name__}); is it a SimVQ training checkpoint?")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path}: the state_dict holds no tensors")
    return tensors


def _detect_official_modality(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"image"`` or ``"audio"`` from the key layout of an official state dict.

    Image: the Open-MAGVIT2 CNN (``encoder.conv_in.weight`` is a 4-D conv, ``encoder.down.*``). Audio: a
    1-D encoder (SEANet ``encoder.model.*``) or a Vocos decoder (``decoder.backbone.*``).
    """
    conv_in = state_dict.get("encoder.conv_in.weight")
    if conv_in is not None and conv_in.dim() == 4 and any(k.startswith("encoder.down.") for k in state_dict):
        return "image"
    if any(k.startswith(("encoder.model.", "decoder.backbone.", "backbone.")) for k in state_dict):
        return "audio"
    sample = sorted(state_dict)[:6]
    raise ValueError(f"cannot tell which official model this checkpoint holds (first keys: {sample}); expected SimVQ image or audio weights")


def select_official_weights(state_dict: Mapping[str, torch.Tensor], *, use_ema: bool = True, prefixes=("encoder.", "decoder.", "quantize.")) -> dict[str, torch.Tensor]:
    """Tokenizer tensors (keys under ``prefixes``) from an official state dict, raw or EMA.

    The official EMA (taming's ``LitEma``) stores a copy of every trainable parameter as
    ``model_ema.<name with the dots removed>``. Those names are mapped back by matching them against the
    dot-free raw names; tensors without an EMA copy (the frozen codebook ``C``, buffers) keep their raw values.
    ``loss.*`` (discriminator, LPIPS) and everything outside ``prefixes`` is dropped.
    """
    raw = {k: v for k, v in state_dict.items() if k.startswith(tuple(prefixes))}
    if not raw:
        raise ValueError(f"the checkpoint has no keys under {list(prefixes)}; not a SimVQ tokenizer checkpoint")
    if not use_ema:
        return dict(raw)
    ema = {k[len("model_ema."):]: v for k, v in state_dict.items() if k.startswith("model_ema.")}
    ema.pop("decay", None)
    ema.pop("num_updates", None)
    if not ema:
        raise ValueError(
            "the checkpoint holds no EMA weights (no model_ema.* keys); convert the raw weights instead "
            "(use_ema=False, or --no-ema on the command line)"
        )
    by_flat: dict[str, str] = {}
    for key in raw:
        flat = key.replace(".", "")
        if flat in by_flat:
            raise ValueError(f"raw names {by_flat[flat]!r} and {key!r} collide once dots are removed; EMA names are ambiguous")
        by_flat[flat] = key
    out = dict(raw)
    replaced = 0
    for flat, value in ema.items():
        key = by_flat.get(flat)
        if key is None:
            continue  # EMA copy of a loss.* parameter (discriminator) or of something we drop
        if tuple(value.shape) != tuple(raw[key].shape):
            raise ValueError(f"EMA tensor model_ema.{flat} has shape {tuple(value.shape)} but {key} has {tuple(raw[key].shape)}")
        out[key] = value
        replaced += 1
    if replaced == 0:
        raise ValueError("none of the model_ema.* tensors matches an encoder/decoder/quantizer parameter")
    return out


def infer_official_image_config(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Model and quantizer sections inferred from tensor shapes; unlisted settings from ``official-128``.

    ``quantize.embedding.weight`` is ``(K, d)``; widths from ``encoder.conv_in`` and each level's first
    ResBlock; depth from the ``encoder.down.{i}`` / ``block.{j}`` indices.
    """
    from simvq.models.image import IMAGE_PRESETS

    def need(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise ValueError(f"official image checkpoint lacks {key!r}; it does not have the official layout")
        return state_dict[key]

    codebook = need("quantize.embedding.weight")
    if codebook.dim() != 2:
        raise ValueError(f"quantize.embedding.weight should be (K, d), got shape {tuple(codebook.shape)}")
    k, d = codebook.shape
    conv_in = need("encoder.conv_in.weight")
    ch, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    levels = sorted({int(key.split(".")[2]) for key in state_dict if key.startswith("encoder.down.")})
    if levels != list(range(len(levels))):
        raise ValueError(f"encoder.down levels are not contiguous: {levels}")
    blocks = sorted({int(key.split(".")[4]) for key in state_dict if key.startswith("encoder.down.0.block.")})
    ch_mult = []
    for level in levels:
        width = int(need(f"encoder.down.{level}.block.0.conv1.weight").shape[0])
        if width % ch:
            raise ValueError(f"level {level} width {width} is not a multiple of ch={ch}")
        ch_mult.append(width // ch)
    z = int(need("encoder.conv_out.weight").shape[0])
    if z != d:
        raise ValueError(f"encoder.conv_out gives {z} channels but the codebook has dimension {d}")
    preset = IMAGE_PRESETS["official-128"]
    model = {
        "in_channels": in_channels,
        "out_channels": int(need("decoder.conv_out.weight").shape[0]),
        "ch": ch,
        "ch_mult": ch_mult,
        "num_res_blocks": len(blocks),
        "z_channels": z,
        "norm_groups": preset.get("norm_groups", 32),
    }
    if "quantize.embedding_proj.weight" in state_dict:
        quantizer = {"name": "simvq", "codebook_size": int(k)}
    else:  # a plain VQ baseline trained with the same code base
        quantizer = {"name": "vq", "codebook_size": int(k)}
    return {"modality": "image", "model": model, "quantizer": quantizer}


def _convert_official_image(state_dict: Mapping[str, torch.Tensor], use_ema: bool) -> tuple[dict, dict]:
    from simvq.models import build_tokenizer

    weights = select_official_weights(state_dict, use_ema=use_ema)
    config = infer_official_image_config(weights)
    try:
        from simvq.config import resolve_config

        config = resolve_config(config)  # fill every section's defaults: the model dir stores a full config
    except ImportError:
        pass
    model = build_tokenizer(config)
    own = model.state_dict()
    # our model has counters (quantize.usage.*) that the official one lacks: they keep their fresh values
    missing = [k for k in own if k not in weights and ".usage." not in k]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"official weights do not map onto the image tokenizer: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, value in weights.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"{key}: official shape {tuple(value.shape)} != expected {tuple(own[key].shape)}")
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in weights.items()}})
    return model.state_dict(), config


def _official_converter(modality: str) -> Callable[[Mapping[str, torch.Tensor], bool], tuple[dict, dict]]:
    """The converter for ``modality``: ``(state_dict, use_ema) -> (tokenizer state dict, full config)``."""
    if modality == "image":
        return _convert_official_image
    if modality == "audio":
        # written by the audio stack; imported only when an audio checkpoint shows up
        from simvq.models.audio import convert_official_state_dict

        return convert_official_state_dict
    raise ValueError(f"no converter for official {modality!r} checkpoints")


def convert_official(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, *, use_ema: bool = True, overwrite: bool = False) -> Path:
    """Convert an official SimVQ Lightning ``.ckpt`` into a model directory; returns ``out_dir``.

    Takes ``state_dict``, picks the EMA weights (``use_ema=True``, what the official evaluation uses) or the
    raw ones, drops ``loss.*`` (discriminator, LPIPS), infers codebook size and widths from tensor shapes, and
    writes ``config.yaml`` + ``model.safetensors``. ``out_dir`` must not already hold a model unless
    ``overwrite``.
    """
    ckpt_path = Path(ckpt_path)
    out_dir = Path(out_dir)
    if not overwrite and ((out_dir / WEIGHTS_FILE).exists() or (out_dir / CONFIG_FILE).exists()):
        raise FileExistsError(f"{out_dir} already holds a model; choose another output directory or pass overwrite=True (--force)")
    state_dict = read_official_state_dict(ckpt_path)
    modality = _detect_official_modality(state_dict)
    weights, config = _official_converter(modality)(state_dict, use_ema)
    meta = {"source": "official", "source_file": ckpt_path.name, "weights": "ema" if use_ema else "raw", "modality": modality}
    return save_model_dir(out_dir, weights, config, metadata=meta, overwrite=overwrite)


__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "atomic_path",
    "convert_official",
    "infer_official_image_config",
    "load_model_dir",
    "load_tokenizer",
    "read_model_metadata",
    "read_official_state_dict",
    "save_file_atomic",
    "save_model_dir",
    "select_official_weights",
]
