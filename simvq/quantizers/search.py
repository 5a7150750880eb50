"""Nearest-code search: the one implementation every quantizer uses.

Exact argmin of the squared L2 distance between N tokens and K codes, chunked so that the extra memory never
exceeds ``max_chunk_elements`` distances, whatever N x K is. Ties go to the lowest code index, as
``torch.argmin`` does. Nothing here is differentiable; the callers gather the selected codes afterwards so
that the backward pass never sees the N x K matrix.

How the answer is kept exact at matmul speed:

1. Precision. The search runs in fp32 (also under bf16/fp16 autocast and for bf16/fp16 inputs, which are
   upcast exactly), or in fp64 when either input is fp64.
2. Centring. ``||z - c||^2`` is translation-invariant, so tokens and codes are shifted by the codebook mean
   ``m`` first (one O(K d) pass). Features that share a large common offset (a norm of 30 with a spread of
   0.1, say) would otherwise lose every significant digit of their differences in the fp32 matmul below.
3. Matmul. Per token the distance is evaluated as ``||c'||^2 - 2 z'.c'`` (``z' = z - m``, ``c' = c - m``);
   ``||z'||^2`` is the same for every code of a row and cannot change the argmin.
4. Certificate. Rounding moves each evaluated distance by at most a bound ``B`` that follows from the unit
   roundoff, ``d``, ``||z'||`` and ``max ||c'||`` (see :func:`_rounding_bound`; it includes the rounding of
   the centring and TF32/bf16 matmul inputs when ``torch.get_float32_matmul_precision()`` allows them). A
   token whose best evaluated distance beats every other code by more than ``2 B`` has provably found the
   exact nearest code. The few tokens with a rival inside ``2 B`` (near-ties, duplicate codes) are re-ranked:
   their rivals are evaluated as ``sum((z - c)^2)`` in fp64 on the original coordinates, the smallest wins,
   and exact ties go to the lowest index.

The result is therefore the argmin of the fp64 distance ``sum((z - c)^2)``, not of the fp32 matmul form.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_ELEMENTS = None  # device default, below
# Bound on the distances held at once when the caller gives none. CPU: 128 MiB of fp32. GPU: 512 MiB, where
# fewer, larger matmuls and reductions reach 83% of the plain matmul rate against 74% at 128 MiB
# (H200, N=4096, K=262,144, d=128; docs/benchmarks.md).
CPU_CHUNK_ELEMENTS = 2**25
ACCELERATOR_CHUNK_ELEMENTS = 2**27
# Reductions run on blocks of this many codes: amin over a block is vectorised, whereas min-with-index over a
# long row is a scalar loop on CPU (~20x slower per element); the index is then found in one block per token.
REDUCE_BLOCK = 64
# Unit roundoff of the matmul inputs per torch.get_float32_matmul_precision(): "high" allows TF32 (10
# explicit mantissa bits), "medium" bf16 (7); "highest" keeps fp32 inputs (no extra rounding).
_INPUT_ROUNDOFF = {"highest": 0.0, "high": 2.0**-11, "medium": 2.0**-8}


def check_chunk_elements(value: int | None, name: str = "max_chunk_elements") -> int | None:
    """Validate a ``max_chunk_elements`` setting (``None``: the device default)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (a number of distances) or None, got {value!r}")
    return value


def _chunk_sizes(num_tokens: int, num_codes: int, max_elements: int) -> tuple[int, int]:
    """Token and code chunk sizes with token_chunk * code_chunk <= max_elements.

    Whole rows of codes are preferred (one matmul per token chunk, one reduction); the codes are split
    only when a single token's row would not fit with a reasonable number of tokens per chunk.
    """
    min_tokens = 256
    if num_codes * min(num_tokens, min_tokens) <= max_elements:
        code_chunk = num_codes
    else:
        code_chunk = max(1, max_elements // min(num_tokens, min_tokens))
    token_chunk = max(1, min(num_tokens, max_elements // code_chunk))
    return token_chunk, code_chunk


def _merge(best, cand, tol):
    """Merge two ``(value, index, rival)`` row results; ``cand`` covers higher code indices than ``best``.

    ``rival`` marks rows where some code other than the chosen one lies within ``tol`` of the minimum. On an
    exact tie the lower index (``best``) is kept.
    """
    val, idx, rival = best
    c_val, c_idx, c_rival = cand
    better = c_val < val
    close = (c_val - val).abs() <= tol
    rival = torch.where(close, True, torch.where(better, c_rival, rival))
    return torch.where(better, c_val, val), torch.where(better, c_idx, idx), rival


def _row_min(dist: torch.Tensor, tol: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row minimum, its lowest index, and whether another entry lies within ``tol`` of it (CPU form).

    Two levels: ``amin`` over blocks of ``REDUCE_BLOCK`` codes, the first block holding the row minimum,
    then the first position of that minimum inside the block. ``amin`` returns an element exactly, so the
    equality that locates it is exact and ties still go to the lowest index. The rival test reads only the
    block minima and the winning block, so it costs almost nothing.
    """
    n, w = dist.shape
    blocks = w // REDUCE_BLOCK
    if blocks == 0:
        return _plain_row_min(dist, tol)
    head_w = blocks * REDUCE_BLOCK
    head = dist[:, :head_w].reshape(n, blocks, REDUCE_BLOCK)
    block_min = head.amin(dim=2)
    val, block = block_min.min(dim=1)
    inner_row = head[torch.arange(n, device=dist.device), block]
    thr = (val + tol).unsqueeze(1)
    rival = ((block_min <= thr).sum(dim=1) > 1) | ((inner_row <= thr).sum(dim=1) > 1)
    result = val, block * REDUCE_BLOCK + inner_row.argmin(dim=1), rival
    if head_w < w:  # ragged tail of fewer than REDUCE_BLOCK codes, at higher indices
        tail_val, tail_idx, tail_rival = _plain_row_min(dist[:, head_w:], tol)
        result = _merge(result, (tail_val, tail_idx + head_w, tail_rival), tol)
    return result


def _plain_row_min(dist: torch.Tensor, tol: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same result as :func:`_row_min` with one ``min(dim=1)`` and one counting pass (accelerator form)."""
    val, idx = dist.min(dim=1)
    rival = (dist <= (val + tol).unsqueeze(1)).sum(dim=1) > 1
    return val, idx, rival


def _rounding_bound(dim: int, dtype: torch.dtype, code_norm: torch.Tensor, token_norm: torch.Tensor) -> torch.Tensor:
    """Per-token bound on |evaluated - exact| distance, for ``||c'||^2 - 2 z'.c'`` after centring.

    A length-``d`` dot product in any summation order errs by at most ``gamma = n u / (1 - n u)`` times
    ``sum |x_i y_i|`` (Higham, Accuracy and Stability of Numerical Algorithms, 3.1), so the matmul form errs
    by ``gamma (|c'|^2 + 2 |z'| |c'|)`` with ``n = d + 2`` (the final add and scale included), plus
    ``2 u_in`` per product when TF32/bf16 matmul inputs are allowed. Centring rounds ``z'`` and ``c'``
    once each; that moves ``|z' - c'|^2`` by at most ``2 u (|z'| + |c'|)^2 (1 + u)``. The sum is inflated by
    10% to cover the rounding of the norms and of the threshold themselves.
    """
    u = torch.finfo(dtype).eps / 2
    u_in = _INPUT_ROUNDOFF.get(torch.get_float32_matmul_precision(), 2.0**-8) if dtype == torch.float32 else 0.0
    n = dim + 2
    gamma = n * u / (1 - n * u) + 2 * u_in
    c = code_norm
    return 1.1 * (gamma * (c * c + 2 * c * token_norm) + 2 * u * (1 + u) * (token_norm + c).pow(2))


def _rerank(z, codebook, zc, cc_t, c_sq, thr, max_elements):
    """Exact argmin for a few tokens: codes whose evaluated distance is within ``thr`` are compared by
    ``sum((z - c)^2)`` in fp64 on the original coordinates; exact ties go to the lowest index."""
    num_tokens, num_codes = zc.shape[0], cc_t.shape[1]
    best = torch.full((num_tokens,), float("inf"), dtype=torch.float64, device=z.device)
    best_idx = torch.full((num_tokens,), num_codes, dtype=torch.long, device=z.device)
    # nonzero() returns two int64 per hit: a smaller budget keeps the worst case (all codes equal) bounded
    max_elements = max(1, max_elements // 8)
    token_chunk, code_chunk = _chunk_sizes(num_tokens, num_codes, max_elements)
    pair_chunk = max(1, max_elements // z.shape[1])
    for t0 in range(0, num_tokens, token_chunk):
        zt = zc[t0 : t0 + token_chunk]
        for k0 in range(0, num_codes, code_chunk):
            dist = torch.addmm(c_sq[k0 : k0 + code_chunk], zt, cc_t[:, k0 : k0 + code_chunk], beta=1.0, alpha=-2.0)
            rows, cols = (dist <= thr[t0 : t0 + token_chunk, None]).nonzero(as_tuple=True)
            rows, cols = rows + t0, cols + k0
            for p0 in range(0, rows.numel(), pair_chunk):
                r, c = rows[p0 : p0 + pair_chunk], cols[p0 : p0 + pair_chunk]
                exact = (z[r].double() - codebook[c].double()).pow(2).sum(dim=1)
                new_best = best.scatter_reduce(0, r, exact, reduce="amin")
                best_idx = torch.where(best == new_best, best_idx, num_codes)  # an old winner survives a tie
                hit = exact == new_best[r]
                best_idx = best_idx.scatter_reduce(0, r[hit], c[hit], reduce="amin")
                best = new_best
    return best_idx


@torch.no_grad()
def nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    max_chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Index of the nearest code (squared L2) for every token, exact (see the module docstring).

    Args:
        z: ``(N, d)`` tokens, any floating dtype.
        codebook: ``(K, d)`` codes.
        max_chunk_elements: bound on the number of distances held at once (``None``: 2**25 on CPU,
            2**27 on accelerators).

    Returns:
        ``(N,)`` int64 indices in ``[0, K)``.
    """
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest_code expects z (N, d) and codebook (K, d) with the same d, got {tuple(z.shape)} "
            f"and {tuple(codebook.shape)}"
        )
    max_chunk_elements = check_chunk_elements(max_chunk_elements)
    num_tokens, num_codes = z.shape[0], codebook.shape[0]
    out = torch.empty(num_tokens, dtype=torch.long, device=z.device)
    if num_tokens == 0:
        return out
    device_type = z.device.type
    if max_chunk_elements is None:
        max_chunk_elements = CPU_CHUNK_ELEMENTS if device_type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    # CPU: min-with-index over a long row is a scalar loop, so reduce in two levels; GPUs reduce a row with
    # its index at memory speed, and the two-level form costs them 20-30% of the search (measured on H200)
    row_min = _row_min if device_type == "cpu" else _plain_row_min
    dtype = torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32
    with torch.autocast(device_type=device_type, enabled=False):
        mean = codebook.to(dtype).mean(dim=0)
        zc = z.to(dtype) - mean
        cc = codebook.to(dtype) - mean
        c_sq = cc.pow(2).sum(dim=1)
        tol = 2 * _rounding_bound(z.shape[1], dtype, c_sq.max().sqrt(), zc.norm(dim=1))
        token_chunk, code_chunk = _chunk_sizes(num_tokens, num_codes, max_chunk_elements)
        cc_t = cc.t()
        buffer = torch.empty(token_chunk, code_chunk, dtype=dtype, device=z.device)
        thr = torch.empty(num_tokens, dtype=dtype, device=z.device)
        rival = torch.empty(num_tokens, dtype=torch.bool, device=z.device)
        for t0 in range(0, num_tokens, token_chunk):
            zt, tol_t = zc[t0 : t0 + token_chunk], tol[t0 : t0 + token_chunk]
            nt = zt.shape[0]
            best = None
            for k0 in range(0, num_codes, code_chunk):
                k1 = min(k0 + code_chunk, num_codes)
                dist = buffer[:nt, : k1 - k0]
                # dist = ||c'||^2 - 2 z' c', written in place into the reused buffer
                torch.addmm(c_sq[k0:k1], zt, cc_t[:, k0:k1], beta=1.0, alpha=-2.0, out=dist)
                val, idx, near = row_min(dist, tol_t)
                best = (val, idx, near) if best is None else _merge(best, (val, idx + k0, near), tol_t)
            out[t0 : t0 + nt], rival[t0 : t0 + nt] = best[1], best[2]
            thr[t0 : t0 + nt] = best[0] + tol_t
        ties = rival.nonzero().squeeze(1)
        if ties.numel():
            out[ties] = _rerank(z[ties], codebook, zc[ties], cc_t, c_sq, thr[ties], max_chunk_elements)
    return out
