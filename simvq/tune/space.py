"""Search spaces: a YAML mapping of config keys to distributions, checked before any trial runs.

A space file maps a dotted config key to one distribution::

    optim.lr: {type: float, low: 3.0e-4, high: 1.0e-2, log: true}
    quantizer.transform: {type: categorical, choices: [linear, mlp]}
    quantizer.hidden_dim: {type: categorical, choices: [null, 64, 256], when: {quantizer.transform: mlp}}
    model.num_res_blocks: {type: int, low: 1, high: 3}

``when`` makes an entry conditional (Optuna's define-by-run): it is sampled only in trials where each named
key has the given value (or one of a list of values): the value sampled earlier in the same trial, else the
base config's own; a key that neither sets never matches.

The defaults per quantizer family ship in ``simvq/configs/tune/spaces/<quantizer>.yaml``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from simvq.config import set_dotted

SPACE_DIR = Path(__file__).resolve().parent.parent / "configs" / "tune" / "spaces"
TYPES = ("float", "int", "categorical")


@dataclass(frozen=True)
class Param:
    """One searched config key: ``kind`` float/int (``low``, ``high``, ``log``) or categorical (``choices``)."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()
    when: tuple = ()                # ((config key, (accepted values, ...)), ...): sampled only when all hold

    @property
    def labels(self) -> tuple:
        """Categorical choices as Optuna stores them: lists and mappings become their YAML text."""
        return tuple(_label(c) for c in self.choices)

    def value_of(self, sampled):
        """The config value of a sampled Optuna value (a label maps back to its list or mapping)."""
        if self.kind != "categorical":
            return sampled
        return copy.deepcopy(self.choices[self.labels.index(sampled)])

    def active(self, values: dict) -> bool:
        """Whether this entry is sampled, given ``values`` (dotted key -> the trial's value so far / the base's)."""
        return all(key in values and values[key] in accepted for key, accepted in self.when)

    def suggest(self, trial):
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return self.value_of(trial.suggest_categorical(self.key, self.labels))

    def examples(self) -> list:
        """Values that exercise the range: both ends, or every choice (for validation before the study)."""
        if self.kind == "categorical":
            return [copy.deepcopy(c) for c in self.choices]
        cast = int if self.kind == "int" else float
        return [cast(self.low), cast(self.high)]


def _label(choice):
    if choice is None or isinstance(choice, (bool, int, float, str)):
        return choice
    return yaml.safe_dump(choice, default_flow_style=True).strip()


def default_space_file(quantizer: str) -> Path:
    """The shipped space of a quantizer family (FileNotFoundError naming the families that have one)."""
    path = SPACE_DIR / f"{quantizer}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SPACE_DIR.glob("*.yaml")))
        raise FileNotFoundError(
            f"no default search space for quantizer {quantizer!r} (shipped: {known}); pass --space YOUR.yaml"
        )
    return path


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # YAML 1.1 reads 1e-3 as a string
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{where} must be finite, got {value!r}")
    return value


def parse_space(raw, *, source: str = "search space") -> list[Param]:
    """``{key: {type: ..., ...}}`` -> a list of :class:`Param`; ValueError naming the entry for any mistake."""
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{source}: expected a non-empty mapping of config keys to distributions, got {raw!r}")
    params = []
    for key, spec in raw.items():
        where = f"{source}: {key}"
        if not isinstance(key, str) or "." not in key or any(not part for part in key.split(".")):
            raise ValueError(f"{source}: key {key!r} must be a dotted config key such as optim.lr")
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: expected a mapping like {{type: float, low: 1e-4, high: 1e-2, log: true}}, got {spec!r}")
        kind = spec.get("type")
        if kind not in TYPES:
            raise ValueError(f"{where}: type must be one of {', '.join(TYPES)}, got {kind!r}")
        allowed = {"type", "choices", "when"} if kind == "categorical" else {"type", "low", "high", "log", "when"}
        extra = sorted(set(spec) - allowed)
        if extra:
            raise ValueError(f"{where}: unknown field(s) {', '.join(map(repr, extra))} for type {kind}; allowed: {', '.join(sorted(allowed))}")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ValueError(f"{where}: choices must be a non-empty list, got {choices!r}")
            labels = [_label(c) for c in choices]
            if len(set(map(repr, labels))) != len(labels):
                raise ValueError(f"{where}: choices repeat a value: {choices!r}")
            params.append(Param(key, kind, choices=tuple(choices), when=_when(spec.get("when"), where, params)))
            continue
        for field in ("low", "high"):
            if field not in spec:
                raise ValueError(f"{where}: {kind} needs {field}")
        low, high = _number(spec["low"], f"{where}.low"), _number(spec["high"], f"{where}.high")
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise ValueError(f"{where}: log must be true or false, got {log!r}")
        if kind == "int" and (low != int(low) or high != int(high)):
            raise ValueError(f"{where}: int bounds must be integers, got low={low!r}, high={high!r}")
        if low >= high:
            raise ValueError(f"{where}: empty range: low ({low:g}) must be below high ({high:g})")
        if log and low <= 0:
            raise ValueError(f"{where}: a log range needs low > 0, got {low:g}")
        params.append(Param(key, kind, low=low, high=high, log=log, when=_when(spec.get("when"), where, params)))
    return params


def _when(raw, where: str, earlier: list[Param]) -> tuple:
    """``{key: value or [values]}`` -> ``((key, (values, ...)), ...)``; a key searched in this space must come
    earlier in the file (it is sampled first) and the values must be among its choices."""
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{where}: when must be a mapping of config keys to values, e.g. {{quantizer.transform: mlp}}, "
                         f"got {raw!r}")
    by_key = {p.key: p for p in earlier}
    out = []
    for key, value in raw.items():
        if not isinstance(key, str) or "." not in key:
            raise ValueError(f"{where}: when key {key!r} must be a dotted config key such as quantizer.transform")
        accepted = tuple(value) if isinstance(value, list) else (value,)
        if not accepted:
            raise ValueError(f"{where}: when {key} lists no value")
        source = by_key.get(key)
        if source is not None and source.kind == "categorical":
            missing = [v for v in accepted if v not in source.choices]
            if missing:
                raise ValueError(f"{where}: when {key} = {missing[0]!r} is not among {key}'s choices {list(source.choices)}")
        out.append((key, accepted))
    return tuple(out)



def load_space(path: str | Path) -> list[Param]:
    """Read and check a search-space YAML file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"search space {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"search space {path} is not valid YAML: {' '.join(str(err).split())}") from None
    return parse_space(raw, source=str(path))


def set_key(raw: dict, dotted: str, value) -> None:
    """``raw["a"]["b"] = value`` for ``"a.b"`` (sections created as needed; the value is copied)."""
    set_dotted(raw, dotted.split("."), copy.deepcopy(value), dotted)


__all__ = ["SPACE_DIR", "Param", "default_space_file", "load_space", "parse_space", "set_key"]
