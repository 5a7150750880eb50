"""Retrofit: swap the VQ layers of a trained model for SimVQ layers without changing its outputs.

``retrofit(model)`` walks the model and replaces every vector quantizer it recognises by a SimVQ layer
whose frozen codebook ``C`` is the old codebook and whose linear transform starts at the identity
(``W = I``, ``b = 0``). At the moment of the swap the effective codebook ``C W^T + b`` equals the old one
bit for bit, so the model computes exactly what it computed before; training on from there moves every
code at once through ``W`` (the SimVQ mechanism). That alone does not revive the dead codes of a collapsed
codebook when they are bunched together (measured in docs/adopt.md): ``dead_codes="respread"`` or
``"fresh"`` (below) spread them first, at the price of exactness for the dead codes.

Recognised kinds:

- this library's :class:`~simvq.quantizers.vq.VectorQuantizer` (and the EMA variant, whose forward is the
  same nearest-code lookup): replaced by a :class:`~simvq.quantizers.simvq.SimVQ` with the same layout,
  loss weights, gradient estimator and search settings. Same interface, nothing to adapt. Cosine codes
  (``l2_normalize=True``) give a SimVQ with ``l2_normalize=True`` whose ``C`` is the unnormalised codebook,
  so its codes ``normalize(C W^T + b)`` equal the old ``normalize(C)`` bit for bit.
- taming-transformers style quantizers: any module with an ``embedding`` ``nn.Embedding`` table and
  ``n_e`` / ``e_dim`` attributes, called as ``quantizer(z)`` on ``(B, e_dim, H, W)`` features and returning
  ``(z_q, loss, (perplexity, min_encodings, indices))``. Replaced by :class:`TamingSimVQ`, which keeps that
  return convention (``min_encodings`` is ``None``, as taming's ``VectorQuantizer2`` returns it, because a
  one-hot ``(N, K)`` matrix is too large at big ``K``). The loss uses ``beta`` on the commitment term and
  1.0 on the codebook term whatever taming's ``legacy`` flag said (see REFERENCE.md: ``legacy=True`` puts
  ``beta`` on the wrong term). Refused: taming's first ``VectorQuantizer`` (one-hot ``min_encodings`` and
  ``(N, 1)`` indices), index remapping (``remap=``), and LlamaGen-style quantizers (an ``l2_norm``,
  ``entropy_loss_ratio`` or ``show_usage`` attribute: another return convention, normalised codes).
- vector-quantize-pytorch's ``VectorQuantize`` (one codebook shared by all heads, nearest-code search):
  the codebook is read from ``_codebook.embed`` ``(1, K, codebook_dim)``. A cosine-similarity codebook
  (``use_cosine_sim=True``) becomes a SimVQ with ``l2_normalize=True`` (codes ``normalize(C W^T + b)``,
  inputs normalised as before). Refused: separate codebooks per head, affine codebook parameters, stochastic or
  Gumbel sampling, ``vq_bridge``, in-place codebook optimizers, other gradient estimators. Replaced by
  :class:`VectorQuantizeSimVQ`, which keeps the call signature ``vq(x, mask=None, lens=None, ...)``, the
  layouts (``channel_last``, ``accept_image_fmap``, ``accept_3d_fmap``), ``project_in`` / ``project_out``
  and the return convention ``(quantized, indices, loss)``. ``return_loss_breakdown=True`` appends the
  SimVQ :class:`~simvq.quantizers.base.QuantizerOutput` as a fourth element.

Dead codes (``dead_codes=``). A collapsed codebook's unused codes are often near-identical tiny vectors
(taming-style VQ initialises them ``uniform(-1/K, 1/K)`` and they never move); one shared linear map cannot
spread them, so the plain swap (``"keep"``) revives nothing. ``"respread"`` redraws the dead rows of ``C``
where codes are needed, ``"fresh"`` starts from a new random ``C`` with ``W, b`` fitted to the live codes.
Which codes are dead is decided on what the user passes: ``data`` (model inputs, run through the model to
collect each quantizer's input features) or ``counts`` (per-code usage counts).

The official SimVQ layer (``embedding`` + ``embedding_proj``) is already SimVQ: retrofit refuses it with a
``ValueError`` rather than rebuilding it from the raw ``C`` without its projection. A taming-style module
holding any other parameter or buffer is skipped, since a SimVQ layer would not reproduce what it computes.

Anything else that looks like a quantizer (a class name containing "Quantiz", or a known kind with an
option SimVQ cannot reproduce exactly, such as stochastic code sampling) is left alone and listed in
:attr:`RetrofitResult.skipped` with the reason, and a warning is issued.
"""

from __future__ import annotations

import inspect
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from simvq.quantizers.base import Quantizer
from simvq.quantizers.search import nearest_code
from simvq.quantizers.simvq import SimVQ
from simvq.quantizers.vq import VectorQuantizer


class RetrofitResult(list):
    """The names (``model.named_modules()`` style) of the replaced modules, in model order.

    Attributes:
        skipped: ``{module name: reason}`` for quantizer-like modules left unchanged.
        dead_codes: ``{module name: report}`` for ``dead_codes="respread"`` / ``"fresh"``: ``strategy``,
            ``live`` and ``dead`` (code counts), ``source`` (what the redrawn codes were drawn from) and, for
            ``"fresh"``, ``fit_rms`` (root-mean-square distance between the live codes and their fitted
            reproductions) and ``fit_relative`` (that over the live codes' RMS spread about their mean).
        live: ``{module name: (K,) bool tensor}``, the codes found live (same strategies); pass
            ``counts=result.live`` to retrofit another copy of the model without running the data again.
    """

    def __init__(self, replaced=(), skipped: dict | None = None, dead_codes: dict | None = None,
                 live: dict | None = None) -> None:
        super().__init__(replaced)
        self.skipped: dict[str, str] = dict(skipped or {})
        self.dead_codes: dict[str, dict] = dict(dead_codes or {})
        self.live: dict[str, torch.Tensor] = dict(live or {})

    def __repr__(self) -> str:
        return f"RetrofitResult(replaced={list(self)!r}, skipped={self.skipped!r}, dead_codes={self.dead_codes!r})"


# ----- building the SimVQ layer ------------------------------------------------------------------------


def _simvq_from_codebook(codebook: torch.Tensor, *, transform: str, learnable_codebook: bool, **settings) -> SimVQ:
    """A SimVQ whose frozen ``C`` is ``codebook`` ``(K, d)`` and whose transform is the identity map;
    ``settings`` are its other constructor keywords (loss weights, layout, gradient estimator, cosine codes,
    search), taken from the layer it replaces."""
    codebook = codebook.detach()
    size, dim = codebook.shape
    if transform not in ("linear", "mlp"):
        raise ValueError(f"transform must be 'linear' or 'mlp' for a retrofit, got {transform!r}")
    layer = SimVQ(dim=dim, codebook_size=size, transform=transform, learnable_codebook=learnable_codebook, **settings)
    layer = layer.to(device=codebook.device)
    with torch.no_grad():
        layer.embedding.weight.copy_(codebook.float())
        _init_identity(layer.embedding_proj, dim)
    return layer


def layer_config(layer: SimVQ) -> dict:
    """The ``quantizer`` config section that builds a layer like ``layer`` (``(K, d)`` shapes and settings;
    weights come from its state dict): its name, size and each setting that differs from SimVQ's default.
    ``simvq retrofit`` writes it, so the model folder rebuilds the layer that :func:`retrofit` made."""
    if not isinstance(layer.embedding_proj, (nn.Linear, nn.Sequential)) or type(layer) is not SimVQ:
        raise ValueError(f"{type(layer).__name__} with a {type(layer.embedding_proj).__name__} transform has no config form")
    linear = isinstance(layer.embedding_proj, nn.Linear)
    first = layer.embedding_proj if linear else layer.embedding_proj[0]
    values = {
        "frozen_codebook_dim": layer.frozen_codebook_dim, "bias": first.bias is not None,
        "transform": "linear" if linear else "mlp", "hidden_dim": None if linear else first.out_features,
        "learnable_codebook": layer.learnable_codebook, "rotation_trick": layer.use_rotation_trick,
        "commitment_weight": layer.commitment_weight, "codebook_weight": layer.codebook_weight,
        "l2_normalize": layer.l2_normalize, "check_finite": layer.check_finite,
        "search_chunk_elements": layer.search_chunk_elements, "search": layer.search,
    }
    defaults = {k: p.default for k, p in inspect.signature(SimVQ.__init__).parameters.items()}
    defaults["frozen_codebook_dim"] = layer.dim
    return {"name": "simvq", "codebook_size": layer.codebook_size,
            **{k: v for k, v in values.items() if v != defaults[k]}}


def _init_identity(proj: nn.Module, dim: int) -> None:
    """Make ``proj`` the identity map on ``(N, dim)`` rows.

    ``linear``: ``W = I, b = 0``. ``mlp`` (Linear-GELU-Linear): an exact identity through a GELU is not
    possible with one hidden unit per channel, so the hidden layer carries ``+x`` and ``-x`` and the output
    layer computes ``GELU(x) - GELU(-x) = x`` (an identity of GELU, since GELU(x) - GELU(-x) = x Phi(x) +
    x Phi(-x) = x). That equality holds exactly in real arithmetic; in floating point it is within rounding.
    """
    if isinstance(proj, nn.Linear):
        proj.weight.copy_(torch.eye(dim, dtype=proj.weight.dtype, device=proj.weight.device))
        if proj.bias is not None:
            proj.bias.zero_()
        return
    first, last = proj[0], proj[-1]
    hidden = first.out_features
    if hidden < 2 * dim:
        raise ValueError(f"an MLP transform needs hidden_dim >= 2 * dim = {2 * dim} to start at the identity")
    eye = torch.eye(dim, dtype=first.weight.dtype, device=first.weight.device)
    first.weight.zero_()
    first.weight[:dim].copy_(eye)
    first.weight[dim : 2 * dim].copy_(-eye)
    last.weight.zero_()
    last.weight[:, :dim].copy_(eye)
    last.weight[:, dim : 2 * dim].copy_(-eye)
    for layer in (first, last):
        if layer.bias is not None:
            layer.bias.zero_()


# ----- adapters keeping third-party call conventions --------------------------------------------------


class TamingSimVQ(nn.Module):
    """SimVQ with the taming-transformers quantizer interface.

    ``forward(z)`` takes ``(B, e_dim, H, W)`` and returns ``(z_q, loss, (perplexity, None, indices))`` with
    ``indices`` flat ``(B*H*W,)`` (or ``(B, H, W)`` when the replaced module had ``sane_index_shape=True``).
    ``get_codebook_entry(indices, shape)`` returns codes from the effective codebook, in
    ``(B, e_dim, H, W)`` when ``shape = (B, H, W, e_dim)`` is given, as taming's does.

    Attributes:
        quantizer: the wrapped :class:`SimVQ` (``quantizer.embedding`` holds the old codebook as ``C``).
    """

    def __init__(self, *, quantizer: SimVQ, sane_index_shape: bool = False) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.n_e = quantizer.codebook_size
        self.e_dim = quantizer.dim
        self.sane_index_shape = bool(sane_index_shape)

    @property
    def embedding(self) -> nn.Embedding:
        """The frozen codebook ``C`` (the old taming codebook at the moment of the swap)."""
        return self.quantizer.embedding

    def forward(self, z: torch.Tensor):
        out = self.quantizer(z)
        counts = torch.bincount(out.indices.reshape(-1), minlength=self.n_e).float()
        probs = counts / counts.sum().clamp_min(1)
        perplexity = torch.exp(-(probs * (probs + 1e-10).log()).sum())
        indices = out.indices if self.sane_index_shape else out.indices.reshape(-1)
        return out.quantized, out.loss, (perplexity, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape=None) -> torch.Tensor:
        codes = self.quantizer.codes_from_indices(indices.reshape(-1).long())
        if shape is not None:
            codes = codes.view(*shape).permute(0, 3, 1, 2).contiguous()
        return codes


class VectorQuantizeSimVQ(nn.Module):
    """SimVQ with vector-quantize-pytorch's ``VectorQuantize`` call signature and return convention.

    ``forward(x, indices=None, mask=None, lens=None, ..., return_loss_breakdown=False)`` returns
    ``(quantized, indices, loss)`` in the layout the replaced module used (``(B, N, dim)`` by default,
    ``(B, dim, N)`` with ``channel_last=False``, ``(B, dim, H, W)`` with ``accept_image_fmap``), indices
    ``(B, N)`` / ``(B, H, W)`` (``(..., heads)`` with several heads), ``-1`` at masked positions.
    ``project_in`` / ``project_out`` of the replaced module are kept as they were. A cosine-similarity
    codebook's inputs are normalised by ``quantizer`` (a SimVQ with ``l2_normalize=True``).
    Options of ``VectorQuantize.forward`` that only make sense for its own codebook (``topk``,
    ``sample_codebook_temp``, EMA controls, ``codebook_transform_fn``) are accepted and ignored except that
    ``indices=`` (cross-entropy to given codes) and ``topk=`` raise, since SimVQ has no equivalent.
    """

    def __init__(
        self,
        *,
        quantizer: SimVQ,
        project_in: nn.Module,
        project_out: nn.Module,
        heads: int = 1,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        return_zeros_for_masked_padding: bool = True,
    ) -> None:
        super().__init__()
        self.quantizer = quantizer  # a cosine-similarity codebook's: SimVQ(l2_normalize=True), which normalises
        self.project_in = project_in
        self.project_out = project_out
        self.heads = int(heads)
        self.channel_last = bool(channel_last)
        self.accept_image_fmap = bool(accept_image_fmap)
        self.accept_3d_fmap = bool(accept_3d_fmap)
        self.return_zeros_for_masked_padding = bool(return_zeros_for_masked_padding)
        self.codebook_size = quantizer.codebook_size

    @property
    def codebook(self) -> torch.Tensor:
        """Effective codes ``(K, codebook_dim)`` (``C W^T + b``)."""
        return self.quantizer.codebook

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        codes = self.quantizer.codes_from_indices(indices.reshape(-1).long())
        lead = indices.shape[:-1] if self.heads > 1 else indices.shape
        codes = codes.reshape(*lead, -1)
        if self.accept_image_fmap or self.accept_3d_fmap or not self.channel_last:
            codes = codes.movedim(-1, 1)
        return codes

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        codes = self.get_codes_from_indices(indices)
        if self.accept_image_fmap or self.accept_3d_fmap or not self.channel_last:
            return self.project_out(codes.movedim(1, -1)).movedim(-1, 1)
        return self.project_out(codes)

    def forward(
        self,
        x: torch.Tensor,
        indices: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        lens: torch.Tensor | None = None,
        topk: int | None = None,
        return_loss_breakdown: bool = False,
        **ignored,
    ):
        if indices is not None:
            raise ValueError("a retrofitted SimVQ layer has no cross-entropy-to-given-indices mode; call it without indices=")
        if topk is not None:
            raise ValueError("a retrofitted SimVQ layer has no top-k mode; call it without topk=")
        if mask is not None and lens is not None:
            raise ValueError("pass mask or lens, not both")
        only_one = x.dim() == 2
        spatial = None
        if only_one:
            x = x.unsqueeze(1)
        if self.accept_image_fmap or self.accept_3d_fmap:
            if mask is not None or lens is not None:
                raise ValueError("mask/lens cannot be used with feature maps")
            spatial = x.shape[2:]
            tokens = x.flatten(2).transpose(1, 2)  # (B, N, dim)
        elif not self.channel_last and not only_one:
            tokens = x.transpose(1, 2)
        else:
            tokens = x
        if lens is not None:
            mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lens[:, None]
        b, n = tokens.shape[:2]
        h = self.project_in(tokens)  # (B, N, heads * codebook_dim)
        h = h.reshape(b, n, self.heads, -1)
        chosen = h[mask] if mask is not None else h.reshape(b * n, self.heads, -1)  # (M, heads, codebook_dim)
        out = self.quantizer(chosen)  # channel_first=False: last axis is the code dimension
        q_rows = out.quantized.reshape(chosen.shape[0], -1)
        idx_rows = out.indices  # (M, heads)
        if mask is not None:
            fill = torch.zeros_like(tokens) if self.return_zeros_for_masked_padding else tokens
            q_full = h.new_zeros(b, n, q_rows.shape[-1])
            q_full[mask] = q_rows.to(q_full.dtype)
            idx_full = torch.full((b, n, self.heads), -1, dtype=torch.long, device=tokens.device)
            idx_full[mask] = idx_rows
            quantized = self.project_out(q_full)
            quantized = torch.where(mask[..., None], quantized, fill.to(quantized.dtype))
        else:
            quantized = self.project_out(q_rows.reshape(b, n, -1))
            idx_full = idx_rows.reshape(b, n, self.heads)
        embed_ind = idx_full if self.heads > 1 else idx_full[..., 0]
        if spatial is not None:
            quantized = quantized.transpose(1, 2).reshape(b, -1, *spatial)
            embed_ind = embed_ind.reshape(b, *spatial, *embed_ind.shape[2:])
        elif not self.channel_last and not only_one:
            quantized = quantized.transpose(1, 2)
        if only_one:
            quantized = quantized[:, 0]
            embed_ind = embed_ind[:, 0]
        if return_loss_breakdown:
            return quantized, embed_ind, out.loss, out
        return quantized, embed_ind, out.loss


# ----- recognising the kinds ---------------------------------------------------------------------------


def _library_kind(module: nn.Module) -> str | None:
    """Why a library quantizer cannot be retrofitted, or None when it can."""
    if isinstance(module, SimVQ):
        return "already a SimVQ layer"
    plain = {VectorQuantizer}
    try:  # the EMA VQ searches its codebook exactly as plain VQ does
        from simvq.quantizers.ema import EMAVectorQuantizer

        plain.add(EMAVectorQuantizer)
    except ImportError:
        pass
    if type(module) in plain:
        if getattr(module, "index_levels", 1) != 1:
            return "has several index levels"
        return None
    return (
        f"{type(module).__name__} does not quantize by nearest-neighbour lookup in a (K, dim) codebook in its "
        "input space, so a SimVQ layer cannot reproduce its outputs"
    )


def _vector_quantize_class():
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:  # optional dependency
        return None
    return VectorQuantize


def _vq_pytorch_problem(module: nn.Module) -> str | None:
    codebook = getattr(module, "_codebook", None)
    sampling = getattr(getattr(codebook, "gumbel_sample", None), "keywords", {}) or {}
    if sampling.get("stochastic"):
        return "samples codes stochastically (stochastic_sample_codes=True); SimVQ picks the nearest code"
    if sampling.get("straight_through"):
        return "uses a Gumbel straight-through estimator, which SimVQ does not implement"
    if getattr(codebook, "vq_bridge", None) is not None:
        return "transforms its codebook with a vq_bridge module, which a SimVQ layer would not reproduce"
    if getattr(module, "in_place_codebook_optimizer", None) is not None:
        return "updates its codebook with an in-place optimizer inside forward"
    if getattr(module, "separate_codebook_per_head", False) and module.heads > 1:
        return "has a separate codebook per head"
    if getattr(getattr(module, "_codebook", None), "affine_param", False):
        return "uses affine codebook parameters"
    if getattr(module, "directional_reparam", False) or getattr(module, "sync_update_v", 0.0) > 0:
        return "uses a gradient estimator SimVQ does not implement"
    initted = getattr(getattr(module, "_codebook", None), "initted", None)
    if isinstance(initted, torch.Tensor) and not bool(initted):
        return "its codebook is not initialised yet (kmeans_init=True and no forward pass so far)"
    embed = getattr(getattr(module, "_codebook", None), "embed", None)
    if not isinstance(embed, torch.Tensor) or embed.dim() != 3 or embed.shape[0] != 1:
        return "its codebook is not a single (1, K, d) table in _codebook.embed"
    return None


def _taming_style_problem(module: nn.Module) -> str | None:
    """Why a module with the taming layout (``embedding``, ``n_e``, ``e_dim``) is not taming's
    ``VectorQuantizer2`` convention, or None when it is."""
    cls = type(module)
    if cls.__module__.startswith("taming.") and cls.__name__ == "VectorQuantizer":
        return ("taming's first VectorQuantizer returns a one-hot (N, K) min_encodings and (N, 1) indices, a "
                "convention TamingSimVQ does not keep (VectorQuantizer2 is supported)")
    llamagen = [a for a in ("l2_norm", "entropy_loss_ratio", "show_usage") if hasattr(module, a)]
    if llamagen:
        return (f"a LlamaGen-style quantizer ({', '.join(llamagen)}): it returns (z_q, (vq_loss, commit_loss, "
                "entropy_loss, usage), ...) and, with l2_norm, normalises features and codes; TamingSimVQ keeps "
                "neither")
    return None


def _is_taming_style(module: nn.Module) -> bool:
    return (
        isinstance(getattr(module, "embedding", None), nn.Embedding)
        and hasattr(module, "n_e")
        and hasattr(module, "e_dim")
        and not isinstance(module, (Quantizer, TamingSimVQ))
    )


def _looks_like_quantizer(module: nn.Module) -> bool:
    return "quantiz" in type(module).__name__.lower()


def convert_quantizer(module: nn.Module, *, transform: str = "linear", learnable_codebook: bool = False) -> nn.Module:
    """The SimVQ replacement for one quantizer module (raises ``TypeError`` naming the reason otherwise).

    Args:
        module: a supported quantizer (see the module docstring).
        transform: ``"linear"`` (``W = I, b = 0`` at the start) or ``"mlp"`` (identity through
            ``GELU(x) - GELU(-x)``; equal up to rounding only).
        learnable_codebook: also train ``C`` (off by default: SimVQ's point is a frozen ``C``).

    Returns:
        A module on the same device, in the same train/eval mode, that computes what ``module`` computed.
    """
    new = _convert(module, transform=transform, learnable_codebook=learnable_codebook)
    if isinstance(new, str):
        raise TypeError(f"cannot retrofit {type(module).__name__}: {new}")
    return new


def _convert(module: nn.Module, *, transform: str, learnable_codebook: bool):
    """The replacement module, or a string saying why there is none (None when not a quantizer)."""
    common = dict(transform=transform, learnable_codebook=learnable_codebook)
    if isinstance(module, (TamingSimVQ, VectorQuantizeSimVQ)):
        return "already a SimVQ layer"
    if isinstance(module, Quantizer):
        problem = _library_kind(module)
        if problem:
            return problem
        cosine = bool(getattr(module, "l2_normalize", False))
        new = _simvq_from_codebook(
            # cosine codes: the unnormalised weight, which SimVQ normalises as the old layer did
            module.embedding.weight if cosine else module.codebook,
            commitment_weight=module.commitment_weight,
            # an EMA codebook has no codebook term; SimVQ needs one, since it is what trains W
            codebook_weight=getattr(module, "codebook_weight", 1.0),
            channel_first=module.channel_first,
            rotation_trick=getattr(module, "use_rotation_trick", False),
            check_finite=module.check_finite,
            l2_normalize=cosine,
            search_chunk_elements=module.search_chunk_elements,
            search=module.search,
            **common,
        )
        new.usage.counts.copy_(module.usage.counts)  # keep the tally: "before" usage stays comparable
        return new.train(module.training)
    vq_class = _vector_quantize_class()
    if vq_class is not None and isinstance(module, vq_class):
        problem = _vq_pytorch_problem(module)
        if problem:
            return problem
        simvq = _simvq_from_codebook(
            module._codebook.embed[0],
            commitment_weight=float(module.commitment_weight) if module.has_commitment_loss else 0.0,
            codebook_weight=1.0,
            channel_first=False,
            rotation_trick=bool(module.rotation_trick),
            l2_normalize=bool(getattr(module, "use_cosine_sim", False)),
            **common,
        )
        new = VectorQuantizeSimVQ(
            quantizer=simvq,
            project_in=module.project_in,
            project_out=module.project_out,
            heads=module.heads,
            channel_last=module.channel_last,
            accept_image_fmap=module.accept_image_fmap,
            accept_3d_fmap=getattr(module, "accept_3d_fmap", False),
            return_zeros_for_masked_padding=getattr(module, "return_zeros_for_masked_padding", True),
        )
        return new.train(module.training)
    if _is_taming_style(module):
        if hasattr(module, "embedding_proj"):
            raise ValueError(
                f"{type(module).__name__} is already a SimVQ layer (official layout: frozen embedding + embedding_proj); "
                "retrofit would rebuild it from the raw C and drop the projection, so it refuses: use it as it is"
            )
        extra = sorted(
            name
            for name, _ in [*module.named_parameters(), *module.named_buffers()]
            if name != "embedding.weight"
        )
        if getattr(module, "remap", None) is not None:
            return "remaps indices to a subset of the codebook (remap=...)"
        problem = _taming_style_problem(module)
        if problem:
            return problem
        if extra:
            return f"holds tensors besides its codebook ({', '.join(extra[:3])}), which a SimVQ layer would not reproduce"
        weight = module.embedding.weight
        if tuple(weight.shape) != (int(module.n_e), int(module.e_dim)):
            return f"embedding shape {tuple(weight.shape)} does not match (n_e, e_dim) = ({module.n_e}, {module.e_dim})"
        simvq = _simvq_from_codebook(
            weight,
            commitment_weight=float(getattr(module, "beta", 0.25)),
            codebook_weight=1.0,
            channel_first=True,
            **common,
        )
        new = TamingSimVQ(quantizer=simvq, sane_index_shape=getattr(module, "sane_index_shape", False))
        return new.train(module.training)
    if _looks_like_quantizer(module):
        return f"unknown quantizer kind {type(module).__name__}"
    return None


# ----- dead codes: which codes are unused, and what to do with them -------------------------------------

DEAD_CODE_STRATEGIES = ("keep", "respread", "fresh")


def _inner_simvq(module: nn.Module) -> SimVQ:
    return module if isinstance(module, SimVQ) else module.quantizer


def _vq_pytorch_features(old: nn.Module, x: torch.Tensor, mask=None, lens=None) -> torch.Tensor:
    """The ``(N, codebook_dim)`` rows a vector-quantize-pytorch ``VectorQuantize`` searches its codebook with:
    its input in ``(B, N, dim)`` layout, through ``project_in``, split into heads, masked positions left out,
    unit vectors for a cosine-similarity codebook."""
    if x.dim() == 2:
        x = x.unsqueeze(1)
    elif old.accept_image_fmap or getattr(old, "accept_3d_fmap", False):
        x = x.flatten(2).transpose(1, 2)
    elif not old.channel_last:
        x = x.transpose(1, 2)
    if lens is not None:
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < lens[:, None]
    h = old.project_in(x)
    h = h.reshape(h.shape[0], h.shape[1], old.heads, -1)
    if mask is not None:
        h = h[mask]
    rows = h.reshape(-1, h.shape[-1])
    return F.normalize(rows, dim=-1) if getattr(old, "use_cosine_sim", False) else rows


def _flat_features(old: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The ``(N, d)`` rows that ``old`` quantizes, from the first argument of its forward."""
    if isinstance(old, Quantizer):
        rows = z.movedim(1, -1) if old.channel_first else z
        rows = rows.reshape(-1, rows.shape[-1])
        return F.normalize(rows.float(), dim=-1) if getattr(old, "l2_normalize", False) else rows  # searched as unit vectors
    return z.movedim(1, -1).reshape(-1, z.shape[1])  # taming style: (B, e_dim, *spatial)


class _FeaturesCollected(Exception):
    """Raised by the feature hooks once every quantizer has its input: the rest of the forward is not needed."""


def _collect_features(model: nn.Module, olds: dict[str, nn.Module], data) -> dict[str, torch.Tensor]:
    """Run ``data`` through ``model`` (eval mode, no gradients) and keep each quantizer's input rows.

    Each forward pass stops as soon as every quantizer has received its input (the search and the decoder
    are not needed)."""
    if isinstance(data, torch.Tensor):
        batches = [data]
    else:
        try:
            batches = iter(data)
        except TypeError:
            raise TypeError(f"data must be a tensor of model inputs or an iterable of them, got {type(data).__name__}") from None
    vq_class = _vector_quantize_class()
    features: dict[str, list[torch.Tensor]] = {name: [] for name in olds}
    reached: set[str] = set()

    def hook_for(name, old):
        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs["x"]
            if vq_class is not None and isinstance(old, vq_class):  # forward(x, indices, mask, lens, ...)
                mask = args[2] if len(args) > 2 else kwargs.get("mask")
                lens = args[3] if len(args) > 3 else kwargs.get("lens")
                rows = _vq_pytorch_features(old, x, mask, lens)
            else:
                rows = _flat_features(old, x)
            features[name].append(rows.detach().float().cpu())
            reached.add(name)
            if len(reached) == len(olds):
                raise _FeaturesCollected

        return hook

    modes = {m: m.training for m in model.modules()}
    tallies = {k: v.clone() for k, v in model.named_buffers() if k.endswith("usage.counts")}
    handles = [old.register_forward_pre_hook(hook_for(name, old), with_kwargs=True) for name, old in olds.items()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model.eval()
        with torch.no_grad():
            seen = 0
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                if not isinstance(x, torch.Tensor):
                    raise TypeError(f"data batches must be tensors (or tuples whose first item is one), got {type(x).__name__}")
                reached.clear()
                try:
                    model(x.to(device))
                except _FeaturesCollected:
                    pass
                seen += 1
            if not seen:
                raise ValueError("data is empty: pass at least one batch of model inputs")
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for k, v in tallies.items():  # the dead-code census must not count as usage
                buffers[k].copy_(v)
    out = {}
    for name, parts in features.items():
        if not parts:
            raise ValueError(f"data never reached the quantizer {name}: is it called in model.forward?")
        out[name] = torch.cat(parts)
    return out


def _counts_for(name: str, counts, only_one: bool, size: int) -> torch.Tensor | None:
    if counts is None:
        return None
    if isinstance(counts, dict):
        value = counts.get(name)
        if value is None:
            raise ValueError(f"counts has no entry for the quantizer {name}; give one (K,) count tensor per replaced quantizer")
    elif only_one:
        value = counts
    else:
        raise ValueError("the model has several quantizers: pass counts as {module name: (K,) counts}")
    value = torch.as_tensor(value)
    if value.shape != (size,):
        raise ValueError(f"counts for {name} must have shape ({size},), got {tuple(value.shape)}")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"counts for {name} must be finite")
    if bool((value < 0).any()):
        raise ValueError(f"counts for {name} must be >= 0")
    return value.detach().cpu()


def _gaussian_like(live: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws from a Gaussian with the live codes' mean and covariance (float64).

    A small ridge (1e-3 of the mean variance, or 1e-6 when the live codes coincide) keeps the draws apart
    when fewer than ``d + 1`` codes are live and the covariance is singular.
    """
    live = live.double()
    mean = live.mean(0)
    centred = live - mean
    cov = centred.T @ centred / live.shape[0]
    dim = live.shape[1]
    ridge = float(torch.diagonal(cov).mean()) * 1e-3 or 1e-6
    vals, vecs = torch.linalg.eigh(cov + ridge * torch.eye(dim, dtype=torch.float64))
    root = vecs * vals.clamp_min(0).sqrt()
    noise = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return mean + noise @ root.T


def _respread(layer: SimVQ, used: torch.Tensor, feats: torch.Tensor | None, generator: torch.Generator) -> dict:
    C = layer.embedding.weight
    dead = (~used).nonzero().flatten()
    report = {"strategy": "respread", "live": int(used.sum()), "dead": int(dead.numel())}
    if dead.numel() == 0:
        report["source"] = "nothing to redraw"
        return report
    if feats is not None:
        n = feats.shape[0]
        if n >= dead.numel():
            pick = torch.randperm(n, generator=generator)[: dead.numel()]
            new = feats[pick].double()
        else:  # fewer features than dead codes: reuse them, jittered so no two codes coincide
            pick = torch.randint(n, (dead.numel(),), generator=generator)
            scale = feats.double().std(0, unbiased=False).clamp_min(1e-12) * 1e-3
            new = feats[pick].double() + torch.randn(dead.numel(), feats.shape[1], generator=generator, dtype=torch.float64) * scale
        report["source"] = f"{min(n, dead.numel())} distinct encoder features of {n}"
    else:
        new = _gaussian_like(C.detach()[used].cpu(), dead.numel(), generator)
        report["source"] = "a Gaussian fitted to the live codes"
    with torch.no_grad():
        C[dead.to(C.device)] = new.to(device=C.device, dtype=C.dtype)
    return report


def _fresh(layer: SimVQ, used: torch.Tensor, generator: torch.Generator) -> dict:
    """A new ``C ~ N(0, d^-1/2)`` and the least-squares ``W, b`` reproducing the live codes (float64)."""
    C = layer.embedding.weight
    size, dim = C.shape
    target = C.detach().cpu().double()[used]  # (K_live, d): the codes that must survive
    new_c = torch.randn(size, dim, generator=generator, dtype=torch.float64) * dim**-0.5
    design = torch.cat([new_c[used], torch.ones(target.shape[0], 1, dtype=torch.float64)], 1)  # (K_live, d + 1)
    solution = torch.linalg.lstsq(design, target, driver="gelsd").solution  # (d + 1, d): [W^T; b]
    residual = design @ solution - target
    rms = float(residual.pow(2).sum(1).mean().sqrt())
    spread = float((target - target.mean(0)).pow(2).sum(1).mean().sqrt())
    proj = layer.embedding_proj
    with torch.no_grad():
        C.copy_(new_c.to(C.dtype))
        proj.weight.copy_(solution[:dim].T.to(proj.weight.dtype))
        proj.bias.copy_(solution[dim].to(proj.bias.dtype))
    return {
        "strategy": "fresh",
        "live": int(used.sum()),
        "dead": int((~used).sum()),
        "source": "a fresh N(0, d^-1/2) codebook",
        "fit_rms": rms,
        "fit_relative": rms / spread if spread > 0 else (0.0 if rms == 0 else math.inf),
        "exact": int(used.sum()) <= dim + 1,
    }


def retrofit(
    model: nn.Module,
    *,
    transform: str = "linear",
    learnable_codebook: bool = False,
    dead_codes: str = "keep",
    data=None,
    counts=None,
    seed: int = 0,
) -> RetrofitResult:
    """Replace every supported VQ layer inside ``model`` by a SimVQ layer, in place.

    The frozen codebook ``C`` of each new layer starts from the old codebook and the transform from the
    identity (what changes depends on ``dead_codes``, below). Train on afterwards (SimVQ's loss trains
    ``W``, and through it every code). Parameters of the new layers are new objects: build the optimizer
    after calling this. Code indices keep their meaning: code ``i`` of the new layer is code ``i`` of the old.

    Args:
        model: any ``nn.Module`` holding quantizers as submodules (a bare quantizer: use
            :func:`convert_quantizer`).
        transform, learnable_codebook: see :func:`convert_quantizer`.
        dead_codes: what to do with the codes that ``data`` / ``counts`` show unused.

            - ``"keep"`` (default): ``C`` = the old codebook, ``W = I``, ``b = 0``. Exact at the swap: every
              code, and so every output, is what it was. Dead codes stay where they were; in a collapsed
              taming-style codebook they are near-identical tiny vectors that one linear map cannot spread.
            - ``"respread"``: as ``"keep"``, then the dead rows of ``C`` are redrawn: from the quantizer's input
              features when ``data`` is given (a random subset of them, distinct when there are enough), else
              from a Gaussian fitted to the live codes (their mean and covariance). Exact at the swap: every
              live code. Changes: the dead codes, so a token moves to a redrawn code when one now lies nearer
              than its old live code (with features as the source, many do: that is the point); tokens whose
              live code stays nearest give the same output as before.
            - ``"fresh"``: ``C`` is a new random ``N(0, d^-1/2)`` codebook (as SimVQ initialises it) and ``W, b``
              are the least-squares fit mapping the new rows of the live codes onto the old live codes. Exact
              at the swap only when at most ``d + 1`` codes are live (``exact`` in the report); otherwise every
              live code moves by the fit residual (``fit_rms``, ``fit_relative`` in the report). Changes: all
              dead codes (now ``C W^T + b`` of random rows), so outputs change for most inputs. Needs
              ``transform="linear"``.

        data: model inputs (a tensor, or an iterable of tensors / tuples whose first item is the input), run
            through ``model`` in eval mode without gradients to collect each quantizer's input features (each
            forward pass stops once every quantizer has its input); a code no feature is nearest to is dead.
            Usage tallies in ``model`` are left as they were.
        counts: per-code usage counts instead of (or with) ``data``: a ``(K,)`` tensor when the model has one
            quantizer, else ``{module name: (K,) tensor}``; a code with count 0 is dead (``result.live`` of an
            earlier call is accepted as it is). With both, ``counts`` decides which codes are dead and
            ``data`` supplies the features for ``"respread"``.
        seed: seeds the redrawn rows (``"respread"``) and the fresh codebook (``"fresh"``).

    Returns:
        :class:`RetrofitResult`: the replaced module names; ``.skipped`` maps the names of quantizer-like
        modules left unchanged to the reason (a warning lists them too); ``.dead_codes`` reports the
        strategy per replaced module (live / dead counts, fit residual).

    Raises:
        ValueError: an unknown ``dead_codes``; ``data``/``counts`` with ``"keep"`` or neither with the other
        strategies; counts of the wrong shape; no live code; ``"fresh"`` with an MLP transform; an official
        SimVQ layer (already SimVQ: its projection would be lost).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"retrofit expects an nn.Module, got {type(model).__name__}")
    if dead_codes not in DEAD_CODE_STRATEGIES:
        raise ValueError(f"dead_codes must be one of {', '.join(DEAD_CODE_STRATEGIES)}, got {dead_codes!r}")
    if dead_codes == "keep" and (data is not None or counts is not None):
        raise ValueError("data= and counts= find dead codes for dead_codes='respread' or 'fresh'; 'keep' uses neither")
    if dead_codes != "keep" and data is None and counts is None:
        raise ValueError(f"dead_codes={dead_codes!r} needs data= (model inputs) or counts= (per-code usage) to find the dead codes")
    if dead_codes == "fresh" and transform != "linear":
        raise ValueError("dead_codes='fresh' fits a linear W, b: use transform='linear'")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if _convert(model, transform=transform, learnable_codebook=learnable_codebook) is not None:
        raise TypeError(
            f"retrofit replaces quantizers inside a model, but got a bare {type(model).__name__}; use "
            "simvq.retrofit.convert_quantizer(quantizer) to get its SimVQ replacement"
        )
    swaps, skipped = [], {}  # (parent, child name, full name, old module, new module)

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}{child_name}"
            result = _convert(child, transform=transform, learnable_codebook=learnable_codebook)
            if isinstance(result, nn.Module):
                swaps.append((parent, child_name, name, child, result))
            else:
                if isinstance(result, str):
                    skipped[name] = result
                # a residual stack may still hold retrofittable layers
                visit(child, name + ".")

    visit(model, "")
    reports, live = {}, {}
    if dead_codes != "keep" and swaps:
        olds = {name: old for _, _, name, old, _ in swaps}
        feats = _collect_features(model, olds, data) if data is not None else {}
        generator = torch.Generator().manual_seed(seed)
        if isinstance(counts, dict) and set(counts) - set(olds):
            unknown = sorted(map(str, set(counts) - set(olds)))
            raise ValueError(f"counts names {', '.join(unknown)}, which retrofit does not replace (replaced: {', '.join(olds)})")
        for _, _, name, _, new in swaps:
            layer = _inner_simvq(new)
            size = layer.codebook_size
            given = _counts_for(name, counts, len(swaps) == 1, size)
            if given is not None:
                used = given > 0
            else:
                idx = nearest_code(feats[name].to(layer.embedding.weight.device), layer.codebook.detach())
                used = torch.bincount(idx.cpu(), minlength=size) > 0
            if not bool(used.any()):
                raise ValueError(f"no code of {name} is used on the given data/counts, so there is no live code to keep")
            live[name] = used.clone()
            if dead_codes == "respread":
                reports[name] = _respread(layer, used, feats.get(name), generator)
            else:
                reports[name] = _fresh(layer, used, generator)
    for parent, child_name, _, _, new in swaps:
        setattr(parent, child_name, new)  # works for Sequential/ModuleList/ModuleDict too
    if skipped:
        listing = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        warnings.warn(f"retrofit left these quantizer-like modules unchanged: {listing}", stacklevel=2)
    return RetrofitResult([name for _, _, name, _, _ in swaps], skipped, reports, live)


__all__ = ["DEAD_CODE_STRATEGIES", "RetrofitResult", "TamingSimVQ", "VectorQuantizeSimVQ", "convert_quantizer", "layer_config",
           "retrofit"]
