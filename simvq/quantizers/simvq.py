"""SimVQ: a frozen random codebook ``C`` reparameterised by one learned linear layer.

The codes in use are ``C W^T + b`` (the paper writes ``CW``; the official code adds the bias). Every
gradient step on ``W`` moves the whole codebook, which is what keeps all codes in use.

Faithful to the official implementation by default:
- ``C`` is ``(K, d)`` drawn from ``Normal(0, d**-0.5)``, frozen, and saved in the state dict;
- ``W, b`` is ``nn.Linear(d, d)`` with PyTorch's default initialisation;
- plain squared-L2 search against ``C W^T + b``;
- loss ``0.25 * mean((z - sg(q))^2) + 1.0 * mean((sg(z) - q)^2)``, straight-through gradient.
State-dict keys match the official ones (``embedding.weight``, ``embedding_proj.weight``,
``embedding_proj.bias``), so official weights load with ``load_state_dict``.

Speed: the search runs under ``no_grad`` and never builds the N x K distance matrix. With fewer tokens than
codes, the selected codes are then recomputed as ``transform(C[idx])``, so the transform costs O(N d^2)
forward and backward instead of O(K d^2); on the CPU with at least as many tokens as codes, the codebook
the search used is transformed once with gradients and its rows are gathered (O(K d^2); at K = 1,024 and
4,096 tokens of width 128 a training step takes ~1.5 ms less on two cores). The gradients equal the
official formulation's either way, since only the selected rows of ``C W^T + b`` receive gradient there
too.

``l2_normalize=True`` (off by default; not in the paper): cosine codes as :class:`VectorQuantizer` offers them
(ViT-VQGAN, LlamaGen). The codes are ``normalize(C W^T + b)`` and the tokens are normalised before the search
and in both loss terms, so the nearest code is the most cosine-similar one. It is what a cosine-codebook VQ
layer is retrofitted to (:mod:`simvq.retrofit`).
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
from simvq.quantizers.registry import QUANTIZERS, register_quantizer
from simvq.quantizers.search import DEFAULT_CHUNK_ELEMENTS, check_chunk_elements, check_search, nearest_code

TRANSFORMS = ("linear", "mlp")


def _build_transform(transform, in_dim: int, out_dim: int, bias: bool, hidden_dim: int | None) -> nn.Module:
    if isinstance(transform, nn.Module):
        return transform
    if transform == "linear":
        return nn.Linear(in_dim, out_dim, bias=bias)
    if transform == "mlp":
        hidden = hidden_dim if hidden_dim is not None else 4 * out_dim
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            raise ValueError(f"hidden_dim must be a positive integer, got {hidden_dim!r}")
        return nn.Sequential(nn.Linear(in_dim, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, out_dim, bias=bias))
    raise ValueError(f"transform must be one of {TRANSFORMS} or an nn.Module, got {transform!r}")


@register_quantizer("simvq")
class SimVQ(Quantizer):
    """SimVQ quantizer (arXiv 2411.02038).

    Args:
        dim: feature (code) dimension ``d``.
        codebook_size: number of codes ``K``.
        frozen_codebook_dim: width of the frozen ``C`` (default ``dim``); the transform maps it to ``dim``.
        bias: whether the linear transform has a bias (official: True).
        transform: ``"linear"`` (official), ``"mlp"`` (Linear-GELU-Linear, the non-linear
            reparameterisation) or any ``nn.Module`` that maps ``(N, frozen_codebook_dim)`` rows to
            ``(N, dim)`` row by row.
        hidden_dim: hidden width of the ``"mlp"`` transform (default ``4 * dim``).
        learnable_codebook: train ``C`` together with the transform (the paper shows ``C`` then dominates
            and usage collapses; provided for that comparison).
        rotation_trick: pass gradients to the input with the rotation trick instead of straight-through.
        commitment_weight: weight of ``mean((z - sg(q))^2)`` (official 0.25).
        codebook_weight: weight of ``mean((sg(z) - q)^2)`` (official 1.0).
        l2_normalize: cosine codes: tokens and codes l2-normalised before the search and in both loss terms
            (see the module docstring).
        channel_first, check_finite: see :class:`~simvq.quantizers.base.Quantizer`.
        search_chunk_elements: memory bound of the nearest-code search, in fp32 distances.
        search: nearest-code search path, ``"auto"``, ``"exact-fp32"``, ``"fp32-fused"``, ``"bf16-candidates"``,
            ``"bf16-fused"`` or ``"bf16-triton"`` (same indices on every path; see
            :func:`~simvq.quantizers.search.nearest_code`).
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int,
        frozen_codebook_dim: int | None = None,
        bias: bool = True,
        transform: str | nn.Module = "linear",
        hidden_dim: int | None = None,
        learnable_codebook: bool = False,
        rotation_trick: bool = False,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        l2_normalize: bool = False,
        channel_first: bool = True,
        check_finite: bool = True,
        search_chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
        search: str = "auto",
    ) -> None:
        super().__init__(dim=dim, codebook_size=codebook_size, channel_first=channel_first, check_finite=check_finite)
        cdim = dim if frozen_codebook_dim is None else frozen_codebook_dim
        if not isinstance(cdim, int) or isinstance(cdim, bool) or cdim < 1:
            raise ValueError(f"frozen_codebook_dim must be a positive integer, got {frozen_codebook_dim!r}")
        self.frozen_codebook_dim = cdim
        self.commitment_weight = _check_weight("commitment_weight", commitment_weight)
        self.codebook_weight = _check_weight("codebook_weight", codebook_weight)
        self.use_rotation_trick = bool(rotation_trick)
        self.learnable_codebook = bool(learnable_codebook)
        self.l2_normalize = bool(l2_normalize)
        self.search_chunk_elements = check_chunk_elements(search_chunk_elements, "search_chunk_elements")
        self.search = check_search(search)
        self.embedding = nn.Embedding(codebook_size, cdim)
        nn.init.normal_(self.embedding.weight, mean=0.0, std=cdim**-0.5)
        self.embedding.weight.requires_grad_(self.learnable_codebook)
        self.embedding_proj = _build_transform(transform, cdim, dim, bias, hidden_dim)
        self.transform_name = transform if isinstance(transform, str) else type(transform).__name__

    @property
    def frozen_codebook(self) -> torch.Tensor:
        """The random matrix ``C``, ``(K, frozen_codebook_dim)``."""
        return self.embedding.weight

    def _transform_unnormalized(self, rows: torch.Tensor) -> torch.Tensor:
        """``transform(rows)`` in fp32 (fp64 for a 64-bit module), autocast off, whatever the weights' dtype."""
        out = call_in_dtype(self.embedding_proj, rows.to(self.compute_dtype()))
        if out.dim() != 2 or out.shape[1] != self.dim:
            raise ValueError(f"transform must map (N, {self.frozen_codebook_dim}) to (N, {self.dim}), got {tuple(out.shape)}")
        return out

    def _transform(self, rows: torch.Tensor) -> torch.Tensor:
        """The codes of ``rows`` of ``C``: ``transform(rows)``, as unit vectors with ``l2_normalize``."""
        out = self._transform_unnormalized(rows)
        return F.normalize(out, dim=-1) if self.l2_normalize else out

    @property
    def codebook(self) -> torch.Tensor:
        """Effective codes ``transform(C)``, ``(K, dim)``, recomputed from the current weights."""
        return self._transform(self.embedding.weight)

    def _transforms_every_code(self, num_tokens: int, device: torch.device) -> bool:
        """Whether ``num_tokens`` selected codes come from the whole transformed codebook (see the module
        docstring); forward and decoding decide alike, so decoding gives the forward's codes bit for bit."""
        return device.type == "cpu" and num_tokens >= self.codebook_size

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        if self._transforms_every_code(indices.numel(), indices.device):
            return gather_rows(self.codebook, indices)
        return self._transform(gather_rows(self.embedding.weight, indices))

    def quantize_tokens(self, z: torch.Tensor) -> TokenResult:
        z = z.to(self.compute_dtype(z))  # bf16 / fp16 features are upcast; fp64 stays fp64
        if self.l2_normalize:
            z = F.normalize(z, dim=-1)
        every_code = self.codebook if self._transforms_every_code(z.shape[0], z.device) else None
        with torch.no_grad():
            search_codes = self.codebook if every_code is None else every_code.detach()
            indices = nearest_code(z, search_codes, max_chunk_elements=self.search_chunk_elements, search=self.search)
        # differentiable in W, b (and C if learnable)
        q = self.codes_from_indices(indices) if every_code is None else gather_rows(every_code, indices)
        q = q.to(z.dtype)
        commitment, codebook = vq_loss_terms(z, q)
        loss = self.commitment_weight * commitment + self.codebook_weight * codebook
        out = rotation_trick(z, q.detach()) if self.use_rotation_trick else straight_through(z, q.detach())
        return TokenResult(out, indices, loss, commitment, codebook, torch.zeros_like(loss))

    @torch.no_grad()
    def fold(self):
        """An equivalent frozen-codebook :class:`VectorQuantizer` with ``transform(C)`` baked in.

        Same indices and codes as this quantizer; no transform is evaluated at inference time.
        """
        folded = QUANTIZERS["vq"](  # VectorQuantizer, looked up so that simvq.py need not import vq.py
            dim=self.dim,
            codebook_size=self.codebook_size,
            learnable_codebook=False,
            commitment_weight=self.commitment_weight,
            codebook_weight=self.codebook_weight,
            l2_normalize=self.l2_normalize,
            channel_first=self.channel_first,
            check_finite=self.check_finite,
            search_chunk_elements=self.search_chunk_elements,
            search=self.search,
        ).to(self.embedding.weight.device)
        # the folded VQ normalises its weight itself: given the unnormalised codes its codes are ours bit for bit
        folded.embedding.weight.copy_(self._transform_unnormalized(self.embedding.weight))
        return folded

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, frozen_codebook_dim={self.frozen_codebook_dim}, transform={self.transform_name}, "
            f"learnable_codebook={self.learnable_codebook}, rotation_trick={self.use_rotation_trick}, "
            f"commitment_weight={self.commitment_weight}, codebook_weight={self.codebook_weight}"
            + (", l2_normalize=True" if self.l2_normalize else "")
        )
