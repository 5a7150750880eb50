"""Factorized, l2-normalised codes (ViT-VQGAN, Yu et al. 2021; "VQGAN-FC" in the SimVQ tables).

Tokens are projected ``dim -> codebook_dim`` (a low dimension, 8 in ViT-VQGAN), both the projected tokens
and the learnable codes are l2-normalised, and the search runs in that small space. On the unit sphere the
squared L2 distance is ``2 - 2 cos``, so the nearest code is the most cosine-similar one. The selected
normalised code is projected back ``codebook_dim -> dim``. The two VQ loss terms are measured in the
normalised low-dimensional space, where the search happens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simvq.quantizers.base import (
    Quantizer,
    TokenResult,
    _check_weight,
    call_in_dtype,
    gather_rows,
    rotation_trick,
    straight_through,
    vq_loss_terms,
)
from simvq.quantizers.registry import register_quantizer
from simvq.quantizers.search import DEFAULT_CHUNK_ELEMENTS, check_chunk_elements, check_search, nearest_code


@register_quantizer("factorized_vq")
class FactorizedVectorQuantizer(Quantizer):
    """Low-dimensional (optionally l2-normalised) codebook between two linear projections.

    Args:
        dim: input channel size.
        codebook_size: number of codes ``K``.
        codebook_dim: dimension of the search space and of the stored codes (ViT-VQGAN: 8).
        l2_normalize: normalise projected tokens and codes to the unit sphere (ViT-VQGAN: True).
        rotation_trick: rotation-trick gradients (in the low-dim space) instead of straight-through.
        commitment_weight, codebook_weight: the two named loss weights (0.25, 1.0).
        channel_first, check_finite, search_chunk_elements, search: as for every quantizer (see :class:`SimVQ`).

    Parameters: ``project_in`` (``dim -> codebook_dim``), ``embedding.weight`` ``(K, codebook_dim)``,
    ``project_out`` (``codebook_dim -> dim``). :attr:`codebook` is ``project_out(normalise(embedding))``,
    the ``(K, dim)`` codes that ``quantized`` and :meth:`decode_indices` return.
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int,
        codebook_dim: int = 8,
        l2_normalize: bool = True,
        rotation_trick: bool = False,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        channel_first: bool = True,
        check_finite: bool = True,
        search_chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
        search: str = "auto",
    ) -> None:
        super().__init__(dim=dim, codebook_size=codebook_size, channel_first=channel_first, check_finite=check_finite)
        if not isinstance(codebook_dim, int) or isinstance(codebook_dim, bool) or codebook_dim < 1:
            raise ValueError(f"codebook_dim must be a positive integer (ViT-VQGAN uses 8), got {codebook_dim!r}")
        self.codebook_dim = codebook_dim
        self.l2_normalize = bool(l2_normalize)
        self.use_rotation_trick = bool(rotation_trick)
        self.commitment_weight = _check_weight("commitment_weight", commitment_weight)
        self.codebook_weight = _check_weight("codebook_weight", codebook_weight)
        self.search_chunk_elements = check_chunk_elements(search_chunk_elements, "search_chunk_elements")
        self.search = check_search(search)
        self.project_in = nn.Linear(dim, codebook_dim)
        self.embedding = nn.Embedding(codebook_size, codebook_dim)
        if not self.l2_normalize:
            # unnormalised codes start small, as a plain VQ codebook does
            nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.project_out = nn.Linear(codebook_dim, dim)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.l2_normalize else x

    def _low_dim_codes(self, rows: torch.Tensor) -> torch.Tensor:
        return self._normalize(rows.to(self.compute_dtype()))

    @property
    def low_dim_codebook(self) -> torch.Tensor:
        """The (normalised) codes in the search space, ``(K, codebook_dim)``."""
        return self._low_dim_codes(self.embedding.weight)

    @property
    def codebook(self) -> torch.Tensor:
        """Effective codes in the input space, ``project_out(low_dim_codebook)``: ``(K, dim)``."""
        return call_in_dtype(self.project_out, self.low_dim_codebook)

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return call_in_dtype(self.project_out, self._low_dim_codes(gather_rows(self.embedding.weight, indices)))

    def quantize_tokens(self, z: torch.Tensor) -> TokenResult:
        z = z.to(self.compute_dtype(z))
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = self._normalize(call_in_dtype(self.project_in, z))  # (N, codebook_dim)
            indices = nearest_code(
                x, self.low_dim_codebook, max_chunk_elements=self.search_chunk_elements, search=self.search
            )
            q = self._low_dim_codes(gather_rows(self.embedding.weight, indices)).to(x.dtype)  # differentiable in the codebook
            commitment, codebook = vq_loss_terms(x, q)
            loss = self.commitment_weight * commitment + self.codebook_weight * codebook
            passed = rotation_trick(x, q.detach()) if self.use_rotation_trick else straight_through(x, q.detach())
            out = call_in_dtype(self.project_out, passed)
        return TokenResult(out, indices, loss, commitment, codebook, torch.zeros_like(loss))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, codebook_dim={self.codebook_dim}, l2_normalize={self.l2_normalize}, "
            f"commitment_weight={self.commitment_weight}, codebook_weight={self.codebook_weight}"
        )
