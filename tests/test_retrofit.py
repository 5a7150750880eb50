"""simvq.retrofit: outputs identical at the moment of the swap, for every supported quantizer kind."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from simvq.quantizers import SimVQ, VectorQuantizer
from simvq.retrofit import RetrofitResult, TamingSimVQ, VectorQuantizeSimVQ, convert_quantizer, retrofit


class TamingQuantizer(nn.Module):
    """An independent, naive re-statement of taming-transformers' VectorQuantizer2 call convention."""

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, sane_index_shape: bool = False) -> None:
        super().__init__()
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.remap = None
        self.sane_index_shape = sane_index_shape
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def forward(self, z):
        z = z.permute(0, 2, 3, 1).contiguous()
        flat = z.view(-1, self.e_dim)
        # explicit pairwise distances, unlike the library's expanded-square search
        d = ((flat[:, None, :] - self.embedding.weight[None, :, :]) ** 2).sum(-1)
        idx = d.argmin(1)
        z_q = self.embedding(idx).view(z.shape)
        loss = self.beta * ((z_q.detach() - z) ** 2).mean() + ((z_q - z.detach()) ** 2).mean()
        z_q = z + (z_q - z).detach()
        z_q = z_q.permute(0, 3, 1, 2).contiguous()
        if self.sane_index_shape:
            idx = idx.reshape(z.shape[0], z.shape[1], z.shape[2])
        return z_q, loss, (None, None, idx)


class ConvTokenizer(nn.Module):
    """encoder -> quantize -> decoder on (B, 3, 8, 8) images."""

    def __init__(self, quantize: nn.Module, dim: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(3, dim, 3, padding=1)
        self.quantize = quantize
        self.decoder = nn.Conv2d(dim, 3, 3, padding=1)

    def forward(self, x):
        out = self.quantize(self.encoder(x))
        q = out.quantized if hasattr(out, "quantized") else out[0]
        return self.decoder(q), out


def _spread_codebook(codebook: torch.Tensor) -> None:
    # a trained-looking codebook at the scale of the encoder output, so many codes get selected
    with torch.no_grad():
        codebook.copy_(torch.randn_like(codebook) * 0.3)


def test_library_vq_identical_at_swap_and_trainable_after():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=8, codebook_size=32)
    _spread_codebook(vq.embedding.weight)
    model = ConvTokenizer(vq)
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        before_x, before = model(x)
    old_codebook = vq.embedding.weight.detach().clone()
    names = retrofit(model)
    assert names == ["quantize"] and isinstance(names, RetrofitResult) and names.skipped == {}
    assert isinstance(model.quantize, SimVQ)
    assert not model.quantize.training  # eval mode carried over
    with torch.no_grad():
        after_x, after = model(x)
    assert torch.equal(before.indices, after.indices)
    assert torch.equal(before.quantized, after.quantized)
    assert torch.equal(before_x, after_x)
    assert torch.equal(model.quantize.frozen_codebook, old_codebook)
    assert torch.equal(model.quantize.embedding_proj.weight, torch.eye(8))
    assert torch.equal(model.quantize.embedding_proj.bias, torch.zeros(8))
    # training on moves W (the whole codebook), not C
    model.train()
    _, out = model(x)
    out.loss.backward()
    assert model.quantize.embedding.weight.grad is None
    assert model.quantize.embedding_proj.weight.grad.abs().sum() > 0


def test_cosine_vq_identical_with_its_losses_gradients_and_settings():
    torch.manual_seed(1)
    vq = VectorQuantizer(dim=8, codebook_size=32, l2_normalize=True, rotation_trick=True, commitment_weight=0.5,
                         search="exact-fp32", search_chunk_elements=4096)
    _spread_codebook(vq.embedding.weight)
    model = ConvTokenizer(vq)
    x = torch.randn(4, 3, 8, 8)

    def step(m):
        xx = x.clone().requires_grad_(True)
        rec, out = m(xx)
        ((rec * torch.linspace(-1, 1, rec.numel()).reshape(rec.shape)).sum() + out.loss).backward()
        return rec.detach(), out, xx.grad

    before_rec, before, before_grad = step(model)
    assert retrofit(model) == ["quantize"]
    new = model.quantize
    assert isinstance(new, SimVQ) and new.l2_normalize and new.use_rotation_trick
    assert (new.search, new.search_chunk_elements, new.commitment_weight) == ("exact-fp32", 4096, 0.5)
    assert torch.equal(new.codebook, vq.codebook)  # normalize(C W^T + b) with C the unnormalised weight
    model.zero_grad(set_to_none=True)
    after_rec, after, after_grad = step(model)
    assert torch.equal(before.indices, after.indices) and torch.equal(before_rec, after_rec)
    # the loss terms compare unit tokens with unit codes, as before: same values, same input gradient
    assert torch.equal(before.commitment_loss, after.commitment_loss) and torch.equal(before.loss, after.loss)
    assert torch.equal(before_grad, after_grad)


def test_taming_style_identical_and_keeps_return_convention():
    torch.manual_seed(1)
    old = TamingQuantizer(n_e=48, e_dim=8, beta=0.3)
    _spread_codebook(old.embedding.weight)
    model = ConvTokenizer(old)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y0, (zq0, _, (_, _, idx0)) = model(x)
    names = retrofit(model)
    assert names == ["quantize"]
    new = model.quantize
    assert isinstance(new, TamingSimVQ) and new.n_e == 48 and new.e_dim == 8
    assert new.quantizer.commitment_weight == pytest.approx(0.3) and new.quantizer.codebook_weight == 1.0
    with torch.no_grad():
        y1, (zq1, loss1, (perplexity, encodings, idx1)) = model(x)
    assert idx1.shape == idx0.shape == (2 * 8 * 8,)
    assert torch.equal(idx0, idx1)
    # taming's z + (z_q - z).detach() rounds (about 1 ulp of z); the library returns the code bit for bit
    assert torch.equal(zq1, model.quantize.quantizer.decode_indices(idx1.reshape(2, 8, 8)))
    torch.testing.assert_close(zq1, zq0, rtol=0, atol=1e-6)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    assert encodings is None and loss1.dim() == 0
    # perplexity by hand from the indices
    p = torch.bincount(idx1, minlength=48).float() / idx1.numel()
    p = p[p > 0]
    assert float(perplexity) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-5)
    # get_codebook_entry as taming's: (B, H, W, e_dim) shape -> (B, e_dim, H, W)
    entry = new.get_codebook_entry(idx1, shape=(2, 8, 8, 8))
    # zq1 went through z + (q - z): equal to the codes up to one rounding step
    torch.testing.assert_close(entry, zq1, rtol=0, atol=1e-6)


def test_taming_sane_index_shape_is_kept():
    old = TamingQuantizer(n_e=16, e_dim=4, sane_index_shape=True)
    holder = nn.Sequential(old)
    retrofit(holder)
    _, _, (_, _, idx) = holder[0](torch.randn(3, 4, 5, 6))
    assert idx.shape == (3, 5, 6)


vqp = pytest.importorskip("vector_quantize_pytorch")


def _train_vector_quantize(vq, x, steps=3):
    # EMA updates move the codebook away from its initialisation, as in a trained model
    vq.train()
    for _ in range(steps):
        vq(x)
    vq.eval()


def test_vector_quantize_image_fmap_with_projection_identical():
    torch.manual_seed(2)
    old = vqp.VectorQuantize(dim=8, codebook_size=64, codebook_dim=6, accept_image_fmap=True, decay=0.5)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), old, nn.Identity())
    feats = torch.randn(4, 8, 6, 6)
    _train_vector_quantize(old, feats)
    x = torch.randn(2, 3, 6, 6)
    model.eval()
    with torch.no_grad():
        q0, i0, _ = old(model[0](x))
    names = retrofit(model)
    assert names == ["1"]
    new = model[1]
    assert isinstance(new, VectorQuantizeSimVQ)
    assert torch.equal(new.quantizer.frozen_codebook, old._codebook.embed[0])
    with torch.no_grad():
        q1, i1, loss = new(model[0](x))
    assert i1.shape == i0.shape == (2, 6, 6)
    assert torch.equal(i0, i1)
    assert q1.shape == q0.shape
    # straight-through adds and subtracts the input: equal up to one rounding step
    torch.testing.assert_close(q1, q0, rtol=0, atol=1e-6)
    assert loss.dim() == 0


def test_vector_quantize_sequence_heads_and_mask():
    torch.manual_seed(3)
    old = vqp.VectorQuantize(dim=12, codebook_size=32, heads=2, codebook_dim=4, decay=0.5)
    tokens = torch.randn(3, 10, 12)
    _train_vector_quantize(old, tokens)
    holder = nn.ModuleDict({"vq": old})
    mask = torch.tensor([[True] * 10, [True] * 7 + [False] * 3, [True] * 2 + [False] * 8])
    with torch.no_grad():
        q0, i0, _ = old(tokens)
        qm0, im0, _ = old(tokens, mask=mask)
    assert retrofit(holder) == ["vq"]
    new = holder["vq"]
    with torch.no_grad():
        q1, i1, _ = new(tokens)
        qm1, im1, _, breakdown = new(tokens, mask=mask, return_loss_breakdown=True)
    assert i1.shape == i0.shape == (3, 10, 2)
    assert torch.equal(i0, i1)
    torch.testing.assert_close(q1, q0, rtol=0, atol=1e-6)
    assert torch.equal(im0, im1) and int((im1 == -1).sum()) == (3 + 8) * 2
    torch.testing.assert_close(qm1, qm0, rtol=0, atol=1e-6)
    assert breakdown.indices.shape == (int(mask.sum()), 2)


def test_unsupported_kinds_are_left_alone_and_reported():
    class MyQuantizer(nn.Module):
        def forward(self, z):
            return z.round()

    sampling = vqp.VectorQuantize(dim=8, codebook_size=16, stochastic_sample_codes=True)
    vq = VectorQuantizer(dim=8, codebook_size=16)
    model = nn.ModuleDict(
        {"tok_emb": nn.Embedding(100, 8), "odd": MyQuantizer(), "cos": sampling, "already": SimVQ(dim=8, codebook_size=16), "vq": vq}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = retrofit(model)
    assert list(result) == ["vq"]
    assert set(result.skipped) == {"odd", "cos", "already"}
    assert "stochastic" in result.skipped["cos"] and "unknown" in result.skipped["odd"]
    assert any("odd" in str(w.message) for w in caught)
    assert isinstance(model["tok_emb"], nn.Embedding)  # a token embedding is not a VQ layer
    assert model["cos"] is sampling


def test_bare_quantizer_and_bad_arguments():
    vq = VectorQuantizer(dim=4, codebook_size=8)
    with pytest.raises(TypeError, match="convert_quantizer"):
        retrofit(vq)
    with pytest.raises(TypeError, match="nn.Module"):
        retrofit("model")
    with pytest.raises(ValueError, match="transform"):
        retrofit(nn.Sequential(vq), transform="conv")
    assert isinstance(convert_quantizer(vq), SimVQ)


def test_mlp_transform_starts_at_the_identity():
    torch.manual_seed(4)
    vq = VectorQuantizer(dim=6, codebook_size=20)
    _spread_codebook(vq.embedding.weight)
    new = convert_quantizer(vq, transform="mlp")
    torch.testing.assert_close(new.codebook, vq.codebook, rtol=0, atol=1e-6)
    z = torch.randn(5, 6, 3, 3)
    assert torch.equal(new(z).indices, vq(z).indices)


# ----- dead-code strategies ----------------------------------------------------------------------------


def _collapsed_vq(size: int = 64, dim: int = 4, live: int = 5, seed: int = 0) -> tuple[ConvTokenizer, torch.Tensor]:
    """A tokenizer whose VQ codebook has ``live`` spread codes and ``size - live`` tiny, near-identical ones."""
    torch.manual_seed(seed)
    vq = VectorQuantizer(dim=dim, codebook_size=size)
    with torch.no_grad():
        vq.embedding.weight.uniform_(-1.0 / size, 1.0 / size)
        vq.embedding.weight[:live] = torch.randn(live, dim) * 0.5
    return ConvTokenizer(vq, dim=dim).eval(), torch.randn(6, 3, 8, 8)


def _hand_features(model: ConvTokenizer, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        z = model.encoder(x)
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double().numpy()


def _hand_nearest(feats: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    return ((feats[:, None, :] - codebook[None, :, :]) ** 2).sum(-1).argmin(1)


def test_dead_code_arguments_are_validated():
    model, x = _collapsed_vq()
    counts = torch.ones(64)
    cases = [
        (dict(dead_codes="revive"), "dead_codes must be one of"),
        (dict(dead_codes="keep", data=x), "'keep' uses neither"),
        (dict(dead_codes="keep", counts=counts), "'keep' uses neither"),
        (dict(dead_codes="respread"), "needs data="),
        (dict(dead_codes="fresh", counts=counts, transform="mlp"), "transform='linear'"),
        (dict(dead_codes="respread", counts=torch.ones(63)), "shape (64,)"),
        (dict(dead_codes="respread", counts=-counts), ">= 0"),
        (dict(dead_codes="respread", counts=torch.zeros(64)), "no live code"),
        (dict(dead_codes="respread", counts={"elsewhere": counts}), "counts names elsewhere, which retrofit does not replace"),
        (dict(dead_codes="respread", data=x, seed=1.5), "seed must be an integer"),
    ]
    for kwargs, message in cases:
        fresh_model, _ = _collapsed_vq()
        with pytest.raises(ValueError, match=re.escape(message)) as err:
            retrofit(fresh_model, **kwargs)
        assert "\n" not in str(err.value)
        assert isinstance(fresh_model.quantize, VectorQuantizer)  # nothing replaced on a refusal


def test_respread_from_data_keeps_live_codes_and_draws_dead_ones_from_the_features():
    model, x = _collapsed_vq()
    old = model.quantize.embedding.weight.detach().double().numpy().copy()
    feats = _hand_features(model, x)
    used = np.zeros(64, bool)
    used[_hand_nearest(feats, old)] = True
    tallies = model.quantize.usage.counts.clone()
    with torch.no_grad():
        before_x, before = model(x)
    model.quantize.usage.counts.copy_(tallies)  # the forward above counted; the census must not
    result = retrofit(model, dead_codes="respread", data=[x[:3], (x[3:], "label")])
    report = result.dead_codes["quantize"]
    assert (report["live"], report["dead"]) == (int(used.sum()), int((~used).sum()))
    new = model.quantize.codebook.detach().double().numpy()
    assert np.array_equal(new[used], old[used])  # live codes exact
    # every redrawn code is one of the features (float32 copies), all distinct
    gaps = ((new[~used][:, None, :] - feats[None, :, :]) ** 2).sum(-1).min(1)
    assert gaps.max() < 1e-12
    assert len({tuple(r) for r in new[~used]}) == int((~used).sum())
    assert torch.equal(model.quantize.usage.counts, tallies)
    # a token whose old live code is still the nearest gets the same output as before
    with torch.no_grad():
        _, after = model(x)
    same = (after.indices == before.indices)
    assert same.any() and (~same).any()
    assert torch.equal(after.quantized.permute(0, 2, 3, 1)[same], before.quantized.permute(0, 2, 3, 1)[same])
    assert (~used[after.indices.flatten().numpy()]).any()  # redrawn codes are used at once


def test_respread_from_counts_draws_from_a_gaussian_fitted_to_the_live_codes():
    model, _ = _collapsed_vq(size=6000, dim=3, live=40)
    old = model.quantize.embedding.weight.detach().double().numpy().copy()
    counts = torch.zeros(6000, dtype=torch.long)
    counts[:40] = torch.arange(1, 41)
    result = retrofit(model, dead_codes="respread", counts=counts, seed=3)
    assert result.dead_codes["quantize"]["source"] == "a Gaussian fitted to the live codes"
    new = model.quantize.codebook.detach().double().numpy()
    assert np.array_equal(new[:40], old[:40])
    drawn = new[40:]
    live = old[:40]
    mean, cov = live.mean(0), np.cov(live.T, bias=True)
    ridge = np.trace(cov) / 3 * 1e-3
    # 5,960 draws: the sample mean is within a few standard errors, the sample covariance within ~10%
    assert np.all(np.abs(drawn.mean(0) - mean) < 5 * np.sqrt(np.diag(cov) / len(drawn)))
    assert np.allclose(np.cov(drawn.T, bias=True), cov + ridge * np.eye(3), atol=0.1 * np.abs(cov).max())


def test_fresh_codebook_least_squares_fit_against_numpy():
    for live in (3, 20):  # exact when live <= d + 1 = 5
        model, x = _collapsed_vq(size=64, dim=4, live=live)
        old = model.quantize.embedding.weight.detach().double().numpy().copy()
        counts = torch.zeros(64)
        counts[:live] = 1
        report = retrofit(model, dead_codes="fresh", counts=counts, seed=7).dead_codes["quantize"]
        q = model.quantize
        C = q.embedding.weight.detach().double().numpy()
        assert not np.allclose(C[:live], old[:live])  # a new codebook
        assert abs(C.std() - 0.5) < 0.1  # N(0, d^-1/2) with d = 4
        design = np.hstack([C[:live], np.ones((live, 1))])
        sol, *_ = np.linalg.lstsq(design, old[:live], rcond=None)
        reproduced = design @ sol
        rms = np.sqrt(((reproduced - old[:live]) ** 2).sum(1).mean())
        spread = np.sqrt(((old[:live] - old[:live].mean(0)) ** 2).sum(1).mean())
        assert report["fit_rms"] == pytest.approx(rms, abs=1e-6)
        assert report["fit_relative"] == pytest.approx(rms / spread, abs=1e-6)
        assert report["exact"] == (live <= 5)
        effective = q.codebook.detach().double().numpy()
        assert np.allclose(effective[:live], reproduced, atol=1e-5)
        if live <= 5:
            assert rms < 1e-6 and np.allclose(effective[:live], old[:live], atol=1e-5)
        else:
            assert rms > 1e-3


class OfficialSimVQ(nn.Module):
    """A stand-in with the official SimVQ layer's attribute names (frozen embedding + embedding_proj)."""

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.n_e, self.e_dim, self.beta, self.remap, self.legacy = n_e, e_dim, beta, None, True
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.requires_grad_(False)
        self.embedding_proj = nn.Linear(e_dim, e_dim)

    def forward(self, z):
        codes = self.embedding_proj(self.embedding.weight)
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.e_dim)
        idx = torch.cdist(flat, codes).argmin(1)
        z_q = codes[idx].view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        return z_q, torch.zeros(()), (None, None, idx)


def test_official_simvq_layer_is_refused_not_rebuilt_without_its_projection():
    model = ConvTokenizer(OfficialSimVQ(16, 8))
    with pytest.raises(ValueError, match="already a SimVQ layer") as err:
        retrofit(model)
    assert "\n" not in str(err.value)
    assert isinstance(model.quantize, OfficialSimVQ)
    with pytest.raises(ValueError, match="embedding_proj"):
        convert_quantizer(OfficialSimVQ(16, 8))


def test_taming_style_module_with_other_tensors_is_skipped():
    quantizer = TamingQuantizer(16, 8)
    quantizer.scale = nn.Parameter(torch.ones(8))
    model = ConvTokenizer(quantizer)
    with pytest.warns(UserWarning, match="scale"):
        result = retrofit(model)
    assert result == [] and "scale" in result.skipped["quantize"]
    assert model.quantize is quantizer


# ----- `simvq retrofit` and `simvq train --init` -------------------------------------------------------


def _vq_model_dir(path):
    from simvq.checkpoints import save_model_dir
    from simvq.config import load_config
    from simvq.modalities import build_tokenizer

    torch.manual_seed(0)
    cfg = load_config("image/digits-tiny", ["quantizer.name=vq"])
    save_model_dir(path, build_tokenizer(cfg), cfg)
    return path


def _folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_cli_retrofit_writes_a_new_model_folder(tmp_path, capsys):
    from PIL import Image

    from simvq.checkpoints import load_tokenizer, read_model_metadata
    from simvq.cli import main

    model_dir = _vq_model_dir(tmp_path / "vq")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(images / f"im{i}.png")
    before = _folder_bytes(model_dir)
    # keep: the new folder computes exactly what the old one did
    assert main(["retrofit", "--model", str(model_dir), "--out", str(tmp_path / "keep")]) == 0
    old, new = load_tokenizer(model_dir), load_tokenizer(tmp_path / "keep")
    assert isinstance(new.quantize, SimVQ) and isinstance(old.quantize, VectorQuantizer)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(old(x)[0], new(x)[0])
    meta = read_model_metadata(tmp_path / "keep")
    assert meta["retrofit_of"] == str(model_dir.resolve()) and meta["retrofit_dead_codes"] == "keep"
    assert meta["retrofit_quantizer_before"] == "vq"
    # respread on a folder of images: live codes kept, report in the metadata
    out = tmp_path / "respread"
    assert main(["retrofit", "--model", str(model_dir), "--out", str(out), "--dead-codes", "respread", "--data", str(images)]) == 0
    report = json.loads(read_model_metadata(out)["retrofit_report"])
    assert report["strategy"] == "respread" and report["live"] + report["dead"] == 64 and report["dead"] > 0
    assert "live" in capsys.readouterr().out
    assert _folder_bytes(model_dir) == before  # the input is never modified
    # user errors: one line, exit 2, nothing written
    for argv, message in (
        (["--out", str(tmp_path / "x"), "--data", str(images)], "use it with --dead-codes respread or fresh"),
        (["--out", str(model_dir / "inside")], "overlaps the input"),
        (["--out", str(tmp_path / "keep")], "not empty"),
    ):
        assert main(["retrofit", "--model", str(model_dir), *argv]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "x").exists() and not (model_dir / "inside").exists()
    assert main(["retrofit", "--model", str(tmp_path / "keep"), "--out", str(tmp_path / "y")]) == 2
    assert "already a SimVQ layer" in capsys.readouterr().err


def test_cli_retrofit_keeps_the_layer_settings_in_the_new_config(tmp_path):
    import yaml

    from simvq.checkpoints import load_tokenizer, save_model_dir
    from simvq.cli import main
    from simvq.config import load_config
    from simvq.modalities import build_tokenizer

    torch.manual_seed(0)
    settings = ["quantizer.name=vq", "quantizer.l2_normalize=true", "quantizer.rotation_trick=true",
                "quantizer.commitment_weight=0.5", "quantizer.search=exact-fp32", "quantizer.search_chunk_elements=4096"]
    cfg = load_config("image/digits-tiny", settings)
    save_model_dir(tmp_path / "vq", build_tokenizer(cfg), cfg)
    assert main(["retrofit", "--model", str(tmp_path / "vq"), "--out", str(tmp_path / "keep")]) == 0
    written = yaml.safe_load((tmp_path / "keep" / "config.yaml").read_text())["quantizer"]
    assert written == {"name": "simvq", "codebook_size": 64, "l2_normalize": True, "rotation_trick": True,
                       "commitment_weight": 0.5, "search": "exact-fp32", "search_chunk_elements": 4096}
    old, new = load_tokenizer(tmp_path / "vq"), load_tokenizer(tmp_path / "keep")
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        (a, out_a), (b, out_b) = old(x), new(x)
    assert torch.equal(a, b) and torch.equal(out_a.loss, out_b.loss)  # the folder rebuilds the same layer
    # respread on a cosine codebook draws the dead codes from unit features
    assert main(["retrofit", "--model", str(tmp_path / "vq"), "--out", str(tmp_path / "re"), "--dead-codes", "respread",
                 "--limit", "64"]) == 0
    q_old, q_new = old.quantize, load_tokenizer(tmp_path / "re").quantize
    moved = (q_new.embedding.weight != q_old.embedding.weight).any(1)
    assert moved.any() and q_new.l2_normalize
    torch.testing.assert_close(q_new.embedding.weight[moved].norm(dim=1), torch.ones(int(moved.sum())))


def test_layer_config_rebuilds_mlp_and_default_layers():
    from simvq.quantizers import build_quantizer
    from simvq.retrofit import layer_config

    assert layer_config(SimVQ(dim=8, codebook_size=16)) == {"name": "simvq", "codebook_size": 16}
    for layer in (SimVQ(dim=8, codebook_size=16, transform="mlp", hidden_dim=20, bias=False, frozen_codebook_dim=6),
                  SimVQ(dim=8, codebook_size=16, learnable_codebook=True, codebook_weight=2.0, check_finite=False)):
        config = layer_config(layer)
        rebuilt = build_quantizer(config.pop("name"), dim=8, **config)
        rebuilt.load_state_dict(layer.state_dict(), strict=True)
        assert repr(rebuilt) == repr(layer)
    with pytest.raises(ValueError, match="no config form"):
        layer_config(SimVQ(dim=4, codebook_size=8, transform=nn.Identity()))


@pytest.mark.slow
def test_cli_train_init_starts_from_the_retrofitted_weights(tmp_path):
    from simvq.checkpoints import load_model_dir
    from simvq.cli import main

    model_dir = _vq_model_dir(tmp_path / "vq")
    assert main(["retrofit", "--model", str(model_dir), "--out", str(tmp_path / "simvq")]) == 0
    start, _ = load_model_dir(tmp_path / "simvq")
    code = main(["train", "--config", str(tmp_path / "simvq" / "config.yaml"), "--init", str(tmp_path / "simvq"),
                 "--out", str(tmp_path / "run"), "--max-steps", "1", "--quiet", "trainer.loggers=[]", "data.batch_size=2"])
    assert code == 0
    end, _ = load_model_dir(tmp_path / "run" / "model")
    # C is frozen: the run started from the retrofitted codebook, not from a fresh random one
    assert torch.equal(end["quantize.embedding.weight"], start["quantize.embedding.weight"])
