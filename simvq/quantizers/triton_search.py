"""The fused bf16 scan of ``search="bf16-triton"`` (GPUs, Triton): products and running minima in registers.

One kernel pass computes ``v = ||c'||^2 - 2 z~.c~`` for a block of tokens against a tile of codes on the tensor
cores (bf16 inputs, fp32 accumulation), keeps each token's running minimum, and records the tiles whose
smallest value is within the token's margin of that running minimum: their index and that smallest value, in
a short list per token. No distance is written to memory. A code within the margin of the final minimum lies
in a recorded tile (when its tile was scanned, the running minimum was no smaller than the final one), so
the tiles recorded and still within the margin of the final minimum hold every candidate; the caller
(:func:`simvq.quantizers.search._bf16_triton`) evaluates their codes again in fp32 and settles the winner
exactly.

Tokens are split into blocks of ``BLOCK_T`` (one program each) and the codes into ``splits`` ranges of whole
tiles (a second grid axis), so that a few thousand tokens still fill the GPU; each split keeps its own minimum
and list, and the caller merges them.

The kernel runs on CUDA tensors. With ``TRITON_INTERPRET=1`` in the environment before Triton is imported
(Triton's interpreter, NumPy on the CPU; Triton reads the variable at import) it runs on CPU tensors instead;
NumPy has no bf16, so there the operands are passed as fp32 tensors holding the same bf16-rounded values
(products of bf16 numbers are exact in fp32, so only the summation order differs from a GPU's). This is how
the tests check the kernel on machines without a GPU (tests/conftest.py sets the variable there).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except Exception as err:  # noqa: BLE001 - any import failure makes the path unavailable, with the reason
    triton = tl = None
    _IMPORT_ERROR = f"triton is not importable ({type(err).__name__}: {err}); pip install triton"
else:
    _IMPORT_ERROR = None

# Codes per tile: the unit of the recorded lists and of the caller's fp32 re-evaluation
BLOCK_K = 128
# Tiles recorded per token and split; a token with more (a crowded codebook, many duplicate codes) goes to
# the exact path
LIST_CAP = 64
# Widths up to this are held in registers and shared memory for the whole scan; wider codes are read in
# pieces of DIM_PIECE per tile
WHOLE_DIM_MAX = 256
DIM_PIECE = 64


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET`` set, as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_status(device_type: str | None = None) -> str | None:
    """None where the kernel can run on ``device_type`` tensors (None: on this machine at all), else why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device_type is None:
        if interpreting() or torch.cuda.is_available():
            return None
        return "it runs on CUDA GPUs, and CUDA is not available here (TRITON_INTERPRET=1 runs it on the CPU, slowly)"
    if interpreting():
        return None if device_type == "cpu" else f"TRITON_INTERPRET is set: the kernel runs on CPU tensors, got {device_type}"
    if device_type != "cuda":
        return f"the Triton kernel runs on CUDA tensors, got {device_type} (TRITON_INTERPRET=1 runs it on the CPU, slowly)"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"it needs bf16 tensor cores (compute capability 8.0 or newer), this GPU has {major}.{minor}"
    return None


def _scan(
    z_ptr, c_ptr, csq_ptr, margin_ptr, min_ptr, count_ptr, tile_ptr, tile_min_ptr,
    num_tokens, num_codes, dim, tiles_per_split,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, WHOLE_D: tl.constexpr, CAP: tl.constexpr,
):  # fmt: skip
    """One block of tokens against one split's range of code tiles (see the module docstring).

    ``z`` (N, dim) holds the bf16 centred tokens, ``c`` (K, dim) the bf16 centred codes times -2 (exact),
    both padded with zeros to a width ``dim`` that is a multiple of ``BLOCK_D`` (so that no load needs a mask
    along the width, which would keep it from being vectorised), ``csq`` (K,) ``||c'||^2`` in fp32 and
    ``margin`` (N,) each token's fp32 margin. Per split and token it writes the minimum, the number of tiles
    recorded (it may exceed CAP: then only the first CAP are kept) and the tiles' indices (over the whole
    codebook) and smallest values.
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    split = tl.program_id(1)
    split64 = split.to(tl.int64)
    live = rows < num_tokens
    rows64 = rows.to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    margin = tl.load(margin_ptr + rows, mask=live, other=0.0)
    run_min = tl.full([BLOCK_T], float("inf"), tl.float32)
    count = tl.zeros([BLOCK_T], dtype=tl.int32)
    if WHOLE_D:
        a = tl.load(z_ptr + rows64[:, None] * dim + dd[None, :], mask=live[:, None], other=0.0)
    first_tile = split * tiles_per_split
    k_start = first_tile * BLOCK_K
    k_stop = tl.minimum(k_start + tiles_per_split * BLOCK_K, num_codes)
    list_base = (split64 * num_tokens + rows64) * CAP
    for k0 in range(k_start, k_stop, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cols64 = cols.to(tl.int64)
        in_k = cols < num_codes
        if WHOLE_D:
            b = tl.load(c_ptr + cols64[:, None] * dim + dd[None, :], mask=in_k[:, None], other=0.0)
            acc = tl.dot(a, tl.trans(b))
        else:
            acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                dp = d0 + dd
                a_p = tl.load(z_ptr + rows64[:, None] * dim + dp[None, :], mask=live[:, None], other=0.0)
                b_p = tl.load(c_ptr + cols64[:, None] * dim + dp[None, :], mask=in_k[:, None], other=0.0)
                acc = tl.dot(a_p, tl.trans(b_p), acc)
        # padding codes: +inf, never a minimum and never recorded for themselves
        csq = tl.load(csq_ptr + cols, mask=in_k, other=float("inf"))
        tile_min = tl.min(acc + csq[None, :], axis=1)
        run_min = tl.minimum(run_min, tile_min)
        hit = live & (tile_min <= run_min + margin)
        slot = list_base + tl.minimum(count, CAP - 1)
        keep = hit & (count < CAP)
        tl.store(tile_ptr + slot, tl.zeros([BLOCK_T], dtype=tl.int32) + k0 // BLOCK_K, mask=keep)
        tl.store(tile_min_ptr + slot, tile_min, mask=keep)
        count += hit.to(tl.int32)
    tl.store(min_ptr + split64 * num_tokens + rows64, run_min, mask=live)
    tl.store(count_ptr + split64 * num_tokens + rows64, count, mask=live)


@functools.lru_cache(maxsize=None)
def _kernel():
    """The jitted kernel (interpreted where ``TRITON_INTERPRET`` is set), made on first use."""
    return triton.jit(_scan)


def _config(dim: int) -> dict:
    """Launch settings for codes of width ``dim`` (before padding)."""
    block_d = max(16, 1 << (dim - 1).bit_length())
    if block_d <= WHOLE_DIM_MAX:
        # the token block's operands stay resident for the whole scan (bf16: 32 KiB at 128 x 128)
        block_t = 128 if block_d <= 128 else 64
        return dict(BLOCK_T=block_t, BLOCK_D=block_d, WHOLE_D=True, num_warps=8, num_stages=3 if block_d <= 128 else 2)
    return dict(BLOCK_T=64, BLOCK_D=DIM_PIECE, WHOLE_D=False, num_warps=8, num_stages=3)


def padded_width(dim: int) -> int:
    """The operands' width for codes of width ``dim``: a multiple of the kernel's ``BLOCK_D``, zeros past ``dim``
    (they add nothing to the products). Rows then start 16-byte aligned and every load is a whole vector."""
    block_d = _config(dim)["BLOCK_D"]
    return -(-dim // block_d) * block_d


def compile_for(arch: int, dim: int):
    """Build the kernel ahead of time for CUDA compute capability ``arch`` (90: H100/H200, 80: A100) and codes of
    width ``dim``, as a launch specialises it (16-byte aligned pointers, sizes divisible by 16); needs no GPU,
    only Triton's compiler and the ptxas it ships. Returns Triton's compiled kernel (``.asm["ptx"]``,
    ``.asm["cubin"]``). Not under ``TRITON_INTERPRET``, which changes how Triton's language functions behave.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if interpreting():
        raise RuntimeError("compile_for needs TRITON_INTERPRET unset when Triton is imported")
    fn = JITFunction(_scan)
    cfg = _config(padded_width(dim))
    pointers = ("*bf16", "*bf16") + ("*fp32",) * 3 + ("*i32", "*i32", "*fp32")
    constants = dict(BLOCK_T=cfg["BLOCK_T"], BLOCK_K=BLOCK_K, BLOCK_D=cfg["BLOCK_D"], WHOLE_D=cfg["WHOLE_D"], CAP=LIST_CAP)
    types = list(pointers) + ["i32"] * 4
    signature = {name: types[i] if i < len(types) else "constexpr" for i, name in enumerate(fn.arg_names)}
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()},
        attrs={(i,): [["tt.divisibility", 16]] for i in range(len(types))},
    )
    options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def token_block(dim: int) -> int:
    """Tokens per program for codes of width ``dim``."""
    return _config(dim)["BLOCK_T"]


def default_splits(num_tokens: int, num_codes: int, dim: int, device: torch.device) -> int:
    """Code ranges per token block: enough programs for two per multiprocessor, whole tiles each."""
    tiles = -(-num_codes // BLOCK_K)
    blocks = -(-num_tokens // token_block(dim))
    if device.type == "cuda":
        units = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        units = 1  # the interpreter runs one program at a time
    return max(1, min(tiles, -(-2 * units // blocks)))


def scan(zb: torch.Tensor, cb: torch.Tensor, csq: torch.Tensor, margin: torch.Tensor, splits: int):
    """Run the kernel: ``zb`` (N, w) and ``cb`` (K, w) bf16 (fp32 holding bf16 values under the interpreter),
    ``w = padded_width(d)``, ``csq`` (K,) and ``margin`` (N,) fp32, all contiguous on one device; ``splits``
    code ranges.

    Returns ``(minimum (S, N), count (S, N), tiles (S, N, LIST_CAP), tile_min (S, N, LIST_CAP))``, S the splits
    actually used; list entries past a token's count are unset.
    """
    status = triton_status(zb.device.type)
    if status is not None:
        raise RuntimeError(f"the Triton search kernel cannot run: {status}")
    num_tokens, width = zb.shape
    num_codes = cb.shape[0]
    tiles = -(-num_codes // BLOCK_K)
    per_split = -(-tiles // max(1, min(splits, tiles)))
    used = -(-tiles // per_split)
    device = zb.device
    run_min = torch.empty(used, num_tokens, dtype=torch.float32, device=device)
    count = torch.empty(used, num_tokens, dtype=torch.int32, device=device)
    tile = torch.empty(used, num_tokens, LIST_CAP, dtype=torch.int32, device=device)
    tile_min = torch.empty(used, num_tokens, LIST_CAP, dtype=torch.float32, device=device)
    cfg = _config(width)
    if width % cfg["BLOCK_D"] or cb.shape[1] != width:
        raise ValueError(f"operands of widths {width} and {cb.shape[1]}: pad both to padded_width(dim)")
    grid = (-(-num_tokens // cfg["BLOCK_T"]), used)
    _kernel()[grid](
        zb, cb, csq, margin, run_min, count, tile, tile_min, num_tokens, num_codes, width, per_split,
        BLOCK_K=BLOCK_K, CAP=LIST_CAP, **cfg,
    )  # fmt: skip
    return run_min, count, tile, tile_min
