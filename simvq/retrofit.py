"""Retrofit: swap the VQ layers of a trained model for SimVQ layers without changing its outputs.

``retrofit(model)`` walks the model and replaces every vector quantizer it recognises by a SimVQ layer
whose frozen codebook ``C`` is the old codebook and whose linear transform starts at the identity
(``W = I``, ``b = 0``). At the moment of the swap the effective codebook ``C W^T + b`` equals the old one
bit for bit, so the model computes exactly what it computed before; training on from there moves every
code at once through ``W`` (the SimVQ mechanism), which is what revives the dead codes of a collapsed
codebook.

Recognised kinds:

- this library's :class:`~simvq.quantizers.vq.VectorQuantizer` (and the EMA variant, whose forward is the
  same nearest-code lookup): replaced by a :class:`~simvq.quantizers.simvq.SimVQ` with the same layout,
  loss weights and gradient estimator. Same interface, nothing to adapt.
- taming-transformers style quantizers: any module with an ``embedding`` ``nn.Embedding`` table and
  ``n_e`` / ``e_dim`` attributes, called as ``quantizer(z)`` on ``(B, e_dim, H, W)`` features and returning
  ``(z_q, loss, (perplexity, min_encodings, indices))``. Replaced by :class:`TamingSimVQ`, which keeps that
  return convention (``min_encodings`` is ``None``, as taming's ``VectorQuantizer2`` returns it, because a
  one-hot ``(N, K)`` matrix is too large at big ``K``). The loss uses ``beta`` on the commitment term and
  1.0 on the codebook term whatever taming's ``legacy`` flag said (see REFERENCE.md: ``legacy=True`` puts
  ``beta`` on the wrong term).
- vector-quantize-pytorch's ``VectorQuantize`` (Euclidean codebook, one codebook shared by all heads, no
  index remapping): the codebook is read from ``_codebook.embed`` ``(1, K, codebook_dim)``. Replaced by
  :class:`VectorQuantizeSimVQ`, which keeps the call signature ``vq(x, mask=None, lens=None, ...)``, the
  layouts (``channel_last``, ``accept_image_fmap``, ``accept_3d_fmap``), ``project_in`` / ``project_out``
  and the return convention ``(quantized, indices, loss)``. ``return_loss_breakdown=True`` appends the
  SimVQ :class:`~simvq.quantizers.base.QuantizerOutput` as a fourth element.

Anything else that looks like a quantizer (a class name containing "Quantiz", or a known kind with an
option SimVQ cannot reproduce exactly, such as cosine-similarity search) is left alone and listed in
:attr:`RetrofitResult.skipped` with the reason, and a warning is issued.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from simvq.quantizers.base import Quantizer
from simvq.quantizers.simvq import SimVQ
from simvq.quantizers.vq import VectorQuantizer


class RetrofitResult(list):
    """The names (``model.named_modules()`` style) of the replaced modules, in model order.

    Attributes:
        skipped: ``{module name: reason}`` for quantizer-like modules left unchanged.
    """

    def __init__(self, replaced=(), skipped: dict | None = None) -> None:
        super().__init__(replaced)
        self.skipped: dict[str, str] = dict(skipped or {})

    def __repr__(self) -> str:
        return f"RetrofitResult(replaced={list(self)!r}, skipped={self.skipped!r})"


# ----- building the SimVQ layer ------------------------------------------------------------------------


def _simvq_from_codebook(
    codebook: torch.Tensor,
    *,
    transform: str,
    learnable_codebook: bool,
    commitment_weight: float,
    codebook_weight: float,
    channel_first: bool,
    rotation_trick: bool = False,
    check_finite: bool = True,
) -> SimVQ:
    """A SimVQ whose frozen ``C`` is ``codebook`` ``(K, d)`` and whose transform is the identity map."""
    codebook = codebook.detach()
    size, dim = codebook.shape
    if transform not in ("linear", "mlp"):
        raise ValueError(f"transform must be 'linear' or 'mlp' for a retrofit, got {transform!r}")
    layer = SimVQ(
        dim=dim,
        codebook_size=size,
        transform=transform,
        learnable_codebook=learnable_codebook,
        rotation_trick=rotation_trick,
        commitment_weight=commitment_weight,
        codebook_weight=codebook_weight,
        channel_first=channel_first,
        check_finite=check_finite,
    )
    layer = layer.to(device=codebook.device)
    with torch.no_grad():
        layer.embedding.weight.copy_(codebook.float())
        _init_identity(layer.embedding_proj, dim)
    return layer


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
    ``project_in`` / ``project_out`` of the replaced module are kept as they were.
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
        self.quantizer = quantizer
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
    if getattr(module, "use_cosine_sim", False):
        return "uses cosine-similarity search (SimVQ searches by squared L2)"
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
        new = _simvq_from_codebook(
            module.codebook,
            commitment_weight=module.commitment_weight,
            # an EMA codebook has no codebook term; SimVQ needs one, since it is what trains W
            codebook_weight=getattr(module, "codebook_weight", 1.0),
            channel_first=module.channel_first,
            rotation_trick=getattr(module, "use_rotation_trick", False),
            check_finite=module.check_finite,
            **common,
        )
        new.search_chunk_elements = getattr(module, "search_chunk_elements", new.search_chunk_elements)
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
        if getattr(module, "remap", None) is not None:
            return "remaps indices to a subset of the codebook (remap=...)"
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


def retrofit(model: nn.Module, *, transform: str = "linear", learnable_codebook: bool = False) -> RetrofitResult:
    """Replace every supported VQ layer inside ``model`` by a SimVQ layer, in place.

    The frozen codebook ``C`` of each new layer is the old codebook; the transform starts at the identity,
    so ``model``'s outputs are unchanged right after the call. Train on afterwards (SimVQ's loss trains
    ``W``, and through it every code). Parameters of the new layers are new objects: build the optimizer
    after calling this.

    Args:
        model: any ``nn.Module`` holding quantizers as submodules (a bare quantizer: use
            :func:`convert_quantizer`).
        transform, learnable_codebook: see :func:`convert_quantizer`.

    Returns:
        :class:`RetrofitResult`: the replaced module names; ``.skipped`` maps the names of quantizer-like
        modules left unchanged to the reason (a warning lists them too).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"retrofit expects an nn.Module, got {type(model).__name__}")
    if _convert(model, transform=transform, learnable_codebook=learnable_codebook) is not None:
        raise TypeError(
            f"retrofit replaces quantizers inside a model, but got a bare {type(model).__name__}; use "
            "simvq.retrofit.convert_quantizer(quantizer) to get its SimVQ replacement"
        )
    replaced, skipped = [], {}

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}{child_name}"
            result = _convert(child, transform=transform, learnable_codebook=learnable_codebook)
            if isinstance(result, nn.Module):
                setattr(parent, child_name, result)  # works for Sequential/ModuleList/ModuleDict too
                replaced.append(name)
            elif isinstance(result, str):
                skipped[name] = result
                # a residual stack may still hold retrofittable layers
                visit(child, name + ".")
            else:
                visit(child, name + ".")

    visit(model, "")
    if skipped:
        listing = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        warnings.warn(f"retrofit left these quantizer-like modules unchanged: {listing}", stacklevel=2)
    return RetrofitResult(replaced, skipped)


__all__ = ["RetrofitResult", "TamingSimVQ", "VectorQuantizeSimVQ", "convert_quantizer", "retrofit"]
