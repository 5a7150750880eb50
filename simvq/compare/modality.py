"""The comparison's modality: chosen from the base config or the ``--data`` value, never by name here.

Every modality-specific default, ``--data`` rule and report section lives in
``simvq.modalities.<name>.compare`` (reached through :func:`compare_module`).
"""

from __future__ import annotations

import os
from pathlib import Path

from simvq.compare.variants import DEFAULT_QUANTIZERS
from simvq.config import apply_overrides, load_raw_config
from simvq.modalities import get_modality, modality_names


def compare_module(name: str):
    """The ``simvq compare`` module of the modality ``name`` (defaults, ``--data`` handling, report sections)."""
    return get_modality(name).compare()


def _defaults(name: str) -> dict:
    d = dict(compare_module(name).DEFAULTS)
    if d["quantizers"] is None:
        d["quantizers"] = DEFAULT_QUANTIZERS
    return d


#: what an unset argument means, per modality of the base config
MODALITY_DEFAULTS: dict[str, dict] = {name: _defaults(name) for name in modality_names()}
#: the default image preset (a normal training config; its quantizer section is replaced per run)
DEFAULT_CONFIG = MODALITY_DEFAULTS["image"]["config"]
#: the audio compare preset (``audio/speech-small`` sized for a 2-core CPU)
DEFAULT_AUDIO_CONFIG = MODALITY_DEFAULTS["audio"]["config"]


def preset_defaults(modality: str, config) -> dict:
    """What an unset argument means: the modality's defaults, updated by the named compare preset's own
    (``PRESET_DEFAULTS`` of the modality's compare module, keyed by preset name, e.g. ``compare/scaling``)."""
    defaults = dict(MODALITY_DEFAULTS[modality])
    if isinstance(config, str):
        name = config[:-5] if config.endswith(".yaml") else config
        defaults.update(getattr(compare_module(modality), "PRESET_DEFAULTS", {}).get(name, {}))
    return defaults


def builtin_data() -> dict[str, str]:
    """Every built-in ``--data`` name -> its modality."""
    return {key: name for name in MODALITY_DEFAULTS for key in compare_module(name).BUILTIN_DATA}


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    """Whether a file under ``path`` (recursively, not hidden) ends with one of ``suffixes``."""
    for _, _, names in os.walk(path, followlinks=True):
        if any(n.lower().endswith(suffixes) and not n.startswith(".") for n in names):
            return True
    return False


def data_modality(data: str | None) -> str | None:
    """The modality of a ``--data`` value, ``"mixed"`` for a folder of several, None without ``--data``.

    Raises FileNotFoundError for a missing folder or a folder that holds no modality's files, and
    NotADirectoryError for a file.
    """
    if data is None:
        return None
    text = str(data)
    builtin = builtin_data()
    if text in builtin:
        return builtin[text]
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"--data {text!r} is not a built-in data set ({', '.join(builtin)}) and no such folder exists; give an "
            "existing folder of images or of wav/flac files, a folder of Fashion-MNIST IDX files, or a built-in name"
        )
    if not path.is_dir():
        raise NotADirectoryError(f"--data {text!r} is a file; give a folder of images (JPEG/PNG), of audio (wav/flac) "
                                 "or of IDX files")
    found = [name for name in MODALITY_DEFAULTS if compare_module(name).holds_files(path, _has_suffix)]
    if len(found) > 1:
        return "mixed"
    if found:
        return found[0]
    raise FileNotFoundError(
        f"--data {text!r} holds no audio (wav/flac) and no image (JPEG/PNG) files (searched recursively); "
        "give a folder with your recordings or images"
    )


def raw_config(source: str | dict, overrides: list) -> dict:
    """A config as written (a preset, a YAML path or a dict) with ``key=value`` overrides applied."""
    raw = load_raw_config(source)
    return apply_overrides(raw, list(overrides))


def _configs() -> str:
    return " or ".join(f"--config {d['config']} ({compare_module(n).NOUN})" for n, d in MODALITY_DEFAULTS.items())


def compare_modality(config: str | dict | None, data: str | None, overrides: list | None = None) -> str:
    """The comparison's modality: the config's ``modality``, or without a config the data's (default image).

    Raises ValueError when ``data`` is of another modality than the config (e.g. a folder of wav files with
    an image config), before anything trains.
    """
    kind = data_modality(data)
    if config is None:
        if any(str(o).split("=", 1)[0].strip() == "modality" for o in overrides or []):
            raise ValueError(f"--set modality=... cannot change the default preset's modality; pass {_configs()} "
                             "instead")
        if kind == "mixed":
            raise ValueError(f"--data {data!r} holds both audio (wav/flac) and image files; pass {_configs()} to "
                             "choose which of them to compare")
        return kind or "image"
    modality = raw_config(config, overrides or []).get("modality", "image")
    if modality not in MODALITY_DEFAULTS:
        raise ValueError(f"simvq compare supports {', '.join(MODALITY_DEFAULTS)} configs; the config's modality is "
                         f"{modality!r}")
    if kind is not None and kind != "mixed" and kind != modality:
        name = config if isinstance(config, str) else "the given config"
        raise ValueError(
            f"--data {data!r} is {kind} data but {name} is an {modality} config (modality: {modality}); "
            f"use an {kind} config, e.g. --config {MODALITY_DEFAULTS[kind]['config']}, or {modality} data"
        )
    return modality


__all__ = ["DEFAULT_AUDIO_CONFIG", "DEFAULT_CONFIG", "MODALITY_DEFAULTS", "builtin_data", "compare_modality",
           "compare_module", "data_modality", "preset_defaults", "raw_config"]
