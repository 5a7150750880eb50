"""Run configuration: YAML presets, ``key.sub=value`` overrides, and validation against a schema.

A config is a nested dict with the top-level sections ``modality``, ``seed``, ``model``, ``quantizer``,
``loss``, ``data``, ``optim`` and ``trainer``. :func:`resolve_config` validates it and fills every default,
so the dict a model directory stores is complete and a run can be reproduced from it alone.

The schema is a set of dataclasses, one per section. ``optim`` and ``trainer`` are shared by every
modality; ``model``, ``loss`` and ``data`` come from the modality (:meth:`simvq.modalities.Modality.sections`),
which also expands presets and checks its cross-section values (``finalize_config``). The
``quantizer`` section is ``name`` plus the keyword arguments of that quantizer class (``dim`` is filled from
the model).

Presets live inside the package (``simvq/configs/<modality>/<name>.yaml``), so ``image/photos-small`` works
whether simvq is installed or run from a checkout; :func:`load_config` also accepts a path to any YAML file.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from simvq.modalities import get_modality
from simvq.modalities.base import check_positive
from simvq.quantizers import QUANTIZERS

class ConfigTypeError(TypeError, ValueError):
    """A config value of the wrong type: a user error (ValueError) that is also a TypeError."""


PRESET_DIR = Path(__file__).resolve().parent / "configs"
TOP_LEVEL_KEYS = ("modality", "seed", "model", "quantizer", "loss", "data", "optim", "trainer")
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")


# ----- shared sections --------------------------------------------------------------------------------
@dataclass
class OptimConfig:
    """Optimiser settings shared by every modality (the official recipe's values are the defaults).

    ``lr`` and ``betas`` drive Adam for the generator (encoder, quantizer, decoder); ``quantizer_lr`` the
    quantizer's own parameters (SimVQ's ``W, b``; ``None``: same as ``lr``); ``disc_lr`` the
    discriminator (``None``: same as ``lr``). The learning rate is constant after an optional linear
    warm-up of ``warmup_steps``. ``grad_clip`` clips the global gradient norm of each optimiser.
    ``ema_decay`` keeps an exponential moving average of all trainable weights (``None`` disables it);
    with ``ema_warmup`` the effective decay is ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, as in
    taming-transformers' LitEma, so short runs are not dominated by the random initialisation.
    """

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = 0.0
    quantizer_lr: Optional[float] = None
    disc_lr: Optional[float] = None
    warmup_steps: int = 0
    grad_clip: Optional[float] = None
    ema_decay: Optional[float] = 0.999
    ema_warmup: bool = True


@dataclass
class TrainerConfig:
    """How long and where to train, and what to log.

    A *step* is one batch: one generator update (and one discriminator update once the GAN is on).
    ``max_steps`` / ``max_epochs`` / ``max_minutes`` stop the run, whichever comes first (``max_epochs`` is
    converted to steps from the training-set size and the global batch). ``accelerator``, ``devices``,
    ``num_nodes``, ``strategy`` and ``precision`` go to the Lightning Trainer unchanged (``strategy: ddp``
    for several GPUs or nodes). ``checkpoint_every`` writes ``last.ckpt`` every so many steps (and always at
    the end); ``sample_every`` writes a reconstruction grid (0: only at the end); ``eval_every`` runs the
    evaluation set with EMA weights (0: never during training). ``loggers`` picks from ``csv`` and
    ``tensorboard``. ``num_threads`` sets ``torch.set_num_threads`` for CPU training (None: torch's
    default; 1 is often fastest on a CPU shared with other jobs).
    """

    max_steps: Optional[int] = None
    max_epochs: Optional[float] = None
    max_minutes: Optional[float] = None
    precision: Union[str, int] = "32-true"
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    log_every: int = 50
    checkpoint_every: int = 1000
    sample_every: int = 0
    eval_every: int = 0
    num_samples: int = 8
    loggers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])
    deterministic: bool = False
    num_threads: Optional[int] = None


# ----- validation -------------------------------------------------------------------------------------
def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(hint))
        return f"{origin.__name__}[{args}]"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _coerce(value, hint, where: str):
    """Check ``value`` against the annotation ``hint``; returns the value (ints accepted as floats)."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin is Union:
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except TypeError as err:
                errors.append(err)
        raise ConfigTypeError(f"{where} must be {_type_name(hint)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigTypeError(f"{where} must be {_type_name(hint)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigTypeError(f"{where} must be a list ({_type_name(hint)}), got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigTypeError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigTypeError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigTypeError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigTypeError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigTypeError(f"{where} must be a string, got {value!r}")
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigTypeError(f"{where} must be {_type_name(hint)}, got {value!r}")
    return value


def _validate_section(section: str, raw, schema) -> dict:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigTypeError(f"config section '{section}' must be a mapping, got {type(raw).__name__}: {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(repr(f'{section}.{k}') for k in unknown)}; "
            f"valid keys in '{section}': {', '.join(fields)}"
        )
    hints = typing.get_type_hints(schema)
    out = {}
    for name, f in fields.items():
        if name in raw:
            out[name] = _coerce(copy.deepcopy(raw[name]), hints[name], f"{section}.{name}")
        elif f.default is not dataclasses.MISSING:
            out[name] = copy.deepcopy(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[name] = f.default_factory()  # type: ignore[misc]
        else:
            raise ValueError(f"config key '{section}.{name}' is required")
    return out


def _quantizer_keys(name: str, raw: dict) -> set[str]:
    """The config keys the quantizer class called ``name`` accepts (ValueError for an unknown name).

    A class that takes ``**level_kwargs`` for the quantizer of each level (residual stacks) also accepts
    that level class's keys.
    """
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer.name {name!r}; valid names: {', '.join(QUANTIZERS)}")
    params = inspect.signature(QUANTIZERS[name].__init__).parameters
    keys = {k for k, p in params.items() if k != "self" and p.kind is not p.VAR_KEYWORD}
    if hasattr(QUANTIZERS[name], "build_kwargs"):
        keys.add("codebook_size")  # translated by the class (FSQ: codebook_size -> levels)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()) and "quantizer" in params:
        level = raw.get("quantizer", params["quantizer"].default)
        if isinstance(level, str) and level != name:
            keys |= _quantizer_keys(level, {})
    return keys


def _validate_quantizer(raw) -> dict:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigTypeError(f"config section 'quantizer' must be a mapping, got {raw!r}")
    raw = copy.deepcopy(raw)
    raw.setdefault("name", "simvq")
    name = raw["name"]
    if not isinstance(name, str):
        raise ConfigTypeError(f"quantizer.name must be a string, got {name!r}")
    params = _quantizer_keys(name, raw)
    unknown = sorted(set(raw) - params - {"name"})
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(repr('quantizer.' + k) for k in unknown)} for quantizer {name!r}; "
            f"valid keys: name, {', '.join(sorted(params - {'dim'}))}"
        )
    if "dim" in raw:
        raise ValueError("quantizer.dim is filled from the model (model.z_channels); remove it from the config")
    return raw


def _check_required_quantizer_keys(raw: dict) -> None:
    """A quantizer keyword without a default must be in the config (checked after every other section)."""
    name = raw.get("name")
    missing = sorted(_required_quantizer_keys(name) - set(raw) - {"dim"})
    if hasattr(QUANTIZERS.get(name), "build_kwargs") and "codebook_size" in raw:
        missing = []  # the class derives its other arguments from codebook_size (FSQ: levels)
    if missing:
        raise ValueError(
            f"quantizer {name!r} needs {', '.join(repr('quantizer.' + k) for k in missing)}; set it in the config "
            f"or as an override (e.g. quantizer.{missing[0]}=...)"
        )


def _required_quantizer_keys(name: str) -> set[str]:
    """Keyword arguments without a default of the quantizer class called ``name``."""
    cls = QUANTIZERS.get(name)
    if cls is None:
        return set()
    params = inspect.signature(cls.__init__).parameters
    return {k for k, p in params.items() if k != "self" and p.default is p.empty and p.kind is p.KEYWORD_ONLY}


def resolve_config(config: dict) -> dict:
    """Validate ``config`` and return a complete copy with every default filled in.

    Raises ValueError naming the offending key (and listing the valid ones) or TypeError for wrong types.
    """
    if not isinstance(config, dict):
        raise ConfigTypeError(f"a config must be a mapping of sections, got {type(config).__name__}")
    unknown = sorted(set(config) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ValueError(
            f"unknown top-level key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(TOP_LEVEL_KEYS)}"
        )
    modality = config.get("modality", "image")
    seed = config.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigTypeError(f"seed must be a non-negative integer, got {seed!r}")
    kind = get_modality(modality)
    schema = kind.sections()
    out = {
        "modality": modality,
        "seed": seed,
        "model": _validate_section("model", config.get("model"), schema["model"]),
        "quantizer": _validate_quantizer(config.get("quantizer")),
        "loss": _validate_section("loss", config.get("loss"), schema["loss"]),
        "data": _validate_section("data", config.get("data"), schema["data"]),
        "optim": _validate_section("optim", config.get("optim"), OptimConfig),
        "trainer": _validate_section("trainer", config.get("trainer"), TrainerConfig),
    }
    out = kind.finalize_config(out)
    _check_values(out)
    _check_required_quantizer_keys(out["quantizer"])
    return out


def _check_values(cfg: dict) -> None:
    o, t = cfg["optim"], cfg["trainer"]
    check_positive(cfg, "lr", "optim", allow_none=False)
    check_positive(cfg, "quantizer_lr", "optim")
    check_positive(cfg, "disc_lr", "optim")
    check_positive(cfg, "weight_decay", "optim", allow_none=False, allow_zero=True)
    check_positive(cfg, "warmup_steps", "optim", allow_none=False, allow_zero=True)
    check_positive(cfg, "grad_clip", "optim")
    if len(o["betas"]) != 2 or not all(0 <= b < 1 for b in o["betas"]):
        raise ValueError(f"optim.betas must be two numbers in [0, 1), got {o['betas']!r}")
    if o["ema_decay"] is not None and not 0 < o["ema_decay"] < 1:
        raise ValueError(f"optim.ema_decay must lie in (0, 1) or be null to disable EMA, got {o['ema_decay']!r}")
    for key in ("max_steps", "max_epochs", "max_minutes"):
        check_positive(cfg, key, "trainer")
    check_positive(cfg, "num_threads", "trainer")
    for key in ("log_every", "num_nodes"):
        check_positive(cfg, key, "trainer", allow_none=False)
    for key in ("checkpoint_every", "sample_every", "eval_every", "num_samples"):
        check_positive(cfg, key, "trainer", allow_none=False, allow_zero=True)
    if isinstance(t["precision"], int) and not isinstance(t["precision"], bool):
        t["precision"] = str(t["precision"])  # trainer.precision=32 on the command line is YAML's integer 32
    if t["precision"] not in PRECISIONS:
        raise ValueError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {t['precision']!r}")
    bad = sorted(set(t["loggers"]) - {"csv", "tensorboard"})
    if bad:
        raise ValueError(f"trainer.loggers may contain 'csv' and 'tensorboard', got {bad}")


# ----- loading, presets, overrides --------------------------------------------------------------------
def list_presets() -> list[str]:
    """Names of the shipped presets, e.g. ``image/photos-small``."""
    return sorted(str(p.relative_to(PRESET_DIR).with_suffix("")) for p in PRESET_DIR.glob("*/*.yaml"))


def find_config(name_or_path: str | Path) -> Path:
    """A YAML path for a preset name (``image/photos-small``) or a file path."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{str(name_or_path).removesuffix('.yaml')}.yaml"
    if preset.is_file():
        return preset
    # configs/image/x.yaml given relative to a checkout: fall back to the packaged copy
    parts = Path(str(name_or_path)).parts
    if len(parts) >= 2 and parts[-2] in {p.name for p in PRESET_DIR.iterdir() if p.is_dir()}:
        packaged = PRESET_DIR / parts[-2] / Path(parts[-1]).with_suffix(".yaml").name
        if packaged.is_file():
            return packaged
    raise FileNotFoundError(
        f"no config file or preset called {str(name_or_path)!r}; give a YAML path or one of: "
        f"{', '.join(list_presets())}"
    )


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line describing a YAML syntax error (PyYAML's own message spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def load_yaml(path: str | Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML ({yaml_problem(err)}); fix that line of the file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 text file; give a YAML config file") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder; give a YAML config file or a preset name") from None
    if data is None:
        if not Path(path).read_text(encoding="utf-8").strip():
            raise ValueError(f"{path} is empty; give a YAML config file (a preset with `base: image/photos-small` and "
                             "the keys that differ, for example)")
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=2e-4"`` -> (["optim", "lr"], 0.0002); the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.sub=value (e.g. optim.lr=2e-4)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r}: the key must be dotted names like trainer.max_steps")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ValueError(
            f"override {text!r}: the value is not valid YAML ({yaml_problem(err)}); quote it or fix it, e.g. optim.betas=[0.5,0.9]"
        ) from None
    # YAML reads 1e-4 as a string (it wants 1.0e-4); numbers are what people mean
    if isinstance(parsed, str):
        try:
            parsed = float(parsed) if any(c in parsed.lower() for c in ".e") and parsed.strip() else parsed
        except ValueError:
            pass
    return key.split("."), parsed


def set_dotted(config: dict, keys: list[str], value, what: str) -> None:
    """``config[k0][k1]... = value`` in place, sections created as needed; ``what`` names the setting in the
    error when a key on the way is a value, not a section."""
    node = config
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ValueError(f"{what}: {'.'.join(keys[: i + 1])} is not a section")
        node = nxt
    node[keys[-1]] = value


def apply_overrides(config: dict, overrides: list[str] | None) -> dict:
    """A copy of ``config`` with each ``key.sub=value`` applied (validation happens in resolve_config)."""
    out = copy.deepcopy(config)
    for text in overrides or []:
        keys, value = parse_override(text)
        set_dotted(out, keys, value, f"override {text!r}")
    return out


def _fix_yaml_floats(obj):
    # YAML 1.1 parses "1e-4" as a string; every such value in our schema is a number
    if isinstance(obj, dict):
        return {k: _fix_yaml_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fix_yaml_floats(v) for v in obj]
    if isinstance(obj, str):
        try:
            if any(c in obj.lower() for c in "e") and obj.strip()[0] in "+-.0123456789":
                return float(obj)
        except (ValueError, IndexError):
            return obj
    return obj


def config_source_file(source) -> Path | None:
    """The YAML file a config source names (None for a dict); a user file, not a shipped preset, is an input."""
    if isinstance(source, dict):
        return None
    path = find_config(source)
    return None if PRESET_DIR in path.resolve().parents else path


def _merge(base: dict, child: dict) -> dict:
    """``child`` over ``base``: sections merge key by key; any other value (lists included) replaces."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_raw_config(source: str | Path | dict, _chain: tuple[str, ...] = ()) -> dict:
    """The unvalidated config a preset name, YAML path or dict describes, its ``base:`` presets applied.

    A config may name another preset or YAML file as ``base:`` and state only its differences from it (a
    relative path is read from the naming file's folder first); bases may themselves have bases.
    """
    if isinstance(source, dict):
        raw, here = copy.deepcopy(source), None
    else:
        path = find_config(source)
        raw, here = load_yaml(path), path.resolve()
    base = raw.pop("base", None)
    if base is None:
        return _fix_yaml_floats(raw)
    if not isinstance(base, str):
        raise ConfigTypeError(f"base must be a preset name or a YAML path, got {base!r}")
    if here is not None and not Path(base).is_absolute() and (here.parent / base).is_file():
        base = str(here.parent / base)
    key = str(find_config(base).resolve())
    chain = (*_chain, str(here)) if here is not None else _chain
    if key in chain:
        raise ValueError(f"config base {base!r} names itself through its own bases: {' -> '.join(chain)} -> {key}")
    return _fix_yaml_floats(_merge(load_raw_config(base, chain), raw))


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> dict:
    """Load a preset name, a YAML path or a dict (with its ``base:`` presets), apply overrides, validate and
    fill defaults."""
    return resolve_config(apply_overrides(load_raw_config(source), overrides))


def save_config(config: dict, path: str | Path) -> None:
    """Write ``config`` as YAML atomically (:func:`simvq.io.save_file_atomic`)."""
    from simvq.io import save_file_atomic

    save_file_atomic(path, yaml.safe_dump(config, sort_keys=False))


def get(config: dict, dotted: str, default=None):
    """``get(cfg, "trainer.max_steps")`` -> the value, or ``default`` when a key is missing."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


__all__ = [
    "ConfigTypeError",
    "OptimConfig",
    "TrainerConfig",
    "apply_overrides",
    "find_config",
    "list_presets",
    "load_config",
    "load_raw_config",
    "parse_override",
    "resolve_config",
    "save_config",
    "set_dotted",
]

