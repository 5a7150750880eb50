"""Index Backpropagation Quantization (Shi et al. 2024, "Taming Scalable Visual Tokenizer for Autoregressive
Image Generation", arXiv 2412.02692; official code ``IndexPropagationQuantize`` in TencentARC/SEED-Voken).

Plain VQ updates only the codes that were selected, so codes far from the encoder features never move and
die. IBQ makes the *index* differentiable: every token gets a categorical distribution over all ``K`` codes,

    logits = z C^T / temperature              (N, K)   dot product with the raw codebook, no normalisation
    soft   = softmax(logits)                  (N, K)
    hard   = one_hot(argmax(logits))          (N, K)
    index  = hard - sg(soft) + soft           straight-through of the distribution
    q      = index @ C                        forward value C[argmax], gradient through ``soft`` to all codes

and the quantized output is ``q`` itself (no ``z + sg(q - z)``): the decoder's gradient reaches the encoder
and every code through the softmax. The release's "double quantization loss" is

    mean((q - z)^2) + mean((sg(C[idx]) - z)^2) + beta * mean((C[idx] - sg(z))^2),   beta = 0.25

(the first term uses the straight-through ``q`` and so pulls all codes; the last two are the VQ-VAE
commitment and codebook terms on the hard code, weights 1 and 0.25 in the release), plus, when enabled,
the MAGVIT-v2 entropy loss on ``softmax(logits / 0.01)``: mean per-token entropy minus the entropy of the
batch-mean distribution.

**Indices are the argmax of the dot product, not the nearest code**: ``argmax z.c`` equals
``argmin ||z - c||^2`` only when all codes have the same norm (``||c||^2`` is ignored). Decoding uses the
same indices, so the round trip is exact; but a folded or nearest-code search would pick other codes.

**Memory**: the ``(N, K)`` logits and softmax are inherent to IBQ (every code receives gradient), and are
kept for the backward pass: about ``2 N K`` fp32 values, ``4 N K`` with the entropy loss on (one more
softmax and its log at the entropy temperature). N = 4096 tokens at K = 262,144 is 4 GiB per copy; split
the batch, or set ``entropy_weight=0`` to drop the entropy copies.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from simvq.quantizers.base import Quantizer, TokenResult, _check_weight, vq_loss_terms
from simvq.quantizers.lfq import _entropy
from simvq.quantizers.registry import register_quantizer


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def ibq_entropy_terms(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-token entropy and entropy of the batch-mean distribution of ``softmax(logits / temperature)``.

    ``logits``: ``(N, K)`` fp32. Both in nats. The release adds 1e-5 inside the log of the batch-mean
    distribution; here the mean distribution's entropy is exact (``0 log 0 = 0``).
    """
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    p = log_p.exp()
    per_token = -(p * log_p).sum(-1).mean()
    return per_token, _entropy(p.mean(0))


@register_quantizer("ibq")
class IBQ(Quantizer):
    """Index Backpropagation Quantizer: a learnable ``(K, dim)`` codebook, every code trained every step.

    Args:
        dim, codebook_size: code dimension and number of codes.
        temperature: divides the logits of the index distribution (the release uses none: 1.0).
        commitment_weight: weight of ``mean((z - sg(C[idx]))^2)`` (release: 1.0).
        codebook_weight: weight of ``mean((sg(z) - C[idx])^2)`` (release: ``beta`` = 0.25).
        straight_through_weight: weight of ``mean((q - z)^2)`` with the straight-through ``q`` (release: 1.0).
            Its value equals ``commitment_loss`` (``q`` is ``C[idx]`` in value); only its gradients differ.
        entropy_weight: weight of the entropy loss ``aux_loss`` (0.05, ``entropy_loss_weight`` of the released
            ImageNet presets, which turn the entropy loss on; 0 skips computing it and its ``(N, K)`` copies).
        sample_entropy_weight, codebook_entropy_weight: the release's ``sample_minimization_weight`` and
            ``batch_maximization_weight`` (1.0, 1.0): ``aux = s * H_token - c * H_batch``.
        entropy_temperature: temperature of the entropy loss's softmax (release: 0.01).
        init_codebook: optional ``(K, dim)`` start; default ``Normal(0, 1)`` (``nn.Embedding``'s default,
            which the release keeps).
        channel_first, check_finite: as for every quantizer.

    Output: ``loss = commitment_weight * commitment_loss + codebook_weight * codebook_loss +
    straight_through_weight * mean((q - z)^2) + entropy_weight * aux_loss``; ``aux_loss`` is the
    unweighted entropy term (zero when ``entropy_weight == 0``). ``indices = argmax(z C^T)``, ties to the
    lowest index. ``quantized`` equals ``C[indices]`` exactly in value.
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int,
        temperature: float = 1.0,
        commitment_weight: float = 1.0,
        codebook_weight: float = 0.25,
        straight_through_weight: float = 1.0,
        entropy_weight: float = 0.05,
        sample_entropy_weight: float = 1.0,
        codebook_entropy_weight: float = 1.0,
        entropy_temperature: float = 0.01,
        init_codebook: torch.Tensor | None = None,
        channel_first: bool = True,
        check_finite: bool = True,
    ) -> None:
        super().__init__(dim=dim, codebook_size=codebook_size, channel_first=channel_first, check_finite=check_finite)
        self.temperature = _check_positive("temperature", temperature)
        self.entropy_temperature = _check_positive("entropy_temperature", entropy_temperature)
        self.commitment_weight = _check_weight("commitment_weight", commitment_weight)
        self.codebook_weight = _check_weight("codebook_weight", codebook_weight)
        self.straight_through_weight = _check_weight("straight_through_weight", straight_through_weight)
        self.entropy_weight = _check_weight("entropy_weight", entropy_weight)
        self.sample_entropy_weight = _check_weight("sample_entropy_weight", sample_entropy_weight)
        self.codebook_entropy_weight = _check_weight("codebook_entropy_weight", codebook_entropy_weight)
        self.embedding = nn.Embedding(codebook_size, dim)  # Normal(0, 1), as the release leaves it
        if init_codebook is not None:
            if not isinstance(init_codebook, torch.Tensor) or tuple(init_codebook.shape) != (codebook_size, dim):
                raise ValueError(
                    f"init_codebook must be a ({codebook_size}, {dim}) tensor, got "
                    f"{tuple(getattr(init_codebook, 'shape', ()))}"
                )
            if not init_codebook.is_floating_point() or not bool(torch.isfinite(init_codebook).all()):
                raise ValueError("init_codebook must hold finite floating-point values")
            with torch.no_grad():
                self.embedding.weight.copy_(init_codebook)

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding.weight

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` fp32 index logits ``z C^T / temperature`` for flat ``(N, dim)`` tokens."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            dots = z.float() @ self.embedding.weight.float().t()
            return dots if self.temperature == 1.0 else dots / self.temperature

    def quantize_tokens(self, z: torch.Tensor) -> TokenResult:
        with torch.autocast(device_type=z.device.type, enabled=False):
            z32 = z.float()
            codes = self.embedding.weight.float()
            dots = z32 @ codes.t()  # (N, K)
            logits = dots if self.temperature == 1.0 else dots / self.temperature
            indices = logits.argmax(dim=-1)  # first maximum on ties
            soft = torch.softmax(logits, dim=-1)
            hard_codes = codes[indices]  # (N, dim): gradient to the selected rows only
            # (hard - sg(soft) + soft) @ C, written so that the forward value is C[idx] bit for bit: the hard
            # part is a gather; the soft part contributes y - sg(y) (exactly zero) whose gradient to ``soft``
            # is g C^T, as in the release; C gets its direct gradient from the gather only (the one-hot's
            # value is ``hard``), and its gradient to all rows through soft -> logits.
            y = soft @ codes.detach()
            quantized = hard_codes + (y - y.detach())
            commitment, codebook = vq_loss_terms(z32, hard_codes)
            straight = (quantized - z32).pow(2).mean()
            loss = (
                self.commitment_weight * commitment
                + self.codebook_weight * codebook
                + self.straight_through_weight * straight
            )
            if self.entropy_weight > 0:
                per_token, batch = ibq_entropy_terms(dots, self.entropy_temperature)
                aux = self.sample_entropy_weight * per_token - self.codebook_entropy_weight * batch
                loss = loss + self.entropy_weight * aux
            else:
                aux = torch.zeros_like(loss)
        return TokenResult(quantized, indices, loss, commitment, codebook, aux)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, temperature={self.temperature}, commitment_weight={self.commitment_weight}, "
            f"codebook_weight={self.codebook_weight}, straight_through_weight={self.straight_through_weight}, "
            f"entropy_weight={self.entropy_weight}, entropy_temperature={self.entropy_temperature}"
        )
