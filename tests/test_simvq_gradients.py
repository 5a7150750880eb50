"""SimVQ's forward value and gradients (to the tokens, the transform and a learnable C) against the loss written
out by hand in float64, with fewer tokens than codes and with more.
"""

from __future__ import annotations

import pytest
import torch

from simvq import SimVQ
from simvq.quantizers.base import gather_rows


@pytest.mark.parametrize("num_tokens", [8, 64])  # K = 16: fewer tokens than codes, then more
@pytest.mark.parametrize("learnable_codebook", [False, True])
def test_gradients_equal_the_float64_reference(num_tokens, learnable_codebook):
    torch.manual_seed(0)
    q = SimVQ(dim=6, codebook_size=16, channel_first=False, commitment_weight=0.3, codebook_weight=0.9,
              learnable_codebook=learnable_codebook)
    z = torch.randn(num_tokens, 6, requires_grad=True)
    weights = torch.randn(num_tokens, 6)
    out = q(z)
    ((out.quantized * weights).sum() + out.loss).backward()

    # reference: codes (C W^T + b) in float64, the token's nearest code by explicit distances, the loss by hand
    C = q.embedding.weight.detach().double().requires_grad_(learnable_codebook)
    W = q.embedding_proj.weight.detach().double().requires_grad_()
    b = q.embedding_proj.bias.detach().double().requires_grad_()
    zd = z.detach().double().requires_grad_()
    codes = C @ W.t() + b
    idx = ((zd.detach()[:, None] - codes.detach()[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(out.indices, idx)
    sel = codes[idx]
    n = sel.numel()
    commitment = ((zd - sel.detach()) ** 2).sum() / n
    codebook = ((zd.detach() - sel) ** 2).sum() / n
    straight = sel.detach() + (zd - zd.detach())
    ((straight * weights.double()).sum() + 0.3 * commitment + 0.9 * codebook).backward()

    assert torch.allclose(out.quantized.double(), sel.detach(), atol=1e-6)
    assert torch.allclose(q.embedding_proj.weight.grad.double(), W.grad, atol=1e-5)
    assert torch.allclose(q.embedding_proj.bias.grad.double(), b.grad, atol=1e-5)
    assert torch.allclose(z.grad.double(), zd.grad, atol=1e-6)
    if learnable_codebook:
        assert torch.allclose(q.embedding.weight.grad.double(), C.grad, atol=1e-5)
    else:
        assert q.embedding.weight.grad is None


def test_no_grad_keeps_the_codes_and_builds_no_graph():
    torch.manual_seed(1)
    q = SimVQ(dim=4, codebook_size=8, channel_first=False)
    z = torch.randn(32, 4)
    with torch.no_grad():
        out = q(z)
    assert not out.quantized.requires_grad
    assert torch.equal(out.quantized, q.codes_from_indices(out.indices).detach())


@pytest.mark.parametrize("num_tokens", [8, 64])  # K = 16: selected rows transformed, then the whole codebook
def test_decoding_the_forward_indices_gives_its_codes_bit_for_bit(num_tokens):
    torch.manual_seed(3)
    q = SimVQ(dim=6, codebook_size=16, channel_first=False)
    out = q(torch.randn(2, num_tokens // 2, 6))
    assert torch.equal(q.decode_indices(out.indices), out.quantized)


@pytest.mark.parametrize("shape", [(50,), (5, 7)])
def test_gather_rows_backward_equals_indexing(shape):
    # the CPU backward accumulates with index_add_; repeated and unused rows, indices of any shape
    g = torch.Generator().manual_seed(4)
    table = torch.randn(9, 3, dtype=torch.float64, generator=g, requires_grad=True)
    indices = torch.randint(9, shape, generator=g)
    weights = torch.randn(*shape, 3, dtype=torch.float64, generator=g)
    (gather_rows(table, indices) * weights).sum().backward()
    expected = torch.zeros(9, 3, dtype=torch.float64)
    for i, w in zip(indices.reshape(-1).tolist(), weights.reshape(-1, 3)):
        expected[i] += w  # by hand, row by row
    assert torch.equal(gather_rows(table, indices), table[indices])
    assert torch.allclose(table.grad, expected, rtol=0, atol=1e-12)


def test_gather_rows_twice_differentiable():
    # a penalty on the gradient (create_graph=True) differentiates through the gather's backward
    g = torch.Generator().manual_seed(5)
    table = torch.randn(6, 2, dtype=torch.float64, generator=g, requires_grad=True)
    indices = torch.tensor([0, 3, 3, 5])
    weights = torch.randn(4, 2, dtype=torch.float64, generator=g)

    def penalty(gather):
        (grad,) = torch.autograd.grad((gather(table, indices) ** 2 * weights).sum(), table, create_graph=True)
        return grad.pow(2).sum()

    penalty(gather_rows).backward()
    ours = table.grad.clone()
    table.grad = None
    penalty(lambda t, i: t[i]).backward()  # autograd's own indexing as the reference
    assert torch.allclose(ours, table.grad, rtol=0, atol=1e-12)
