"""Plain VQ-VAE vector quantizer (van den Oord et al. 2017), as taming-transformers trains it.

Three options, off by default (the defaults are taming-transformers' VQ):

- ``l2_normalize=True``: cosine codes (ViT-VQGAN, Yu et al. 2021; LlamaGen's ``codebook_l2_norm``). Tokens
  and codes are l2-normalised before the search and in both loss terms, the codebook starts normalised
  (``uniform(-1/K, 1/K)`` then normalised, as LlamaGen), the quantized output is the unit-norm code with the
  straight-through gradient flowing back through the token's normalisation, and :attr:`codebook` returns
  the normalised codes. The nearest unit code in L2 is the code of largest cosine similarity.
- ``rotation_trick=True``: Fifty et al. 2024, see :func:`~simvq.quantizers.base.rotation_trick`.
- ``kmeans_init=True``: the codes are replaced by k-means centroids (:func:`~simvq.quantizers.lc.kmeans_init`,
  the project's one k-means) of the tokens of the first ``kmeans_init_batches`` training-mode forward passes,
  then trained as usual. A saved buffer ``kmeans_initialized`` records that this happened, so loading a
  checkpoint never re-initialises. Under ``torch.distributed`` rank 0 computes the centroids from its own
  tokens and broadcasts them, so every rank starts from the same codebook (all ranks must run the same
  number of training forward passes before the init, as DDP does).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from simvq.quantizers.base import (
    Quantizer,
    TokenResult,
    _check_weight,
    gather_rows,
    rotation_trick,
    straight_through,
    vq_loss_terms,
)
from simvq.quantizers.registry import register_quantizer
from simvq.quantizers.search import DEFAULT_CHUNK_ELEMENTS, check_chunk_elements, check_search, nearest_code

# k-means++ seeding is K sequential passes over the features; above this many codes random seeding is used
KMEANS_PLUS_PLUS_MAX_CODES = 4096
_KMEANS_FLAG = "kmeans_initialized"


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@register_quantizer("vq")
class VectorQuantizer(Quantizer):
    """A learnable ``(K, dim)`` codebook trained by the codebook loss term.

    Initialised ``uniform(-1/K, 1/K)`` as taming-transformers does, or from ``init_codebook``. With
    ``learnable_codebook=False`` the codebook is a frozen buffer-like parameter (what :meth:`SimVQ.fold`
    returns). The loss is ``commitment_weight * mean((z - sg(q))^2) + codebook_weight * mean((sg(z) - q)^2)``
    (with ``z`` and ``q`` l2-normalised when ``l2_normalize``).

    Args:
        dim, codebook_size: code dimension and number of codes.
        init_codebook: optional ``(K, dim)`` tensor to start from.
        learnable_codebook: whether the codebook receives gradients.
        l2_normalize: cosine codes (see the module docstring).
        rotation_trick: rotation-trick gradients instead of straight-through.
        kmeans_init: initialise the codes by k-means on the first training batches' tokens.
        kmeans_iters: Lloyd iterations of that k-means (10).
        kmeans_init_batches: how many training forward passes' tokens to collect first (1). With fewer
            than ``K`` tokens the tokens are repeated to ``K`` rows, and some centroids will coincide.
        commitment_weight, codebook_weight: the two named loss weights (0.25, 1.0).
        channel_first, check_finite, search_chunk_elements, search: as for every quantizer (see :class:`SimVQ`).
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int,
        init_codebook: torch.Tensor | None = None,
        learnable_codebook: bool = True,
        l2_normalize: bool = False,
        rotation_trick: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        kmeans_init_batches: int = 1,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        channel_first: bool = True,
        check_finite: bool = True,
        search_chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
        search: str = "auto",
    ) -> None:
        super().__init__(dim=dim, codebook_size=codebook_size, channel_first=channel_first, check_finite=check_finite)
        self.commitment_weight = _check_weight("commitment_weight", commitment_weight)
        self.codebook_weight = _check_weight("codebook_weight", codebook_weight)
        self.use_rotation_trick = bool(rotation_trick)
        self.learnable_codebook = bool(learnable_codebook)
        self.l2_normalize = bool(l2_normalize)
        self.use_kmeans_init = bool(kmeans_init)
        self.kmeans_iters = _check_count("kmeans_iters", kmeans_iters, 0)
        self.kmeans_init_batches = _check_count("kmeans_init_batches", kmeans_init_batches, 1)
        if self.use_kmeans_init and not self.learnable_codebook:
            raise ValueError("kmeans_init=True needs learnable_codebook=True (a frozen codebook is never replaced)")
        if self.use_kmeans_init and init_codebook is not None:
            raise ValueError("pass either init_codebook or kmeans_init=True, not both")
        self.search_chunk_elements = check_chunk_elements(search_chunk_elements, "search_chunk_elements")
        self.search = check_search(search)
        self.embedding = nn.Embedding(codebook_size, dim)
        with torch.no_grad():
            if init_codebook is None:
                self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
                if self.l2_normalize:
                    self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
            else:
                if tuple(init_codebook.shape) != (codebook_size, dim):
                    raise ValueError(
                        f"init_codebook must have shape ({codebook_size}, {dim}), got {tuple(init_codebook.shape)}"
                    )
                self.embedding.weight.copy_(init_codebook)
        self.embedding.weight.requires_grad_(self.learnable_codebook)
        if self.use_kmeans_init:
            self.register_buffer(_KMEANS_FLAG, torch.tensor(False))
        self._kmeans_pending: list[torch.Tensor] = []

    @property
    def codebook(self) -> torch.Tensor:
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.l2_normalize else weight

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        rows = gather_rows(self.embedding.weight, indices)
        # normalise the gathered rows: the same arithmetic as the forward pass, so decoding is bit-exact
        return F.normalize(rows, dim=-1) if self.l2_normalize else rows

    @property
    def kmeans_pending(self) -> bool:
        """True while a requested k-means initialisation has not happened yet."""
        return self.use_kmeans_init and not bool(getattr(self, _KMEANS_FLAG))

    @torch.no_grad()
    def _collect_for_kmeans(self, tokens: torch.Tensor) -> None:
        self._kmeans_pending.append(tokens.detach().float())
        if len(self._kmeans_pending) < self.kmeans_init_batches:
            return
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        weight = self.embedding.weight
        if not distributed or dist.get_rank() == 0:
            features = torch.cat(self._kmeans_pending)
            k = self.codebook_size
            if features.shape[0] < k:  # too few tokens: repeat them (duplicate centroids are re-seeded)
                features = features[torch.arange(k, device=features.device) % features.shape[0]]
            from simvq.quantizers.lc import kmeans_init  # late: lc builds on simvq, which folds into this class

            seeding = "kmeans++" if k <= KMEANS_PLUS_PLUS_MAX_CODES else "random"
            centroids = kmeans_init(features, k, iters=self.kmeans_iters, seed=0, init=seeding)
            weight.copy_(centroids.to(weight.dtype))
        if distributed:
            dist.broadcast(weight.data, src=0)
        getattr(self, _KMEANS_FLAG).fill_(True)
        self._kmeans_pending = []

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # ``load_state_dict`` works on its own copy of the dict: adding or dropping a key here leaves the caller's intact
        flag = prefix + _KMEANS_FLAG
        if self.use_kmeans_init and flag not in state_dict and prefix + "embedding.weight" in state_dict:
            state_dict[flag] = torch.tensor(True)  # a checkpoint without the flag holds trained codes: keep them
        elif not self.use_kmeans_init:
            state_dict.pop(flag, None)
        if self.use_kmeans_init:
            self._kmeans_pending = []
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def quantize_tokens(self, z: torch.Tensor) -> TokenResult:
        z32 = z.to(self.compute_dtype(z))  # fp32, or fp64 under 64-true (never 16-bit)
        if self.l2_normalize:
            z32 = F.normalize(z32, dim=-1)
        if self.training and self.kmeans_pending:
            self._collect_for_kmeans(z32)
        with torch.no_grad():
            codes = self.codebook
        indices = nearest_code(z32, codes, max_chunk_elements=self.search_chunk_elements, search=self.search)
        q = self.codes_from_indices(indices).to(z32.dtype)
        commitment, codebook = vq_loss_terms(z32, q)
        loss = self.commitment_weight * commitment + self.codebook_weight * codebook
        out = rotation_trick(z32, q.detach()) if self.use_rotation_trick else straight_through(z32, q.detach())
        return TokenResult(out, indices, loss, commitment, codebook, torch.zeros_like(loss))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, learnable_codebook={self.learnable_codebook}, "
            f"l2_normalize={self.l2_normalize}, rotation_trick={self.use_rotation_trick}, "
            f"kmeans_init={self.use_kmeans_init}, "
            f"commitment_weight={self.commitment_weight}, codebook_weight={self.codebook_weight}"
        )
