"""The shape of the code: one route per modality, imports one way, no cycles (checks that keep it so)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simvq.config import load_config
from simvq.modalities import REGISTRY, Modality, get_modality, modality_names

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "simvq"

# `x == "audio"`, `"image" != y`, `modality in ("image", "audio")`: a branch on a modality's name
BRANCH = re.compile(
    r"""(==|!=)\s*["'](?:%(names)s)["']|["'](?:%(names)s)["']\s*(==|!=)|\bin\s*[(\[{]\s*["'](?:%(names)s)["']"""
    % {"names": "|".join(REGISTRY)}
)


def test_no_modality_branch_outside_the_modality_packages():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "modalities") in path.parents:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if BRANCH.search(line.split("#", 1)[0]):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "dispatch through simvq.modalities.get_modality instead:\n" + "\n".join(offenders)


def test_the_branch_pattern_finds_branches():
    # the check above must be able to fail
    assert BRANCH.search('if config["modality"] == "audio":')
    assert BRANCH.search("if 'image' != kind:")
    assert BRANCH.search('if m in ("image", "audio"):')
    assert not BRANCH.search('modality = config.get("modality", "image")')


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed (pip install import-linter)")
def test_import_contracts_hold():
    """The layers of .importlinter (cli > compare > ... > quantizers > usage/io), no cycles at any depth."""
    run = subprocess.run(["lint-imports", "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_unknown_modality_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown modality 'video'; valid modalities: image, audio"):
        get_modality("video")
    with pytest.raises(ValueError, match="valid modalities"):
        load_config({"modality": "video"})


TINY_PRESETS = {"image": "image/digits-tiny", "audio": "audio/speech-tiny"}


@pytest.mark.parametrize("name", modality_names())
def test_every_registered_modality_implements_the_interface(name):
    modality = get_modality(name)
    assert isinstance(modality, Modality) and modality.name == name
    assert set(modality.sections()) == {"model", "loss", "data"}
    assert name in TINY_PRESETS, f"add a tiny preset for the {name} modality to this test"
    cfg = load_config(TINY_PRESETS[name])
    assert cfg["modality"] == name
    model = modality.build_model(cfg)
    assert modality.code_dim(cfg) == model.quantize.dim
    rate = modality.rate(model, cfg)
    assert rate["bits_per_token"] == pytest.approx(torch.log2(torch.tensor(float(cfg["quantizer"]["codebook_size"]))).item())
    task = modality.task(cfg)
    assert task.modality is modality and task.config is cfg
    assert callable(modality.compare) and callable(modality.encode_files) and callable(modality.decode_files)


def test_residual_levels_count_in_the_bitrate():
    """One bitrate formula: a 2-level residual stack carries 2 x log2(K) bits per token position."""
    cfg = load_config("image/digits-tiny", ["quantizer.name=residual", "quantizer.num_quantizers=2", "quantizer.codebook_size=256"])
    modality = get_modality("image")
    model = modality.build_model(cfg)
    rate = modality.rate(model, cfg)
    side = cfg["data"]["image_size"] // model.downsample_factor
    assert rate["bits_per_token"] == 16.0 and rate["bits_per_image"] == 16.0 * side * side


def test_importing_simvq_does_not_load_the_audio_stack():
    code = "import simvq, sys; import simvq.config; print('simvq.modalities.audio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
