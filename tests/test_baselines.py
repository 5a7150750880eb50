"""Baseline quantizers (EMA VQ, factorized VQ, VQGAN-LC, FSQ, LFQ, residual) and the factory.

References are independent of the code under test: numbers worked out by hand, naive full-matrix
re-computations, scikit-learn's k-means, and a two-process gloo run against a one-process run.
"""

from __future__ import annotations

import itertools
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from simvq.quantizers import (
    FSQ,
    LFQ,
    QUANTIZERS,
    EMAVectorQuantizer,
    FactorizedVectorQuantizer,
    LCVectorQuantizer,
    ResidualQuantizer,
    VectorQuantizer,
    build_quantizer,
    fsq_levels_for,
    kmeans_init,
)
from simvq.quantizers.lfq import lfq_entropy_terms

DIM, K = 12, 32


def _factory_kwargs(name: str) -> dict:
    if name == "fsq":
        return dict(dim=DIM, levels=[4, 3, 5])
    if name == "lfq":
        return dict(dim=DIM, codebook_size=K)
    if name == "residual":
        return dict(dim=DIM, codebook_size=K, num_quantizers=3)
    return dict(dim=DIM, codebook_size=K)


ALL_NAMES = list(QUANTIZERS)


# ----- every quantizer -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_NAMES)
def test_decode_indices_reproduces_quantized_and_gradients_reach_input(name):
    torch.manual_seed(0)
    q = build_quantizer(name, **_factory_kwargs(name))
    z = torch.randn(2, DIM, 3, 5, requires_grad=True)
    out = q(z)
    assert out.quantized.shape == z.shape
    expected_idx = (2, 3, 5, 3) if name == "residual" else (2, 3, 5)
    assert out.indices.shape == expected_idx and out.indices.dtype == torch.long
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < q.codebook_size
    (out.quantized * torch.randn_like(out.quantized)).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    q.eval()
    with torch.no_grad():
        out = q(z)
        decoded = q.decode_indices(out.indices)
    torch.testing.assert_close(decoded, out.quantized, atol=1e-5, rtol=1e-5)
    for value in (out.loss, out.commitment_loss, out.codebook_loss, out.aux_loss):
        assert value.dim() == 0 and torch.isfinite(value)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_state_dict_round_trip_and_channel_last(name):
    torch.manual_seed(1)
    q = build_quantizer(name, **_factory_kwargs(name))
    z = torch.randn(4, DIM, 6)
    q.train()
    q(z)  # move EMA state / usage counters away from their initial values
    torch.manual_seed(123)  # a different random initialisation
    fresh = build_quantizer(name, **_factory_kwargs(name))
    fresh.load_state_dict(q.state_dict())
    q.eval(), fresh.eval()
    with torch.no_grad():
        a, b = q(z), fresh(z)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.quantized, b.quantized)
    # the same quantizer, channel-last layout: same indices
    last = build_quantizer(name, **_factory_kwargs(name), channel_first=False)
    last.load_state_dict(q.state_dict())
    last.eval()
    with torch.no_grad():
        c = last(z.movedim(1, -1))
    assert torch.equal(c.indices, a.indices)
    torch.testing.assert_close(c.quantized, a.quantized.movedim(1, -1))


@pytest.mark.parametrize("name", ["ema_vq", "fsq", "lfq", "factorized_vq"])
def test_bf16_autocast_indices_match_fp32(name):
    torch.manual_seed(2)
    q = build_quantizer(name, **_factory_kwargs(name)).eval()
    z = torch.randn(3, DIM, 4).bfloat16()
    with torch.no_grad():
        ref = q(z.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = q(z)
    assert torch.equal(out.indices, ref.indices)
    assert out.quantized.dtype == torch.bfloat16


def test_factory_names_and_errors():
    assert set(QUANTIZERS) - {"ibq"} == {"simvq", "vq", "ema_vq", "factorized_vq", "lc_vq", "fsq", "lfq", "residual"}
    with pytest.raises(ValueError, match="valid names: simvq, vq, ema_vq"):
        build_quantizer("vqq", dim=4, codebook_size=8)
    with pytest.raises(TypeError, match="unknown argument.*'decy'"):
        build_quantizer("ema_vq", dim=4, codebook_size=8, decy=0.9)
    fsq = build_quantizer("fsq", dim=16, codebook_size=2**16)
    assert fsq.levels == [8, 8, 8, 5, 5, 5] and fsq.codebook_size == 64000
    with pytest.raises(ValueError, match="pass only one"):
        build_quantizer("fsq", codebook_size=2**10, levels=[8, 8])
    with pytest.raises(TypeError, match="unknown argument.*'decay'"):  # level keywords are checked too
        build_quantizer("residual", dim=4, codebook_size=8, num_quantizers=2, quantizer="vq", decay=0.9)
    stack = build_quantizer("residual", dim=4, codebook_size=8, num_quantizers=2, quantizer="vq")
    assert isinstance(stack.levels[1], VectorQuantizer)


def test_fsq_levels_for_paper_table():
    assert fsq_levels_for(2**8) == [8, 6, 5]
    assert fsq_levels_for(2**10) == [8, 5, 5, 5]
    assert fsq_levels_for(2**12) == [7, 5, 5, 5, 5]
    assert fsq_levels_for(2**14) == [8, 8, 8, 6, 5]
    assert fsq_levels_for(2**16) == [8, 8, 8, 5, 5, 5]
    assert fsq_levels_for(1000) == [8, 5, 5, 5]  # the exact size of a recommended set
    assert fsq_levels_for(2**13) == [8, 8, 5, 5, 5]  # extensions of the paper's rows (fsq_levels.py)
    for bad in (1234, 2**7, 2**19):
        with pytest.raises(ValueError, match="levels=\\[...\\]"):
            fsq_levels_for(bad)


# ----- FSQ ---------------------------------------------------------------------------------------
def test_fsq_odd_level_rounding_by_hand():
    q = FSQ(levels=[3], channel_first=False)
    # bound(z) = 1.001 * tanh(z); values round to -1, 0, 1 -> indices 0, 1, 2
    z = torch.tensor([[-5.0], [-0.6], [-0.4], [0.0], [0.4], [0.6], [5.0]])
    out = q(z)
    # tanh(0.6) * 1.001 = 0.538 -> 1;  tanh(0.4) * 1.001 = 0.380 -> 0
    assert out.quantized.squeeze(-1).tolist() == [-1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert out.indices.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert float(out.loss) == 0.0


def test_fsq_even_level_offset_by_hand():
    q = FSQ(levels=[4], channel_first=False)
    # even L: grid -2, -1, 0, 1 divided by L//2 = 2 -> -1, -0.5, 0, 0.5; z = 0 must land on 0 exactly
    torch.testing.assert_close(q.codebook, torch.tensor([[-1.0], [-0.5], [0.0], [0.5]]))
    out = q(torch.tensor([[-10.0], [0.0], [10.0]]))
    assert out.quantized.squeeze(-1).tolist() == [-1.0, 0.0, 0.5]
    assert out.indices.tolist() == [0, 2, 3]
    # half = 1.5 * 1.001, shift = atanh(0.5 / half): bound(0) = tanh(shift) * half - 0.5 = 0
    assert abs(float(q.bound(torch.zeros(1, 1)))) < 1e-6


def test_fsq_two_levels_and_extremes_stay_on_the_grid():
    q = FSQ(levels=[2, 7, 1000], channel_first=False)
    z = torch.cat([torch.linspace(-30, 30, 301).unsqueeze(1).expand(-1, 3), torch.zeros(1, 3)])
    out = q(z)
    assert torch.isfinite(out.quantized).all()
    # L = 2: values {-1, 0}; L = 7: {-1, -2/3, ..., 1}; L = 1000: (-500 .. 499) / 500
    assert set(out.quantized[:, 0].tolist()) == {-1.0, 0.0}
    assert torch.equal(out.quantized[[0, -2]], torch.tensor([[-1.0, -1.0, -1.0], [0.0, 1.0, 499 / 500]]))
    assert out.quantized[-1].tolist() == [0.0, 0.0, 0.0]  # z = 0 -> the zero code in every channel
    assert torch.equal(q.decode_indices(out.indices), out.quantized)


def test_fsq_mixed_radix_hand_picked():
    q = FSQ(levels=[3, 4], channel_first=False)
    # index = d0 + 3 * d1, code_i = (d_i - L_i // 2) / (L_i // 2)
    hand = {0: (-1.0, -1.0), 7: (0.0, 0.0), 11: (1.0, 0.5), 5: (1.0, -0.5)}
    for index, code in hand.items():
        assert q.decode_indices(torch.tensor([index])).squeeze(0).tolist() == list(code)
    codes = q.codebook
    assert codes.shape == (12, 2) and len({tuple(r) for r in codes.tolist()}) == 12
    assert torch.equal(q.grid_codes_to_indices(codes), torch.arange(12))
    # quantizing a pre-image of each code gives back its index: inputs z with bound(z) = 0.9 * level,
    # inside the rounding interval of that integer level (bound never reaches the even grid's -L/2)
    half = torch.tensor([1.0, 2.0])
    target = 0.9 * codes * half
    half_range = (torch.tensor([3.0, 4.0]) - 1) * 1.001 / 2
    shift = torch.atanh(torch.tensor([0.0, 0.5]) / half_range)
    pre = torch.atanh((target + torch.tensor([0.0, 0.5])) / half_range) - shift
    assert torch.equal(q(pre).indices, torch.arange(12))


def test_fsq_projections_and_invalid_levels():
    q = FSQ(levels=[8, 5, 5, 5], dim=32)
    assert q.codebook_size == 1000 and q.codebook.shape == (1000, 32)
    assert FSQ(levels=[8, 5, 5, 5]).dim == 4 and not list(FSQ(levels=[8, 5]).parameters())
    for bad in ([], [1, 5], [8.0, 5], "855", [True, 3], None, [1001]):
        with pytest.raises(ValueError, match="level"):
            FSQ(levels=bad)
    with pytest.raises(ValueError, match="dim"):
        FSQ(levels=[5, 5], dim=0)


# ----- LFQ ---------------------------------------------------------------------------------------
def test_lfq_bits_to_indices_by_hand():
    q = LFQ(codebook_size=8, channel_first=False)
    z = torch.tensor([[1.0, -1.0, -1.0], [-2.0, 0.5, 3.0], [0.3, 0.2, -0.1], [-0.1, -0.2, -0.3]])
    out = q(z)
    # index = sum_i 2^i [z_i > 0], channel 0 least significant
    assert out.indices.tolist() == [1, 6, 3, 0]
    assert out.quantized.tolist() == [[1, -1, -1], [-1, 1, 1], [1, 1, -1], [-1, -1, -1]]
    assert q.decode_indices(torch.tensor([5])).tolist() == [[1.0, -1.0, 1.0]]
    # commitment = mean((z - sign(z))^2) by hand
    expected = sum((a - (1 if a > 0 else -1)) ** 2 for row in z.tolist() for a in row) / 12
    assert abs(float(out.commitment_loss) - expected) < 1e-6
    assert float(out.codebook_loss) == 0.0


def _naive_lfq_entropy(x: torch.Tensor, temperature: float):
    """Full N x 2^bits softmax over an explicitly enumerated hypercube."""
    bits = x.shape[1]
    codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=bits)))
    dist = torch.cdist(x, codes).pow(2)
    p = torch.softmax(-dist / temperature, dim=-1)
    per_sample = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()
    avg = p.mean(0)
    return per_sample, -(avg * avg.clamp_min(1e-30).log()).sum()


@pytest.mark.parametrize("bits,temperature", [(1, 1.0), (4, 0.5), (5, 1.0), (7, 0.3)])
def test_lfq_entropy_matches_full_softmax(bits, temperature):
    torch.manual_seed(bits)
    x = (0.7 * torch.randn(40, bits)).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    per, batch = lfq_entropy_terms(x, temperature)
    per_ref, batch_ref = _naive_lfq_entropy(x_ref, temperature)
    torch.testing.assert_close(per, per_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch, batch_ref, atol=1e-5, rtol=1e-5)
    (per - 0.7 * batch).backward()
    (per_ref - 0.7 * batch_ref).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-4)


def test_lfq_loss_composition_and_large_codebook():
    torch.manual_seed(3)
    q = LFQ(codebook_size=2**6, entropy_weight=0.3, commitment_weight=0.5, diversity_gamma=2.0, temperature=0.1)
    z = torch.randn(5, 6, 7)
    out = q(z)
    per, batch = lfq_entropy_terms(z.movedim(1, -1).reshape(-1, 6), 0.1)
    torch.testing.assert_close(out.aux_loss, per - 2.0 * batch)
    torch.testing.assert_close(out.loss, 0.5 * out.commitment_loss + 0.3 * out.aux_loss)
    # K = 2^18 works without an N x K matrix; uniform sign patterns give batch entropy near log(N)
    big = LFQ(codebook_size=2**18, dim=32)
    out = big(torch.randn(2, 32, 16, 16))
    assert out.indices.shape == (2, 16, 16) and torch.isfinite(out.aux_loss)
    out.loss.backward()
    assert big.project_in.weight.grad is not None


def test_lfq_invalid_sizes():
    for bad in (1000, 3, 0, 1, 2.0, True):
        with pytest.raises(ValueError, match="power of two"):
            LFQ(codebook_size=bad)
    with pytest.raises(ValueError, match="use 512 or 1024"):
        LFQ(codebook_size=1000)
    with pytest.raises(ValueError, match="temperature"):
        LFQ(codebook_size=16, temperature=0.0)
    with pytest.raises(ValueError, match="entropy_weight"):
        LFQ(codebook_size=16, entropy_weight=-1)


# ----- EMA VQ ------------------------------------------------------------------------------------
def test_ema_update_matches_textbook_by_hand():
    init = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    q = EMAVectorQuantizer(dim=2, codebook_size=2, decay=0.5, eps=1e-5, init_codebook=init, channel_first=False)
    z = torch.tensor([[1.0, 1.0], [3.0, 1.0], [9.0, 9.0]])
    out = q(z)
    # quantized with the codebook *before* the update
    assert out.quantized.tolist() == [[0, 0], [0, 0], [10, 10]]
    assert out.indices.tolist() == [0, 0, 1]
    # commitment = ((1+1) + (9+1) + (1+1)) / 6; loss = 0.25 * commitment; codebook term reported only
    assert abs(float(out.commitment_loss) - 14 / 6) < 1e-6
    assert abs(float(out.loss) - 0.25 * 14 / 6) < 1e-6
    assert abs(float(out.codebook_loss) - 14 / 6) < 1e-6
    # N = 0.5 * [1, 1] + 0.5 * [2, 1] = [1.5, 1];  m = 0.5 * init + 0.5 * [[4, 2], [9, 9]] = [[2, 1], [9.5, 9.5]]
    assert q.ema_cluster_size.tolist() == [1.5, 1.0]
    assert q.ema_embed_sum.tolist() == [[2.0, 1.0], [9.5, 9.5]]
    # Laplace smoothing: N~ = (N + eps) / (2.5 + 2 eps) * 2.5
    smoothed = [(n + 1e-5) / (2.5 + 2e-5) * 2.5 for n in (1.5, 1.0)]
    expected = torch.tensor([[2.0 / smoothed[0], 1.0 / smoothed[0]], [9.5 / smoothed[1], 9.5 / smoothed[1]]])
    torch.testing.assert_close(q.codebook, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(q.codebook, torch.tensor([[4 / 3, 2 / 3], [9.5, 9.5]]), atol=1e-4, rtol=0)
    # evaluation mode: no update
    q.eval()
    before = q.codebook.clone()
    q(z)
    assert torch.equal(q.codebook, before)
    assert not any(p.requires_grad for p in q.parameters())


def test_ema_gradient_is_identity_and_codebook_gets_none():
    q = EMAVectorQuantizer(dim=3, codebook_size=4, channel_first=False)
    z = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(5, 3)
    (q(z).quantized * w).sum().backward()
    torch.testing.assert_close(z.grad, w)
    assert "embedding" in q.state_dict() and "ema_cluster_size" in q.state_dict() and "ema_embed_sum" in q.state_dict()


def test_ema_dead_code_reset_replaces_dead_codes():
    torch.manual_seed(4)
    init = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1000.0, 1000.0], [-1000.0, -1000.0]])
    z = torch.tensor([[0.1, 0.0], [0.0, 0.2], [0.9, 1.1], [1.2, 0.8], [0.05, 0.05]])
    kw = dict(dim=2, codebook_size=4, decay=0.5, init_codebook=init, channel_first=False)
    q = EMAVectorQuantizer(**kw, dead_code_threshold=0.9)
    q(z)
    # codes 2 and 3 got no tokens: N = 0.5 * 1 = 0.5 < 0.9 -> replaced by batch tokens
    rows = {tuple(r) for r in z.tolist()}
    assert tuple(q.codebook[2].tolist()) in rows and tuple(q.codebook[3].tolist()) in rows
    assert not torch.equal(q.codebook[2], q.codebook[3])  # distinct tokens while there are enough
    torch.testing.assert_close(q.ema_cluster_size[2:], torch.tensor([0.9, 0.9]))
    torch.testing.assert_close(q.ema_embed_sum[2:], q.codebook[2:] * 0.9)
    assert float(q.ema_cluster_size[:2].min()) >= 1.0  # live codes untouched by the reset
    # without the threshold the dead codes stay far away (the collapse the reset fixes)
    plain = EMAVectorQuantizer(**kw)
    plain(z)
    assert float(plain.codebook[2:].abs().min()) > 100


def test_ema_invalid_arguments():
    with pytest.raises(ValueError, match="decay"):
        EMAVectorQuantizer(dim=2, codebook_size=4, decay=1.0)
    with pytest.raises(ValueError, match="eps"):
        EMAVectorQuantizer(dim=2, codebook_size=4, eps=0.0)
    with pytest.raises(ValueError, match="init_codebook"):
        EMAVectorQuantizer(dim=2, codebook_size=4, init_codebook=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="dead_code_threshold"):
        EMAVectorQuantizer(dim=2, codebook_size=4, dead_code_threshold=-1)
    with pytest.raises(TypeError):
        EMAVectorQuantizer(2, 4)  # keyword-only


def _ema_pair():
    """The data of the distributed test: two ranks' batches and a starting codebook."""
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, 10, 3, generator=g), torch.randn(6, 3, generator=g)


def _ddp_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different dead-code picks on each rank, unless they are broadcast
    batches, init = _ema_pair()
    plain = EMAVectorQuantizer(dim=3, codebook_size=6, decay=0.8, init_codebook=init, channel_first=False)
    for _ in range(3):
        plain(batches[rank])
    reset = EMAVectorQuantizer(dim=3, codebook_size=6, decay=0.8, init_codebook=init, dead_code_threshold=2.0,
                               channel_first=False)
    reset(batches[rank])
    out = {}
    for key, q in (("plain", plain), ("reset", reset)):
        gathered = [torch.zeros(6, 3) for _ in range(world)]
        dist.all_gather(gathered, q.codebook.contiguous())
        out[key] = gathered
    if rank == 0:
        torch.save(out, result_file)
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes, each importing torch (~5 s on two idle cores)
def test_ema_distributed_ranks_stay_identical_and_match_single_process():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "result.pt")
        mp.spawn(_ddp_worker, args=(2, init_file, result_file), nprocs=2, join=True)
        result = torch.load(result_file, weights_only=True)
    batches, init = _ema_pair()
    # all-reduced statistics: both ranks equal one process that sees both batches at once
    single = EMAVectorQuantizer(dim=3, codebook_size=6, decay=0.8, init_codebook=init, channel_first=False)
    for _ in range(3):
        single(batches.reshape(-1, 3))
    a, b = result["plain"]
    torch.testing.assert_close(a, single.codebook)
    torch.testing.assert_close(b, single.codebook)
    # dead-code replacements come from rank 0's batch and are identical on both ranks
    a, b = result["reset"]
    assert torch.equal(a, b)
    rank0_rows = {tuple(r) for r in batches[0].tolist()}
    replaced = [tuple(r) for r in a.tolist() if tuple(r) in rank0_rows]
    assert len(replaced) >= 1


# ----- factorized VQ -----------------------------------------------------------------------------
def test_factorized_search_is_cosine_in_low_dim_space():
    torch.manual_seed(5)
    q = FactorizedVectorQuantizer(dim=16, codebook_size=64, codebook_dim=4, channel_first=False)
    z = torch.randn(50, 16)
    out = q(z)
    # independent reference: highest cosine similarity between projected tokens and raw codes
    projected = z @ q.project_in.weight.t() + q.project_in.bias
    cos = F.cosine_similarity(projected.unsqueeze(1), q.embedding.weight.unsqueeze(0), dim=-1)
    assert torch.equal(out.indices, cos.argmax(dim=1))
    codes = F.normalize(q.embedding.weight, dim=-1) @ q.project_out.weight.t() + q.project_out.bias
    torch.testing.assert_close(q.codebook, codes)
    assert q.codebook.shape == (64, 16)
    out.loss.backward()
    assert q.embedding.weight.grad.abs().sum() > 0 and q.project_in.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="codebook_dim"):
        FactorizedVectorQuantizer(dim=16, codebook_size=64, codebook_dim=0)


# ----- VQGAN-LC ----------------------------------------------------------------------------------
def test_lc_frozen_features_and_trained_projector():
    torch.manual_seed(6)
    feats = torch.randn(20, 7)
    q = LCVectorQuantizer(dim=5, init_features=feats, channel_first=False)
    assert q.codebook_size == 20 and q.feature_dim == 7
    assert torch.equal(q.embedding.weight, feats) and not q.embedding.weight.requires_grad
    torch.testing.assert_close(q.codebook, feats @ q.embedding_proj.weight.t() + q.embedding_proj.bias)
    z = torch.randn(30, 5)
    out = q(z)
    dist = torch.cdist(z, q.codebook.detach())
    assert torch.equal(out.indices, dist.argmin(dim=1))
    out.loss.backward()
    assert q.embedding_proj.weight.grad.abs().sum() > 0 and q.embedding.weight.grad is None
    # official loss weights: 1.0 * commitment + 0.33 * codebook
    torch.testing.assert_close(out.loss, 1.0 * out.commitment_loss + 0.33 * out.codebook_loss)
    assert LCVectorQuantizer(dim=5, codebook_size=9).frozen_codebook.shape == (9, 5)  # random fallback
    big = LCVectorQuantizer(dim=400, codebook_size=4, feature_dim=300)
    assert abs(float(big.embedding_proj.weight.detach().std()) - 400**-0.5) < 0.002  # official projector init
    with pytest.raises(ValueError, match="does not match"):
        LCVectorQuantizer(dim=5, codebook_size=10, init_features=feats)
    with pytest.raises(ValueError, match="codebook_size or init_features"):
        LCVectorQuantizer(dim=5)
    with pytest.raises(ValueError, match="init_features"):
        LCVectorQuantizer(dim=5, init_features=torch.randn(20))


def test_kmeans_init_matches_sklearn_on_blobs():
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(8)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = (centers.repeat_interleave(50, 0) + 0.5 * torch.randn(200, 2, generator=g))
    ours = kmeans_init(x, 4, iters=20, seed=0)
    ref = torch.tensor(KMeans(4, n_init=5, random_state=0).fit(x.numpy()).cluster_centers_, dtype=torch.float32)

    def inertia(c):
        return float(torch.cdist(x, c).pow(2).min(1).values.sum())

    assert inertia(ours) <= inertia(ref) * 1.001
    order = lambda c: c[torch.argsort(c[:, 0] * 100 + c[:, 1])]  # noqa: E731
    torch.testing.assert_close(order(ours), order(ref), atol=1e-4, rtol=0)
    assert inertia(ours) <= inertia(kmeans_init(x, 4, iters=0, seed=0))
    # random seeding converges too, to a local minimum no better than k-means++
    rand = kmeans_init(x, 4, iters=20, seed=0, init="random")
    assert inertia(rand) <= inertia(kmeans_init(x, 4, iters=0, seed=0, init="random"))
    assert inertia(rand) >= inertia(ref) * 0.999
    assert torch.equal(kmeans_init(x, 4, iters=3, seed=1), kmeans_init(x, 4, iters=3, seed=1))
    # duplicated points force an empty cluster, which is re-seeded instead of becoming NaN
    dup = torch.cat([torch.zeros(6, 2), torch.ones(1, 2)])
    assert torch.isfinite(kmeans_init(dup, 3, iters=4, seed=0)).all()
    with pytest.raises(ValueError, match="at least k=5"):
        kmeans_init(torch.randn(3, 2), 5)
    with pytest.raises(ValueError, match="iters"):
        kmeans_init(torch.randn(8, 2), 2, iters=-1)
    with pytest.raises(ValueError, match="init must be one of"):
        kmeans_init(torch.randn(8, 2), 2, init="forgy")


# ----- residual ----------------------------------------------------------------------------------
def test_residual_reduces_error_and_sums_levels():
    torch.manual_seed(9)
    z = torch.randn(256, 8)
    q = ResidualQuantizer(num_quantizers=3, quantizer="ema_vq", dim=8, codebook_size=16, channel_first=False)
    for _ in range(15):  # EMA updates act as online k-means on each level
        q(z)
    q.eval()
    q.usage.reset()
    for level in q.levels:
        level.usage.reset()
    out = q(z)
    assert out.indices.shape == (256, 3)
    first = q.levels[0].codes_from_indices(out.indices[:, 0])
    err_first = float((z - first).pow(2).mean())
    err_all = float((z - out.quantized).pow(2).mean())
    assert err_all < 0.8 * err_first
    # naive re-computation: each level quantizes the previous residual; loss parts are summed
    residual, total_loss, total_commit = z, 0.0, 0.0
    for i, level in enumerate(q.levels):
        res = level(residual)
        assert torch.equal(res.indices, out.indices[:, i])
        total_loss += float(res.loss)
        total_commit += float(res.commitment_loss)
        residual = residual - res.quantized
    assert abs(float(out.loss) - total_loss) < 1e-5 and abs(float(out.commitment_loss) - total_commit) < 1e-5
    torch.testing.assert_close(q.decode_indices(out.indices), out.quantized, atol=1e-5, rtol=1e-5)
    assert q.codebook.shape == (3, 16, 8)
    # usage: the stack counts level 0 only; each level counts its own (the naive loop above added one more)
    torch.testing.assert_close(q.usage.counts, torch.bincount(out.indices[:, 0], minlength=16))
    assert int(q.levels[2].usage.counts.sum()) == 2 * 256


def test_residual_gradient_is_level_zero_straight_through():
    q = ResidualQuantizer(quantizers=[VectorQuantizer(dim=4, codebook_size=8) for _ in range(2)], channel_first=False)
    z = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(6, 4)
    (q(z).quantized * w).sum().backward()
    torch.testing.assert_close(z.grad, w)


def test_residual_invalid_arguments():
    with pytest.raises(ValueError, match="same dim and codebook_size"):
        ResidualQuantizer(quantizers=[VectorQuantizer(dim=4, codebook_size=k) for k in (8, 16)])
    with pytest.raises(TypeError, match="both quantizers and level keywords"):
        ResidualQuantizer(quantizers=[VectorQuantizer(dim=4, codebook_size=8)], codebook_size=8)
    with pytest.raises(ValueError, match="num_quantizers"):
        ResidualQuantizer(quantizer="vq", dim=4, codebook_size=8)
    with pytest.raises(ValueError, match="num_quantizers=3"):
        ResidualQuantizer(quantizers=[VectorQuantizer(dim=4, codebook_size=8)], num_quantizers=3)
    with pytest.raises(ValueError, match="nested"):
        ResidualQuantizer(num_quantizers=2, quantizer="residual", dim=4, codebook_size=8)
    with pytest.raises(ValueError, match="indices must end with a dimension of 2"):
        stack = ResidualQuantizer(num_quantizers=2, quantizer="vq", dim=4, codebook_size=8)
        stack.decode_indices(torch.zeros(3, dtype=torch.long))
