"""VQ-VAE with an exponential-moving-average codebook (van den Oord et al. 2017, appendix; VQ-VAE-2).

The codebook receives no gradient. In training mode, after each batch is quantized, every code moves to
the EMA of the mean of the tokens assigned to it:

    N_k <- decay * N_k + (1 - decay) * n_k                 (n_k: tokens assigned to code k in the batch)
    m_k <- decay * m_k + (1 - decay) * sum_{z -> k} z
    e_k <- m_k / N~_k,   N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j    (Laplace smoothing)

The smoothing keeps ``e_k`` finite for codes that stop being used. The EMA state starts at ``N_k = 1``,
``m_k = e_k`` (one pseudo-token at the initial code), so an unused code stays near its initial position
instead of being divided by ``eps`` on the first step. The batch is quantized with the codebook *before*
the update (the update is the last thing a training forward does).

Optionally, codes whose ``N_k`` falls below ``dead_code_threshold`` are replaced by random tokens of the
current batch (and their EMA state restarted at ``N_k = threshold``). Under ``torch.distributed`` the batch
counts and sums are all-reduced before the update and the replacement tokens are broadcast from rank 0,
so every rank keeps the same codebook.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from simvq.quantizers.base import Quantizer, TokenResult, _check_weight, straight_through, vq_loss_terms
from simvq.quantizers.registry import register_quantizer
from simvq.quantizers.search import DEFAULT_CHUNK_ELEMENTS, check_chunk_elements, check_search, nearest_code


_EMA_STATE = ("embedding", "ema_cluster_size", "ema_embed_sum")
_HALF = (torch.float16, torch.bfloat16)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@register_quantizer("ema_vq")
class EMAVectorQuantizer(Quantizer):
    """Vector quantizer whose ``(K, dim)`` codebook is an EMA of its assigned tokens.

    Args:
        dim, codebook_size: code dimension and number of codes.
        decay: EMA decay (0.99 as in VQ-VAE / VQ-VAE-2 and VQGAN-EMA), in ``[0, 1)``.
        eps: Laplace smoothing of the cluster sizes (1e-5).
        commitment_weight: weight of ``mean((z - sg(q))^2)``, the only loss term (0.25).
        dead_code_threshold: codes with EMA cluster size below this are re-seeded from the batch;
            0 turns the reset off (default, as in VQ-VAE-2).
        init_codebook: optional ``(K, dim)`` starting codebook; default ``Normal(0, 1)`` (VQ-VAE-2).
        channel_first, check_finite, search_chunk_elements, search: as for every quantizer (see :class:`SimVQ`).

    Output: ``loss = commitment_weight * commitment_loss``; ``codebook_loss`` is the unweighted
    ``mean((sg(z) - q)^2)`` for monitoring only (it is not part of ``loss``).

    State (buffers, saved in the state dict): ``embedding`` ``(K, dim)``, ``ema_cluster_size`` ``(K,)``,
    ``ema_embed_sum`` ``(K, dim)``.
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int,
        decay: float = 0.99,
        eps: float = 1e-5,
        commitment_weight: float = 0.25,
        dead_code_threshold: float = 0.0,
        init_codebook: torch.Tensor | None = None,
        channel_first: bool = True,
        check_finite: bool = True,
        search_chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
        search: str = "auto",
    ) -> None:
        super().__init__(dim=dim, codebook_size=codebook_size, channel_first=channel_first, check_finite=check_finite)
        decay, eps = float(decay), float(eps)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1) (typically 0.99), got {decay}")
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a finite number > 0 (typically 1e-5), got {eps}")
        self.decay = decay
        self.eps = eps
        self.commitment_weight = _check_weight("commitment_weight", commitment_weight)
        self.dead_code_threshold = _check_weight("dead_code_threshold", dead_code_threshold)
        self.search_chunk_elements = check_chunk_elements(search_chunk_elements, "search_chunk_elements")
        self.search = check_search(search)
        if init_codebook is None:
            embedding = torch.randn(codebook_size, dim)
        else:
            if not isinstance(init_codebook, torch.Tensor) or tuple(init_codebook.shape) != (codebook_size, dim):
                raise ValueError(
                    f"init_codebook must be a tensor of shape ({codebook_size}, {dim}), "
                    f"got {tuple(getattr(init_codebook, 'shape', ()))}"
                )
            embedding = init_codebook.detach().float().clone()
        self.register_buffer("embedding", embedding)
        self.register_buffer("ema_cluster_size", torch.ones(codebook_size))
        self.register_buffer("ema_embed_sum", embedding.clone())

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding

    def _apply(self, fn, recurse=True):
        # The EMA state stays in at least fp32 when the module is cast to bf16 / fp16 (bf16-true): an EMA
        # step of (1 - decay) = 1% is below bf16's resolution. Device moves and fp64 apply as usual.
        before = {name: self._buffers[name] for name in _EMA_STATE}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype in _HALF and old.dtype not in _HALF:
                self._buffers[name] = old.to(device=new.device)
        return self

    def quantize_tokens(self, z: torch.Tensor) -> TokenResult:
        z = z.to(self.compute_dtype(z))
        indices = nearest_code(z, self.embedding, max_chunk_elements=self.search_chunk_elements, search=self.search)
        q = self.embedding[indices].to(z.dtype)
        commitment, codebook = vq_loss_terms(z, q)
        out = straight_through(z, q)
        if self.training:
            self._ema_update(z.detach().to(self.embedding.dtype), indices)
        loss = self.commitment_weight * commitment  # no codebook term: the EMA moves the codes
        return TokenResult(out, indices, loss, commitment, codebook, torch.zeros_like(loss))

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        """One EMA step from ``(N, dim)`` fp32 tokens and their ``(N,)`` code indices."""
        counts = torch.bincount(indices, minlength=self.codebook_size).to(self.ema_cluster_size.dtype)
        sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, z)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.ema_cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        self.embedding.copy_(self.ema_embed_sum / smoothed.unsqueeze(1))
        if self.dead_code_threshold > 0:
            self._reset_dead_codes(z)

    @torch.no_grad()
    def _reset_dead_codes(self, z: torch.Tensor) -> None:
        dead = (self.ema_cluster_size < self.dead_code_threshold).nonzero().squeeze(1)
        num_dead = dead.numel()  # identical on every rank: the cluster sizes are
        if num_dead == 0:
            return
        if num_dead <= z.shape[0]:
            picks = torch.randperm(z.shape[0], device=z.device)[:num_dead]
        else:  # fewer tokens than dead codes: sample with replacement
            picks = torch.randint(z.shape[0], (num_dead,), device=z.device)
        new_codes = z[picks]
        if _distributed():
            dist.broadcast(new_codes, src=0)
        self.embedding[dead] = new_codes
        # restart the EMA at the threshold with the new code as its mean, so it is not dead on arrival
        self.ema_cluster_size[dead] = self.dead_code_threshold
        self.ema_embed_sum[dead] = new_codes * self.dead_code_threshold

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, decay={self.decay}, eps={self.eps}, "
            f"commitment_weight={self.commitment_weight}, dead_code_threshold={self.dead_code_threshold}"
        )
