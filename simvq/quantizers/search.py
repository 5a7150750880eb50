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

Paths (``search=``; every path returns the same indices):

- ``"exact-fp32"``: the steps above (fp64 throughout for fp64 inputs).
- ``"fp32-fused"``: the same steps in one C kernel for CPUs without hardware bf16 (AVX2 + FMA;
  :mod:`simvq.quantizers.native`): each token's smallest value, its code and the runner-up value are kept in
  registers as the fp32 values are computed, so no distance is written to memory; tokens whose runner-up is
  within the certificate are re-ranked as in step 4. See :func:`_fp32_fused`.
- ``"bf16-candidates"``: the distance matmul runs in bf16 (5-7x the fp32 rate on CPUs with AVX512-BF16, and
  tensor cores on GPUs), with fp32 accumulation. A per-token bound on its error (bf16 rounding of both
  inputs, fp32 accumulation, the bf16 rounding of the output; :func:`_bf16_error_terms`) gives a
  threshold above the row minimum beyond which no code can be as near as the best; every code under it is
  a candidate, and the candidates are re-ranked by the exact path's rule (fp32 ``||c'||^2 - 2 z'.c'`` with
  its certificate, fp64 ``sum((z - c)^2)`` for near-ties). Tokens with more than ``MAX_CANDIDATES``
  candidates (or candidates spread over more than ``MAX_CANDIDATE_BLOCKS`` reduction blocks: duplicated
  codes, dense clusters) are searched again by the exact path; when more than ``BF16_GIVE_UP_FRACTION`` of
  the first token chunk does, the other chunks go straight to the exact path. The bound assumes round-to-nearest bf16
  conversions and fp32 accumulation inside the matmul, rounded to nearest as AVX512-BF16 and AMX do, or with
  the larger unit :data:`TENSOR_CORE_ACC_ROUNDOFF` on CUDA, whose tensor cores truncate;
  tests/test_search_paths.py checks it against float64 on the running machine.
- ``"bf16-fused"``: the bf16-candidates rule in one C kernel (:mod:`simvq.quantizers.native`, CPUs with
  AVX512-BF16): the products are accumulated in fp32 registers, each token's running minimum is kept as
  they are computed and the codes within the bound of it at the end of each pass over a block of codes, so
  no distance is written to memory, and the values are not rounded to bf16 (a smaller bound, fewer
  candidates). See :func:`_bf16_fused`.
- ``"bf16-triton"``: the same rule as one Triton kernel on CUDA GPUs (:mod:`simvq.quantizers.triton_search`):
  bf16 products on the tensor cores with fp32 accumulation, each token's running minimum in registers and the
  tiles of codes within the bound of it recorded, no distance written to memory; the codes of the recorded
  tiles are evaluated again in fp32 and settled as the bf16-candidates path settles its candidates. See
  :func:`_bf16_triton`. Not timed on a GPU yet, so ``"auto"`` does not choose it.
- ``"auto"`` (default): on CPUs with hardware bf16, for fp32 searches, ``"bf16-fused"`` from
  ``BF16_FUSED_MIN_DISTANCES`` distances where the kernel builds, else ``"bf16-candidates"`` from
  ``BF16_MIN_DISTANCES`` distances of codes at least ``BF16_MIN_DIM`` wide; on other CPUs ``"fp32-fused"``
  from ``FP32_FUSED_MIN_PRODUCTS`` multiply-adds (tokens x codes x width) where its kernel builds;
  ``"exact-fp32"`` otherwise (:func:`resolve_search`).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import torch

from simvq.quantizers.native import Finish, bf16_search_kernel, default_threads, fp32_search_kernel, native_status

DEFAULT_CHUNK_ELEMENTS = None  # device default, below
# Bound on the distances held at once when the caller gives none. CPU: 128 MiB of fp32. GPU: 512 MiB, where
# fewer, larger matmuls and reductions reach 83% of the plain matmul rate against 74% at 128 MiB
# (H200, N=4096, K=262,144, d=128; docs/benchmarks.md).
CPU_CHUNK_ELEMENTS = 2**25
ACCELERATOR_CHUNK_ELEMENTS = 2**27
# The bf16 path on CPU, when such a chunk still holds whole rows of codes for at least 256 tokens (K <= 32,768):
# 2**23 distances, 16 MiB of bf16 output that stays in the last-level cache between the matmul and the block
# minima. Two threads, N = 4,096, d = 128, SimVQ codebooks: K = 4,096: 18 vs 31 ms at 2**25; 8,192: 29 vs 44 ms;
# 16,384: 68 vs 86 ms; 32,768: 133 vs 141 ms; from K = 65,536 (128 tokens per chunk) 2**25 is faster (281 vs
# 315 ms); docs/benchmarks.md
CPU_BF16_CHUNK_ELEMENTS = 2**23
# Reductions run on blocks of this many codes: amin over a block is vectorised, whereas min-with-index over a
# long row is a scalar loop on CPU (~20x slower per element); the index is then found in one block per token.
REDUCE_BLOCK = 64
# Unit roundoff of the matmul inputs per torch.get_float32_matmul_precision(): "high" allows TF32 (10
# explicit mantissa bits), "medium" bf16 (7); "highest" keeps fp32 inputs (no extra rounding).
_INPUT_ROUNDOFF = {"highest": 0.0, "high": 2.0**-11, "medium": 2.0**-8}
# The search paths (see nearest_code). "auto" resolves to one of the others per call (resolve_search).
SEARCH_PATHS = ("auto", "exact-fp32", "fp32-fused", "bf16-candidates", "bf16-fused", "bf16-triton")
# "auto" uses the bf16 path on CPUs from this many distances (tokens x codes) per call up: below it the fixed
# cost of the candidate bookkeeping outweighs the faster matmul (1,024 x 512: 0.9x the exact path's speed,
# 1,024 x 1,024: 1.2x, 4,096 x 256: 1.1x; one thread, SimVQ codebooks; docs/benchmarks.md)
BF16_MIN_DISTANCES = 2**20
# ... and only for codes at least this wide: with narrow codes the matmul is a small part of the search (writing
# the distances dominates), and the bf16 path's extra columns and candidate re-ranking make it slower (d = 4:
# 1.2x the exact path's time at 2,048 x 1,024, 2.3x at 2,048 x 8,192; d = 16: 0.5x at 2,048 x 16,384; one thread)
BF16_MIN_DIM = 16
# The fused kernel ("bf16-fused") writes no distances and has no width limit, and its fixed cost is ~0.06 ms:
# it ran in 0.17-0.81x the exact path's time at every size measured, from 1 x 1 x 4 to 1,024 x 1,024 x 128 and
# 1 x 65,536 x 128 (tokens x codes x width; docs/benchmarks.md). "auto" takes it from this many distances up:
# below, a search takes ~0.1 ms either way, and a process whose searches are all that small never builds it
BF16_FUSED_MIN_DISTANCES = 2**10
# Tokens whose bf16 candidates span more blocks of REDUCE_BLOCK codes than this, or number more than
# MAX_CANDIDATES, fall back to the exact path (bounds the candidate bookkeeping on tie-heavy data)
MAX_CANDIDATE_BLOCKS = 64
MAX_CANDIDATES = 128
# When more than this share of the first token chunk falls back, the bf16 path stops and sends the other tokens
# to the exact path: on a crowded codebook (trained SimVQ, 16-d codes, K = 262,144: 57% of tokens with more
# than MAX_CANDIDATES candidates) finishing the bf16 pass would cost 1.6x the exact search
BF16_GIVE_UP_FRACTION = 0.25
# The fused kernel ("bf16-fused") holds MAX_CANDIDATES (index, value) pairs per token instead of distances: tokens
# go through it in chunks of at most this many (8 MiB of pairs), the first chunk smaller so that a crowded
# codebook is detected early (BF16_GIVE_UP_FRACTION), from this many distances (tokens x codes) up: ~10 ms
# of kernel time on two cores; below it, a second call's fixed cost outweighs what the early stop can save
FUSED_TOKEN_CHUNK = 8192
FUSED_FIRST_CHUNK = 1024
FUSED_FIRST_CHUNK_DISTANCES = 2**25
# Codes per cache block of the fused kernel, in bytes of bf16 codes: a block stays in the per-core L2 cache
# while every token block of a thread passes over it
FUSED_CODE_BLOCK_BYTES = 2**19
# The Triton kernel ("bf16-triton"): the unit roundoff its error bound gives the fp32 accumulation inside the
# tensor cores' bf16 products. They align the terms of each multiply-add block and truncate rather than round
# each addition to nearest, so the round-to-nearest unit (2^-24) is taken 8x; the bf16 rounding of the inputs
# (2^-8 relative) dominates the bound either way (it grows by 1% at d = 32, 4% at d = 128, 14% at d = 512).
# The bf16-candidates path uses it on CUDA too. tests/test_search_triton.py checks the bound against float64
# on the GPU that runs it.
TENSOR_CORE_ACC_ROUNDOFF = 2.0**-21
# Tokens that keep tiles of more codes than this (as many as MAX_CANDIDATE_BLOCKS reduction blocks hold) go to the
# exact path: it bounds the fp32 re-evaluation per token; the re-evaluation runs in groups of whole tokens of
# at most max(this, max_chunk_elements / 8) codes
MAX_TRITON_CODES = MAX_CANDIDATE_BLOCKS * REDUCE_BLOCK
# Tokens in the Triton path's first chunk when a search has at least FUSED_FIRST_CHUNK_DISTANCES distances: a
# crowded codebook is found there, before the kernel scans the other tokens for nothing
TRITON_FIRST_CHUNK = 4096
# The fp32 kernel ("fp32-fused", CPUs without hardware bf16): "auto" takes it from this many multiply-adds
# (tokens x codes x width) up. Below, a fixed cost of ~0.05 ms more than the exact path's shows: 1 x 16 x 16
# (tokens x codes x width) took 1.08x the exact path's time, 1 x 1 x 4 1.11x; from there up it took 0.78-1.02x
# at 1-256 tokens of small codebooks and 0.36-0.52x with 1-256 tokens at K = 4,096-65,536, d = 128 (two threads
# of a 2-core AVX2 CPU; benchmarks/search_paths.py, docs/benchmarks.md). Codes go in cache blocks of this many
# bytes (fp32), half a core's L2
FP32_FUSED_MIN_PRODUCTS = 2**12
FP32_CODE_BLOCK_BYTES = 2**18
# Codes per re-ranked token the fp32 kernel lists itself (its near-ties: usually two); more go to the matmul
FP32_RERANK_PAIRS_PER_TOKEN = 64
# Tokens the fp32 kernel leaves to the exact path because their values could come near the fp32 range: below this
# bound the values of every code, ||c'||^2 - 2 z'.c' <= (||z'|| + max ||c'||)^2, stay far inside it
FP32_FUSED_MAX_BOUND = 1e30


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


def _no_best_yet(num_tokens, num_codes, dim, max_elements, device):
    """The start of a re-rank for :func:`_best_of_pairs`: fp64 best distances (+inf), their codes (``num_codes``:
    none yet) and how many pairs to compare at once (an eighth of ``max_elements`` values)."""
    best = torch.full((num_tokens,), float("inf"), dtype=torch.float64, device=device)
    best_idx = torch.full((num_tokens,), num_codes, dtype=torch.long, device=device)
    return best, best_idx, max(1, max(1, max_elements // 8) // dim)


def _best_of_pairs(z, codebook, rows, cols, best, best_idx, pair_chunk):
    """Fold the fp64 distances ``sum((z[r] - c[k])^2)`` of the pairs ``(rows, cols)`` into the running
    ``best`` / ``best_idx`` (in place semantics, returned); exact ties keep the lowest code index."""
    num_codes = codebook.shape[0]
    for p0 in range(0, rows.numel(), pair_chunk):
        r, c = rows[p0 : p0 + pair_chunk], cols[p0 : p0 + pair_chunk]
        exact = (z[r].double() - codebook[c].double()).pow(2).sum(dim=1)
        new_best = best.scatter_reduce(0, r, exact, reduce="amin")
        best_idx = torch.where(best == new_best, best_idx, num_codes)  # an old winner survives a tie
        hit = exact == new_best[r]
        best_idx = best_idx.scatter_reduce(0, r[hit], c[hit], reduce="amin")
        best = new_best
    return best, best_idx


def _settle_ties(z, codebook, rows, cols, out, max_chunk_elements) -> None:
    """Write into ``out`` the fp64 winner (lowest index on exact ties) of each token in ``rows`` among its
    near-tied candidate codes ``cols`` (pairs): the last step of both bf16 paths' re-rank."""
    num_tokens = out.shape[0]
    best = torch.full((num_tokens,), float("inf"), dtype=torch.float64, device=out.device)
    best_idx = torch.full((num_tokens,), codebook.shape[0], dtype=torch.long, device=out.device)
    pair_chunk = max(1, max_chunk_elements // 8 // z.shape[1])
    _, best_idx = _best_of_pairs(z, codebook, rows, cols, best, best_idx, pair_chunk)
    tied = torch.unique(rows)
    out[tied] = best_idx[tied]


def _rerank(z, codebook, zc, cc_t, c_sq, thr, max_elements):
    """Exact argmin for a few tokens: codes whose evaluated distance is within ``thr`` are compared by
    ``sum((z - c)^2)`` in fp64 on the original coordinates; exact ties go to the lowest index."""
    num_tokens, num_codes = zc.shape[0], cc_t.shape[1]
    best, best_idx, pair_chunk = _no_best_yet(num_tokens, num_codes, z.shape[1], max_elements, z.device)
    # nonzero() returns two int64 per hit: a smaller budget keeps the worst case (all codes equal) bounded
    token_chunk, code_chunk = _chunk_sizes(num_tokens, num_codes, max(1, max_elements // 8))
    for t0 in range(0, num_tokens, token_chunk):
        zt = zc[t0 : t0 + token_chunk]
        for k0 in range(0, num_codes, code_chunk):
            dist = torch.addmm(c_sq[k0 : k0 + code_chunk], zt, cc_t[:, k0 : k0 + code_chunk], beta=1.0, alpha=-2.0)
            rows, cols = (dist <= thr[t0 : t0 + token_chunk, None]).nonzero(as_tuple=True)
            best, best_idx = _best_of_pairs(z, codebook, rows + t0, cols + k0, best, best_idx, pair_chunk)
    return best_idx


def _exact_search(z, codebook, zc, cc, c_sq, max_chunk_elements):
    """The exact path: matmul in the centred inputs' precision, certificate, fp64 re-rank of near-ties."""
    num_tokens, num_codes = zc.shape[0], cc.shape[0]
    dtype = zc.dtype
    out = torch.empty(num_tokens, dtype=torch.long, device=zc.device)
    if num_tokens == 0:
        return out
    # CPU: min-with-index over a long row is a scalar loop, so reduce in two levels; GPUs reduce a row with
    # its index at memory speed, and the two-level form costs them 20-30% of the search (measured on H200)
    row_min = _row_min if zc.device.type == "cpu" else _plain_row_min
    tol = 2 * _rounding_bound(zc.shape[1], dtype, c_sq.max().sqrt(), zc.norm(dim=1))
    token_chunk, code_chunk = _chunk_sizes(num_tokens, num_codes, max_chunk_elements)
    cc_t = cc.t()
    buffer = torch.empty(token_chunk, code_chunk, dtype=dtype, device=zc.device)
    thr = torch.empty(num_tokens, dtype=dtype, device=zc.device)
    rival = torch.empty(num_tokens, dtype=torch.bool, device=zc.device)
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


def _fp32_fused(z, codebook, mean, max_chunk_elements):
    """The fp32 kernel (kernels/fp32_search.c) for CPUs without hardware bf16: the exact path's rule without
    its distance matrix. Returns ``(out, fallback, reranked)`` as :func:`_bf16_candidates` does.

    The kernel centres the codes on ``mean`` and packs them in one pass (no centred copy is made unless some
    token needs a re-rank), evaluates ``||c'||^2 - 2 z'.c'`` in fp32 (FMAs from zero, the squared norm added
    last: the matmul form, within :func:`_rounding_bound` ``B`` in any summation order) and keeps per token
    its smallest value ``m1``, the code that reached it and the smallest value ``m2`` of every other code.
    Where ``m2 - m1 > 2 B`` no other code can be nearer, and that code is the exact path's answer. Tokens
    with a rival within ``2 B`` (near-ties, duplicate codes) are re-ranked: a second kernel pass over them
    lists the codes whose value is within ``m1 + 2 B`` (the nearest code's value is at most its true value
    plus ``B``, which is at most ``m1 + 2 B``), and the listed codes are compared in fp64 on the original
    coordinates, lowest index on exact ties (:func:`_best_of_pairs`). Past
    :data:`FP32_RERANK_PAIRS_PER_TOKEN` codes per token the exact path's :func:`_rerank` lists them by the
    fp32 matmul instead. Tokens whose values cannot be trusted (non-finite, or a bound past
    :data:`FP32_FUSED_MAX_BOUND`) are left to the exact path (``fallback``).
    """
    kernel = fp32_search_kernel()
    if kernel is None:
        raise RuntimeError(f"the fused fp32 search kernel is unavailable: {native_status('fp32')}")
    num_tokens, dim = z.shape
    num_codes = codebook.shape[0]
    threads = default_threads()
    codes32, mean = codebook.to(torch.float32).contiguous(), mean.contiguous()
    b, csq = kernel.codes(codes32, mean, threads=threads)
    c_sq = csq[:num_codes]
    c_max = c_sq.max()
    if not torch.isfinite(c_max):  # NaN or inf codes: the exact path decides
        return torch.empty(num_tokens, dtype=torch.long), torch.ones(num_tokens, dtype=torch.bool), 0
    z32 = z if z.dtype == torch.float32 and z.is_contiguous() else z.float().contiguous()
    kb_codes = max(1, FP32_CODE_BLOCK_BYTES // (4 * dim))
    res = kernel.run(z32, mean, b, csq, kb_codes=kb_codes, threads=threads)
    tol = 2 * _rounding_bound(dim, torch.float32, c_max.sqrt(), res.znorm)
    trusted = torch.isfinite(res.m1) & (tol <= FP32_FUSED_MAX_BOUND)
    # the gap in double: its own rounding cannot matter
    rival = trusted & ~(res.m2.double() - res.m1.double() > tol.double())
    out = res.idx.long()
    rows = rival.nonzero().squeeze(1)
    if rows.numel():
        zr = z32[rows]
        thr = res.m1[rows] + tol[rows]
        # the kernel lists the codes within thr by the values it ranked them with, which hold the nearest
        # (both are within B of the truth); too many (dense duplicates, or more pairs than an eighth of the
        # memory bound, as _rerank allows itself): the matmul lists them, chunk by chunk
        cap = min(FP32_RERANK_PAIRS_PER_TOKEN * len(rows), max(FP32_RERANK_PAIRS_PER_TOKEN, max_chunk_elements // 8))
        pairs = kernel.collect(zr, mean, b, csq, thr, threads=threads, cap=cap)
        if pairs is None:
            # the kernel's squared norms (a sum of squares like any other, within the bound) spare a pass
            out[rows] = _rerank(zr, codebook, zr - mean, (codes32 - mean).t(), c_sq, thr, max_chunk_elements)
        else:
            start = _no_best_yet(len(rows), num_codes, dim, max_chunk_elements, z.device)
            out[rows] = _best_of_pairs(zr, codebook, *pairs, *start)[1]
    return out, ~trusted, int(rows.numel())


def _bf16_product_error(dim: int, z_norm: torch.Tensor, c_max, dz_norm: torch.Tensor, dc_max, acc_u: float = 2.0**-24):
    """Per-token bound (fp64) on ``|x - T|`` for ``x = ||c'||^2 - 2 z~.c~`` accumulated in fp32 from bf16 inputs.

    ``z~ = z' - dz`` and ``c~ = c' - dc`` are the bf16 roundings (round to nearest) of the centred fp32
    vectors and ``T = ||c'||^2 - 2 z'.c'`` (``D - ||z'||^2``, ``D`` the distance of the fp32 centred vectors).
    ``z'.c' - z~.c~ = dz.c~ + z'.dc``, so ``|x - T| <= 2 (|dz| max|c~| + |z'| max|dc|) + (gamma_d + 2u^2)
    |c'|^2 + gamma_{d+4} sum|terms|`` (the ``2u^2``: a norm passed as a bf16 hi + lo pair; products of two
    bf16 numbers are exact in fp32), with the rounding residuals' own norms ``|dz|`` (per token) and
    ``max |dc|`` (over the codes) measured, not bounded by ``u |z'|``: typically 2.5x smaller. The fp32
    centring adds ``2 u32 (1 + u32) (|z'| + |c'|)^2`` against the true distance (as in
    :func:`_rounding_bound`), and bf16 hardware that flushes subnormal inputs and outputs to zero (AVX512-BF16
    does) at most ``2^-126`` per flushed value. Codes enter at the largest norms; every norm is inflated for
    its own fp32 rounding and the sum by 10%. ``c_max`` and ``dc_max``: 0-d tensors or Python floats.
    ``acc_u``: the unit roundoff of the matmul's fp32 accumulation (2^-24: round to nearest, as AVX512-BF16
    does; tensor cores truncate, see :data:`TENSOR_CORE_ACC_ROUNDOFF`).

    Returns ``(bound, z_norm, c_max)``, the norms as inflated (fp64).
    """
    per_dz, per_z, per_zz, const, grow, c_max = _bf16_error_coefficients(dim, c_max, dc_max, acc_u)
    z_norm, dz_norm = z_norm.double() * grow, dz_norm.double() * grow
    bound = 1.1 * (per_dz * dz_norm + z_norm * (per_z + per_zz * z_norm) + const)
    return bound, z_norm, c_max


def _bf16_error_coefficients(dim: int, c_max, dc_max, acc_u: float = 2.0**-24) -> tuple:
    """:func:`_bf16_product_error` as a polynomial in a token's norms: ``E = 1.1 (per_dz |dz| + per_z |z'| +
    per_zz |z'|^2 + const)``, ``|dz|`` and ``|z'|`` the norms as computed in fp32 times ``grow``.

    Returns ``(per_dz, per_z, per_zz, const, grow, c_max)`` with ``c_max`` inflated by ``grow``; floats for
    float arguments (what the fused kernel takes), 0-d tensors for tensors.
    """
    u, u32 = 2.0**-8, 2.0**-24

    def gamma(n, unit=u32):
        return n * unit / (1 - n * unit)

    grow = 1 + gamma(dim + 1) + 2 * u32  # a norm computed in fp32: sum of squares, then the square root
    c_max, dc_max = (x.double() * grow if torch.is_tensor(x) else float(x) * grow for x in (c_max, dc_max))
    # 2 (|dz| (c + dc) + |z'| dc) + (gamma_d + 2 u^2) c^2 + gamma_{d+4} (2.1 |z'| c + 1.01 c^2)
    # + w (|z'| + c)^2 + flush (1 + |z'| + 2 c), collected by powers of |dz| and |z'|
    w, flush = 2 * u32 * (1 + u32), (dim + 4) * 2.0**-125
    per_dz = 2 * (c_max + dc_max)
    per_z = 2 * dc_max + 2.1 * gamma(dim + 4, acc_u) * c_max + 2 * w * c_max + flush
    const = (gamma(dim) + 2 * u * u + 1.01 * gamma(dim + 4, acc_u) + w) * c_max**2 + flush * (1 + 2 * c_max)
    return per_dz, per_z, w, const, grow, c_max


def _bf16_error_terms(
    dim: int, z_norm: torch.Tensor, c_max: torch.Tensor, dz_norm: torch.Tensor, dc_max: torch.Tensor, acc_u: float = 2.0**-24
):
    """Per-token bound ``E`` (fp64) on the bf16 matmul error, and the row shift ``S`` that keeps outputs positive.

    The matmul evaluates ``x = S + ||c'||^2 - 2 z~.c~`` with ``||c'||^2`` and ``S`` passed as bf16 hi + lo
    pairs; without ``S`` its error is bounded by :func:`_bf16_product_error`, and ``S`` adds its own hi + lo
    and accumulation error. The bf16 rounding of the output is handled separately (relative to the output,
    see :func:`_bf16_threshold_key`).

    By Cauchy-Schwarz ``T >= r^2 - 2 |z'| r`` with ``r = |c'| <= max|c'|``, whose least value is ``-S0``,
    ``S0 = 2 |z'| r* - r*^2`` at ``r* = min(|z'|, max|c'|)``. ``S = S0 + margin``, with the margin above the
    error, keeps every output >= +0 (bf16 values then order as their int16 bit patterns) and as small as a
    per-token constant can: the bf16 rounding of the outputs, relative to their size, enters the threshold.
    ``S`` is the same for every code of a token and cannot change its argmin. ``acc_u``: the unit roundoff of
    the matmul's fp32 accumulation (see :func:`_bf16_product_error`).
    """
    g = (dim + 4) * acc_u / (1 - (dim + 4) * acc_u)
    base, z_norm, c_max = _bf16_product_error(dim, z_norm, c_max, dz_norm, dc_max, acc_u)
    zc_prod = z_norm * c_max
    r = torch.minimum(z_norm, c_max)
    reach = 2 * z_norm * r - r * r  # S0, from norms inflated above the true ones: >= the true S0
    shift = reach * (1 + 1e-5) + 4 * g * zc_prod + 2 * base + 1e-30
    err = base + 1.1 * g * 1.01 * shift + 1e-30
    return err, shift


def _hi_lo(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` (fp32) as two bf16 numbers whose sum is within 2 u^2 |values| of it."""
    hi = values.bfloat16()
    return hi, (values - hi.float()).bfloat16()


def _bf16_threshold_key(min_key: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """The int16 key of the largest bf16 output a code can have and still be as near as the row's minimum.

    With ``y`` the bf16 outputs (>= 0) and ``u' = u / (1 - u)`` their relative rounding, a code ``k`` can be
    no farther than the row's best ``w`` only if ``y_k (1 - u') <= y_w (1 + u') + 2 E``. The threshold is
    computed in fp64 and rounded up to the next bf16 value, so that no such code is screened out.
    """
    u = 2.0**-8
    u_out = u / (1 - u)
    y_min = min_key.view(torch.bfloat16).double()
    thr = (y_min * (1 + u_out) + 2 * err) / (1 - u_out)
    thr_b = thr.float().bfloat16()
    key = thr_b.view(torch.int16).to(torch.int32)
    key = key + (thr_b.double() < thr).to(torch.int32)  # round up, never down
    return key.clamp(max=2**15 - 1).to(torch.int16)


def _bf16_operands(zc, cc, c_sq, z_norm):
    """bf16 matrices ``a`` (N, d + 4) and ``b_t`` (d + 4, K) with ``a @ b_t ~ S + ||c'||^2 - 2 z'.c'``, and the
    per-token error bound ``E`` of that product before its output is rounded (see :func:`_bf16_error_terms`).

    ``a = [z', 1, 1, S_hi, S_lo]``, ``b = [-2 c', |c'|^2_hi, |c'|^2_lo, 1, 1]``: one plain matmul, with no
    separate pass over the N x K output to add the code norms.
    """
    num_tokens, dim = zc.shape
    a = torch.empty(num_tokens, dim + 4, dtype=torch.bfloat16, device=zc.device)
    a[:, :dim] = zc.float()
    # built row-major (a transposed copy is ~4x slower on CPU) and handed to the matmul as a transposed view
    b = torch.empty(cc.shape[0], dim + 4, dtype=torch.bfloat16, device=zc.device)
    b[:, :dim] = cc
    # rounding residuals, measured: the difference of a value and its bf16 rounding is exact in the value's
    # own precision (fp32 or fp64), whatever path the conversion took
    dz_norm = (zc - a[:, :dim].to(zc.dtype)).norm(dim=1)
    dc_max = (cc - b[:, :dim].to(cc.dtype)).norm(dim=1).max()
    # tensor cores truncate in their accumulation (TENSOR_CORE_ACC_ROUNDOFF); CPUs round to nearest
    acc_u = TENSOR_CORE_ACC_ROUNDOFF if zc.device.type == "cuda" else 2.0**-24
    err, shift = _bf16_error_terms(dim, z_norm, c_sq.max().sqrt(), dz_norm, dc_max, acc_u)
    s_hi, s_lo = _hi_lo(shift.float())
    c_hi, c_lo = _hi_lo(c_sq.float())
    a[:, dim : dim + 2] = 1
    a[:, dim + 2], a[:, dim + 3] = s_hi, s_lo
    b[:, :dim] *= -2  # exact in bf16: a power of two
    b[:, dim], b[:, dim + 1] = c_hi, c_lo
    b[:, dim + 2 :] = 1
    return a, b.t(), err


def _bf16_candidates(z, codebook, zc, cc, c_sq, max_chunk_elements):
    """bf16 matmul, candidates within a proven bound of each row's minimum, fp64 re-rank of the candidates.

    Returns ``(indices, fallback, reranked)``: ``fallback`` marks tokens with more than
    ``MAX_CANDIDATE_BLOCKS`` blocks or ``MAX_CANDIDATES`` candidates (their indices are left for the exact
    path), ``reranked`` counts the tokens with more than one candidate.
    """
    num_tokens, dim = zc.shape
    num_codes = cc.shape[0]
    device = zc.device
    z_norm = zc.norm(dim=1)
    a, b_t, err = _bf16_operands(zc, cc, c_sq, z_norm)
    token_chunk, code_chunk = _chunk_sizes(num_tokens, num_codes, max_chunk_elements)
    buffer = torch.empty(token_chunk * code_chunk, dtype=torch.bfloat16, device=device)
    out = torch.empty(num_tokens, dtype=torch.long, device=device)
    fallback = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    reranked = 0
    for t0 in range(0, num_tokens, token_chunk):
        at = a[t0 : t0 + token_chunk]
        nt = at.shape[0]
        err_t = err[t0 : t0 + nt]
        run_min = torch.full((nt,), 2**15 - 1, dtype=torch.int16, device=device)
        blocks_seen = torch.zeros(nt, dtype=torch.long, device=device)
        entries_seen = torch.zeros(nt, dtype=torch.long, device=device)
        rows_l, cols_l, keys_l = [], [], []
        for k0 in range(0, num_codes, code_chunk):
            k1 = min(k0 + code_chunk, num_codes)
            w = k1 - k0
            y = buffer[: nt * w].view(nt, w)  # contiguous whatever the chunk width
            torch.mm(at, b_t[:, k0:k1], out=y)
            flat = y.view(torch.int16).view(-1)  # outputs are >= +0: bf16 order is int16 order
            keys = flat.view(nt, w)
            blocks = w // REDUCE_BLOCK
            head_w = blocks * REDUCE_BLOCK
            tail = keys[:, head_w:]
            if blocks:
                block_min = keys[:, :head_w].unflatten(1, (blocks, REDUCE_BLOCK)).amin(dim=2)
                chunk_min = block_min.amin(dim=1)
                if head_w < w:
                    chunk_min = torch.minimum(chunk_min, tail.amin(dim=1))
            else:
                chunk_min = tail.amin(dim=1)
            run_min = torch.minimum(run_min, chunk_min)
            thr = _bf16_threshold_key(run_min, err_t)
            if blocks:
                sel = block_min <= thr[:, None]
                blocks_seen += sel.sum(dim=1)
                sel &= (blocks_seen <= MAX_CANDIDATE_BLOCKS)[:, None]
                r, blk = sel.nonzero(as_tuple=True)
                # the selected blocks, gathered as whole rows of REDUCE_BLOCK keys from overlapping windows
                windows = flat.as_strided((flat.numel() - REDUCE_BLOCK + 1, REDUCE_BLOCK), (1, 1))
                vals = windows.index_select(0, r * w + blk * REDUCE_BLOCK)
                hit = vals <= thr.index_select(0, r)[:, None]
                if int(hit.sum()) > nt * MAX_CANDIDATES // 8:
                    # many candidates (ties, dense clusters): rows past MAX_CANDIDATES keep no pairs, so at
                    # most MAX_CANDIDATES pairs per token are ever held
                    entries_seen.index_add_(0, r, hit.sum(dim=1))
                    hit &= (entries_seen <= MAX_CANDIDATES).index_select(0, r)[:, None]
                pr, pj = hit.nonzero(as_tuple=True)
                rows_l.append(r.index_select(0, pr))
                cols_l.append(k0 + blk.index_select(0, pr) * REDUCE_BLOCK + pj)
                keys_l.append(vals.view(-1).index_select(0, pr * REDUCE_BLOCK + pj))
            if head_w < w:
                hit = tail <= thr[:, None]
                entries_seen += hit.sum(dim=1)
                tr, tj = (hit & (entries_seen <= MAX_CANDIDATES)[:, None]).nonzero(as_tuple=True)
                rows_l.append(tr)
                cols_l.append(k0 + head_w + tj)
                keys_l.append(tail[tr, tj])
        over = (blocks_seen > MAX_CANDIDATE_BLOCKS) | (entries_seen > MAX_CANDIDATES)  # counts below add the rest
        thr = _bf16_threshold_key(run_min, err_t)
        rows, cols, keys = torch.cat(rows_l), torch.cat(cols_l), torch.cat(keys_l)
        keep = (keys <= thr[rows]) & ~over[rows]
        rows, cols = rows[keep], cols[keep]
        counts = torch.bincount(rows, minlength=nt)
        # every row that did not overflow holds its own minimum; a row without one would be a bug upstream
        over |= (counts == 0) | (counts > MAX_CANDIDATES)
        keep = ~over[rows]
        rows, cols = rows[keep], cols[keep]
        single = counts[rows] == 1
        out[t0 + rows[single]] = cols[single]
        rows, cols = t0 + rows[~single], cols[~single]
        if rows.numel():
            reranked += _settle_pairs(z, codebook, zc, cc, c_sq, z_norm, rows, cols, out, max_chunk_elements)
        fallback[t0 : t0 + nt] = over
        if t0 == 0 and t0 + nt < num_tokens and float(over.float().mean()) > BF16_GIVE_UP_FRACTION:
            # a crowded codebook: most tokens have too many candidates; the rest go to the exact path
            fallback[nt:] = True
            break
    return out, fallback, reranked


def _bf16_fused(z, codebook, max_chunk_elements):
    """The fused kernel (kernels/bf16_search.c): bf16 products accumulated in fp32 from ``||c'||^2``, the
    running minimum kept per token while the values are in registers, and the codes within the bound of it
    found again at the end of each pass over a block of codes from the tiles' per-token minima; no distance
    is written to memory. Same contract as :func:`_bf16_candidates`, but the tokens and codes
    are centred, squared and rounded by the kernel's own threaded code (the other paths' ``zc``, ``cc``,
    ``c_sq`` and bf16 copies are torch passes: 210 ms on one thread for the codes at K = 262,144, d = 128),
    and each chunk of tokens is packed, bounded, scanned and settled in one parallel call: a fixed cost
    of a few torch operations per call, where the search of a small codebook takes about a millisecond.

    The kernel's values ``v = ||c'||^2 - 2 z~.c~`` (fp32, not rounded to bf16) err by at most ``E``
    (:func:`_bf16_product_error`), so a code can be the nearest only if ``v <= min v + 2 E``. The kernel keeps
    every code under a running threshold that never falls below that (its fp32 sum is given the margin of
    its own rounding). When a piece of tokens is scanned, it filters their kept codes against the final
    minimum in fp64 and compares several candidates by ``sum((z - c)^2)`` in fp64 on the original
    coordinates; only candidates within the rounding of that sum of the best (duplicate codes, exact ties)
    come back here, to the fp64 re-rank every path shares (:func:`_settle_ties`, lowest index on exact
    ties), so that all paths break them alike.
    """
    kernel = bf16_search_kernel()
    if kernel is None:
        raise RuntimeError(f"the fused bf16 search kernel is unavailable: {native_status()}")
    mr, ws = kernel.tokens_per_block, kernel.workspace
    num_tokens, dim = z.shape
    threads = default_threads()
    out = torch.empty(num_tokens, dtype=torch.long)
    codes32 = codebook if codebook.dtype == torch.float32 and codebook.is_contiguous() else codebook.float().contiguous()
    z32 = z if z.dtype == torch.float32 and z.is_contiguous() else z.float().contiguous()
    # the codes' mean, -2 c~ (exact: a power of two), ||c'||^2 in fp32 with +inf on the padding codes (never
    # kept) and the maxima of the bound, in one threaded call
    packed = kernel.codes(codes32, threads=threads)
    if not math.isfinite(packed.c_sq_max):  # NaN if any is
        return out, torch.ones(num_tokens, dtype=torch.bool), 0  # non-finite inputs: the exact path decides
    b, csq, mean = packed.b, packed.csq, packed.mean
    bound = _bf16_error_coefficients(dim, math.sqrt(packed.c_sq_max), packed.dc_max)
    cap = MAX_CANDIDATES
    chunk = max(mr, min(FUSED_TOKEN_CHUNK, max_chunk_elements // (2 * cap)) // mr * mr)
    fallback = None
    reranked = 0
    for t0, t1 in _token_chunks(num_tokens, codebook.shape[0], chunk, FUSED_FIRST_CHUNK):
        nt = t1 - t0
        whole = nt == num_tokens  # one chunk: no views to make (a few us each, against ~1 ms at K = 1,024)
        idx, z_chunk = (out, z32) if whole else (out[t0:t1], z32[t0:t1])
        near = ws("near", (nt,), torch.int32)
        state = kernel.state(-(-nt // mr) * mr, dim, cap)
        several, ties, over = kernel.run(
            z_chunk, mean, b, csq, bound, state, kb_codes=FUSED_CODE_BLOCK_BYTES // (4 * b.shape[1]), threads=threads,
            finish=Finish(codes32, idx, near),
        )  # fmt: skip
        reranked += several
        if ties:
            # near-ties in fp64 (rare: duplicate codes, exact ties): the re-rank every path shares
            multi = (idx == -2).nonzero().squeeze(1)
            kept_m = near[multi]
            rows, slot = (torch.arange(int(kept_m.max())) < kept_m[:, None]).nonzero(as_tuple=True)
            cols = state.cand_idx[slot, multi[rows]].long()
            with torch.autocast(device_type="cpu", enabled=False):
                _settle_ties(z, codebook, t0 + multi[rows], cols, out, max_chunk_elements)
        if over:
            # overflowed lists, values that could leave the fp32 range, non-finite tokens: the exact path
            fallback, give_up = _fall_back(fallback, idx == -1, t0, t1, num_tokens)
            if give_up:
                break
    return out, fallback, reranked


def _token_chunks(num_tokens: int, num_codes: int, chunk: int, first_chunk: int) -> list[tuple[int, int]]:
    """Token ranges ``[t0, t1)`` of ``chunk`` tokens for the fused kernels. From ``FUSED_FIRST_CHUNK_DISTANCES``
    distances up the first holds ``first_chunk`` tokens at most: it tells early whether the codebook is too
    crowded for the kernel (:func:`_fall_back`); below, the most that can waste is a few ms, less than a
    second call's fixed cost."""
    first = chunk if num_tokens * num_codes < FUSED_FIRST_CHUNK_DISTANCES else min(first_chunk, chunk)
    bounds = [0, min(num_tokens, first)]
    bounds += list(range(bounds[-1] + chunk, num_tokens, chunk)) + [num_tokens]
    return [(t0, t1) for t0, t1 in zip(bounds[:-1], bounds[1:]) if t1 > t0]


def _fall_back(fallback, over: torch.Tensor, t0: int, t1: int, num_tokens: int) -> tuple[torch.Tensor, bool]:
    """Mark the tokens ``over`` of the chunk ``[t0, t1)`` for the exact path (``fallback``: None until some
    token is). Returns the marks and whether to give up: when more than ``BF16_GIVE_UP_FRACTION`` of a first
    chunk falls back (a crowded codebook), every later token is marked too and the fused pass stops."""
    if fallback is None:
        fallback = torch.zeros(num_tokens, dtype=torch.bool, device=over.device)
    fallback[t0:t1] = over
    if t0 == 0 and t1 < num_tokens and int(over.sum()) > BF16_GIVE_UP_FRACTION * (t1 - t0):
        fallback[t1:] = True
        return fallback, True
    return fallback, False


def _fp32_round_up(values: torch.Tensor) -> torch.Tensor:
    """``values`` (fp64) as fp32 numbers no smaller than them (+inf past the fp32 range)."""
    low = values.float()
    return torch.where(low.double() < values, torch.nextafter(low, torch.full_like(low, float("inf"))), low)


def _bf16_triton(z, codebook, max_chunk_elements):
    """The Triton kernel (:mod:`simvq.quantizers.triton_search`, GPUs): bf16 products accumulated in fp32 on the
    tensor cores, each token's running minimum kept in registers and the tiles of ``BLOCK_K`` codes within its
    margin recorded, no distance written to memory; then the codes of the recorded tiles still within the
    margin of the final minimum are evaluated again in fp32 and settled as the bf16-candidates path settles
    its candidates (:func:`_settle_pairs`: fp32 with its certificate, fp64 for near-ties, lowest index on
    exact ties). Same contract as :func:`_bf16_candidates`.

    The kernel's values ``v = ||c'||^2 - 2 z~.c~`` err by at most ``E`` (:func:`_bf16_product_error`, with the
    accumulation unit of :data:`TENSOR_CORE_ACC_ROUNDOFF`), so a code can be the nearest only if
    ``v <= min v + 2 E``. The margin passed to the kernel is ``2 E`` plus the fp32 rounding of the sum
    ``minimum + margin`` (``|v| <= max|c'|^2 + 2 |z'| max|c'|``), rounded up to fp32, so that its fp32
    threshold never falls below ``min v + 2 E``. Tokens whose lists overflow (more than ``LIST_CAP`` tiles
    in a code range) or keep tiles of more than :data:`MAX_TRITON_CODES` codes, non-finite tokens and values that
    could leave the fp32 range go to the exact path (``fallback``), and so does every token after a first
    chunk of which more than ``BF16_GIVE_UP_FRACTION`` did.
    """
    from simvq.quantizers import triton_search as ts  # optional dependency: imported where the path runs

    device = z.device
    num_tokens, dim = z.shape
    num_codes = codebook.shape[0]
    block_k = ts.BLOCK_K
    out = torch.empty(num_tokens, dtype=torch.long, device=device)
    operand = torch.float32 if ts.interpreting() else torch.bfloat16  # NumPy (the interpreter) has no bf16
    with torch.autocast(device_type=device.type, enabled=False):
        codes32 = codebook.float()
        if not bool(torch.isfinite(codes32).all()):
            return out, torch.ones(num_tokens, dtype=torch.bool, device=device), 0  # the exact path decides
        mean = codes32.mean(dim=0)
        cc = codes32 - mean
        c_sq = cc.pow(2).sum(dim=1)
        c16 = cc.bfloat16()
        dc_max = (cc - c16.float()).norm(dim=1).max()
        width = ts.padded_width(dim)  # zero columns: aligned rows, whole-vector loads
        cb = torch.zeros(num_codes, width, dtype=operand, device=device)
        cb[:, :dim] = c16 * -2  # -2 c~: exact, a power of two
        c_max = c_sq.max().sqrt()
        # token chunks: the lists (8 bytes per entry, LIST_CAP per token and code range; code ranges only where
        # the token blocks alone would not fill the GPU) within the budget's bytes
        chunk = max(ts.token_block(dim), max_chunk_elements // (2 * ts.LIST_CAP))
        fallback = None
        reranked = 0
        for t0, t1 in _token_chunks(num_tokens, num_codes, chunk, TRITON_FIRST_CHUNK):
            nt = t1 - t0
            z_chunk = z[t0:t1]
            zc = z_chunk.float() - mean
            finite = torch.isfinite(zc).all(dim=1)
            zc = torch.where(finite[:, None], zc, 0.0)
            z_norm = zc.norm(dim=1)
            z16 = zc.bfloat16()
            dz_norm = (zc - z16.float()).norm(dim=1)
            err, z_norm_g, c_max_g = _bf16_product_error(dim, z_norm, c_max, dz_norm, dc_max, TENSOR_CORE_ACC_ROUNDOFF)
            reach = c_max_g * c_max_g + 2 * z_norm_g * c_max_g  # bound on |v|
            margin64 = 2 * err + 2.0**-22 * (reach + 2 * err)
            margin = _fp32_round_up(margin64)
            ok = finite & torch.isfinite(margin) & (reach + margin64 < 2.0**126)
            if not bool(ok.any()):  # values past the fp32 range (huge codes): every token to the exact path
                over = ok.logical_not()
            else:
                zb = torch.zeros(nt, width, dtype=operand, device=device)
                zb[:, :dim] = torch.where(ok[:, None], z16, 0.0)  # the tokens not searched here run as zeros
                splits = ts.default_splits(nt, num_codes, dim, device)
                run_min, count, tiles, tile_min = ts.scan(zb, cb, c_sq, torch.where(ok, margin, 0.0), splits)
                final = run_min.amin(dim=0)
                thr = final + margin  # fp32, as in the kernel
                over = ~ok | ~torch.isfinite(final) | (count > ts.LIST_CAP).any(dim=0)
                slot = torch.arange(ts.LIST_CAP, device=device)
                kept = (slot < count[..., None]) & (tile_min <= thr[None, :, None])
                per_row = kept.sum(dim=(0, 2))
                over |= per_row * block_k > MAX_TRITON_CODES
                # every token that did not overflow kept the tile of its own minimum; one without would be a bug
                over |= per_row == 0
                kept &= ~over[None, :, None]
                _, rows, _ = kept.nonzero(as_tuple=True)
                tile_idx = tiles[kept].long()
                order = torch.argsort(rows * (num_codes // block_k + 1) + tile_idx)  # row-major, as CSR needs
                rows, tile_idx = rows[order], tile_idx[order]
                per_row = torch.where(over, 0, per_row)
                for p0, p1 in _row_groups(per_row, max(MAX_TRITON_CODES, max_chunk_elements // 8) // block_k):
                    cols = tile_idx[p0:p1, None] * block_k + torch.arange(block_k, device=device)
                    inside = cols < num_codes
                    g_rows, g_cols = rows[p0:p1, None].expand_as(cols)[inside], cols[inside]
                    reranked += _settle_pairs(
                        z_chunk, codebook, zc, cc, c_sq, z_norm, g_rows, g_cols, out[t0:t1], max_chunk_elements
                    )
            if bool(over.any()):
                fallback, give_up = _fall_back(fallback, over, t0, t1, num_tokens)
                if give_up:
                    break
    return out, fallback, reranked


def _row_groups(per_row: torch.Tensor, budget: int) -> list[tuple[int, int]]:
    """Ranges ``[p0, p1)`` of a row-major list of entries, ``per_row[r]`` of them for row ``r``, each range whole
    rows and at most ``budget`` entries (or one row, where a row has more)."""
    total = int(per_row.sum())
    if total <= budget:
        return [(0, total)] if total else []
    ends = per_row.cumsum(0)
    groups, start = [], 0
    while start < total:
        rows_in = int(torch.searchsorted(ends, start + budget, right=True))
        stop = int(ends[rows_in - 1]) if rows_in else 0
        if stop <= start:  # a row larger than the budget: alone
            stop = int(ends[int(torch.searchsorted(ends, start, right=True))])
        groups.append((start, stop))
        start = stop
    return groups


def _pair_dots(zc: torch.Tensor, cc: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``zc[rows] . cc[cols]`` for row-major sorted pairs, without materialising the gathered rows.

    A sampled dense-dense matmul (``torch.sparse.sampled_addmm`` on the CSR pattern of the pairs) reads each
    token once, where gathering both sides would copy ``d`` values per pair; it is about 7x faster on CPU
    for a few candidates per token. Each dot is an ordinary length-``d`` sum in the inputs' precision.
    """
    counts = torch.bincount(rows, minlength=zc.shape[0])
    crow = torch.zeros(zc.shape[0] + 1, dtype=torch.long, device=zc.device)
    crow[1:] = counts.cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CSR layout is marked beta; the pattern is valid by construction
        pattern = torch.sparse_csr_tensor(
            crow, cols, torch.zeros(cols.numel(), dtype=zc.dtype, device=zc.device), size=(zc.shape[0], cc.shape[0])
        )
        return torch.sparse.sampled_addmm(pattern, zc, cc.t(), beta=0.0).values()


def _settle_pairs(z, codebook, zc, cc, c_sq, z_norm, rows, cols, out, max_chunk_elements) -> int:
    """Exact winner of each token in ``rows`` among its candidate codes ``cols`` (pairs), written into ``out``.

    The pairs are evaluated as ``||c'||^2 - 2 z'.c'`` in the centred precision (fp32), with the rounding
    bound of :func:`_rounding_bound`; tokens with a second candidate within twice the bound of the best are
    settled by the fp64 ``sum((z - c)^2)`` on the original coordinates, lowest index on exact ties.
    Returns the number of tokens settled.
    """
    num_tokens, dim = zc.shape
    num_codes = cc.shape[0]
    if rows.numel() > 1 and not bool((rows[1:] >= rows[:-1]).all()):
        order = torch.argsort(rows * num_codes + cols)  # row-major, as the sparse (CSR) layout needs
        rows, cols = rows[order], cols[order]
    dist = c_sq.index_select(0, cols) - 2 * _pair_dots(zc, cc, rows, cols)
    tol = 2 * _rounding_bound(dim, zc.dtype, c_sq.max().sqrt(), z_norm.index_select(0, rows))
    best = torch.full((num_tokens,), float("inf"), dtype=dist.dtype, device=dist.device)
    best = best.scatter_reduce(0, rows, dist, reduce="amin")
    close = dist <= best[rows] + tol
    rows, cols = rows[close], cols[close]
    counts = torch.bincount(rows, minlength=num_tokens)
    single = counts[rows] == 1
    out[rows[single]] = cols[single]
    rows, cols = rows[~single], cols[~single]
    if rows.numel():
        _settle_ties(z, codebook, rows, cols, out, max_chunk_elements)
    return int((counts > 0).sum())


class SearchInfo(NamedTuple):
    """How one :func:`nearest_code_info` call found its answer.

    Attributes:
        path: the path that ran (``"auto"`` resolved).
        reranked: tokens whose bf16 candidates were re-ranked (0 on the exact path; on ``"bf16-triton"``
            every token: the codes of its recorded tiles are evaluated again in fp32; on ``"fp32-fused"``
            the tokens with a rival within the rounding bound, re-ranked in fp64).
        fallback: tokens the bf16 bound could not settle within ``MAX_CANDIDATE_BLOCKS`` blocks, searched
            again by the exact path (0 on the exact path; on ``"fp32-fused"`` the tokens with non-finite
            values).
    """

    path: str
    reranked: int
    fallback: int


def check_search(value, name: str = "search") -> str:
    """Validate a ``search`` setting: one of :data:`SEARCH_PATHS`; ``"bf16-fused"`` only where its kernel runs."""
    if not isinstance(value, str) or value not in SEARCH_PATHS:
        raise ValueError(f"{name} must be one of {', '.join(repr(p) for p in SEARCH_PATHS)}, got {value!r}")
    if value == "bf16-fused" and not fused_kernel_available():
        raise ValueError(
            f"{name}='bf16-fused' needs the fused bf16 kernel, which is unavailable here ({native_status()}); "
            "use 'auto', which takes it where it runs and the other paths elsewhere"
        )
    if value == "fp32-fused" and not fp32_kernel_available():
        raise ValueError(
            f"{name}='fp32-fused' needs the fused fp32 kernel, which is unavailable here ({native_status('fp32')}); "
            "use 'auto', which takes it where it runs and the other paths elsewhere"
        )
    if value == "bf16-triton" and (reason := triton_unavailable()) is not None:
        raise ValueError(f"{name}='bf16-triton' cannot run here: {reason}; use search='auto'")
    return value


def triton_unavailable(device_type: str | None = None) -> str | None:
    """Why ``search="bf16-triton"`` cannot run (on ``device_type`` tensors, if given), or None where it can."""
    from simvq.quantizers import triton_search  # imports Triton only if it is installed

    return triton_search.triton_status(device_type)


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX-BF16; Linux flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def fused_kernel_available() -> bool:
    """Whether the fused bf16 kernel can run here (see :mod:`simvq.quantizers.native`); built on first call."""
    return bf16_search_kernel() is not None


def fp32_kernel_available() -> bool:
    """Whether the fused fp32 kernel can run here (see :mod:`simvq.quantizers.native`); built on first call."""
    return fp32_search_kernel() is not None


def resolve_search(
    search: str, device: torch.device | str, dtype: torch.dtype, num_tokens: int, num_codes: int, dim: int | None = None
) -> str:
    """The path ``search`` runs for ``num_tokens`` tokens and ``num_codes`` codes on ``device`` in ``dtype``.

    ``"auto"`` picks a bf16 path for fp32 searches on CPUs with hardware bf16 (AVX512-BF16 or AMX):
    ``"bf16-fused"`` from ``BF16_FUSED_MIN_DISTANCES`` distances (tokens x codes) up where its kernel builds
    (:func:`fused_kernel_available`; the first such call builds it), else ``"bf16-candidates"`` from
    ``BF16_MIN_DISTANCES`` distances of codes at least ``BF16_MIN_DIM`` wide (``dim``; None: not checked).
    On CPUs without hardware bf16 it picks ``"fp32-fused"`` from ``FP32_FUSED_MIN_PRODUCTS`` multiply-adds
    (tokens x codes x ``dim``; None: counted as 1) up where its kernel builds (AVX2 and FMA). ``"exact-fp32"`` otherwise:
    fp64 inputs, small searches, CPUs with neither kernel, and accelerators (where the bf16 paths have not
    been timed yet; pass ``search="bf16-triton"`` or ``"bf16-candidates"`` there).
    """
    search = check_search(search)
    if search != "auto":
        return search
    if dtype != torch.float32 or torch.device(device).type != "cpu":
        return "exact-fp32"
    distances = num_tokens * num_codes
    if not cpu_has_fast_bf16():
        big = distances * (1 if dim is None else dim) >= FP32_FUSED_MIN_PRODUCTS
        return "fp32-fused" if big and fp32_kernel_available() else "exact-fp32"
    if distances >= BF16_FUSED_MIN_DISTANCES and fused_kernel_available():
        return "bf16-fused"
    if distances >= BF16_MIN_DISTANCES and (dim is None or dim >= BF16_MIN_DIM):
        return "bf16-candidates"
    return "exact-fp32"


@torch.no_grad()
def nearest_code_info(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    max_chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
    search: str = "auto",
) -> tuple[torch.Tensor, SearchInfo]:
    """:func:`nearest_code` and a :class:`SearchInfo` saying which path ran and how often it fell back."""
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest_code expects z (N, d) and codebook (K, d) with the same d, got {tuple(z.shape)} "
            f"and {tuple(codebook.shape)}"
        )
    max_chunk_elements = check_chunk_elements(max_chunk_elements)
    check_search(search)
    num_tokens, num_codes = z.shape[0], codebook.shape[0]
    device_type = z.device.type
    dtype = torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32
    path = resolve_search(search, z.device, dtype, num_tokens, num_codes, z.shape[1])
    if num_tokens == 0:
        return torch.empty(0, dtype=torch.long, device=z.device), SearchInfo(path, 0, 0)
    if max_chunk_elements is None:
        max_chunk_elements = CPU_CHUNK_ELEMENTS if device_type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
        if path == "bf16-candidates" and device_type == "cpu" and num_codes * 256 <= CPU_BF16_CHUNK_ELEMENTS:
            max_chunk_elements = CPU_BF16_CHUNK_ELEMENTS
    if path in ("bf16-fused", "fp32-fused") and (device_type != "cpu" or dtype != torch.float32):
        raise ValueError(f"search={path!r} runs fp32 searches on the CPU, got {dtype} on {device_type}; use search='auto'")
    if path == "bf16-triton":
        if dtype != torch.float32:
            raise ValueError(f"search='bf16-triton' runs fp32 searches, got {dtype} inputs; use search='auto'")
        reason = triton_unavailable(device_type)
        if reason is not None:
            raise ValueError(f"search='bf16-triton' cannot search these tensors: {reason}; use search='auto'")
        out, fallback, reranked = _bf16_triton(z, codebook, max_chunk_elements)
        if fallback is None:
            return out, SearchInfo(path, reranked, 0)
    if path == "bf16-fused":
        # no torch pass before the kernel (it centres, packs and bounds the codes itself): at K = 1,024 the
        # search takes about a millisecond, and each torch call after other work costs ~10-20 us
        out, fallback, reranked = _bf16_fused(z, codebook, max_chunk_elements)
        if fallback is None:
            return out, SearchInfo(path, reranked, 0)
    with torch.autocast(device_type=device_type, enabled=False):
        mean = codebook.to(dtype).mean(dim=0)
        if path in ("bf16-fused", "bf16-triton", "fp32-fused"):
            # centred tokens and codes: only if some tokens fall back (the fused kernels centre their own)
            zc = cc = c_sq = None
            if path == "fp32-fused":
                out, fallback, reranked = _fp32_fused(z, codebook, mean, max_chunk_elements)
        else:
            cc = codebook.to(dtype) - mean
            c_sq = cc.pow(2).sum(dim=1)
            zc = z.to(dtype) - mean
            if path == "exact-fp32":
                return _exact_search(z, codebook, zc, cc, c_sq, max_chunk_elements), SearchInfo(path, 0, 0)
            out, fallback, reranked = _bf16_candidates(z, codebook, zc, cc, c_sq, max_chunk_elements)
        rows = fallback.nonzero().squeeze(1)
        if rows.numel():
            if cc is None:
                cc = codebook.to(dtype) - mean
                c_sq = cc.pow(2).sum(dim=1)
            zc_rows = z[rows].to(dtype) - mean if zc is None else zc[rows]
            out[rows] = _exact_search(z[rows], codebook, zc_rows, cc, c_sq, max_chunk_elements)
    return out, SearchInfo(path, reranked, int(rows.numel()))


def nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    max_chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
    search: str = "auto",
) -> torch.Tensor:
    """Index of the nearest code (squared L2) for every token, exact (see the module docstring).

    Args:
        z: ``(N, d)`` tokens, any floating dtype.
        codebook: ``(K, d)`` codes.
        max_chunk_elements: bound on the number of distances held at once (``None``: 2**25 on CPU, 2**23
            for the bf16 path on CPU up to K = 32,768, 2**27 on accelerators).
        search: ``"auto"`` (default; see :func:`resolve_search`), ``"exact-fp32"`` (fp32 matmul, or fp64
            for fp64 inputs), ``"fp32-fused"`` (the fused fp32 CPU kernel, AVX2), ``"bf16-candidates"``
            (bf16 matmul, exact re-rank), ``"bf16-fused"`` (the fused bf16 CPU kernel, exact re-rank) or
            ``"bf16-triton"`` (the fused GPU kernel, exact re-rank). Every path returns the same indices.

    Returns:
        ``(N,)`` int64 indices in ``[0, K)``.
    """
    return nearest_code_info(z, codebook, max_chunk_elements=max_chunk_elements, search=search)[0]
