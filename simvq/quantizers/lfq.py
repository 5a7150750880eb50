"""Lookup-free quantization (MAGVIT-v2, Yu et al. 2023, "Language Model Beats Diffusion", arXiv 2310.05737).

Each of ``bits = log2(K)`` channels is quantized to its sign, ``-1`` or ``+1``; the implicit codebook is the
``{-1, +1}^bits`` hypercube and the index of a code is ``sum_i 2^i [z_i > 0]`` (channel 0 least
significant, as in the paper). An entropy loss keeps every code in use:

    aux = mean_n H(p(. | z_n)) - diversity_gamma * H(mean_n p(. | z_n)),
    p(c | z) = softmax_c(-||z - c||^2 / temperature)  over all 2^bits codes c,

low per-token entropy (confident assignments) and high entropy of the batch-average (all codes used).

Computing ``p`` as an ``N x 2^bits`` matrix does not fit for large codebooks (N = 4096 tokens and
K = 2^18 would be 4 GiB per copy). The hypercube makes it unnecessary: ``-||z - c||^2 = 2 z.c + const``
splits into a sum over channels, so ``p(c | z)`` is the product of a distribution over the low half of the
bits and one over the high half. Hence, exactly:

- the per-token entropy is the sum of the two halves' entropies;
- the batch-mean distribution, as a ``2^lo x 2^hi`` matrix, is ``P_lo^T P_hi / N``.

Memory is ``O(N * 2^(bits/2) + 2^bits)``: K = 2^18 needs two ``N x 512`` matrices and one ``512 x 512``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from simvq.quantizers.base import Quantizer, TokenResult, _check_weight, call_in_dtype, straight_through, vq_loss_terms
from simvq.quantizers.registry import register_quantizer


def _sign_table(bits: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(2^bits, bits)`` float table: row ``j`` holds the ``±1`` code of index ``j`` (bit i = channel i)."""
    j = torch.arange(2**bits, device=device).unsqueeze(-1)
    bit = torch.bitwise_right_shift(j, torch.arange(bits, device=device)) & 1
    return bit.to(dtype) * 2 - 1


def _entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats along ``dim``; ``0 log 0 = 0``."""
    return -(p * p.clamp_min(1e-30).log()).sum(dim)


def lfq_entropy_terms(z: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-token entropy and entropy of the batch-mean code distribution, in nats.

    ``z``: ``(N, bits)`` fp32 (or fp64) values in the LFQ space. The distributions are over all ``2^bits`` codes with
    ``p(c | z) = softmax(-||z - c||^2 / temperature)``, computed exactly through the product structure of
    the hypercube (see the module docstring).
    """
    bits = z.shape[-1]
    lo = (bits + 1) // 2
    halves = (z[:, :lo], z[:, lo:])
    probs, per_token = [], 0.0
    for part in halves:
        table = _sign_table(part.shape[-1], device=z.device, dtype=z.dtype)  # (2^b, b); 0 channels -> one empty code
        # -||z - c||^2 = 2 z.c - ||z||^2 - b: only 2 z.c depends on the code
        log_p = torch.log_softmax(2 * part @ table.t() / temperature, dim=-1)
        p = log_p.exp()
        per_token = per_token + -(p * log_p).sum(-1).mean()
        probs.append(p)
    p_lo, p_hi = probs
    mean_joint = p_lo.t() @ p_hi / z.shape[0]  # (2^lo, 2^hi): average of the outer products
    return per_token, _entropy(mean_joint.reshape(-1))


@register_quantizer("lfq")
class LFQ(Quantizer):
    """Lookup-free quantizer over ``codebook_size = 2^bits`` implicit codes.

    Args:
        codebook_size: a power of two, ``2^bits`` (e.g. 2**18 as in MAGVIT-v2).
        dim: input channel size; when it differs from ``bits``, linear projections ``dim -> bits`` and
            ``bits -> dim`` surround the quantizer. Default ``bits``.
        entropy_weight: weight of the entropy loss (MAGVIT-v2: 0.1).
        commitment_weight: weight of ``mean((z - sg(q))^2)`` in the bit space (0.25).
        diversity_gamma: weight of the batch-entropy term inside the entropy loss (1.0).
        temperature: softmax temperature of the code distributions (0.01, i.e. inverse temperature 100).
        channel_first, check_finite: see :class:`~simvq.quantizers.base.Quantizer`.

    Output: ``loss = commitment_weight * commitment_loss + entropy_weight * aux_loss``; ``aux_loss`` is the
    unweighted entropy term; ``codebook_loss`` is zero (the codes are fixed).
    """

    def __init__(
        self,
        *,
        codebook_size: int,
        dim: int | None = None,
        entropy_weight: float = 0.1,
        commitment_weight: float = 0.25,
        diversity_gamma: float = 1.0,
        temperature: float = 0.01,
        channel_first: bool = True,
        check_finite: bool = True,
    ) -> None:
        if not isinstance(codebook_size, int) or isinstance(codebook_size, bool) or codebook_size < 2:
            raise ValueError(f"LFQ codebook_size must be a power of two >= 2, got {codebook_size!r}")
        if codebook_size & (codebook_size - 1):
            lower = 1 << (codebook_size.bit_length() - 1)
            raise ValueError(
                f"LFQ codebook_size must be a power of two (2**bits), got {codebook_size}; "
                f"use {lower} or {lower * 2}"
            )
        bits = codebook_size.bit_length() - 1
        dim = bits if dim is None else dim
        super().__init__(dim=dim, codebook_size=codebook_size, channel_first=channel_first, check_finite=check_finite)
        self.bits = bits
        self.entropy_weight = _check_weight("entropy_weight", entropy_weight)
        self.commitment_weight = _check_weight("commitment_weight", commitment_weight)
        self.diversity_gamma = _check_weight("diversity_gamma", diversity_gamma)
        temperature = float(temperature)
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        self.temperature = temperature
        self.register_buffer("_powers", 2 ** torch.arange(bits, dtype=torch.long), persistent=False)
        needs_projection = dim != bits
        self.project_in = nn.Linear(dim, bits) if needs_projection else nn.Identity()
        self.project_out = nn.Linear(bits, dim) if needs_projection else nn.Identity()

    def bits_to_indices(self, signs: torch.Tensor) -> torch.Tensor:
        """``(N, bits)`` values -> ``(N,)`` int64 indices, ``sum_i 2^i [v_i > 0]``."""
        return ((signs > 0).long() * self._powers).sum(dim=-1)

    def indices_to_bits(self, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(N,)`` indices -> ``(N, bits)`` ``±1`` codes (the inverse of :meth:`bits_to_indices`)."""
        bit = torch.bitwise_and(indices.long().unsqueeze(-1), self._powers) > 0
        return bit.to(dtype) * 2 - 1

    @property
    def codebook(self) -> torch.Tensor:
        """All ``2^bits`` codes in index order, projected to ``dim``: ``(K, dim)`` (large for big K)."""
        return self.codes_from_indices(torch.arange(self.codebook_size, device=self._powers.device))

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return call_in_dtype(self.project_out, self.indices_to_bits(indices, self.compute_dtype()))

    def quantize_tokens(self, z: torch.Tensor) -> TokenResult:
        z = z.to(self.compute_dtype(z))  # bf16 / fp16 upcast to fp32; fp64 stays fp64
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = call_in_dtype(self.project_in, z)  # (N, bits)
            signs = torch.where(x > 0, 1.0, -1.0).to(x.dtype)
            indices = self.bits_to_indices(signs)
            commitment, _ = vq_loss_terms(x, signs)
            per_token, batch = lfq_entropy_terms(x, self.temperature)
            aux = per_token - self.diversity_gamma * batch
            loss = self.commitment_weight * commitment + self.entropy_weight * aux
            out = call_in_dtype(self.project_out, straight_through(x, signs))
        return TokenResult(out, indices, loss, commitment, torch.zeros_like(loss), aux)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, {super().extra_repr()}, entropy_weight={self.entropy_weight}, "
            f"commitment_weight={self.commitment_weight}, diversity_gamma={self.diversity_gamma}, "
            f"temperature={self.temperature}"
        )
