"""Nearest-code search: the one implementation every quantizer uses.

Exact argmin of the squared L2 distance between N tokens and K codes, computed in fp32 (also under
bf16/fp16 autocast) and chunked so that the extra memory never exceeds ``max_chunk_elements`` floats,
whatever N x K is. Ties go to the lowest code index, as ``torch.argmin`` does.

The distance ``||z - c||^2 = ||z||^2 - 2 z.c + ||c||^2`` is reduced to ``||c||^2 - 2 z.c``: the token norm
is the same for every code of a row and cannot change the argmin. Nothing here is differentiable; the
callers gather the selected codes afterwards so that the backward pass never sees the N x K matrix.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_ELEMENTS = None  # device default, below
# Bound on the fp32 distances held at once when the caller gives none. CPU: 128 MiB. GPU: 512 MiB, where
# fewer, larger matmuls and reductions reach 83% of the plain matmul rate against 74% at 128 MiB
# (H200, N=4096, K=262,144, d=128; docs/benchmarks.md).
CPU_CHUNK_ELEMENTS = 2**25
ACCELERATOR_CHUNK_ELEMENTS = 2**27
# Reductions run on blocks of this many codes: amin over a block is vectorised, whereas min-with-index over a
# long row is a scalar loop on CPU (~20x slower per element); the index is then found in one block per token.
REDUCE_BLOCK = 64


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


def _row_min(dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row minimum and its lowest index for ``(n, w)`` distances, same result as ``dist.min(dim=1)``.

    Two levels: ``amin`` over blocks of ``REDUCE_BLOCK`` codes, the first block holding the row minimum,
    then the first position of that minimum inside the block. ``amin`` returns an element exactly, so the
    equality that locates it is exact and ties still go to the lowest index.
    """
    n, w = dist.shape
    blocks = w // REDUCE_BLOCK
    if blocks == 0:
        return dist.min(dim=1)
    head_w = blocks * REDUCE_BLOCK
    head = dist[:, :head_w].reshape(n, blocks, REDUCE_BLOCK)
    val, block = head.amin(dim=2).min(dim=1)
    inner = head[torch.arange(n, device=dist.device), block].argmin(dim=1)
    idx = block * REDUCE_BLOCK + inner
    if head_w < w:
        # ragged tail of fewer than REDUCE_BLOCK codes; it wins only when strictly smaller (higher indices)
        tail_val, tail_idx = dist[:, head_w:].min(dim=1)
        better = tail_val < val
        val = torch.where(better, tail_val, val)
        idx = torch.where(better, tail_idx + head_w, idx)
    return val, idx


def _plain_row_min(dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return dist.min(dim=1)


@torch.no_grad()
def nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    max_chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
    codebook_sq_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Index of the nearest code (squared L2) for every token.

    Args:
        z: ``(N, d)`` tokens, any floating dtype.
        codebook: ``(K, d)`` codes.
        max_chunk_elements: bound on the number of fp32 distances held at once (``None``: 2**25 on CPU,
            2**27 on accelerators).
        codebook_sq_norms: optional precomputed ``(K,)`` squared norms of the codes (fp32).

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
    with torch.autocast(device_type=device_type, enabled=False):
        z32 = z.float()
        c32 = codebook.float()
        c_sq = codebook_sq_norms.float() if codebook_sq_norms is not None else c32.pow(2).sum(dim=1)
        token_chunk, code_chunk = _chunk_sizes(num_tokens, num_codes, max_chunk_elements)
        c32_t = c32.t()
        buffer = torch.empty(token_chunk, code_chunk, dtype=torch.float32, device=z.device)
        for t0 in range(0, num_tokens, token_chunk):
            zt = z32[t0 : t0 + token_chunk]
            nt = zt.shape[0]
            best_val = best_idx = None
            for k0 in range(0, num_codes, code_chunk):
                k1 = min(k0 + code_chunk, num_codes)
                dist = buffer[:nt, : k1 - k0]
                # dist = ||c||^2 - 2 z c, written in place into the reused buffer
                torch.addmm(c_sq[k0:k1], zt, c32_t[:, k0:k1], beta=1.0, alpha=-2.0, out=dist)
                val, idx = row_min(dist)
                if best_val is None:
                    best_val, best_idx = val, idx
                else:
                    # strictly smaller only: on a tie the earlier (lower-index) chunk keeps the win
                    better = val < best_val
                    best_val = torch.where(better, val, best_val)
                    best_idx = torch.where(better, idx + k0, best_idx)
            out[t0 : t0 + nt] = best_idx
    return out
