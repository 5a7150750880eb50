"""The quantizer interface shared by every quantizer family.

A quantizer takes features ``z`` of shape ``(B, dim, *spatial)`` (channel-first, as conv features) or,
with ``channel_first=False``, ``(B, *, dim)``, and returns a :class:`QuantizerOutput`. Subclasses implement
:meth:`Quantizer.quantize_tokens` on flat ``(N, dim)`` tokens; layout handling, input validation, usage
counting and the empty-batch case live here once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from simvq.usage import CodebookUsage


class NonFiniteInputError(ValueError):
    """A quantizer was given NaN or Inf features (training has diverged upstream)."""


class QuantizerOutput(NamedTuple):
    """What every quantizer returns.

    Attributes:
        quantized: same shape as the input; values are the selected codes, gradients flow to the input
            through the straight-through estimator (or the rotation trick).
        indices: ``(B, *spatial)`` int64 code indices (``(B, *spatial, levels)`` for residual stacks).
        loss: the weighted total of the terms below; add it to the training loss.
        commitment_loss: unweighted ``mean((z - sg(q))^2)``; its gradient reaches the encoder only.
        codebook_loss: unweighted ``mean((sg(z) - q)^2)``; its gradient reaches the codebook only.
        aux_loss: unweighted auxiliary term (e.g. LFQ's entropy loss); zero when the family has none.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    commitment_loss: torch.Tensor
    codebook_loss: torch.Tensor
    aux_loss: torch.Tensor


class TokenResult(NamedTuple):
    """What :meth:`Quantizer.quantize_tokens` returns for flat ``(N, dim)`` tokens."""

    quantized: torch.Tensor  # (N, dim), already straight-through
    indices: torch.Tensor  # (N,) or (N, levels)
    loss: torch.Tensor
    commitment_loss: torch.Tensor
    codebook_loss: torch.Tensor
    aux_loss: torch.Tensor


def straight_through(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward value ``q``, gradient of the identity to ``z``: ``z + sg(q - z)``."""
    # written as sg(q) + (z - sg(z)): z - z is exactly 0 for finite z, so the forward value is q bit for
    # bit, whereas z + (q - z) rounds and drifts from the code (decode_indices would then disagree)
    return q.detach() + (z - z.detach())


def rotation_trick(z: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Forward value ``q``; gradient to ``z`` through the fixed rotation-and-scale taking ``z`` to ``q``.

    Fifty et al. 2024 ("Restructuring Vector Quantization with the Rotation Trick"): ``q = sg(lambda R) z``
    with ``R`` the Householder-style rotation from ``z/|z|`` to ``q/|q|`` and ``lambda = |q|/|z|``.
    Rows are ``(N, dim)``.
    """
    z_norm = z.norm(dim=-1, keepdim=True).clamp_min(eps)
    q_norm = q.norm(dim=-1, keepdim=True).clamp_min(eps)
    u = (z / z_norm).detach()
    v = (q / q_norm).detach()
    w = u + v
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(eps)
    # R z = z - 2 w (w.z) + 2 v (u.z); every coefficient vector is a constant
    rotated = z - 2 * w * (w * z).sum(-1, keepdim=True) + 2 * v * (u * z).sum(-1, keepdim=True)
    out = rotated * (q_norm / z_norm).detach()
    # the algebra gives exactly q up to rounding; make the forward value bit-exact (out + sg(q - out) would
    # round again, so add a zero that carries the gradient instead)
    return q.detach() + (out - out.detach())


def vq_loss_terms(z: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two named VQ-VAE loss terms, unweighted, in fp32 (fp64 when either input is fp64).

    ``commitment = mean((z - sg(q))^2)`` (reaches the encoder), ``codebook = mean((sg(z) - q)^2)``
    (reaches the codebook parameters). Keeping them separate stops a single ``beta`` from landing on
    the wrong term.
    """
    dtype = compute_dtype(z, q)
    return _VQLossTerms.apply(z.to(dtype), q.to(dtype))


class _VQLossTerms(torch.autograd.Function):
    """Both terms from one difference ``d = z - q``: they have the same value, ``mean(d^2)``, and the gradients
    ``2 d / n`` (to ``z``, from the commitment term) and ``-2 d / n`` (to ``q``, from the codebook term).
    One pass over the tokens forward and one per input backward, where two separate ``pow().mean()`` terms
    make about eight; on a CPU each such pass over an (N, d) tensor costs as much as the rest of a small step.
    """

    @staticmethod
    def forward(ctx, z, q):
        d = z - q
        flat = d.reshape(-1)
        value = torch.dot(flat, flat) / flat.numel()  # no tokens: 0 / 0 = nan, as mean() of nothing
        ctx.save_for_backward(d)
        return value, value.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_commitment, grad_codebook):
        (d,) = ctx.saved_tensors
        scale = 2.0 / max(d.numel(), 1)
        grad_z = d * (grad_commitment * scale) if ctx.needs_input_grad[0] else None
        grad_q = d * (grad_codebook * -scale) if ctx.needs_input_grad[1] else None
        return grad_z, grad_q


def gather_rows(table: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``table[indices]`` (rows of a 2-D ``table``), differentiable in ``table``.

    On the CPU the backward accumulates the rows' gradients with ``index_add_``: autograd's own backward of
    indexing (``index_put_`` with ``accumulate=True``) took 2.0 ms against 0.1 ms for 4,096 rows of 128 into
    1,024 on two cores. Elsewhere (and without gradients) plain indexing.
    """
    if table.device.type != "cpu" or not (table.requires_grad and torch.is_grad_enabled()):
        return table[indices]
    return _GatherRows.apply(table, indices)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table, indices):
        ctx.save_for_backward(indices)
        ctx.num_rows = table.shape[0]
        return table[indices]

    @staticmethod
    def backward(ctx, grad):
        # out of place, so that a double backward (create_graph=True) differentiates through it too
        (indices,) = ctx.saved_tensors
        row = grad.shape[indices.dim() :]
        return grad.new_zeros((ctx.num_rows, *row)).index_add(0, indices.reshape(-1), grad.reshape(-1, *row)), None


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype quantizers compute in: fp64 when any of ``tensors`` is fp64, else fp32.

    bf16 / fp16 features or modules (``bf16-true``, ``16-mixed``) are upcast, so code distances, rounding
    boundaries and loss terms never run in 16 bits; fp64 (``64-true``) stays fp64.
    """
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def call_in_dtype(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` computed in ``x.dtype`` with autocast off.

    Floating parameters and buffers of another dtype (a module cast to bf16) are cast for this call only,
    differentiably, so their gradients still arrive in the module's own dtype.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        if all(t.dtype == x.dtype or not t.is_floating_point() for t in tensors.values()):
            return module(x)
        cast = {name: t.to(x.dtype) if t.is_floating_point() else t for name, t in tensors.items()}
        return torch.func.functional_call(module, cast, (x,))


def _check_weight(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


class Quantizer(nn.Module):
    """Base class: layout, validation and usage counting around :meth:`quantize_tokens`.

    Args:
        dim: channel size of the input features.
        codebook_size: number of codes ``K`` (the size of the index space).
        channel_first: input is ``(B, dim, *spatial)`` when True, ``(B, *, dim)`` when False.
        check_finite: raise on NaN/Inf inputs (one device sync per call; set False to skip the check).
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int,
        channel_first: bool = True,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(codebook_size, int) or isinstance(codebook_size, bool) or codebook_size < 1:
            raise ValueError(f"codebook_size must be a positive integer, got {codebook_size!r}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.channel_first = bool(channel_first)
        self.check_finite = bool(check_finite)
        self.usage = CodebookUsage(codebook_size)

    # ----- to implement -----------------------------------------------------------------------------
    def quantize_tokens(self, z: torch.Tensor) -> TokenResult:  # pragma: no cover - abstract
        """Quantize flat ``(N, dim)`` tokens."""
        raise NotImplementedError

    @property
    def codebook(self) -> torch.Tensor:  # pragma: no cover - abstract
        """The effective codes, ``(K, dim)``."""
        raise NotImplementedError

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes ``(N, dim)`` for flat indices; families with several index columns override this."""
        return self.codebook[indices]

    def compute_dtype(self, *tensors: torch.Tensor) -> torch.dtype:
        """fp64 when ``tensors`` or this module's parameters and buffers are fp64, else fp32."""
        return compute_dtype(*tensors, *self.parameters(), *self.buffers())

    # ----- shared machinery -------------------------------------------------------------------------
    @property
    def index_levels(self) -> int:
        """Number of index columns per token (1 for single codebooks, the depth for residual stacks)."""
        return 1

    def _validate(self, z: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(z).__name__}")
        if not z.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} expects floating-point features, got dtype {z.dtype}; "
                "convert with z.float()"
            )
        if z.dim() < 2:
            raise ValueError(
                f"{type(self).__name__} expects at least 2 dimensions "
                f"({'(B, dim, *spatial)' if self.channel_first else '(B, *, dim)'}), got shape {tuple(z.shape)}"
            )
        channel_axis = 1 if self.channel_first else -1
        if z.shape[channel_axis] != self.dim:
            layout = "(B, dim, *spatial)" if self.channel_first else "(B, *, dim)"
            raise ValueError(
                f"{type(self).__name__} expects {self.dim} channels in layout {layout} "
                f"(channel_first={self.channel_first}), got shape {tuple(z.shape)} with "
                f"{z.shape[channel_axis]} channels on axis {channel_axis}"
            )
        if self.check_finite and not torch.compiler.is_compiling() and z.numel() > 0:
            # a finite sum proves every element finite (NaN and Inf propagate) in one vectorised pass; only
            # a non-finite sum (which overflow of finite values can also give) needs the element-wise check
            if not bool(torch.isfinite(z.sum())) and not bool(torch.isfinite(z).all()):
                raise NonFiniteInputError(
                    f"{type(self).__name__} got NaN or Inf in its input; fix the encoder (lower the "
                    "learning rate, clip gradients) or pass check_finite=False to skip this check"
                )

    def _to_tokens(self, z: torch.Tensor) -> torch.Tensor:
        if self.channel_first:
            z = z.movedim(1, -1)
        return z.reshape(-1, self.dim)

    def _from_tokens(self, flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.channel_first:
            shape = (like.shape[0], *like.shape[2:], self.dim)
            return flat.reshape(shape).movedim(-1, 1)
        return flat.reshape(like.shape)

    def _index_shape(self, z: torch.Tensor) -> tuple[int, ...]:
        spatial = z.shape[2:] if self.channel_first else z.shape[1:-1]
        shape = (z.shape[0], *spatial)
        return shape if self.index_levels == 1 else (*shape, self.index_levels)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self._validate(z)
        flat = self._to_tokens(z)
        if flat.shape[0] == 0:
            zero = z.new_zeros((), dtype=torch.float32)
            return QuantizerOutput(
                z.clone(), torch.zeros(self._index_shape(z), dtype=torch.long, device=z.device), zero, zero, zero, zero
            )
        res = self.quantize_tokens(flat)
        self.usage.update(res.indices)
        quantized = self._from_tokens(res.quantized.to(z.dtype), z)
        return QuantizerOutput(
            quantized,
            res.indices.reshape(self._index_shape(z)),
            res.loss,
            res.commitment_loss,
            res.codebook_loss,
            res.aux_loss,
        )

    def _validate_indices(self, indices: torch.Tensor) -> None:
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex():
            raise TypeError(f"indices must be an integer tensor, got {getattr(indices, 'dtype', type(indices))}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"indices must lie in [0, {self.codebook_size}), got values in "
                f"[{int(indices.min())}, {int(indices.max())}]; were they made with another codebook size?"
            )

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for ``indices`` of shape ``(B, *spatial)``, returned in the input layout."""
        self._validate_indices(indices)
        levels = self.index_levels
        if levels > 1 and (indices.dim() < 2 or indices.shape[-1] != levels):
            raise ValueError(f"indices must end with a dimension of {levels} levels, got shape {tuple(indices.shape)}")
        lead = indices.shape if levels == 1 else indices.shape[:-1]
        flat = indices.reshape(-1) if levels == 1 else indices.reshape(-1, levels)
        codes = self.codes_from_indices(flat.long()).reshape(*lead, self.dim)
        return codes.movedim(-1, 1) if self.channel_first and codes.dim() > 1 else codes

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, channel_first={self.channel_first}"
