"""Model directories, atomic writes, load errors, and conversion of official SimVQ checkpoints.

The official layout is written out here from the official code's structure (key names and shapes), and the
official forward pass is re-implemented functionally (F.conv2d over the official tensors, depth-to-space by
explicit slicing), so the conversion is checked against an independent reference, not against itself.
"""

import argparse
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from simvq.checkpoints import convert_official, load_model_dir, load_tokenizer, read_model_metadata, save_model_dir
from simvq.io import atomic_path, save_file_atomic
from simvq.modalities.image.convert import infer_official_image_config, select_official_weights
from simvq.cli import main as cli_main
from simvq.modalities import build_tokenizer
from simvq.modalities.image.model import IMAGE_PRESETS, ImageTokenizer
from simvq.quantizers import SimVQ

SMALL = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 16, "in_channels": 3, "out_channels": 3}


def official_layout(ch, ch_mult, num_res_blocks, z_channels, in_channels, out_channels, codebook_size):
    """{key: shape} of the official VQModel's encoder/decoder/quantize tensors."""
    keys = {}

    def res(prefix, cin, cout):
        keys.update({f"{prefix}.norm1.weight": (cin,), f"{prefix}.norm1.bias": (cin,)})
        keys[f"{prefix}.conv1.weight"] = (cout, cin, 3, 3)
        keys.update({f"{prefix}.norm2.weight": (cout,), f"{prefix}.norm2.bias": (cout,)})
        keys[f"{prefix}.conv2.weight"] = (cout, cout, 3, 3)
        if cin != cout:
            keys[f"{prefix}.nin_shortcut.weight"] = (cout, cin, 1, 1)

    keys["encoder.conv_in.weight"] = (ch, in_channels, 3, 3)
    w = ch
    for lvl, m in enumerate(ch_mult):
        for j in range(num_res_blocks):
            res(f"encoder.down.{lvl}.block.{j}", w, ch * m)
            w = ch * m
        if lvl < len(ch_mult) - 1:
            keys[f"encoder.down.{lvl}.downsample.weight"] = (w, w, 3, 3)
            keys[f"encoder.down.{lvl}.downsample.bias"] = (w,)
    for j in range(num_res_blocks):
        res(f"encoder.mid_block.{j}", w, w)
    keys.update({"encoder.norm_out.weight": (w,), "encoder.norm_out.bias": (w,)})
    keys.update({"encoder.conv_out.weight": (z_channels, w, 1, 1), "encoder.conv_out.bias": (z_channels,)})
    w = ch * ch_mult[-1]
    keys.update({"decoder.conv_in.weight": (w, z_channels, 3, 3), "decoder.conv_in.bias": (w,)})
    for j in range(num_res_blocks):
        res(f"decoder.mid_block.{j}", w, w)
    for lvl in reversed(range(len(ch_mult))):
        for j in range(num_res_blocks):
            res(f"decoder.up.{lvl}.block.{j}", w, ch * ch_mult[lvl])
            w = ch * ch_mult[lvl]
        if lvl > 0:
            keys[f"decoder.up.{lvl}.upsample.conv1.weight"] = (4 * w, w, 3, 3)
            keys[f"decoder.up.{lvl}.upsample.conv1.bias"] = (4 * w,)
    keys.update({"decoder.norm_out.weight": (w,), "decoder.norm_out.bias": (w,)})
    keys.update({"decoder.conv_out.weight": (out_channels, w, 3, 3), "decoder.conv_out.bias": (out_channels,)})
    keys["quantize.embedding.weight"] = (codebook_size, z_channels)
    keys["quantize.embedding_proj.weight"] = (z_channels, z_channels)
    keys["quantize.embedding_proj.bias"] = (z_channels,)
    return keys


def random_tensors(layout, gen):
    out = {}
    for key, shape in layout.items():
        if key.endswith("norm1.weight") or key.endswith("norm2.weight") or key.endswith("norm_out.weight"):
            out[key] = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            out[key] = torch.randn(shape, generator=gen) / fan_in**0.5
        else:
            out[key] = 0.1 * torch.randn(shape, generator=gen)
    return out


# ----- an independent functional forward of the official model -------------------------------------------
def _swish(x):
    return x * torch.sigmoid(x)


def _gn(x, p, pre):
    return F.group_norm(x, 32, p[f"{pre}.weight"], p[f"{pre}.bias"], eps=1e-6)


def _res(x, p, pre):
    h = F.conv2d(_swish(_gn(x, p, f"{pre}.norm1")), p[f"{pre}.conv1.weight"], padding=1)
    h = F.conv2d(_swish(_gn(h, p, f"{pre}.norm2")), p[f"{pre}.conv2.weight"], padding=1)
    skip = F.conv2d(x, p[f"{pre}.nin_shortcut.weight"]) if f"{pre}.nin_shortcut.weight" in p else x
    return skip + h


def _d2s_dcr(x):
    b, c4, h, w = x.shape
    c = c4 // 4
    out = torch.empty(b, c, 2 * h, 2 * w)
    for i in range(2):
        for j in range(2):
            out[:, :, i::2, j::2] = x[:, (2 * i + j) * c : (2 * i + j + 1) * c]
    return out


def official_forward(p, x, levels, nrb):
    h = F.conv2d(x, p["encoder.conv_in.weight"], padding=1)
    for lvl in range(levels):
        for j in range(nrb):
            h = _res(h, p, f"encoder.down.{lvl}.block.{j}")
        if lvl < levels - 1:
            h = F.conv2d(h, p[f"encoder.down.{lvl}.downsample.weight"], p[f"encoder.down.{lvl}.downsample.bias"], stride=2, padding=1)
    for j in range(nrb):
        h = _res(h, p, f"encoder.mid_block.{j}")
    z = F.conv2d(_swish(_gn(h, p, "encoder.norm_out")), p["encoder.conv_out.weight"], p["encoder.conv_out.bias"])
    codes = p["quantize.embedding.weight"] @ p["quantize.embedding_proj.weight"].T + p["quantize.embedding_proj.bias"]
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
    idx = torch.cdist(flat, codes.double()).argmin(dim=1)
    zq = codes[idx].reshape(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
    h = F.conv2d(zq, p["decoder.conv_in.weight"], p["decoder.conv_in.bias"], padding=1)
    for j in range(nrb):
        h = _res(h, p, f"decoder.mid_block.{j}")
    for lvl in reversed(range(levels)):
        for j in range(nrb):
            h = _res(h, p, f"decoder.up.{lvl}.block.{j}")
        if lvl > 0:
            up = f"decoder.up.{lvl}.upsample.conv1"
            h = _d2s_dcr(F.conv2d(h, p[f"{up}.weight"], p[f"{up}.bias"], padding=1))
    x_hat = F.conv2d(_swish(_gn(h, p, "decoder.norm_out")), p["decoder.conv_out.weight"], p["decoder.conv_out.bias"], padding=1)
    return idx.reshape(z.shape[0], z.shape[2], z.shape[3]), x_hat


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    """A small checkpoint in the official Lightning layout with raw + EMA weights, loss.* and hparams."""
    gen = torch.Generator().manual_seed(0)
    layout = official_layout(**SMALL, codebook_size=32)
    raw = random_tensors(layout, gen)
    ema = random_tensors(layout, gen)
    state = dict(raw)
    for key, value in ema.items():
        if key != "quantize.embedding.weight":  # frozen C: LitEma only copies trainable parameters
            state["model_ema." + key.replace(".", "")] = value
    state["model_ema.decay"] = torch.tensor(0.999)
    state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4, generator=gen)
    state["model_ema.lossdiscriminatormain0weight"] = torch.randn(64, 3, 4, 4, generator=gen)
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.rand(1, 64, 1, 1, generator=gen)
    path = tmp_path_factory.mktemp("official") / "simvq_small.ckpt"
    # Lightning also pickles hyper-parameters: an object torch's weights-only loader does not allow
    torch.save({"state_dict": state, "epoch": 49, "hyper_parameters": argparse.Namespace(learning_rate=1e-4)}, path)
    ema_full = {**ema, "quantize.embedding.weight": raw["quantize.embedding.weight"]}
    return path, raw, ema_full


def test_official_layout_matches_official_128_model():
    """Full-size key/shape check against the official layout, without running the 64M-parameter model."""
    layout = official_layout(**IMAGE_PRESETS["official-128"], codebook_size=65536)
    quantizer = SimVQ(dim=128, codebook_size=65536)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = ImageTokenizer(quantizer=quantizer, **IMAGE_PRESETS["official-128"])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if ".usage." not in k}
    assert ours == layout
    meta = {k: torch.empty(s, device="meta") for k, s in layout.items()}
    cfg = infer_official_image_config(meta)
    assert cfg["quantizer"] == {"name": "simvq", "codebook_size": 65536}
    assert {k: cfg["model"][k] for k in IMAGE_PRESETS["official-128"]} == IMAGE_PRESETS["official-128"]


@pytest.mark.parametrize("use_ema", [True, False])
def test_convert_official_outputs_equal_reference(official_ckpt, tmp_path, use_ema):
    path, raw, ema = official_ckpt
    out = convert_official(path, tmp_path / "model", use_ema=use_ema)
    model = load_tokenizer(out)
    meta = read_model_metadata(out)
    assert meta["weights"] == ("ema" if use_ema else "raw") and meta["source"] == "official"
    _, config = load_model_dir(out)
    assert config["modality"] == "image" and config["quantizer"]["codebook_size"] == 32
    assert {k: config["model"][k] for k in SMALL} == SMALL
    weights = ema if use_ema else raw
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ref_idx, ref_rec = official_forward(weights, x, levels=2, nrb=1)
        x_hat, q = model(x)
        # the same official tensors loaded straight into the model give the same outputs
        direct = build_tokenizer(config).eval()
        direct.load_state_dict(weights, strict=False)
        d_hat, dq = direct(x)
    assert torch.equal(q.indices, ref_idx)
    assert torch.equal(dq.indices, q.indices)
    assert torch.allclose(x_hat, ref_rec, atol=1e-5)
    assert torch.equal(d_hat, x_hat)
    # EMA and raw weights really differ, so the selection is tested
    other = raw if use_ema else ema
    assert not torch.allclose(model.encoder.conv_in.weight, other["encoder.conv_in.weight"])


def test_select_official_weights_drops_loss_and_maps_ema(official_ckpt):
    path, raw, ema = official_ckpt
    from simvq.checkpoints import read_official_state_dict

    sd = read_official_state_dict(path)
    picked = select_official_weights(sd, use_ema=True)
    assert set(picked) == set(raw)
    assert not any(k.startswith(("loss.", "model_ema.")) for k in picked)
    for key in raw:
        assert torch.equal(picked[key], ema[key]), key
    no_ema = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
    with pytest.raises(ValueError, match="use_ema=False"):
        select_official_weights(no_ema, use_ema=True)


def test_convert_cli_and_refuses_to_overwrite(official_ckpt, tmp_path, capsys):
    path, _, _ = official_ckpt
    out = tmp_path / "cli_model"
    assert cli_main(["convert", "--from", "official", str(path), str(out)]) == 0
    assert "ema weights" in capsys.readouterr().out
    before = (out / "model.safetensors").read_bytes()
    assert cli_main(["convert", "--from", "official", str(path), str(out), "--no-ema"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert cli_main(["convert", "--from", "official", str(path), str(out), "--no-ema", "--force"]) == 0
    assert read_model_metadata(out)["weights"] == "raw"
    assert cli_main(["convert", "--from", "official", str(tmp_path / "missing.ckpt"), str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err


def test_convert_refuses_other_files_and_folders_it_did_not_make(official_ckpt, tmp_path, capsys):
    path, _, _ = official_ckpt
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    for args, words in (([str(text), str(tmp_path / "x")], "not a readable PyTorch checkpoint"),
                        ([str(path), str(theirs)], "already holds a model or other files"),
                        ([str(path), str(theirs), "--force"], "was made by another program or a person"),
                        ([str(path), str(path.parent)], "already holds a model or other files"),
                        ([str(path), str(path.parent), "--force"], "holds the input")):
        assert cli_main(["convert", "--from", "official", *args]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and words in lines[0], lines
    assert not (tmp_path / "x").exists() and [p.name for p in theirs.iterdir()] == ["keep.txt"]
    assert not (path.parent / "model.safetensors").exists()


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "x": Evil()}, path)
    with pytest.raises(ValueError, match="could not be read"):
        convert_official(path, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_unrecognised_checkpoint_errors(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"foo.weight": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match="cannot tell"):
        convert_official(path, tmp_path / "out")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable"):
        convert_official(bad, tmp_path / "out")


# ----- model directories ------------------------------------------------------------------------------------
def _small_model():
    cfg = {"modality": "image", "model": {"preset": "small-grey-32"}, "quantizer": {"name": "simvq", "codebook_size": 16}}
    torch.manual_seed(0)
    return build_tokenizer(cfg), cfg


def test_model_dir_round_trip(tmp_path):
    model, cfg = _small_model()
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    model.eval()
    with torch.no_grad():
        ref, _ = model(x)
    save_model_dir(tmp_path / "m", model, {**cfg, "model": {**cfg["model"], "ch_mult": (1, 2, 2)}})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.yaml", "model.safetensors"]
    state, config = load_model_dir(tmp_path / "m")
    assert config["model"]["ch_mult"] == [1, 2, 2]  # tuples are stored as YAML lists
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
    loaded = load_tokenizer(tmp_path / "m")
    with torch.no_grad():
        out, _ = loaded(x)
    assert torch.equal(out, ref)
    # shared / non-contiguous tensors are saved as independent copies
    t = torch.arange(6.0).view(2, 3)
    save_model_dir(tmp_path / "s", {"a": t, "b": t.t(), "c": t[0]}, {"modality": "image"})
    st, _ = load_model_dir(tmp_path / "s")
    assert torch.equal(st["b"], t.t()) and torch.equal(st["c"], t[0])


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_dir(tmp_path / "nope")
    model, cfg = _small_model()
    d = save_model_dir(tmp_path / "m", model, cfg)
    (d / "config.yaml").rename(d / "config.bak")
    with pytest.raises(FileNotFoundError, match="config.yaml is missing"):
        load_model_dir(d)
    (d / "config.bak").rename(d / "config.yaml")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        load_model_dir(d)
    (d / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="corrupt"):
        load_model_dir(d)
    (d / "model.safetensors").write_bytes(data)
    (d / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_model_dir(d)
    (d / "config.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_model_dir(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_model_dir(d)
    with pytest.raises(FileExistsError):
        save_model_dir(tmp_path / "m2", model, cfg) and save_model_dir(tmp_path / "m2", model, cfg, overwrite=False)


def test_atomic_writes_keep_old_file_on_failure(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    save_file_atomic(target, b"old")
    assert target.read_bytes() == b"old"

    def failing_writer(tmp: Path):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_file_atomic(target, failing_writer)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]  # no temp files left behind
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        torch.save({"w": torch.ones(2)}, tmp)
        assert target.read_bytes() == b"old"  # not visible before the block ends
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(2))
    save_file_atomic(target, "text ✓")
    assert target.read_text(encoding="utf-8") == "text ✓"
    with pytest.raises(TypeError):
        save_file_atomic(target, 3)
