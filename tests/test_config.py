"""Config loading, presets, overrides and validation (simvq.config)."""

import pytest
import yaml

from simvq.config import (
    apply_overrides,
    find_config,
    list_presets,
    load_config,
    parse_override,
    resolve_config,
    save_config,
)
from simvq.tokens import config_hash


def test_defaults_are_the_official_optimiser_and_every_section_is_filled():
    cfg = load_config({"quantizer": {"name": "simvq", "codebook_size": 1024}})
    assert set(cfg) == {"modality", "seed", "model", "quantizer", "loss", "data", "optim", "trainer"}
    assert cfg["optim"]["lr"] == 1e-4 and cfg["optim"]["betas"] == [0.5, 0.9]
    assert cfg["optim"]["weight_decay"] == 0.0 and cfg["optim"]["ema_decay"] == 0.999
    assert cfg["loss"]["gan_weight"] == 0.1 and cfg["loss"]["disc_loss"] == "hinge"
    # the model section is expanded to every keyword (official 128x128 widths by default)
    assert cfg["model"] == {
        "in_channels": 3, "out_channels": 3, "ch": 128, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 2,
        "z_channels": 128, "norm_groups": 32,
    }


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ValueError) as err:
        resolve_config({"optim": {"learning_rate": 1e-3}})
    msg = str(err.value)
    assert "optim.learning_rate" in msg
    for key in ("lr", "betas", "weight_decay", "warmup_steps", "grad_clip", "ema_decay"):
        assert key in msg

    with pytest.raises(ValueError, match="valid keys: modality, seed, model, quantizer"):
        resolve_config({"optimizer": {}})


def test_unknown_quantizer_keyword_and_name():
    with pytest.raises(ValueError) as err:
        resolve_config({"quantizer": {"name": "simvq", "codebook_size": 8, "beta": 0.25}})
    assert "quantizer.beta" in str(err.value) and "commitment_weight" in str(err.value)
    with pytest.raises(ValueError, match="valid names"):
        resolve_config({"quantizer": {"name": "vqq"}})
    with pytest.raises(ValueError, match="filled from the model"):
        resolve_config({"quantizer": {"name": "simvq", "codebook_size": 8, "dim": 4}})


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"optim": {"lr": "fast"}}, "optim.lr must be a number"),
        ({"trainer": {"log_every": 2.5}}, "trainer.log_every must be an integer"),
        ({"optim": {"betas": [0.5]}}, "optim.betas"),
        ({"trainer": {"precision": "8-bit"}}, "trainer.precision"),
        ({"optim": {"ema_decay": 1.5}}, "optim.ema_decay"),
        ({"optim": {"quantizer_lr": 0}}, "optim.quantizer_lr must be > 0"),
        ({"data": {"dataset": "cifar"}}, "data.dataset"),
        ({"data": {"channels": 1}}, "model.in_channels"),
        ({"data": {"image_size": 36}}, "divisible"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_values_are_named(raw, needle):
    with pytest.raises((ValueError, TypeError), match=needle.replace(".", r"\.")):
        resolve_config(raw)


def test_overrides_parse_yaml_values():
    assert parse_override("optim.lr=2e-4") == (["optim", "lr"], 2e-4)
    assert parse_override("trainer.devices=[0, 1]") == (["trainer", "devices"], [0, 1])
    assert parse_override("optim.grad_clip=null") == (["optim", "grad_clip"], None)
    assert parse_override("trainer.precision=bf16-mixed") == (["trainer", "precision"], "bf16-mixed")
    with pytest.raises(ValueError, match="key.sub=value"):
        parse_override("optim.lr")
    cfg = load_config("image/digits-tiny", ["optim.lr=3e-3", "quantizer.codebook_size=32", "trainer.max_steps=7"])
    assert cfg["optim"]["lr"] == pytest.approx(3e-3)
    assert cfg["quantizer"]["codebook_size"] == 32 and cfg["trainer"]["max_steps"] == 7
    # an override of an unknown key is caught by validation
    with pytest.raises(ValueError, match="optim.lrr"):
        load_config("image/digits-tiny", ["optim.lrr=1"])
    with pytest.raises(ValueError, match="not a section"):
        apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr.x=1"])


def test_presets_by_name_and_path(tmp_path):
    names = list_presets()
    for required in ("image/official-128", "image/photos-small", "image/fashion-small", "image/digits-tiny"):
        assert required in names
        load_config(required)  # every shipped preset validates
    assert find_config("image/photos-small") == find_config("image/photos-small.yaml")
    # a path in a checkout's configs/ folder resolves too, from any working directory
    assert find_config("configs/image/photos-small.yaml").name == "photos-small.yaml"
    official = load_config("image/official-128")
    assert official["trainer"]["precision"] == "16-mixed" and official["trainer"]["max_epochs"] == 50
    assert official["data"]["batch_size"] * official["trainer"]["devices"] == 256
    with pytest.raises(FileNotFoundError, match="image/photos-small"):
        find_config("image/nope")
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"quantizer": {"name": "vq", "codebook_size": 16}, "optim": {"lr": "1e-3"}}))
    cfg = load_config(str(path))
    assert cfg["quantizer"]["name"] == "vq" and cfg["optim"]["lr"] == 1e-3


def test_saved_config_round_trips_and_hash_tracks_the_model(tmp_path):
    cfg = load_config("image/photos-small")
    save_config(cfg, tmp_path / "c.yaml")
    assert resolve_config(yaml.safe_load((tmp_path / "c.yaml").read_text())) == cfg
    other = load_config("image/photos-small", ["trainer.max_steps=5", "optim.lr=1e-2"])
    assert config_hash(other) == config_hash(cfg)  # training settings do not change what tokens mean
    assert config_hash(load_config("image/photos-small", ["quantizer.codebook_size=1024"])) != config_hash(cfg)


def test_an_empty_config_file_is_named_as_empty(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.yaml is empty"):
        load_config(empty)
    commented = tmp_path / "commented.yaml"
    commented.write_text("# only a comment\nbase: image/digits-tiny\n")
    assert load_config(commented)["modality"] == "image"
