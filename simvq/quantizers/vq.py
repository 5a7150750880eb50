"""Plain VQ-VAE vector quantizer (van den Oord et al. 2017), as taming-transformers trains it."""

from __future__ import annotations

import torch
from torch import nn

from simvq.quantizers.base import Quantizer, TokenResult, _check_weight, rotation_trick, straight_through, vq_loss_terms
from simvq.quantizers.search import DEFAULT_CHUNK_ELEMENTS, check_chunk_elements, nearest_code


class VectorQuantizer(Quantizer):
    """A learnable ``(K, dim)`` codebook trained by the codebook loss term.

    Initialised ``uniform(-1/K, 1/K)`` as taming-transformers does, or from ``init_codebook``. With
    ``learnable_codebook=False`` the codebook is a frozen buffer-like parameter (what :meth:`SimVQ.fold`
    returns). The loss is ``commitment_weight * mean((z - sg(q))^2) + codebook_weight * mean((sg(z) - q)^2)``.

    Args:
        dim, codebook_size: code dimension and number of codes.
        init_codebook: optional ``(K, dim)`` tensor to start from.
        learnable_codebook: whether the codebook receives gradients.
        rotation_trick: rotation-trick gradients instead of straight-through.
        commitment_weight, codebook_weight: the two named loss weights (0.25, 1.0).
        channel_first, check_finite, search_chunk_elements: as for every quantizer.
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int,
        init_codebook: torch.Tensor | None = None,
        learnable_codebook: bool = True,
        rotation_trick: bool = False,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        channel_first: bool = True,
        check_finite: bool = True,
        search_chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        super().__init__(dim=dim, codebook_size=codebook_size, channel_first=channel_first, check_finite=check_finite)
        self.commitment_weight = _check_weight("commitment_weight", commitment_weight)
        self.codebook_weight = _check_weight("codebook_weight", codebook_weight)
        self.use_rotation_trick = bool(rotation_trick)
        self.learnable_codebook = bool(learnable_codebook)
        self.search_chunk_elements = check_chunk_elements(search_chunk_elements, "search_chunk_elements")
        self.embedding = nn.Embedding(codebook_size, dim)
        with torch.no_grad():
            if init_codebook is None:
                self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            else:
                if tuple(init_codebook.shape) != (codebook_size, dim):
                    raise ValueError(
                        f"init_codebook must have shape ({codebook_size}, {dim}), got {tuple(init_codebook.shape)}"
                    )
                self.embedding.weight.copy_(init_codebook)
        self.embedding.weight.requires_grad_(self.learnable_codebook)

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding.weight

    def quantize_tokens(self, z: torch.Tensor) -> TokenResult:
        indices = nearest_code(z, self.embedding.weight, max_chunk_elements=self.search_chunk_elements)
        q = self.embedding.weight[indices].float()
        commitment, codebook = vq_loss_terms(z, q)
        loss = self.commitment_weight * commitment + self.codebook_weight * codebook
        z32 = z.float()
        out = rotation_trick(z32, q.detach()) if self.use_rotation_trick else straight_through(z32, q.detach())
        return TokenResult(out, indices, loss, commitment, codebook, torch.zeros_like(loss))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, learnable_codebook={self.learnable_codebook}, "
            f"commitment_weight={self.commitment_weight}, codebook_weight={self.codebook_weight}"
        )
