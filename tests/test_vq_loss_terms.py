"""``vq_loss_terms``: the two VQ-VAE terms computed from one difference, against a float64 hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from simvq.quantizers import vq_loss_terms


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_values_and_gradients_equal_the_float64_formulas(dtype):
    g = torch.Generator().manual_seed(0)
    z0, q0 = torch.randn(23, 6, generator=g), torch.randn(23, 6, generator=g)
    z = z0.to(dtype).requires_grad_()
    q = q0.to(dtype).requires_grad_()
    commitment, codebook = vq_loss_terms(z, q)
    assert commitment.dtype == codebook.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    (0.25 * commitment + 0.7 * codebook).backward()
    # hand formulas in float64 on the same (rounded) inputs: value mean((z - q)^2); d/dz of 0.25 * commitment is
    # 0.25 * 2 (z - q) / n, d/dq of 0.7 * codebook is -0.7 * 2 (z - q) / n; no cross terms (stop-gradients)
    zd, qd = z.detach().double(), q.detach().double()
    diff = zd - qd
    n = diff.numel()
    value = float((diff * diff).sum()) / n
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert math.isclose(commitment.item(), value, rel_tol=tol) and math.isclose(codebook.item(), value, rel_tol=tol)
    assert torch.allclose(z.grad.double(), 0.25 * 2 * diff / n, rtol=tol if dtype != torch.bfloat16 else 1e-2, atol=0)
    assert torch.allclose(q.grad.double(), -0.7 * 2 * diff / n, rtol=tol if dtype != torch.bfloat16 else 1e-2, atol=0)


def test_each_term_reaches_only_its_own_input():
    z = torch.randn(8, 3, requires_grad=True)
    q = torch.randn(8, 3, requires_grad=True)
    commitment, _ = vq_loss_terms(z, q)
    commitment.backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0
    assert q.grad is None or float(q.grad.abs().sum()) == 0
    z.grad, q.grad = None, None
    _, codebook = vq_loss_terms(z, q)
    codebook.backward()
    assert z.grad is None or float(z.grad.abs().sum()) == 0
    assert float(q.grad.abs().sum()) > 0


def test_a_constant_code_gets_no_gradient_and_no_tokens_give_nan():
    z = torch.randn(5, 4, requires_grad=True)
    buffer = torch.randn(5, 4)  # an EMA codebook's rows: no gradient wanted
    commitment, codebook = vq_loss_terms(z, buffer)
    (commitment + codebook).backward()
    assert torch.allclose(z.grad, 2 * (z.detach() - buffer) / 20)
    empty = torch.zeros(0, 4, requires_grad=True)
    c, k = vq_loss_terms(empty, empty.detach())
    assert math.isnan(c.item()) and math.isnan(k.item())
