"""Export a tokenizer to ONNX (or TorchScript): ``encoder.onnx`` (input -> indices), ``decoder.onnx``
(indices -> output) and ``export.json`` (shapes, sample rate, codebook size).

What goes into the graphs:

- Encoder: the network, then the quantizer written out as plain tensor ops. Codebook families (SimVQ,
  LC-VQ, VQ, EMA VQ) search a constant codebook: SimVQ's ``C W^T + b`` is folded
  (:meth:`~simvq.quantizers.simvq.SimVQ.fold`) into that constant, which is centred on its mean ``m`` (as
  :func:`~simvq.quantizers.search.nearest_code` does), and the index is ``argmin(||c'||^2 - 2 (z - m).c')``
  over all codes in fp32. PyTorch's search certifies the same argmin in fp64, so the two can differ only on
  near-ties (distances within fp32 rounding); :func:`verify_export` counts them. FSQ and LFQ keep their
  rounding / sign rules (with their projections); a residual stack chains its levels.
- Decoder: a gather from a constant ``(K, dim)`` table of codes (the sum of one row per level for residual
  stacks), then the network. The audio decoder's inverse STFT (``irfft`` + ``F.fold``, which the ONNX
  exporters do not take) is rewritten as one matmul with a precomputed windowed inverse-DFT basis and an
  overlap-add by ``conv_transpose1d`` (:class:`MatmulISTFT`, checked against the model's ISTFT).
- Weight norm is removed (the weights are baked) and the model runs in fp32.

Inputs and outputs (dynamic batch and spatial / time axes):

- images: ``pixels`` ``(B, C, H, W)`` float32 in ``[0, 1]`` (H, W multiples of the down-sampling factor)
  -> ``indices`` ``(B, h, w)`` int64 -> ``pixels`` ``(B, C, H, W)`` float32 in ``[0, 1]``;
- audio: ``waveform`` ``(B, 1, T)`` float32 at the model's rate, ``T`` a multiple of the hop
  -> ``indices`` ``(B, T / hop)`` int64 -> ``waveform`` ``(B, 1, T)`` in ``[-1, 1]``;
- residual quantizers add a trailing axis of ``index_levels`` to ``indices``.

Those are the values :meth:`simvq.Tokenizer.encode` / :meth:`~simvq.Tokenizer.decode` return.

Size limits: an ONNX file is one protobuf message, limited to 2 GiB; larger graphs store their weights as
external data (``*.onnx.data`` next to the graph), which :func:`export_onnx` switches to by itself. A
K = 262,144 folded codebook of dimension 128 is a 128 MiB constant and fits inline.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from simvq.io import prepare_output_dir, save_file_atomic
from simvq.tokenizer import Tokenizer

FORMATS = ("onnx", "torchscript")
MANIFEST_FILE = "export.json"
DEFAULT_OPSET = 17
# protobuf's hard limit is 2 GiB; keep a margin for the graph itself
INLINE_LIMIT_BYTES = 1_800_000_000


# ----------------------------------------------------------------------------------------------------------
# Quantizers as plain graphs
# ----------------------------------------------------------------------------------------------------------


class CodebookSearch(nn.Module):
    """Nearest code in a constant ``(K, dim)`` codebook: ``argmin ||c'||^2 - 2 z'.c'`` around the code mean.

    ``normalize``: l2-normalise the tokens first (cosine codes of VQ or SimVQ; the codebook is stored normalised).
    """

    def __init__(self, codebook: torch.Tensor, *, normalize: bool = False) -> None:
        super().__init__()
        codebook = codebook.detach().float()
        mean = codebook.double().mean(0)
        centred = (codebook.double() - mean).float()
        self.register_buffer("mean", mean.float())
        self.register_buffer("centred_t", centred.t().contiguous())  # (dim, K): one matmul
        self.register_buffer("sq_norm", centred.double().square().sum(1).float())
        self.normalize = normalize

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``(N, dim)`` -> ``(N,)`` int64."""
        if self.normalize:
            z = F.normalize(z, dim=-1)
        scores = self.sq_norm - 2.0 * ((z - self.mean) @ self.centred_t)
        return scores.argmin(dim=-1)


class GraphQuantizer(nn.Module):
    """``encode``: ``(N, dim)`` tokens -> ``(N,)`` / ``(N, levels)`` indices; ``codes``: indices -> ``(N, dim)``."""

    def __init__(self, quantizer: nn.Module) -> None:
        super().__init__()
        from simvq.quantizers import FSQ, LFQ, EMAVectorQuantizer, ResidualQuantizer, SimVQ, VectorQuantizer

        q = quantizer
        self.kind = type(q).__name__
        self.levels = None
        self.search = None
        self.rule = None
        if isinstance(q, ResidualQuantizer):
            self.levels = nn.ModuleList([GraphQuantizer(level) for level in q.levels])
            return
        if isinstance(q, (SimVQ, VectorQuantizer)):  # LC-VQ is a SimVQ: its codebook is transform(C) too
            table = (q.fold() if isinstance(q, SimVQ) else q).codebook
            self.search = CodebookSearch(table, normalize=q.l2_normalize)
        elif isinstance(q, EMAVectorQuantizer):
            table = q.codebook
            self.search = CodebookSearch(table)
        elif isinstance(q, (FSQ, LFQ)):
            self.rule = copy.deepcopy(q).float()
            table = q.codebook
        else:
            raise ValueError(f"export does not support the {type(q).__name__} quantizer yet (supported: SimVQ, LC-VQ, VQ, EMA VQ, FSQ, LFQ, residual stacks of these)")
        # codes_from_indices of every code once: the decoder gathers from this constant
        self.register_buffer("table", table.detach().float().contiguous())

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        if self.levels is not None:
            residual, out = z, []
            for level in self.levels:
                idx = level.encode(residual)
                code = level.codes(idx)
                out.append(idx)
                # the PyTorch stack subtracts the straight-through output r + (q - r), not q: same arithmetic
                residual = residual - (residual + (code - residual))
            return torch.stack(out, dim=-1)
        if self.search is not None:
            return self.search(z)
        from simvq.quantizers import FSQ

        rule = self.rule
        x = rule.project_in(z)
        if isinstance(rule, FSQ):
            return rule.grid_codes_to_indices(rule.quantize_grid(x))  # the module's own rounding rule
        return rule.bits_to_indices(torch.where(x > 0, 1.0, -1.0))

    def codes(self, indices: torch.Tensor) -> torch.Tensor:
        if self.levels is not None:
            total = self.levels[0].codes(indices[..., 0])
            for i in range(1, len(self.levels)):
                total = total + self.levels[i].codes(indices[..., i])
            return total
        return F.embedding(indices, self.table)


# ----------------------------------------------------------------------------------------------------------
# The audio head's inverse STFT as a matmul + overlap-add
# ----------------------------------------------------------------------------------------------------------


class MatmulISTFT(nn.Module):
    """:class:`~simvq.modalities.audio.model.SameISTFT` without ``irfft`` / ``F.fold``.

    Input: real and imaginary parts ``(B, n_fft // 2 + 1, F)``; output ``(B, F * hop)``. The inverse real DFT
    with the synthesis window is one ``(n_fft, n_fft + 2)`` basis (computed in fp64); the overlap-add of the
    frames is ``conv_transpose1d`` with an identity kernel, the window envelope the same of ``window^2``.
    """

    def __init__(self, *, n_fft: int, hop_length: int, window: torch.Tensor) -> None:
        super().__init__()
        n, bins = n_fft, n_fft // 2 + 1
        k = torch.arange(bins, dtype=torch.float64)
        t = torch.arange(n, dtype=torch.float64)
        angle = 2 * math.pi * t[:, None] * k[None, :] / n  # (n, bins)
        weight = torch.full((bins,), 2.0, dtype=torch.float64)
        weight[0] = 1.0
        if n % 2 == 0:
            weight[-1] = 1.0
        w = window.double()[:, None]
        basis = torch.cat([torch.cos(angle) * weight / n * w, -torch.sin(angle) * weight / n * w], dim=1)
        self.register_buffer("basis", basis.float())  # (n, 2 * bins)
        self.register_buffer("eye", torch.eye(n).unsqueeze(1))  # (n, 1, n): overlap-add kernel
        self.register_buffer("window_sq", window.double().square().float().view(1, 1, n))
        self.n_fft = n
        self.hop_length = hop_length
        self.pad = (n_fft - hop_length) // 2

    def forward(self, real: torch.Tensor, imag: torch.Tensor) -> torch.Tensor:
        frames = self.basis @ torch.cat([real, imag], dim=1)  # (B, n_fft, F)
        out = F.conv_transpose1d(frames, self.eye, stride=self.hop_length)  # (B, 1, full)
        ones = torch.ones_like(frames[:1, :1, :])
        envelope = F.conv_transpose1d(ones, self.window_sq, stride=self.hop_length)  # (1, 1, full)
        if self.pad:
            out, envelope = out[..., self.pad : -self.pad], envelope[..., self.pad : -self.pad]
        return (out / envelope.clamp_min(1e-11))[:, 0]


class _ExportHead(nn.Module):
    """:class:`~simvq.modalities.audio.model.ISTFTHead` with :class:`MatmulISTFT` (no complex tensors)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.out = head.out
        self.max_magnitude = head.max_magnitude
        self.istft = MatmulISTFT(n_fft=head.istft.n_fft, hop_length=head.istft.hop_length, window=head.istft.window)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        log_mag, phase = self.out(h).float().transpose(1, 2).chunk(2, dim=1)
        mag = torch.exp(log_mag).clamp(max=self.max_magnitude)
        return self.istft(mag * torch.cos(phase), mag * torch.sin(phase))


# ----------------------------------------------------------------------------------------------------------
# Export wrappers
# ----------------------------------------------------------------------------------------------------------


def _left_padded_forward(self, x: torch.Tensor) -> torch.Tensor:
    """CausalConv1d.forward for lengths that are multiples of the stride (then the right padding is 0).

    The original computes the right padding with ``math.ceil`` on the length, which a trace would freeze
    at the example's length; the exported encoder takes multiples of the hop, and every stage's input is
    then a multiple of its stride.
    """
    from simvq.modalities.audio.model import _pad1d

    return self.conv(_pad1d(x, self.effective_kernel - self.stride, 0, self.pad_mode))


def _make_traceable(model: nn.Module) -> None:
    import types

    from simvq.modalities.audio.model import CausalConv1d

    for sub in model.modules():
        if isinstance(sub, CausalConv1d):
            sub.forward = types.MethodType(_left_padded_forward, sub)


def _bake_weight_norm(module: nn.Module) -> None:
    from torch.nn.utils import parametrize

    for sub in module.modules():
        if parametrize.is_parametrized(sub):
            for name in list(sub.parametrizations.keys()):
                parametrize.remove_parametrizations(sub, name, leave_parametrized=True)


class EncoderGraph(nn.Module):
    """Images ``(B, C, H, W)`` in [0, 1] or waveforms ``(B, 1, T)`` -> indices (see the module docstring)."""

    def __init__(self, model: nn.Module, *, audio: bool) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.quantizer = GraphQuantizer(model.quantize)
        self.audio = audio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x if self.audio else x * 2.0 - 1.0)  # (B, dim, *grid)
        grid = z.shape[2:]
        tokens = z.flatten(2).transpose(1, 2)  # (B, n, dim)
        indices = self.quantizer.encode(tokens.reshape(-1, tokens.shape[-1]))
        return indices.reshape(z.shape[0], *grid, *indices.shape[1:])


class DecoderGraph(nn.Module):
    """Indices -> images ``(B, C, H, W)`` in [0, 1] or waveforms ``(B, 1, T)`` in [-1, 1]."""

    def __init__(self, model: nn.Module, *, audio: bool) -> None:
        super().__init__()
        self.quantizer = GraphQuantizer(model.quantize)
        self.audio = audio
        if audio:
            self.backbone = model.decoder.backbone
            self.head = _ExportHead(model.decoder.head)
        else:
            self.decoder = model.decoder

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        codes = self.quantizer.codes(indices)  # (B, *grid, dim)
        nd = codes.dim()  # explicit permutation: the exporter writes movedim(-1, 1) with a negative axis
        z = codes.permute(0, nd - 1, *range(1, nd - 1))
        if self.audio:
            return self.head(self.backbone(z)).unsqueeze(1).clamp(-1.0, 1.0)
        return ((self.decoder(z) + 1.0) / 2.0).clamp(0.0, 1.0)


def export_graphs(tok: Tokenizer) -> tuple[EncoderGraph, DecoderGraph]:
    """The export wrappers of a tokenizer (a float32 CPU copy, weight norm baked)."""
    from simvq.modalities import build_tokenizer

    # a fresh build, not a deepcopy: a copied parametrized module shares its generated class with the
    # original, and removing the parametrization from the copy would break the original
    model = build_tokenizer(tok.config)
    model.load_state_dict({k: v.float().cpu() for k, v in tok.model.state_dict().items()})
    model = model.float().eval()
    _bake_weight_norm(model)
    if tok.is_audio:
        _make_traceable(model)
    return EncoderGraph(model, audio=tok.is_audio).eval(), DecoderGraph(model, audio=tok.is_audio).eval()


def example_inputs(tok: Tokenizer, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Small example ``(input, indices)`` used to trace the graphs."""
    gen = torch.Generator().manual_seed(0)
    if tok.is_audio:
        x = torch.randn(batch, 1, tok.hop_length * 12, generator=gen) * 0.1
        shape = (batch, 12)
    else:
        side = tok.downsample_factor * 4
        x = torch.rand(batch, tok.in_channels, side, side, generator=gen)
        shape = (batch, 4, 4)
    shape = (*shape, tok.index_levels) if tok.index_levels > 1 else shape
    return x, torch.randint(0, tok.codebook_size, shape, generator=gen)


def _axes(tok: Tokenizer) -> tuple[dict, dict, str]:
    if tok.is_audio:
        io = {0: "batch", 2: "samples"}
        idx = {0: "batch", 1: "frames"}
        name = "waveform"
    else:
        io = {0: "batch", 2: "height", 3: "width"}
        idx = {0: "batch", 1: "grid_height", 2: "grid_width"}
        name = "pixels"
    return io, idx, name


def manifest(tok: Tokenizer, fmt: str, files: dict) -> dict:
    """The ``export.json`` contents."""
    from simvq import __version__
    from simvq.tokens import config_hash

    levels = [tok.index_levels] if tok.index_levels > 1 else []
    if tok.is_audio:
        x_shape, i_shape = ["batch", 1, "samples"], ["batch", "frames", *levels]
        x_note = f"float32 at {tok.sample_rate} Hz, samples a multiple of {tok.hop_length}; output in [-1, 1]"
    else:
        x_shape, i_shape = ["batch", tok.in_channels, "height", "width"], ["batch", "grid_height", "grid_width", *levels]
        x_note = f"float32 in [0, 1]; height and width multiples of {tok.downsample_factor}"
    name = "waveform" if tok.is_audio else "pixels"
    return {
        "format": fmt,
        "simvq_version": __version__,
        "modality": tok.modality.name,
        "quantizer": tok.config.get("quantizer", {}).get("name"),
        "codebook_size": tok.codebook_size,
        "index_levels": tok.index_levels,
        "bits_per_token": tok.bits_per_token,
        "downsample_factor": tok.downsample_factor,
        "sample_rate": tok.sample_rate,
        "hop_length": tok.hop_length,
        "tokens_per_second": tok.tokens_per_second,
        "in_channels": tok.in_channels,
        "config_hash": config_hash(tok.config),
        "encoder": {"file": files["encoder"], "input": {"name": name, "shape": x_shape, "dtype": "float32", "note": x_note},
                    "output": {"name": "indices", "shape": i_shape, "dtype": "int64"}},
        "decoder": {"file": files["decoder"], "input": {"name": "indices", "shape": i_shape, "dtype": "int64"},
                    "output": {"name": name, "shape": x_shape, "dtype": "float32"}},
    }


def _onnx_export(module: nn.Module, args: tuple, path: Path, *, input_name: str, output_name: str, in_axes: dict,
                 out_axes: dict, opset: int) -> None:
    """Legacy (TorchScript-based) exporter; weights move to external data past the protobuf limit."""
    import onnx

    size = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    external = size > INLINE_LIMIT_BYTES

    def write(tmp: Path) -> None:
        torch.onnx.export(
            module, args, str(tmp), input_names=[input_name], output_names=[output_name],
            dynamic_axes={input_name: in_axes, output_name: out_axes}, opset_version=opset, dynamo=False,
            do_constant_folding=True,
        )
        if external:  # rewrite with the tensors in one side file (atomic as a pair: data first)
            proto = onnx.load(str(tmp))
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data")

    with torch.inference_mode(False), torch.no_grad():
        save_file_atomic(path, write)


def export_onnx(tok: Tokenizer, out: str | os.PathLike, *, opset: int = DEFAULT_OPSET) -> dict:
    """Write ``encoder.onnx``, ``decoder.onnx`` and ``export.json`` into the folder ``out``; returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    enc, dec = export_graphs(tok)
    x, idx = example_inputs(tok)
    io_axes, idx_axes, name = _axes(tok)
    _onnx_export(enc, (x,), out / "encoder.onnx", input_name=name, output_name="indices", in_axes=io_axes,
                 out_axes=idx_axes, opset=opset)
    _onnx_export(dec, (idx,), out / "decoder.onnx", input_name="indices", output_name=name, in_axes=idx_axes,
                 out_axes=io_axes, opset=opset)
    info = manifest(tok, "onnx", {"encoder": "encoder.onnx", "decoder": "decoder.onnx"})
    info["opset"] = opset
    save_file_atomic(out / MANIFEST_FILE, json.dumps(info, indent=2))
    return info


def export_torchscript(tok: Tokenizer, out: str | os.PathLike) -> dict:
    """Write traced ``encoder.pt`` / ``decoder.pt`` (``torch.jit.load``) and ``export.json`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    enc, dec = export_graphs(tok)
    x, idx = example_inputs(tok)
    with torch.inference_mode(False), torch.no_grad():
        for module, example, name in ((enc, x, "encoder.pt"), (dec, idx, "decoder.pt")):
            traced = torch.jit.trace(module, (example,), check_trace=False)
            save_file_atomic(out / name, lambda tmp, traced=traced: torch.jit.save(traced, str(tmp)))
    info = manifest(tok, "torchscript", {"encoder": "encoder.pt", "decoder": "decoder.pt"})
    save_file_atomic(out / MANIFEST_FILE, json.dumps(info, indent=2))
    return info


def export(tok: Tokenizer, out: str | os.PathLike, *, format: str = "onnx", opset: int = DEFAULT_OPSET) -> dict:
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    if format == "onnx":
        return export_onnx(tok, out, opset=opset)
    return export_torchscript(tok, out)


# ----------------------------------------------------------------------------------------------------------
# Verification against PyTorch
# ----------------------------------------------------------------------------------------------------------


def onnx_session(path: str | os.PathLike, *, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def verify_export(tok: Tokenizer, out: str | os.PathLike, inputs: torch.Tensor, *, batch_size: int = 8) -> dict:
    """Compare an ONNX export in ``out`` with PyTorch on ``inputs`` (model-ready for the ONNX encoder).

    Returns ``tokens``, ``mismatched`` (index disagreements), ``agreement`` (fraction), ``decoder_max_abs``
    (ONNX decoder vs :meth:`Tokenizer.decode` on the PyTorch indices) and, for the mismatches, ``near_ties``:
    how many have their two candidate codes within 1e-4 relative distance of each other (fp32 rounding).
    """
    out = Path(out)
    enc, dec = onnx_session(out / "encoder.onnx"), onnx_session(out / "decoder.onnx")
    in_name, idx_name = enc.get_inputs()[0].name, dec.get_inputs()[0].name
    total = mismatched = near = 0
    worst = 0.0
    for i in range(0, inputs.shape[0], batch_size):
        x = inputs[i : i + batch_size].float()
        ref = tok.encode(x.squeeze(1) if tok.is_audio else x).cpu()
        got = torch.from_numpy(enc.run(None, {in_name: x.numpy()})[0])
        if got.shape != ref.shape:
            raise AssertionError(f"ONNX indices have shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
        diff = got != ref
        total += ref.numel()
        mismatched += int(diff.sum())
        if diff.any():
            near += _count_near_ties(tok, x, ref, got)
        y_ref = tok.decode(ref).cpu()
        y = torch.from_numpy(dec.run(None, {idx_name: ref.numpy()})[0])
        worst = max(worst, float((y - y_ref).abs().max()))
    return {"tokens": total, "mismatched": mismatched, "agreement": 1 - mismatched / max(total, 1),
            "near_ties": near, "decoder_max_abs": worst}


@torch.inference_mode()
def _count_near_ties(tok: Tokenizer, x: torch.Tensor, ref: torch.Tensor, got: torch.Tensor) -> int:
    """Mismatched tokens (first residual level) whose PyTorch and ONNX codes are equally near (rel. 1e-4)."""
    model = tok.model
    z = model.encoder(tok.preprocess(x.squeeze(1) if tok.is_audio else x)).float()
    tokens = z.flatten(2).transpose(1, 2).reshape(-1, z.shape[1]).cpu().double()
    r, g = ref.reshape(tokens.shape[0], -1)[:, 0], got.reshape(tokens.shape[0], -1)[:, 0]
    rows = (r != g).nonzero().flatten()
    if rows.numel() == 0:
        return 0
    q = model.quantize.levels[0] if hasattr(model.quantize, "levels") else model.quantize
    codes = q.codebook.detach().double().cpu()
    if getattr(q, "l2_normalize", False):
        tokens = F.normalize(tokens, dim=-1)
    d_ref = (tokens[rows] - codes[r[rows]]).square().sum(1)
    d_got = (tokens[rows] - codes[g[rows]]).square().sum(1)
    return int(((d_got - d_ref).abs() <= 1e-4 * d_ref.clamp_min(1e-12)).sum())


# ----------------------------------------------------------------------------------------------------------
# `simvq export`
# ----------------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (or Hub id)")
    p.add_argument("--format", default="onnx", help=f"one of: {', '.join(FORMATS)} (default onnx)")
    p.add_argument("--out", required=True, help="output folder: new, empty, or an earlier `simvq export` output (with --force)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--force", action="store_true", help="replace the files of an earlier `simvq export` in --out")


def _opset_range() -> tuple[int, int]:
    """The ONNX opsets this torch's exporter writes (its own constants; 7 to 20 where it does not say)."""
    try:
        from torch.onnx import _constants as c

        return int(c.ONNX_MIN_OPSET), int(c.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):
        return 7, 20


def run(args: argparse.Namespace) -> int:
    if args.format not in FORMATS:
        raise ValueError(f"unknown export format {args.format!r}; choose one of: {', '.join(FORMATS)}")
    low, high = _opset_range()
    if args.format == "onnx" and not low <= args.opset <= high:
        raise ValueError(f"--opset {args.opset}: this torch exports ONNX opsets {low} to {high}; the default is {DEFAULT_OPSET}")
    tok = Tokenizer.from_pretrained(args.model, device="cpu")
    fresh = not Path(args.out).expanduser().exists()
    out, _ = prepare_output_dir(args.out, "export", inputs=[args.model], force=args.force)
    try:
        info = export(tok, args.out, format=args.format, opset=args.opset)
    except torch.onnx.errors.UnsupportedOperatorError as err:  # the model needs a newer opset than was asked for
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        raise ValueError(f"--opset {args.opset} cannot express this model ({str(err).splitlines()[0]}); use a higher --opset "
                         f"(default {DEFAULT_OPSET})") from None
    sizes = ", ".join(f"{info[k]['file']} {(Path(args.out) / info[k]['file']).stat().st_size / 2**20:.1f} MiB" for k in ("encoder", "decoder"))
    print(f"exported the {info['modality']} tokenizer (K={info['codebook_size']}) to {args.out} as {args.format}: {sizes}, {MANIFEST_FILE}")
    return 0


__all__ = [
    "CodebookSearch",
    "DecoderGraph",
    "EncoderGraph",
    "GraphQuantizer",
    "MatmulISTFT",
    "export",
    "export_onnx",
    "export_torchscript",
    "verify_export",
]
