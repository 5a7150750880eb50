"""simvq.retrofit: outputs identical at the moment of the swap, for every supported quantizer kind."""

from __future__ import annotations

import warnings

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

    cosine = vqp.VectorQuantize(dim=8, codebook_size=16, use_cosine_sim=True)
    vq = VectorQuantizer(dim=8, codebook_size=16)
    model = nn.ModuleDict(
        {"tok_emb": nn.Embedding(100, 8), "odd": MyQuantizer(), "cos": cosine, "already": SimVQ(dim=8, codebook_size=16), "vq": vq}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = retrofit(model)
    assert list(result) == ["vq"]
    assert set(result.skipped) == {"odd", "cos", "already"}
    assert "cosine" in result.skipped["cos"] and "unknown" in result.skipped["odd"]
    assert any("odd" in str(w.message) for w in caught)
    assert isinstance(model["tok_emb"], nn.Embedding)  # a token embedding is not a VQ layer
    assert model["cos"] is cosine


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
