"""SimVQ: hand-computed values, gradients against analytic and official-formulation references, layouts,
state dicts, transforms, compile, errors and a large-K memory bound."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from simvq import SimVQ
from simvq.quantizers.vq import VectorQuantizer


def hand_set_quantizer(**kwargs) -> SimVQ:
    """2-D SimVQ with K=3: C = [[1,0],[0,1],[1,1]], W = diag(2, 1), b = (0, 1).

    Effective codes C W^T + b:
        c0 = (2*1, 1*0) + (0,1) = (2, 1)
        c1 = (2*0, 1*1) + (0,1) = (0, 2)
        c2 = (2*1, 1*1) + (0,1) = (2, 2)
    """
    q = SimVQ(dim=2, codebook_size=3, channel_first=False, **kwargs)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        q.embedding_proj.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        q.embedding_proj.bias.copy_(torch.tensor([0.0, 1.0]))
    return q


# three tokens, squared distances to (c0, c1, c2):
#   z0 = (2, 0.8): (0 + 0.04, 4 + 1.44, 0 + 1.44) = (0.04, 5.44, 1.44) -> 0
#   z1 = (0.5, 2): (2.25 + 1, 0.25 + 0, 2.25 + 0) = (3.25, 0.25, 2.25) -> 1
#   z2 = (2, 2.5): (0 + 2.25, 4 + 0.25, 0 + 0.25) = (2.25, 4.25, 0.25) -> 2
HAND_Z = torch.tensor([[[2.0, 0.8], [0.5, 2.0], [2.0, 2.5]]])
HAND_CODES = torch.tensor([[[2.0, 1.0], [0.0, 2.0], [2.0, 2.0]]])


def test_hand_computed_indices_and_losses():
    q = hand_set_quantizer()
    out = q(HAND_Z)
    assert out.indices.tolist() == [[0, 1, 2]]
    torch.testing.assert_close(out.quantized, HAND_CODES)
    # z - q = (0, -0.2), (0.5, 0), (0, 0.5): squared sum 0.04 + 0.25 + 0.25 = 0.54 over 6 entries = 0.09
    torch.testing.assert_close(out.commitment_loss, torch.tensor(0.09))
    torch.testing.assert_close(out.codebook_loss, torch.tensor(0.09))
    # 0.25 * 0.09 + 1.0 * 0.09 = 0.1125
    torch.testing.assert_close(out.loss, torch.tensor(0.1125))
    assert float(out.aux_loss) == 0.0
    torch.testing.assert_close(q.codebook, HAND_CODES[0])
    # custom weights: 2 * 0.09 + 3 * 0.09 = 0.45
    q2 = hand_set_quantizer(commitment_weight=2.0, codebook_weight=3.0)
    torch.testing.assert_close(q2(HAND_Z).loss, torch.tensor(0.45))
    # usage counted once per token
    assert q.usage.compute().counts.tolist() == [1, 1, 1]


def test_hand_computed_gradients():
    """Analytic gradients of L = sum(G * quantized) + loss for the hand-set case.

    M = 6 entries. Straight-through: d/dz sum(G * quantized) = G. Commitment 0.25 * mean((z - sg q)^2)
    gives 0.25 * 2 (z - q) / M to z. Codebook 1.0 * mean((sg z - q)^2) gives dq = 2 (q - z) / M, hence
    dW = sum_n dq_n c_n^T over the selected frozen rows c_n, db = sum_n dq_n; C gets nothing.
    """
    q = hand_set_quantizer()
    z = HAND_Z.clone().requires_grad_(True)
    out = q(z)
    g = torch.tensor([[[1.0, -2.0], [0.5, 3.0], [-1.0, 0.25]]])
    ((out.quantized * g).sum() + out.loss).backward()

    diff = HAND_Z[0] - HAND_CODES[0]  # (0, -0.2), (0.5, 0), (0, 0.5)
    expected_dz = g[0] + 0.25 * 2 * diff / 6
    torch.testing.assert_close(z.grad[0], expected_dz)
    dq = 2 * (HAND_CODES[0] - HAND_Z[0]) / 6
    frozen_rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(q.embedding_proj.weight.grad, dq.t() @ frozen_rows)
    torch.testing.assert_close(q.embedding_proj.bias.grad, dq.sum(0))
    assert q.embedding.weight.requires_grad is False
    assert q.embedding.weight.grad is None


def _random_case(seed=0, **kwargs):
    torch.manual_seed(seed)
    q = SimVQ(dim=8, codebook_size=64, **kwargs)
    z = torch.randn(2, 8, 5, 3)
    return q, z


def test_transform_gets_gradient_only_from_codebook_term():
    q, z = _random_case()
    q.commitment_weight, q.codebook_weight = 0.0, 1.0
    q(z).loss.backward()
    w_from_codebook = q.embedding_proj.weight.grad.clone()
    b_from_codebook = q.embedding_proj.bias.grad.clone()
    assert w_from_codebook.abs().sum() > 0

    q.zero_grad(set_to_none=True)
    q.commitment_weight, q.codebook_weight = 1.0, 0.0
    zz = z.clone().requires_grad_(True)
    out = q(zz)
    (out.loss + out.quantized.sum()).backward()  # straight-through path must not reach W either
    assert q.embedding_proj.weight.grad is None or torch.count_nonzero(q.embedding_proj.weight.grad) == 0
    assert q.embedding_proj.bias.grad is None or torch.count_nonzero(q.embedding_proj.bias.grad) == 0

    q.zero_grad(set_to_none=True)
    q.commitment_weight, q.codebook_weight = 0.25, 1.0
    q(z).loss.backward()
    torch.testing.assert_close(q.embedding_proj.weight.grad, w_from_codebook)
    torch.testing.assert_close(q.embedding_proj.bias.grad, b_from_codebook)
    assert q.embedding.weight.grad is None


def test_input_gradient_is_commitment_plus_straight_through():
    q, z = _random_case(seed=1)
    z = z.requires_grad_(True)
    out = q(z)
    g = torch.randn_like(z)
    ((out.quantized * g).sum() + out.loss).backward()
    codes = q.decode_indices(out.indices).detach()
    expected = g + 0.25 * 2 * (z.detach() - codes) / z.numel()
    torch.testing.assert_close(z.grad, expected)

    # the codebook term sends nothing to the input
    z2 = z.detach().clone().requires_grad_(True)
    q.commitment_weight = 0.0
    q(z2).loss.backward()
    assert torch.count_nonzero(z2.grad) == 0


def test_learnable_codebook_gets_gradient():
    q, z = _random_case(learnable_codebook=True)
    assert q.embedding.weight.requires_grad
    out = q(z)
    out.loss.backward()
    grad = q.embedding.weight.grad
    assert grad is not None
    used = torch.unique(out.indices)
    assert grad[used].abs().sum() > 0
    unused = torch.ones(64, dtype=torch.bool)
    unused[used] = False
    assert torch.count_nonzero(grad[unused]) == 0


def official_forward(C, W, b, z, beta=0.25):
    """The official SimVQ forward written naively: full effective codebook with gradient, full distances."""
    quant_codebook = torch.nn.functional.linear(C, W, b)  # (K, d), differentiable in W, b
    d = z.pow(2).sum(1, keepdim=True) + quant_codebook.pow(2).sum(1) - 2 * z @ quant_codebook.t()
    idx = d.argmin(1)
    z_q = quant_codebook[idx]
    loss = beta * torch.mean((z_q.detach() - z) ** 2) + torch.mean((z_q - z.detach()) ** 2)
    z_q = z + (z_q - z).detach()
    return z_q, idx, loss


def test_gradients_equal_official_formulation():
    torch.manual_seed(7)
    q = SimVQ(dim=16, codebook_size=200, channel_first=False)
    z = torch.randn(4, 25, 16)
    g = torch.randn(4, 25, 16)

    z_ours = z.clone().requires_grad_(True)
    out = q(z_ours)
    ((out.quantized * g).sum() + out.loss).backward()

    W = q.embedding_proj.weight.detach().clone().requires_grad_(True)
    b = q.embedding_proj.bias.detach().clone().requires_grad_(True)
    z_ref = z.reshape(-1, 16).clone().requires_grad_(True)
    zq_ref, idx_ref, loss_ref = official_forward(q.embedding.weight.detach(), W, b, z_ref)
    ((zq_ref * g.reshape(-1, 16)).sum() + loss_ref).backward()

    assert torch.equal(out.indices.reshape(-1), idx_ref)
    torch.testing.assert_close(out.quantized.reshape(-1, 16), zq_ref.detach())
    torch.testing.assert_close(out.loss, loss_ref.detach())
    torch.testing.assert_close(q.embedding_proj.weight.grad, W.grad)
    torch.testing.assert_close(q.embedding_proj.bias.grad, b.grad)
    torch.testing.assert_close(z_ours.grad.reshape(-1, 16), z_ref.grad)


@pytest.mark.parametrize("channel_first", [True, False])
@pytest.mark.parametrize("spatial", [(7,), (3, 4), (2, 3, 2)])
def test_decode_indices_equals_quantized(channel_first, spatial):
    torch.manual_seed(2)
    q = SimVQ(dim=6, codebook_size=32, channel_first=channel_first)
    shape = (2, 6, *spatial) if channel_first else (2, *spatial, 6)
    z = torch.randn(shape)
    out = q(z)
    assert out.quantized.shape == z.shape
    assert out.indices.shape == (2, *spatial) and out.indices.dtype == torch.long
    # exact: the straight-through output carries the code values bit for bit
    assert torch.equal(q.decode_indices(out.indices), out.quantized)
    # the indices address the tokens in the input layout: check one by hand against the codebook
    last = tuple(s - 1 for s in spatial)
    token = z[(1, slice(None), *last)] if channel_first else z[(1, *last, slice(None))]
    nearest = (q.codebook.detach() - token).pow(2).sum(1).argmin()
    assert int(out.indices[(1, *[s - 1 for s in spatial])]) == int(nearest)


def test_fold_gives_same_indices_and_codes():
    q, z = _random_case(seed=3)
    out = q(z)
    folded = q.fold()
    assert isinstance(folded, VectorQuantizer)
    assert not folded.embedding.weight.requires_grad
    f_out = folded(z)
    assert torch.equal(f_out.indices, out.indices)
    torch.testing.assert_close(f_out.quantized, out.quantized)
    torch.testing.assert_close(folded.decode_indices(out.indices), q.decode_indices(out.indices))


def test_cosine_codes_hand_computed():
    # hand-set codes (2, 1), (0, 2), (2, 2) at 26.6, 90 and 45 degrees; a fourth token z3 = (4, 2.2) at 28.8
    # degrees is nearest to c2 in plain L2 (4.04 against 5.44) but to c0 in angle (2.2 against 16.2 degrees)
    z = torch.cat([HAND_Z, torch.tensor([[[4.0, 2.2]]])], dim=1)
    assert hand_set_quantizer()(z).indices.tolist() == [[0, 1, 2, 2]]
    q = hand_set_quantizer(l2_normalize=True)
    z.requires_grad_(True)
    out = q(z)
    assert out.indices.tolist() == [[0, 1, 2, 0]]
    # float64 reference written out: unit tokens, unit codes, both loss terms on the unit vectors
    z64 = z.detach().double().requires_grad_(True)
    codes = HAND_CODES[0].double()
    codes = codes / codes.norm(dim=-1, keepdim=True)
    zn = z64 / z64.norm(dim=-1, keepdim=True)
    ref_q = codes[[0, 1, 2, 0]][None]
    ref_mse = ((zn - ref_q) ** 2).mean()
    torch.testing.assert_close(out.quantized.double(), ref_q, rtol=0, atol=1e-7)
    torch.testing.assert_close(out.commitment_loss.double(), ref_mse, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.codebook_loss.double(), ref_mse, rtol=1e-6, atol=0)
    torch.testing.assert_close(q.codebook.double(), codes, rtol=0, atol=1e-7)
    torch.testing.assert_close(q.decode_indices(out.indices).double(), ref_q, rtol=0, atol=1e-7)
    # the input's gradient: straight-through onto the unit token, then back through the normalisation
    weights = torch.arange(8, dtype=torch.float32).reshape(1, 4, 2)
    ((out.quantized * weights).sum() + out.loss).backward()
    ref_out = zn + (ref_q - zn).detach()
    ((ref_out * weights.double()).sum() + 0.25 * ((zn - ref_q.detach()) ** 2).mean()).backward()
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-5, atol=1e-6)


def test_cosine_codes_fold_bit_for_bit():
    q, z = _random_case(seed=4, l2_normalize=True)
    with torch.no_grad():
        q.embedding_proj.weight.mul_(3.0)  # codes far from unit length before the normalisation
    out = q(z)
    assert torch.allclose(q.codebook.norm(dim=-1), torch.ones(64))
    folded = q.fold()
    assert folded.l2_normalize
    f_out = folded(z)
    assert torch.equal(f_out.indices, out.indices) and torch.equal(f_out.quantized, out.quantized)
    assert torch.equal(folded.codebook, q.codebook)
    assert "l2_normalize=True" in repr(q) and "l2_normalize" not in repr(SimVQ(dim=4, codebook_size=8))


def test_state_dict_round_trip():
    q, z = _random_case(seed=4)
    q(z)
    q2 = SimVQ(dim=8, codebook_size=64)
    q2.load_state_dict(q.state_dict(), strict=True)
    out, out2 = q(z), q2(z)
    assert torch.equal(out.indices, out2.indices)
    torch.testing.assert_close(out.quantized, out2.quantized)
    assert torch.equal(q2.embedding.weight, q.embedding.weight)
    # usage counts travel with the state dict: q counted two forwards; q2 loaded one and counted one
    assert int(q.usage.counts.sum()) == 2 * z.numel() // 8
    assert torch.equal(q2.usage.counts, q.usage.counts)


def test_loads_official_keys_strict():
    torch.manual_seed(5)
    official = {
        "embedding.weight": torch.randn(64, 8) * 8**-0.5,
        "embedding_proj.weight": torch.randn(8, 8),
        "embedding_proj.bias": torch.randn(8),
    }
    q = SimVQ(dim=8, codebook_size=64)
    q.load_state_dict(official, strict=True)
    expected = official["embedding.weight"] @ official["embedding_proj.weight"].t() + official["embedding_proj.bias"]
    torch.testing.assert_close(q.codebook, expected)
    assert set(official) <= set(q.state_dict())
    assert int(q.usage.counts.sum()) == 0


def test_mlp_transform():
    torch.manual_seed(6)
    q = SimVQ(dim=8, codebook_size=40, transform="mlp", hidden_dim=12, channel_first=False)
    lin1, act, lin2 = q.embedding_proj
    assert (lin1.in_features, lin1.out_features, lin2.out_features) == (8, 12, 8)
    expected = lin2(torch.nn.functional.gelu(lin1(q.embedding.weight)))
    torch.testing.assert_close(q.codebook, expected)
    z = torch.randn(3, 10, 8)
    out = q(z)
    ref_idx = torch.cdist(z.reshape(-1, 8).double(), expected.detach().double()).argmin(1)
    assert torch.equal(out.indices.reshape(-1), ref_idx)
    out.loss.backward()
    assert lin1.weight.grad.abs().sum() > 0 and lin2.weight.grad.abs().sum() > 0
    assert SimVQ(dim=8, codebook_size=4, transform="mlp").embedding_proj[0].out_features == 32


class Scale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), 3.0))

    def forward(self, x):
        return x * self.scale


def test_custom_module_transform():
    q = SimVQ(dim=4, codebook_size=10, transform=Scale(4), channel_first=False)
    torch.testing.assert_close(q.codebook, q.embedding.weight * 3.0)
    out = q(torch.randn(2, 5, 4))
    out.loss.backward()
    assert q.embedding_proj.scale.grad.abs().sum() > 0
    assert "embedding_proj.scale" in q.state_dict()

    class Bad(nn.Module):
        def forward(self, x):
            return x[:, :2]

    with pytest.raises(ValueError, match="transform must map"):
        SimVQ(dim=4, codebook_size=10, transform=Bad(), channel_first=False)(torch.randn(2, 5, 4))


def test_frozen_codebook_dim_differs_from_dim():
    torch.manual_seed(8)
    q = SimVQ(dim=6, codebook_size=30, frozen_codebook_dim=3, channel_first=False)
    assert q.frozen_codebook.shape == (30, 3)
    assert q.embedding_proj.weight.shape == (6, 3)
    assert q.codebook.shape == (30, 6)
    z = torch.randn(2, 4, 6)
    out = q(z)
    ref = torch.cdist(z.reshape(-1, 6).double(), q.codebook.detach().double()).argmin(1)
    assert torch.equal(out.indices.reshape(-1), ref)
    torch.testing.assert_close(q.decode_indices(out.indices), out.quantized)
    # std of C is frozen_codebook_dim ** -0.5
    big = SimVQ(dim=6, codebook_size=4000, frozen_codebook_dim=3)
    assert abs(float(big.frozen_codebook.std()) - 3**-0.5) < 0.02


def test_rotation_trick_value_exact_gradient_differs():
    torch.manual_seed(9)
    q_st = SimVQ(dim=8, codebook_size=16, channel_first=False)
    q_rt = SimVQ(dim=8, codebook_size=16, channel_first=False, rotation_trick=True)
    q_rt.load_state_dict(q_st.state_dict())
    z = torch.randn(3, 5, 8)
    g = torch.randn(3, 5, 8)
    grads, outs = [], []
    for q in (q_st, q_rt):
        zz = z.clone().requires_grad_(True)
        out = q(zz)
        (out.quantized * g).sum().backward()
        grads.append(zz.grad)
        outs.append(out)
    assert torch.equal(outs[1].quantized, outs[0].quantized)
    assert torch.equal(outs[1].quantized, q_rt.decode_indices(outs[1].indices))
    torch.testing.assert_close(grads[0], g)  # straight-through: identity
    assert not torch.allclose(grads[1], grads[0], atol=1e-3)
    # the rotation trick's Jacobian is (|q|/|z|) R with R orthogonal: the gradient norm per token is
    # |g| * |q| / |z|
    zn, qn = z.norm(dim=-1), outs[0].quantized.norm(dim=-1)
    torch.testing.assert_close(grads[1].norm(dim=-1), g.norm(dim=-1) * qn / zn, rtol=1e-4, atol=1e-5)
    # explicit Jacobian in float64 (Fifty et al. 2024): J = (|q|/|z|) (I - 2 w w^T + 2 v u^T) with
    # u = z/|z|, v = q/|q|, w = (u + v)/|u + v|; the input gradient is J^T g
    zf, qf, gf = z.reshape(-1, 8).double(), outs[0].quantized.detach().reshape(-1, 8).double(), g.reshape(-1, 8).double()
    u = zf / zf.norm(dim=1, keepdim=True)
    v = qf / qf.norm(dim=1, keepdim=True)
    w = (u + v) / (u + v).norm(dim=1, keepdim=True)
    eye = torch.eye(8, dtype=torch.float64)
    R = eye - 2 * w[:, :, None] * w[:, None, :] + 2 * v[:, :, None] * u[:, None, :]
    torch.testing.assert_close(torch.einsum("nij,nj->ni", R, u), v)  # R maps u onto v
    J = (qf.norm(dim=1) / zf.norm(dim=1))[:, None, None] * R
    expected = torch.einsum("nij,ni->nj", J, gf)
    torch.testing.assert_close(grads[1].reshape(-1, 8).double(), expected, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_matches_fp32():
    q, z = _random_case(seed=10)
    ref = q(z)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = q(z)
    assert torch.equal(out.indices, ref.indices)
    assert out.quantized.dtype == z.dtype
    torch.testing.assert_close(out.quantized, ref.quantized)
    assert out.loss.dtype == torch.float32


def test_bf16_input_keeps_dtype():
    q, z = _random_case(seed=11)
    out = q(z.bfloat16())
    assert out.quantized.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32


def _check_compiled(backend):
    q, z = _random_case(seed=12)
    eager = q(z.clone().requires_grad_(True))
    torch._dynamo.reset()
    compiled = torch.compile(q, backend=backend)
    zc = z.clone().requires_grad_(True)
    out = compiled(zc)
    assert torch.equal(out.indices, eager.indices)
    torch.testing.assert_close(out.quantized, eager.quantized)
    torch.testing.assert_close(out.loss, eager.loss)
    out.loss.backward()
    w_grad = q.embedding_proj.weight.grad.clone()
    q.zero_grad(set_to_none=True)
    eager.loss.backward()
    torch.testing.assert_close(w_grad, q.embedding_proj.weight.grad)


def test_torch_compile_matches_eager():
    # dynamo capture + AOT autograd without code generation: checks the traced graph, a few seconds
    _check_compiled("aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    # the default backend generates C++ with gcc on CPU (~15 s on 2 cores)
    _check_compiled("inductor")


# ----- errors and edge cases -------------------------------------------------------------------------------


def test_wrong_rank_and_channels():
    q = SimVQ(dim=8, codebook_size=4)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        q(torch.randn(8))
    with pytest.raises(ValueError, match=r"expects 8 channels.*with 5 channels"):
        q(torch.randn(2, 5, 3))
    q_last = SimVQ(dim=8, codebook_size=4, channel_first=False)
    with pytest.raises(ValueError, match=r"expects 8 channels.*with 3 channels on axis -1"):
        q_last(torch.randn(2, 8, 3))


def test_integer_input_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        SimVQ(dim=2, codebook_size=4)(torch.ones(2, 2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        SimVQ(dim=2, codebook_size=4)([[1.0, 2.0]])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input(bad):
    q = SimVQ(dim=2, codebook_size=4)
    z = torch.randn(2, 2, 3)
    z[1, 0, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf.*check_finite=False"):
        q(z)
    unchecked = SimVQ(dim=2, codebook_size=4, check_finite=False)
    out = unchecked(z)  # opt-out: no error, the finite tokens still quantize
    assert out.indices.shape == (2, 3)


def test_decode_indices_errors():
    q = SimVQ(dim=2, codebook_size=4)
    with pytest.raises(ValueError, match=r"\[0, 4\).*\[0, 4\]"):
        q.decode_indices(torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match=r"\[0, 4\).*\[-1, 2\]"):
        q.decode_indices(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="integer"):
        q.decode_indices(torch.tensor([[0.0, 1.0]]))
    assert q.decode_indices(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 2, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=0, codebook_size=4), "dim must be a positive integer"),
        (dict(dim=-3, codebook_size=4), "dim must be a positive integer"),
        (dict(dim=2.5, codebook_size=4), "dim must be a positive integer"),
        (dict(dim=4, codebook_size=0), "codebook_size must be a positive integer"),
        (dict(dim=4, codebook_size=8, transform="conv"), r"transform must be one of \('linear', 'mlp'\)"),
        (dict(dim=4, codebook_size=8, commitment_weight=-0.1), "commitment_weight must be a finite number >= 0"),
        (dict(dim=4, codebook_size=8, codebook_weight=-1), "codebook_weight must be a finite number >= 0"),
        (dict(dim=4, codebook_size=8, codebook_weight=float("nan")), "codebook_weight"),
        (dict(dim=4, codebook_size=8, commitment_weight=float("inf")), "commitment_weight"),
        (dict(dim=4, codebook_size=8, frozen_codebook_dim=0), "frozen_codebook_dim"),
        (dict(dim=4, codebook_size=8, frozen_codebook_dim=True), "frozen_codebook_dim"),
        (dict(dim=4, codebook_size=8, transform="mlp", hidden_dim=True), "hidden_dim"),
        (dict(dim=4, codebook_size=8, transform="mlp", hidden_dim=0), "hidden_dim"),
        (dict(dim=4, codebook_size=8, search_chunk_elements=0), "search_chunk_elements"),
    ],
)
def test_invalid_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimVQ(**kwargs)


def test_constructor_is_keyword_only():
    with pytest.raises(TypeError):
        SimVQ(4, 8)


@pytest.mark.parametrize(
    "channel_first, shape, index_shape",
    [(True, (0, 4, 3, 3), (0, 3, 3)), (True, (2, 4, 0), (2, 0)), (False, (0, 5, 4), (0, 5)), (False, (3, 0, 4), (3, 0))],
)
def test_empty_batch(channel_first, shape, index_shape):
    q = SimVQ(dim=4, codebook_size=8, channel_first=channel_first)
    z = torch.randn(shape, requires_grad=True)
    out = q(z)
    assert out.quantized.shape == shape
    assert out.indices.shape == index_shape and out.indices.dtype == torch.long
    for loss in (out.loss, out.commitment_loss, out.codebook_loss, out.aux_loss):
        assert loss.shape == () and float(loss) == 0.0
    assert int(q.usage.counts.sum()) == 0


# ----- memory --------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from simvq import SimVQ

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

    torch.manual_seed(0)
    K, N, D = 262144, 16384, 128
    q = SimVQ(dim=D, codebook_size=K, channel_first=False)
    z = torch.randn(N, D, requires_grad=True)
    # warm the allocator and kernels on a tiny case so the baseline includes the libraries
    SimVQ(dim=D, codebook_size=16, channel_first=False)(torch.randn(4, D)).loss.backward()
    base = peak_mb()
    out = q(z)
    (out.loss + out.quantized.sum()).backward()
    assert q.embedding_proj.weight.grad is not None and z.grad is not None
    assert out.indices.shape == (N,) and int(out.indices.max()) < K
    print(peak_mb() - base)
    """
)


@pytest.mark.slow
def test_large_codebook_forward_backward_memory_is_bounded():
    """K=262,144, N=16,384, d=128: the N x K fp32 distance matrix alone is 17.2 GB; we must stay far below."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    growth_mb = float(proc.stdout.strip().splitlines()[-1])
    full_matrix_mb = 16384 * 262144 * 4 / 2**20  # 16,384 MiB
    # C (128 MiB) + effective codebook (128 MiB) + search buffer (128 MiB) + small N x d tensors
    assert growth_mb < 1024, f"peak RSS grew by {growth_mb:.0f} MiB"
    assert growth_mb < full_matrix_mb / 16


def test_residual_stack_reports_usage_per_level():
    import math

    from simvq.quantizers import ResidualQuantizer

    torch.manual_seed(0)
    q = ResidualQuantizer(num_quantizers=3, quantizer="simvq", dim=8, codebook_size=16, channel_first=False)
    z = torch.randn(2, 300, 8)
    out = q(z)
    q(z[:, :50])  # a second batch: the tallies accumulate
    stats = q.level_usage()
    assert len(stats) == 3
    for level, st in enumerate(stats):
        # by hand from the returned indices, in float64: both batches (the second is the first 50 tokens)
        cols = torch.cat([out.indices[..., level].reshape(-1), out.indices[:, :50, level].reshape(-1)])
        counts = torch.bincount(cols, minlength=16).double()
        p = counts[counts > 0] / counts.sum()
        assert st.total == 700 and st.used_codes == int((counts > 0).sum())
        assert st.utilization == pytest.approx(int((counts > 0).sum()) / 16)
        assert st.perplexity == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-9)
    assert torch.equal(q.usage.compute().counts, stats[0].counts)  # the stack's usage is level 0's
    q.usage.reset()  # one reset clears every level, so a logging window covers the same tokens everywhere
    assert [st.total for st in q.level_usage()] == [0, 0, 0]
