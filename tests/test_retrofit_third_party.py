"""simvq.retrofit on the real third-party classes: taming-transformers' VectorQuantizer2 and
vector-quantize-pytorch's VectorQuantize (Euclidean and cosine): exact at the swap, refusals with a reason."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from simvq.retrofit import TamingSimVQ, VectorQuantizeSimVQ, retrofit
from test_retrofit import ConvTokenizer  # the same encoder -> quantize -> decoder test model

taming = pytest.importorskip("taming.modules.vqvae.quantize")
vqp = pytest.importorskip("vector_quantize_pytorch")


@pytest.mark.parametrize("legacy", [True, False])
def test_taming_vector_quantizer2_swap_is_exact(legacy):
    torch.manual_seed(0)
    old = taming.VectorQuantizer2(64, 8, beta=0.25, legacy=legacy, sane_index_shape=True)
    with torch.no_grad():
        old.embedding.weight.normal_(0, 0.3)  # a trained-looking codebook, at the encoder's scale
    model = ConvTokenizer(old).eval()
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        y0, (zq0, _, (_, _, idx0)) = model(x)
        # the nearest code by explicit float64 distances, independent of both implementations
        z = model.encoder(x).permute(0, 2, 3, 1).reshape(-1, 8).double()
        ref = torch.cdist(z, old.embedding.weight.double()).argmin(1).reshape(3, 6, 6)
    assert retrofit(model) == ["quantize"]
    assert isinstance(model.quantize, TamingSimVQ)
    with torch.no_grad():
        y1, (zq1, loss, (perplexity, encodings, idx1)) = model(x)
    assert torch.equal(idx0, ref) and torch.equal(idx1, ref)
    torch.testing.assert_close(zq1, zq0, rtol=0, atol=1e-6)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    assert encodings is None and loss.dim() == 0
    codes = model.quantize.get_codebook_entry(idx1.flatten(), (3, 6, 6, 8))
    torch.testing.assert_close(codes, old.get_codebook_entry(idx0.flatten(), (3, 6, 6, 8)), rtol=0, atol=0)


def test_taming_refusals_name_the_reason(tmp_path):
    used = tmp_path / "used.npy"
    np.save(used, np.arange(8))
    model = nn.ModuleDict({"remapped": taming.VectorQuantizer2(16, 4, 0.25, remap=str(used)),
                           "first": taming.VectorQuantizer(16, 4, 0.25)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = retrofit(model)
    assert list(result) == []
    assert "remap" in result.skipped["remapped"] and "one-hot" in result.skipped["first"]
    assert isinstance(model["first"], taming.VectorQuantizer)


def test_llamagen_style_quantizer_is_refused():
    class VectorQuantizer(nn.Module):  # LlamaGen's layout: taming's attributes plus l2_norm / entropy_loss_ratio
        def __init__(self):
            super().__init__()
            self.n_e, self.e_dim, self.beta, self.l2_norm, self.entropy_loss_ratio = 16, 4, 0.25, True, 0.1
            self.embedding = nn.Embedding(16, 4)

    with pytest.warns(UserWarning, match="LlamaGen"):
        result = retrofit(nn.Sequential(VectorQuantizer()))
    assert list(result) == [] and "l2_norm" in result.skipped["0"]


def _trained(vq, x, steps=3):
    vq.train()
    for _ in range(steps):
        vq(x)
    return vq.eval()


def test_vector_quantize_cosine_swap_is_exact():
    torch.manual_seed(1)
    old = _trained(vqp.VectorQuantize(dim=12, codebook_size=32, codebook_dim=6, use_cosine_sim=True, decay=0.5),
                   torch.randn(4, 20, 12))
    holder = nn.ModuleDict({"vq": old})
    x = torch.randn(2, 15, 12)
    with torch.no_grad():
        q0, i0, _ = old(x)
        # cosine similarity in float64 from the stored codebook, by hand
        h = old.project_in(x).double()
        h = h / h.norm(dim=-1, keepdim=True)
        e = old._codebook.embed[0].double()
        ref = (h @ (e / e.norm(dim=-1, keepdim=True)).T).argmax(-1)
    assert retrofit(holder) == ["vq"]
    new = holder["vq"]
    assert isinstance(new, VectorQuantizeSimVQ) and new.quantizer.l2_normalize
    with torch.no_grad():
        q1, i1, _ = new(x)
    assert torch.equal(i0, ref) and torch.equal(i1, ref)
    torch.testing.assert_close(q1, q0, rtol=0, atol=1e-5)
    # training moves W; the codes stay unit vectors
    with torch.no_grad():
        new.quantizer.embedding_proj.weight.mul_(3.0)
    norms = new.quantizer.codebook.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


@pytest.mark.parametrize("cosine", [False, True])
def test_vector_quantize_respread_draws_dead_codes_from_its_features(cosine):
    torch.manual_seed(2)
    old = vqp.VectorQuantize(dim=6, codebook_size=64, use_cosine_sim=cosine, accept_image_fmap=True, decay=0.5)
    _trained(old, torch.randn(2, 6, 4, 4))
    model = nn.Sequential(nn.Conv2d(3, 6, 1), old).eval()
    images = torch.randn(5, 3, 4, 4)
    with torch.no_grad():  # the rows the layer searches with, by hand: (B, C, H, W) -> (B*H*W, C)
        rows = model[0](images).permute(0, 2, 3, 1).reshape(-1, 6)
        if cosine:
            rows = rows / rows.norm(dim=-1, keepdim=True)
        before = old._codebook.embed[0].clone()
    result = retrofit(model, dead_codes="respread", data=images, seed=0)
    report = result.dead_codes["1"]
    C = model[1].quantizer.embedding.weight.detach()
    kept = (C == before).all(1)
    assert int(kept.sum()) == report["live"] and report["live"] + report["dead"] == 64
    assert torch.equal(result.live["1"], kept)  # the live set, for counts= on another copy of the model
    # every redrawn code is one of the 80 feature rows (64 - live <= 80 distinct ones)
    dist = torch.cdist(C[~kept].double(), rows.double()).min(1).values
    assert float(dist.max()) < 1e-6


def test_data_pass_stops_at_the_quantizer_and_live_set_feeds_counts():
    from simvq.quantizers import VectorQuantizer

    class Decoder(nn.Module):
        calls = 0

        def forward(self, q):
            Decoder.calls += 1
            return q

    torch.manual_seed(3)
    vq = VectorQuantizer(dim=4, codebook_size=32)
    with torch.no_grad():
        vq.embedding.weight.normal_(0, 0.5)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), vq, Decoder())
    images = torch.randn(6, 3, 4, 4)
    with torch.no_grad():  # the codes the 96 feature rows are nearest to, in float64
        rows = model[0](images).permute(0, 2, 3, 1).reshape(-1, 4).double()
        used = torch.zeros(32, dtype=torch.bool)
        used[torch.cdist(rows, vq.embedding.weight.double()).argmin(1)] = True
    Decoder.calls = 0
    first = retrofit(model, dead_codes="respread", data=[images[:3], images[3:]])
    assert Decoder.calls == 0  # the forward stopped once the quantizer had its input
    assert torch.equal(first.live["1"], used)
    copy = nn.Sequential(nn.Conv2d(3, 4, 1), VectorQuantizer(dim=4, codebook_size=32))
    with torch.no_grad():
        copy[1].embedding.weight.copy_(vq.embedding.weight)
    second = retrofit(copy, dead_codes="fresh", counts=first.live)
    assert second.dead_codes["1"]["live"] == int(used.sum())
