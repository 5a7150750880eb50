"""The fused search kernels, built on first use and loaded with ctypes: kernels/bf16_search.c (bf16 products,
CPUs with AVX512-BF16) and kernels/fp32_search.c (fp32 FMAs, CPUs with AVX2 and FMA, for those without bf16).

Each kernel is plain C with intrinsics and OpenMP, and no dependency on torch's headers, so it
compiles in about a second with the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``). Loaded
after torch, it binds to the OpenMP runtime torch already uses (libgomp, same soname): its threads are
torch's, sized by ``torch.set_num_threads``. (A thread pool of its own lost up to half its speed on two
cores: torch's OpenMP workers spin-wait on a core for a while after each parallel region.) The library
is cached per source, flags and compiler under ``$SIMVQ_KERNEL_DIR``, else ``$XDG_CACHE_HOME/simvq/kernels``
(``~/.cache/simvq/kernels``), written to a temporary name and renamed into place, so concurrent processes
never load a half-written file. ``SIMVQ_NATIVE=0`` turns both kernels off.

Where one cannot be used (not Linux on x86-64, a CPU without its instructions, no C compiler, a failed
build), :func:`bf16_search_kernel` / :func:`fp32_search_kernel` return None and :func:`native_status` says
why; the search then uses its other paths, which return the same indices.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

SOURCE = Path(__file__).with_name("kernels") / "bf16_search.c"
ABI_VERSION = 15
_COMMON_FLAGS = ("-O3", "-fPIC", "-shared", "-std=gnu11", "-fno-strict-aliasing")
# explicit ISA flags rather than -march: the library runs on any CPU with these features, whoever built it
CFLAGS = _COMMON_FLAGS + ("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512bf16", "-mfma")
# tried in order: with OpenMP, then (a compiler without it) serial
FLAG_SETS = (CFLAGS + ("-fopenmp",), CFLAGS)
FP32_SOURCE = Path(__file__).with_name("kernels") / "fp32_search.c"
FP32_ABI_VERSION = 4
FP32_CFLAGS = _COMMON_FLAGS + ("-mavx2", "-mfma")
FP32_FLAG_SETS = (FP32_CFLAGS + ("-fopenmp",), FP32_CFLAGS)
FP32_REQUIRED_CPU_FLAGS = frozenset({"avx2", "fma"})
# token-block pieces per thread, taken dynamically: a core held for a while by another process delays one
# piece, not a fixed share of the work. Each piece streams every cache block of codes through its core's L2
# once; a codebook of one block stays there from piece to piece, and finer pieces then cost nothing and end
# the threads closer together (two threads, K = 1,024, N = 4,096: -3% with 16 pieces per thread; K = 65,536,
# where each piece re-reads 16 MiB of codes: +4%).
PIECES_PER_THREAD = 8
PIECES_PER_THREAD_ONE_BLOCK = 16
# The fp32 kernel with fewer token blocks than PIECES_PER_THREAD per thread (a few hundred tokens or fewer)
# also splits the codes into ranges of at least this many tiles, so that every thread has work (docs/benchmarks.md)
FP32_MIN_PART_TILES = 64
# and at most this many token blocks per piece: a piece settles its tokens right after scanning them, while
# their rows and lists are still in the core's cache (16 blocks of 32 tokens: 256 KiB of fp32 rows at d = 128)
PIECE_BLOCKS = 16
REQUIRED_CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16", "fma"})


_STATE = (
    "apack", "zres", "zsq", "twoe", "limit", "run_min", "thr", "count", "cand_idx", "cand_val", "dropped", "compact_thr"
)  # fmt: skip
_FINISH = ("codes", "out", "near")


class _Args(ctypes.Structure):
    _fields_ = (
        [(name, ctypes.c_void_p) for name in ("z", "mean", "b", "csq", *_STATE, *_FINISH, "stats")]
        + [("bound", ctypes.c_double * 6)]
        + [(name, ctypes.c_int64) for name in ("pairs", "k_pad", "cap", "kb_codes", "n", "dim", "rows")]
    )


class KernelState(NamedTuple):
    """The per-token buffers of one run for ``rows`` tokens (see the C source), all written by the kernel:
    the packed tokens and their bounds as a range of token blocks starts, then the scan's state."""

    apack: torch.Tensor  # (rows / MR, pairs, MR) int32: the centred tokens in bf16, token-blocked
    zres: torch.Tensor  # (rows,) float32: || z' - bf16(z') ||
    zsq: torch.Tensor  # (rows,) float32: ||z'||^2 (+inf on padding tokens)
    twoe: torch.Tensor  # (rows,) float32: the running threshold's margin above the running minimum
    limit: torch.Tensor  # (rows,) float64: 2 E, the margin above the final minimum
    run_min: torch.Tensor  # (rows,) float32: the running minimum of the values
    thr: torch.Tensor  # (rows,) float32: the running threshold
    count: torch.Tensor  # (rows,) int32: codes kept (after a finish, a token with several candidates: how many)
    cand_idx: torch.Tensor  # (cap, rows) int32: the kept codes, slot-major (slot s of token i at [s, i])
    cand_val: torch.Tensor  # (cap, rows) float32: their values
    dropped: torch.Tensor  # (rows,) float32: the smallest value a full list refused (-inf: values out of range)
    compact_thr: torch.Tensor  # (rows,) float32: the threshold at the list's last compaction


class PackedCodes(NamedTuple):
    """The codes' operands (:meth:`Bf16SearchKernel.codes`), views of the calling thread's kept buffers."""

    b: torch.Tensor  # (k_pad / NR, pairs, NR) int32: -2 (c - mean) rounded to bf16 pairs, code tiles, zero past K
    csq: torch.Tensor  # (k_pad,) float32: ||c - mean||^2, +inf on the padding codes
    mean: torch.Tensor  # (d,) float32: the codes' mean (summed in double)
    c_sq_max: float  # max ||c - mean||^2 (NaN if any is)
    dc_max: float  # max || (c - mean) - bf16(c - mean) ||


class Finish(NamedTuple):
    """Where the kernel settles each token after its scan (see ``filter_tokens`` and ``settle_token``)."""

    codes: torch.Tensor  # (K, d) float32: the codes, original coordinates
    out: torch.Tensor  # (n,) int64: the nearest code, -2 (near-ties left first in the list) or -1 (exact path)
    near: torch.Tensor  # (n,) int32: near-ties left for the caller's re-rank (out = -2), else 0


def _bind(lib: ctypes.CDLL, name: str, *argtypes):
    """The C function ``name`` of ``lib`` with its argument types declared, returning nothing."""
    function = getattr(lib, name)
    function.argtypes, function.restype = list(argtypes), None
    return function


def _check_cpu_contiguous(tensors, what: str = "bf16 search kernel") -> None:
    if not all(t.is_cpu and t.is_contiguous() for t in tensors):
        raise ValueError(f"{what}: every tensor must be a contiguous CPU tensor")


class _Kernel:
    """What both kernels share: the loaded library, whether it runs threaded, and per-thread kept buffers."""

    def __init__(self, lib: ctypes.CDLL, prefix: str, abi_version: int):
        """Check the library's ABI (``<prefix>_abi``, which also gives the tile sizes) and whether it was built
        with OpenMP (``<prefix>_openmp``)."""
        mr, nr = ctypes.c_int32(), ctypes.c_int32()
        abi = getattr(lib, f"{prefix}_abi")(ctypes.byref(mr), ctypes.byref(nr))
        if abi != abi_version:
            raise RuntimeError(f"kernel ABI {abi}, expected {abi_version}")
        self.tokens_per_block, self.codes_per_tile = mr.value, nr.value
        self._lib = lib
        self.openmp = bool(getattr(lib, f"{prefix}_openmp")())
        self._local = threading.local()

    def workspace(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape`` from this thread's grow-only buffer ``name`` (uninitialised).

        The per-call buffers (the packed codes, half the size of an fp32 codebook; token operands, state and
        kept codes, ~1 KiB per token) are kept between calls: fresh pages cost a page fault each on first
        touch, which made up a third of the kernel's time at K = 1,024, and 25-35 ms of a 64 MiB operand
        at K = 262,144 (more than packing it). They stay allocated, per thread, until the thread ends or
        :meth:`release_workspace`.
        """
        views = self._local.__dict__.setdefault("views", {})
        key = (name, shape, dtype)
        view = views.get(key)
        if view is not None:
            return view
        buffers = self._local.__dict__.setdefault("buffers", {})
        numel = 1
        for n in shape:
            numel *= n
        buf = buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            # never an inference tensor, even when a search first runs under torch.inference_mode (Lightning's
            # validation): torch refuses in-place updates of those once outside it, and the buffers are kept
            with torch.inference_mode(False):
                buf = buffers[name] = torch.empty(numel, dtype=dtype)
            for old in [k for k in views if k[0] == name]:  # views of the buffer this one replaces
                del views[old]
            self._local.__dict__.pop("state", None)  # its views may be among them
        if len(views) >= 64:  # searches of many different sizes: the views are cheap to make again
            views.clear()
        with torch.inference_mode(False):
            view = views[key] = buf[:numel].view(shape)
        return view

    def release_workspace(self) -> None:
        """Free this thread's kept buffers (see :meth:`workspace`); the next search allocates them again."""
        for name in ("buffers", "views", "state"):
            self._local.__dict__.pop(name, None)


class Bf16SearchKernel(_Kernel):
    """The loaded bf16 kernel: its tile sizes and a threaded call over token blocks (see the C source)."""

    def __init__(self, lib: ctypes.CDLL):
        super().__init__(lib, "simvq_bf16", ABI_VERSION)
        ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
        # (x, mean, n, rows, dim, pairs, scale, layout, out, resid, sq, threads)
        self._pack = _bind(lib, "simvq_bf16_pack_all", ptr, ptr, i64, i64, i64, i64, ctypes.c_float, i32, ptr, ptr, ptr, i32)
        # (codes, k, k_pad, dim, pairs, mean, partial, b, resid, csq, maxima, threads)
        self._codes = _bind(lib, "simvq_bf16_codes", ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, i32)
        self._search_all = _bind(lib, "simvq_bf16_search_all", ctypes.POINTER(_Args), i64, i32, i64)

    def run(
        self, z, mean, b, csq, bound, state: KernelState, *, kb_codes: int, threads: int, finish: Finish | None = None
    ):
        """Pack the tokens ``z`` (n, d) centred on ``mean``, scan every code for every token block, then (with
        ``finish``) settle each token.

        ``b``, ``csq``: the packed codes (:meth:`codes`, or :meth:`pack` with ``layout="codes"``); ``bound``: the six coefficients of the per-token
        error bound (``_bf16_error_coefficients`` in search.py). All tensors must be contiguous CPU tensors
        laid out as the C source describes; ``state`` (:meth:`state`) is written by the call. It releases
        the GIL and runs on ``threads`` OpenMP threads (token blocks in pieces taken dynamically; each piece
        packs, scans and settles its own tokens). Returns, with ``finish``, the number of tokens with several
        candidates, with near-ties left in ``finish.near`` (``finish.out`` -2) and sent to the exact path
        (-1); else None.
        """
        n, dim = z.shape
        rows, pairs = state.count.shape[0], (dim + 1) // 2
        if z.dtype != torch.float32 or mean.dtype != torch.float32 or mean.shape != (dim,) or rows < n:
            raise ValueError("bf16 search kernel: run needs float32 z (n, d) and mean (d,), and state for n tokens")
        if (
            b.dtype != torch.int32 or b.shape[1:] != (pairs, self.codes_per_tile)
            or csq.shape != (b.shape[0] * self.codes_per_tile,)
        ):  # fmt: skip
            raise ValueError("bf16 search kernel: the packed codes must match the tokens' width")
        tensors = (z, mean, b, csq)
        made = self._local.__dict__.get("state")
        if made is not None and made[1] is state and made[0][1] == dim:
            state_pointers = made[2]  # this thread's own state buffers (state()), laid out for this width
        else:
            if (
                state.apack.shape != (rows // self.tokens_per_block, pairs, self.tokens_per_block)
                or state.cand_idx.dim() != 2 or state.cand_idx.shape[1] != rows
                or state.cand_val.shape != state.cand_idx.shape
            ):  # fmt: skip
                raise ValueError("bf16 search kernel: the state must match the tokens' width")
            _check_cpu_contiguous(state)
            state_pointers = [t.data_ptr() for t in state]
        if finish is not None:
            tensors += tuple(finish)
            if (
                finish.out.dtype != torch.int64 or finish.near.dtype != torch.int32
                or finish.codes.dtype != torch.float32 or finish.codes.shape[1] != dim
                or min(len(finish.out), len(finish.near)) < n
            ):  # fmt: skip
                raise ValueError(
                    "bf16 search kernel: finish needs int64 out and int32 near for every token, and float32 "
                    "codes of the tokens' width"
                )
        _check_cpu_contiguous(tensors)
        stats = (ctypes.c_int64 * 3)()
        pointers = [None] * (len(_FINISH) + 1) if finish is None else [*(t.data_ptr() for t in finish), ctypes.addressof(stats)]
        blocks = state.apack.shape[0]
        args = _Args(
            *(t.data_ptr() for t in (z, mean, b, csq)), *state_pointers, *pointers, (ctypes.c_double * 6)(*bound),
            state.apack.shape[1], csq.shape[0], state.cand_idx.shape[0], max(1, kb_codes), n, dim, rows,
        )  # fmt: skip
        threads = max(1, min(threads, blocks))
        # one cache block of codes: the kernel's block is kb_codes rounded up to whole tiles
        one_block = csq.shape[0] <= -(-max(1, kb_codes) // self.codes_per_tile) * self.codes_per_tile
        per_thread = PIECES_PER_THREAD_ONE_BLOCK if one_block else PIECES_PER_THREAD
        pieces = min(blocks, max(threads * per_thread, -(-blocks // PIECE_BLOCKS)))
        self._search_all(ctypes.byref(args), blocks, threads, pieces)
        return None if finish is None else tuple(stats)

    def codes(self, codes: torch.Tensor, *, threads: int = 1) -> PackedCodes:
        """The operands of a codebook ``codes`` (K, d) float32 in one threaded call: its mean (summed in
        double), ``-2 (c - mean)`` rounded to bf16 in the kernel's code tiles (K padded with zero codes to a
        whole tile, ``k_pad``), ``||c - mean||^2`` and the two maxima the error bound needs. The tensors are
        this thread's kept buffers (:meth:`workspace`): valid until the next call."""
        _check_cpu_contiguous((codes,))
        if codes.dtype != torch.float32 or codes.dim() != 2 or codes.shape[0] < 1:
            raise ValueError("bf16 search kernel: codes must be a non-empty float32 (K, d) tensor")
        k, dim = codes.shape
        nr, pairs, threads = self.codes_per_tile, (dim + 1) // 2, max(1, threads)
        k_pad = -(-k // nr) * nr
        ws = self.workspace
        b, csq, mean = ws("codes", (k_pad // nr, pairs, nr), torch.int32), ws("csq", (k_pad,), torch.float32), ws("mean", (dim,), torch.float32)
        partial, resid = ws("partial", (threads, dim), torch.float64), ws("code_resid", (k,), torch.float32)
        maxima = (ctypes.c_double * 2)()
        self._codes(
            codes.data_ptr(), k, k_pad, dim, pairs, mean.data_ptr(), partial.data_ptr(), b.data_ptr(), resid.data_ptr(),
            csq.data_ptr(), ctypes.addressof(maxima), threads,
        )  # fmt: skip
        return PackedCodes(b, csq, mean, maxima[0], maxima[1])

    def state(self, rows: int, dim: int, cap: int) -> KernelState:
        """The buffers of a run over ``rows`` tokens (a multiple of the block size) of width ``dim`` with lists
        of ``cap`` codes, from this thread's kept buffers (:meth:`workspace`); the kernel writes them all.
        The last one is reused as it is while the same is asked for, and :meth:`run` trusts its layout (twelve
        buffer look-ups and checks cost ~50 us, where a search at K = 1,024 takes about a millisecond)."""
        key = (rows, dim, cap)
        last = self._local.__dict__.get("state")
        if last is not None and last[0] == key:
            return last[1]
        mr, pairs = self.tokens_per_block, (dim + 1) // 2
        if rows % mr:
            raise ValueError(f"bf16 search kernel: state rows must be a multiple of {mr}")
        shapes = {
            "apack": ((rows // mr, pairs, mr), torch.int32), "limit": ((rows,), torch.float64),
            "count": ((rows,), torch.int32), "cand_idx": ((cap, rows), torch.int32),
            "cand_val": ((cap, rows), torch.float32),
        }  # fmt: skip
        state = KernelState(*(self.workspace(name, *shapes.get(name, ((rows,), torch.float32))) for name in _STATE))
        self._local.state = (key, state, [t.data_ptr() for t in state])
        return state

    def pack(
        self,
        x: torch.Tensor,
        rows: int,
        *,
        scale: float,
        layout: str,
        out: torch.Tensor | None = None,
        mean: torch.Tensor | None = None,
        squares: bool = False,
        threads: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``y = x - mean`` (``x`` (n, d) float32; no ``mean``: ``y = x``) rounded to bf16 (to nearest even)
        times ``scale`` (a power of two), padded with zero rows to ``rows`` and to an even width, as int32
        pairs of bf16 (even coordinate in the low half) in the kernel's tiles: ``layout="tokens"``, token
        blocks ``(rows / MR, pairs, MR)``; ``"codes"``, code tiles ``(rows / NR, pairs, NR)``. Also returns
        ``||y_i - bf16(y_i)||`` (n,) and, with ``squares``, ``||y_i||^2`` in float32 (rows,) with +inf on the
        padding rows (else None)."""
        _check_cpu_contiguous((x,) if mean is None else (x, mean))
        if x.dtype != torch.float32 or x.dim() != 2 or rows < x.shape[0]:
            raise ValueError("bf16 search kernel: pack expects a float32 (n, d) tensor and rows >= n")
        n, dim = x.shape
        if mean is not None and (mean.dtype != torch.float32 or mean.shape != (dim,)):
            raise ValueError(f"bf16 search kernel: mean must be a float32 tensor of shape ({dim},)")
        pairs = (dim + 1) // 2
        tiles = {"tokens": self.tokens_per_block, "codes": self.codes_per_tile}
        if layout not in tiles:
            raise ValueError(f"bf16 search kernel: pack layout must be 'tokens' or 'codes', got {layout!r}")
        tile = tiles[layout]
        if rows % tile:
            raise ValueError(f"bf16 search kernel: {layout} rows must be a multiple of {tile}")
        shape, dtype = (rows // tile, pairs, tile), torch.int32
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        elif out.shape != shape or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"bf16 search kernel: pack out must be a contiguous {dtype} tensor of shape {shape}")
        resid = torch.empty(n, dtype=torch.float32)
        sq = torch.empty(rows, dtype=torch.float32) if squares else None
        self._pack(
            x.data_ptr(), None if mean is None else mean.data_ptr(), n, rows, dim, pairs, scale, 1 if layout == "tokens" else 2,
            out.data_ptr(), resid.data_ptr(), None if sq is None else sq.data_ptr(), max(1, threads),
        )  # fmt: skip
        return out, resid, sq


class _Fp32Args(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("z", "mean", "b", "csq", "apack", "znorm", "m1", "m2", "idx")] + [
        (name, ctypes.c_int64) for name in ("n", "dim", "k_pad", "kb_codes")
    ]


class Fp32Result(NamedTuple):
    """What :meth:`Fp32SearchKernel.run` leaves per token (views of the calling thread's kept buffers)."""

    m1: torch.Tensor  # (n,) float32: the smallest value ||c'||^2 - 2 z'.c'
    m2: torch.Tensor  # (n,) float32: the smallest value of every other code (+inf with one code)
    idx: torch.Tensor  # (n,) int32: the code that first reached m1, in code order
    znorm: torch.Tensor  # (n,) float32: ||z - mean||


class Fp32SearchKernel(_Kernel):
    """The loaded fp32 kernel (kernels/fp32_search.c): per token the smallest value, its code and the
    runner-up value, from fp32 FMAs in registers, with no distance written to memory."""

    what = "fp32 search kernel"

    def __init__(self, lib: ctypes.CDLL):
        super().__init__(lib, "simvq_fp32", FP32_ABI_VERSION)
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        # (codes, mean, k, k_pad, dim, b, csq, threads)
        self._codes = _bind(lib, "simvq_fp32_codes", ptr, ptr, i64, i64, i64, ptr, ptr, ctypes.c_int32)
        # (args, blocks, threads, pieces, parts)
        self._search_all = _bind(lib, "simvq_fp32_search_all", ctypes.POINTER(_Fp32Args), i64, ctypes.c_int32, i64, i64)
        # (args, thr, blocks, threads, parts, cap, rows, cols) -> pairs found
        self._collect = _bind(lib, "simvq_fp32_collect", ctypes.POINTER(_Fp32Args), ptr, i64, ctypes.c_int32, i64, i64, ptr, ptr)
        self._collect.restype = i64

    def codes(self, codes: torch.Tensor, mean: torch.Tensor, *, threads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes ``codes`` (K, d) float32 centred on ``mean`` (d,) in the kernel's tiles ``(k_pad / NR, d,
        NR)`` (zero codes past K) and their squared norms ``(k_pad,)`` (+inf past K), in one threaded pass:
        this thread's kept buffers, valid until the next call. The centred coordinates equal torch's
        ``codes - mean``; the squared norms are summed in double and rounded once."""
        _check_cpu_contiguous((codes, mean), self.what)
        if codes.dtype != torch.float32 or codes.dim() != 2 or not len(codes):
            raise ValueError(f"{self.what}: codes must be a non-empty float32 (K, d) tensor")
        k, dim = codes.shape
        if mean.dtype != torch.float32 or mean.shape != (dim,):
            raise ValueError(f"{self.what}: mean must be a float32 tensor of shape ({dim},)")
        nr = self.codes_per_tile
        k_pad = -(-k // nr) * nr
        b = self.workspace("codes", (k_pad // nr, dim, nr), torch.float32)
        csq = self.workspace("csq", (k_pad,), torch.float32)
        self._codes(codes.data_ptr(), mean.data_ptr(), k, k_pad, dim, b.data_ptr(), csq.data_ptr(), max(1, threads))
        return b, csq

    def run(
        self, z: torch.Tensor, mean: torch.Tensor, b: torch.Tensor, csq: torch.Tensor, *, kb_codes: int, threads: int,
        parts: int | None = None,
    ) -> Fp32Result:  # fmt: skip
        """Centre the tokens ``z`` (n, d) on ``mean``, pack them and scan every code (``b``, ``csq`` from
        :meth:`codes`) for every token block, on ``threads`` OpenMP threads, the codes in cache blocks of
        ``kb_codes``. Token blocks are split into pieces taken dynamically; with fewer than
        :data:`PIECES_PER_THREAD` blocks per thread the codes are split too, into ranges of at least
        :data:`FP32_MIN_PART_TILES` tiles (``parts``, default: so chosen), merged in code order: the same
        result. Releases the GIL."""
        self._check_operands(z, mean, b, csq)
        n = z.shape[0]
        blocks = -(-n // self.tokens_per_block)
        threads = max(1, threads)
        parts = self._parts(blocks, b.shape[0], threads, parts)
        args, state = self._args(z, mean, b, csq, kb_codes, parts, prefix="")
        if parts == 1:
            threads = min(threads, blocks)
        self._search_all(ctypes.byref(args), blocks, threads, min(blocks, threads * PIECES_PER_THREAD), parts)
        znorm, m1, m2, idx = (t[:n] for t in state)
        return Fp32Result(m1, m2, idx, znorm)

    def collect(
        self, z: torch.Tensor, mean: torch.Tensor, b: torch.Tensor, csq: torch.Tensor, thr: torch.Tensor, *, threads: int,
        cap: int,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
        """Every pair (token ``i`` of ``z``, code ``k``) whose value ``||c'||^2 - 2 z'.c'`` (the one
        :meth:`run` evaluates, bit for bit) is at most ``thr[i]``: ``(rows, cols)`` int64, in no particular
        order; None where there are more than ``cap`` pairs. Its buffers are not :meth:`run`'s, so a
        :class:`Fp32Result` stays valid."""
        self._check_operands(z, mean, b, csq, thr)
        n = z.shape[0]
        if thr.dtype != torch.float32 or thr.shape != (n,):
            raise ValueError(f"{self.what}: collect needs a float32 threshold per token")
        blocks, threads = -(-n // self.tokens_per_block), max(1, threads)
        parts = self._parts(blocks, b.shape[0], threads, None)
        args, _ = self._args(z, mean, b, csq, 1, 1, prefix="collect_")
        pairs = self.workspace("collect_pairs", (2, max(1, cap)), torch.int32)
        found = self._collect(
            ctypes.byref(args), thr.data_ptr(), blocks, threads, parts, max(1, cap), pairs[0].data_ptr(), pairs[1].data_ptr()
        )  # fmt: skip
        if found > cap:
            return None
        return pairs[0, :found].long(), pairs[1, :found].long()

    def _check_operands(self, z, mean, b, csq, *others) -> None:
        """Contiguous CPU operands (``others`` too) of matching dtypes and widths, or a ValueError."""
        _check_cpu_contiguous((z, mean, b, csq, *others), self.what)
        dim = z.shape[1]
        if z.dtype != torch.float32 or mean.dtype != torch.float32 or mean.shape != (dim,):
            raise ValueError(f"{self.what}: the tokens must be float32 (n, d) and the mean float32 (d,)")
        if b.dtype != torch.float32 or b.dim() != 3 or b.shape[1:] != (dim, self.codes_per_tile) or csq.shape != (b.shape[0] * self.codes_per_tile,):
            raise ValueError(f"{self.what}: the packed codes must match the tokens' width")

    def _parts(self, blocks: int, tiles: int, threads: int, parts: int | None) -> int:
        """Code ranges per token block: 1 with enough token blocks for every thread, else enough ranges (of at
        least FP32_MIN_PART_TILES tiles) for PIECES_PER_THREAD pieces per thread; or ``parts`` as asked."""
        if parts is not None:
            if not 1 <= parts <= tiles:
                raise ValueError(f"{self.what}: parts must be between 1 and the number of code tiles ({tiles})")
            return parts
        wanted = threads * PIECES_PER_THREAD
        parts = 1 if threads == 1 or blocks >= wanted else -(-wanted // blocks)
        return max(1, min(parts, tiles // FP32_MIN_PART_TILES))

    def _args(self, z, mean, b, csq, kb_codes: int, parts: int, prefix: str):
        """The kernel's arguments for the tokens ``z``, with the token operands and state (``parts`` states)
        from this thread's kept buffers named with ``prefix``."""
        n, dim = z.shape
        mr = self.tokens_per_block
        blocks = -(-n // mr)
        rows = blocks * mr
        apack = self.workspace(prefix + "apack", (blocks, dim, mr), torch.float32)
        state = [
            self.workspace(prefix + name, (rows if name == "znorm" else parts * rows,), torch.int32 if name == "idx" else torch.float32)
            for name in ("znorm", "m1", "m2", "idx")
        ]  # fmt: skip
        args = _Fp32Args(*(t.data_ptr() for t in (z, mean, b, csq, apack, *state)), n, dim, csq.shape[0], max(1, kb_codes))
        return args, state


def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def kernel_dir() -> Path:
    """Where built kernels are cached (see the module docstring)."""
    if os.environ.get("SIMVQ_KERNEL_DIR"):
        return Path(os.environ["SIMVQ_KERNEL_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "simvq" / "kernels"


def _private_temp_dir() -> Path | None:
    """``$TMPDIR/simvq-kernels-<uid>``, created mode 0700; None if it exists but is not ours alone (a library
    another user could have placed there must never be loaded)."""
    path = Path(tempfile.gettempdir()) / f"simvq-kernels-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.stat()
    except OSError:
        return None
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return path


class _Spec(NamedTuple):
    name: str  # the library's file name stem
    source: Path
    flag_sets: tuple[tuple[str, ...], ...]
    required: frozenset[str]  # /proc/cpuinfo flags
    cls: type


_SPECS = {
    "bf16": _Spec("bf16_search", SOURCE, FLAG_SETS, REQUIRED_CPU_FLAGS, Bf16SearchKernel),
    "fp32": _Spec("fp32_search", FP32_SOURCE, FP32_FLAG_SETS, FP32_REQUIRED_CPU_FLAGS, Fp32SearchKernel),
}


def _build(compiler: str, kind: str = "bf16") -> Path:
    """Compile kernel ``kind`` into the cache (once per source, flags and compiler); returns the library's path.

    The cache folder is :func:`kernel_dir`, or a private folder under the temporary directory when that
    one cannot be created (a read-only home)."""
    spec = _SPECS[kind]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    flags = "|".join(" ".join(f) for f in spec.flag_sets)
    key = hashlib.sha256("\0".join([spec.source.read_text(), flags, version]).encode()).hexdigest()[:16]
    out_dir = kernel_dir()
    target = out_dir / f"{spec.name}-{key}.so"
    if target.exists():
        return target
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        fallback = _private_temp_dir()
        if fallback is None:
            raise
        out_dir, target = fallback, fallback / target.name
        if target.exists():
            return target
    fd, tmp = tempfile.mkstemp(prefix=f".{spec.name}-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        for flag_set in spec.flag_sets:
            cmd = [compiler, *flag_set, "-o", tmp, str(spec.source)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                break
        else:
            raise RuntimeError(f"{os.path.basename(compiler)} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.lru_cache(maxsize=None)
def _load(kind: str = "bf16") -> tuple[Bf16SearchKernel | Fp32SearchKernel | None, str]:
    spec = _SPECS[kind]
    if os.environ.get("SIMVQ_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "turned off by SIMVQ_NATIVE=0"
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"needs Linux on x86-64, this is {platform.system()} on {platform.machine()}"
    missing = sorted(spec.required - _cpu_flags())
    if missing:
        return None, f"this CPU lacks {', '.join(missing)}"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc)"
    try:
        kernel = spec.cls(ctypes.CDLL(str(_build(compiler, kind))))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"simvq: the fused {kind} search kernel is unavailable ({err}); using the PyTorch paths", stacklevel=3)
        return None, f"build or load failed: {err}"
    return kernel, "available" if kernel.openmp else "available, on one thread (the compiler has no OpenMP)"


def bf16_search_kernel() -> Bf16SearchKernel | None:
    """The fused bf16 search kernel, built and loaded on first call; None where it cannot be used."""
    return _load("bf16")[0]


def fp32_search_kernel() -> Fp32SearchKernel | None:
    """The fused fp32 search kernel, built and loaded on first call; None where it cannot be used."""
    return _load("fp32")[0]


def native_status(kind: str = "bf16") -> str:
    """``"available"`` (with a note when the kernel runs on one thread), or why kernel ``kind`` (``"bf16"``
    or ``"fp32"``) cannot be used."""
    return _load(kind)[1]


def default_threads() -> int:
    """Threads the kernel uses: torch's intra-op thread count, so that ``torch.set_num_threads`` governs it."""
    return max(1, torch.get_num_threads())
