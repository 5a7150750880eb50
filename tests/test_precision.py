"""Every quantizer under every trainer precision: 16-mixed, bf16-mixed, bf16-true, 32, 64-true.

Each case runs forward and backward and checks: ``quantized`` in the input's dtype, int64 indices, finite
gradients on the input and on exactly the parameters that should train, and indices equal to a float64
reference (a float64 copy of the same, exactly cast, weights on the same, exactly cast, input; for the
codebook families also an explicit float64 argmin over the effective codebook).
"""

from __future__ import annotations

import copy

import pytest
import torch

from simvq.quantizers import QUANTIZERS, EMAVectorQuantizer, SimVQ, VectorQuantizer, build_quantizer

DIM, K = 16, 64

# name -> (registry name, keywords, nearest-code family, parameters that must be frozen)
CASES = {
    "simvq": ("simvq", {}, True, {"embedding.weight"}),
    "simvq_mlp": ("simvq", {"transform": "mlp", "hidden_dim": 32}, True, {"embedding.weight"}),
    "simvq_learnable": ("simvq", {"learnable_codebook": True}, True, set()),
    "vq": ("vq", {"init_codebook": None}, True, set()),
    "ema_vq": ("ema_vq", {}, True, set()),
    "factorized_vq": ("factorized_vq", {"codebook_dim": 4}, False, set()),
    "lc_vq": ("lc_vq", {"feature_dim": 24}, True, {"embedding.weight"}),
    "fsq": ("fsq", {"levels": [4, 3, 5]}, False, set()),
    "lfq": ("lfq", {"codebook_size": 2**6, "entropy_weight": 0.1}, False, set()),
    "residual": ("residual", {"num_quantizers": 3, "quantizer": "simvq"}, False, {"embedding.weight"}),
    "ibq": ("ibq", {}, False, set()),
}

# name -> (autocast dtype or None, module dtype, input dtype)
PRECISIONS = {
    "16-mixed": (torch.float16, torch.float32, torch.float16),
    "bf16-mixed": (torch.bfloat16, torch.float32, torch.bfloat16),
    "bf16-true": (None, torch.bfloat16, torch.bfloat16),
    "32": (None, torch.float32, torch.float32),
    "64-true": (None, torch.float64, torch.float64),
}


def _autocast_supported(dtype: torch.dtype) -> bool:
    try:
        with torch.autocast(device_type="cpu", dtype=dtype):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except (RuntimeError, AssertionError):
        return False
    return True


def _build(case: str) -> torch.nn.Module:
    name, kwargs, _, _ = CASES[case]
    kwargs = dict(kwargs)
    torch.manual_seed(0)
    if name == "vq":  # well-separated codes (the default uniform(-1/K, 1/K) start is a tight ball)
        kwargs["init_codebook"] = torch.randn(K, DIM)
    if name not in ("fsq", "lfq"):
        kwargs["codebook_size"] = K
    return build_quantizer(name, dim=DIM, **kwargs).train()


def _separated_tokens(module, n: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens next to codes of ``module`` (float64 codebook): returns (tokens (n, DIM), their nearest codes)."""
    codes = module.codebook.detach().double()
    pick = torch.randint(0, codes.shape[0], (n,), generator=generator)
    spacing = torch.cdist(codes, codes).add(torch.eye(len(codes), dtype=codes.dtype) * 1e9).amin()
    tokens = codes[pick] + 0.05 * spacing * torch.randn(n, DIM, generator=generator, dtype=torch.float64) / DIM**0.5
    return tokens, pick


def _fp64_argmin(tokens: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = (tokens.double()[:, None] - codes.double()[None]).pow(2).sum(-1)
    top2 = d.topk(2, dim=1, largest=False).values
    return d.argmin(1), top2[:, 1] - top2[:, 0]


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_under_every_precision(case, precision):
    autocast_dtype, module_dtype, input_dtype = PRECISIONS[precision]
    if autocast_dtype is not None and not _autocast_supported(autocast_dtype):
        pytest.skip(f"CPU autocast does not support {autocast_dtype} in this torch build")
    name, _, codebook_family, frozen = CASES[case]
    g = torch.Generator().manual_seed(1)
    q = _build(case).to(module_dtype)
    reference = copy.deepcopy(q).double()  # the same weights: bf16 / fp32 -> fp64 is exact
    if codebook_family:
        tokens, _ = _separated_tokens(reference, 4 * 5 * 6, g)
        z = tokens.reshape(4, 5 * 6, DIM).movedim(-1, 1).reshape(4, DIM, 5, 6)
    else:
        z = torch.randn(4, DIM, 5, 6, generator=g, dtype=torch.float64)
    z = z.to(input_dtype).requires_grad_(True)

    if autocast_dtype is None:
        out = q(z)
    else:
        with torch.autocast(device_type="cpu", dtype=autocast_dtype):
            out = q(z)
    (out.quantized.double().square().mean() + out.loss.double()).backward()

    assert out.quantized.dtype == input_dtype and out.quantized.shape == z.shape
    assert out.indices.dtype == torch.long and out.indices.shape == (4, 5, 6) + ((3,) if name == "residual" else ())
    assert out.loss.dtype in (torch.float32, torch.float64) and torch.isfinite(out.loss)
    assert z.grad is not None and z.grad.dtype == input_dtype and torch.isfinite(z.grad).all()
    assert z.grad.abs().sum() > 0
    # trainable parameters get finite gradients in their own dtype; frozen ones (SimVQ's C) get none
    params = dict(q.named_parameters())
    assert all(not params[p].requires_grad for p in params if p.split(".", 2)[-1] in frozen or p in frozen)
    for pname, p in params.items():
        if p.requires_grad:
            assert p.grad is not None, f"{pname} got no gradient"
            assert p.grad.dtype == module_dtype and torch.isfinite(p.grad).all(), pname
        else:
            assert p.grad is None, f"{pname} is frozen but got a gradient"
    assert any(p.requires_grad for p in params.values()) or name == "ema_vq"

    # indices against float64: the same (cast) weights and the same (cast) input, searched in float64
    with torch.no_grad():
        ref = reference.eval()(z.detach().double()).indices
    assert torch.equal(out.indices, ref)
    if codebook_family:  # and against an explicit float64 argmin over the effective codebook
        flat = z.detach().double().movedim(1, -1).reshape(-1, DIM)
        expected, gap = _fp64_argmin(flat, reference.codebook.detach())
        assert float(gap.min()) > 1e-3 * float(gap.median())  # the data really is well separated
        assert torch.equal(out.indices.reshape(-1), expected)


def test_every_registered_quantizer_is_covered():
    assert {CASES[c][0] for c in CASES} >= set(QUANTIZERS)


@pytest.mark.parametrize("mode", ["bf16-mixed", "bf16-true", "16-mixed"])
@pytest.mark.parametrize("family", ["simvq", "vq", "ema_vq"])
def test_indices_above_255_survive_16_bit_precision(family, mode):
    # vector-quantize-pytorch #114: indices carried in bf16 round to multiples of 2, 4, ... above 256;
    # here every index in [0, 4096) must come back exactly, odd ones near the top included
    autocast_dtype, module_dtype, input_dtype = PRECISIONS[mode]
    if autocast_dtype is not None and not _autocast_supported(autocast_dtype):
        pytest.skip(f"CPU autocast does not support {autocast_dtype} in this torch build")
    size = 4096
    torch.manual_seed(0)
    if family == "simvq":
        q = SimVQ(dim=DIM, codebook_size=size, channel_first=False)
    elif family == "vq":
        q = VectorQuantizer(dim=DIM, codebook_size=size, init_codebook=torch.randn(size, DIM), channel_first=False)
    else:
        q = EMAVectorQuantizer(dim=DIM, codebook_size=size, channel_first=False).eval()
    q = q.to(module_dtype)
    codes = q.codebook.detach()
    pick = torch.cat([torch.tensor([257, 1023, 2049, 3001, 4093, 4095]), torch.randint(0, size, (250,))])
    z = codes[pick].to(input_dtype)  # a token equal to its code (after the cast): that code is nearest
    expected, _ = _fp64_argmin(z.double(), codes.double())
    assert torch.equal(expected, pick)  # codes stay distinct after the cast, so the answer is `pick`
    if autocast_dtype is None:
        out = q(z.unsqueeze(0))
    else:
        with torch.autocast(device_type="cpu", dtype=autocast_dtype):
            out = q(z.unsqueeze(0))
    assert out.indices.dtype == torch.long
    assert torch.equal(out.indices[0], pick)
    assert int(out.indices.max()) > 4000 and bool((out.indices % 2 == 1).any())


def test_ema_state_stays_fp32_when_the_module_is_cast_to_bf16():
    q = EMAVectorQuantizer(dim=4, codebook_size=8, decay=0.99, channel_first=False)
    start = q.embedding.clone()
    q = q.to(torch.bfloat16)
    for name in ("embedding", "ema_cluster_size", "ema_embed_sum"):
        assert getattr(q, name).dtype == torch.float32, name
    assert torch.equal(q.embedding, start)  # not rounded through bf16 on the way
    # one EMA step by hand in float64: N_k <- 0.99 N_k + 0.01 n_k for the code every token picks
    z = start[3].repeat(10, 1)
    q(z.bfloat16().unsqueeze(0))
    expected = 0.99 * 1.0 + 0.01 * 10
    assert abs(float(q.ema_cluster_size[3]) - expected) < 1e-6  # bf16 would hold 1.09375 at best
    assert q.to(torch.float64).embedding.dtype == torch.float64  # other casts apply as usual
