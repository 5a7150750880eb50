"""Presets are written as differences: ``base:`` inheritance, and no preset restates a default."""

import pytest
import yaml

from simvq.config import PRESET_DIR, list_presets, load_config, load_raw_config, resolve_config


def _flat(section: dict, prefix: str = "") -> dict:
    return {f"{prefix}{k}": v for k, v in section.items()}


@pytest.mark.parametrize("name", [p for p in list_presets() if not p.startswith("prior/")])
def test_no_preset_restates_a_default(name):
    """A value a preset sets must differ from what the config would be without it (the default, or the
    base preset's value): each default is stated once, in the schema."""
    raw = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())
    base = raw.get("base")
    reference = load_config(base) if base else None
    restated = []
    for section in ("loss", "data", "optim", "trainer"):
        for key, value in (raw.get(section) or {}).items():
            if reference is None:
                stripped = {k: v for k, v in load_raw_config(name).items()}
                stripped[section] = {k: v for k, v in stripped[section].items() if k != key}
                try:
                    default = resolve_config(stripped)[section][key]
                except ValueError:
                    continue  # the key is needed for the rest of the preset to be valid
            else:
                default = reference[section][key]
            if load_config(name)[section][key] == default:
                restated.append(f"{section}.{key}")
    assert not restated, f"{name} restates the value it would get anyway: {restated}"


def test_base_presets_merge_section_by_section(tmp_path):
    parent = tmp_path / "parent.yaml"
    parent.write_text("base: image/digits-tiny\noptim: {lr: 3.0e-3}\ntrainer: {max_steps: 7}\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: parent.yaml\ntrainer: {log_every: 3}\ndata: {scales: [2.0]}\n")
    cfg = load_config(str(child))
    tiny = load_config("image/digits-tiny")
    assert cfg["optim"]["lr"] == 3.0e-3 and cfg["trainer"]["max_steps"] == 7 and cfg["trainer"]["log_every"] == 3
    assert cfg["data"]["scales"] == [2.0]  # lists replace, they do not merge
    assert cfg["model"] == tiny["model"] and cfg["quantizer"] == tiny["quantizer"]  # inherited two levels up


def test_a_base_cycle_is_a_clear_error(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="names itself through its own bases"):
        load_config(str(a))
    with pytest.raises(TypeError, match="base must be a preset name"):
        load_config({"base": 3})
