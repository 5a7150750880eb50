"""Deploy checks: ONNX round-trip agreement and encode/decode throughput, PyTorch vs ONNX Runtime.

Two parts, both on models built from the presets (random weights unless ``--model DIR`` names trained ones):

``roundtrip``: every quantizer family (SimVQ, VQ, EMA VQ, FSQ, LFQ, residual SimVQ) x (image, audio) is
exported with :func:`simvq.export.export_onnx` and compared with PyTorch on held-out data (the photos
evaluation crops for the image model, Debian's pocketsphinx real speech, else synthetic tones + noise, for
audio): index agreement, near-ties among the disagreements, decoder max |error|.

``speed``: encode and decode throughput (images/s; seconds of audio per second) of one model in one run:
  eager     simvq.Tokenizer.encode / decode (the library path: exact fp64-certified search)
  graph     the export wrappers (EncoderGraph / DecoderGraph) run eagerly (fp32 argmin, no checks)
  compile   torch.compile of those wrappers (skipped with --no-compile)
  onnx      ONNX Runtime on the exported files
Ratios are against ``eager`` in the same run, same inputs, same thread count.

    python benchmarks/throughput.py roundtrip
    python benchmarks/throughput.py speed --preset image/photos-small --batch 16
    python benchmarks/throughput.py speed --preset audio/speech-small --batch 4 --seconds 5
    python benchmarks/throughput.py speed --preset image/official-128 --batch 2 --set quantizer.codebook_size=262144
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")

FAMILIES = {
    "simvq": [],
    "vq": ["quantizer.name=vq"],
    "ema_vq": ["quantizer.name=ema_vq"],
    "fsq": ["quantizer.name=fsq", "quantizer.codebook_size=4096"],  # a size with recommended levels
    "lfq": ["quantizer.name=lfq"],
    "residual": ["quantizer.name=residual", "quantizer.num_quantizers=2", "quantizer.quantizer=simvq"],
}


def build(preset: str, overrides: list[str], model_dir: str | None = None):
    from simvq import Tokenizer
    from simvq.config import load_config
    from simvq.modalities import build_tokenizer

    if model_dir:
        return Tokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = load_config(preset, overrides)
    return Tokenizer(build_tokenizer(cfg), cfg)


def held_out(tok, count: int, seconds: float = 3.0) -> tuple[torch.Tensor, str]:
    """Model-ready held-out inputs: images (N, C, H, W) in [0, 1]; audio (N, 1, T), T a multiple of the hop."""
    if not tok.is_audio:
        from simvq.modalities import build_datasets

        try:
            ds = build_datasets(tok.config)[1]  # the config's held-out split (photos: chelsea, flower tiles)
            step = max(1, len(ds) // count)
            x = torch.stack([ds[i] for i in range(0, step * count, step)][:count])
            return (x + 1) / 2, f"{count} held-out crops of the {tok.config['data'].get('dataset')} data"
        except Exception as err:  # noqa: BLE001 - fall back to noise images
            print(f"(photos unavailable: {err}; using uniform noise)")
            return torch.rand(count, tok.in_channels, 32, 32), f"{count} uniform-noise 32x32 images"
    hop, rate = tok.hop_length, tok.sample_rate
    length = int(seconds * rate) // hop * hop
    try:
        from simvq.modalities.audio.data import pocketsphinx_clips, read_audio

        waves = []
        for f in pocketsphinx_clips()[:count]:
            w = read_audio(f, sample_rate=rate)
            waves.append(np.pad(w, (0, max(0, length - w.shape[0])))[:length])
        return torch.from_numpy(np.stack(waves))[:, None], f"{len(waves)} pocketsphinx speech clips ({seconds:g} s)"
    except (FileNotFoundError, ValueError):
        t = torch.arange(length) / rate
        gen = torch.Generator().manual_seed(0)
        x = torch.stack([0.3 * torch.sin(2 * np.pi * (100 + 50 * i) * t) + 0.02 * torch.randn(length, generator=gen) for i in range(count)])
        return x[:, None], f"{count} synthetic tones + noise ({seconds:g} s)"


def roundtrip(args) -> None:
    from simvq.export import export_onnx, verify_export

    rows = []
    for preset in args.presets:
        for family, overrides in FAMILIES.items():
            tok = build(preset, overrides + args.set)
            x, what = held_out(tok, args.count)
            with tempfile.TemporaryDirectory() as d:
                export_onnx(tok, d)
                r = verify_export(tok, d, x)
            rows.append((preset, family, tok.codebook_size, r, what))
            print(f"{preset:20s} {family:9s} K={tok.codebook_size:<6d} tokens={r['tokens']:<6d} agreement={100 * r['agreement']:.3f}% "
                  f"mismatched={r['mismatched']} (near-ties {r['near_ties']}) decoder max|err|={r['decoder_max_abs']:.2e}  [{what}]", flush=True)
    print("\n| model | quantizer | K | tokens | identical indices | mismatches (near-ties) | decoder max abs error |")
    print("|---|---|---|---|---|---|---|")
    for preset, family, k, r, _ in rows:
        print(f"| {preset} | {family} | {k} | {r['tokens']} | {100 * r['agreement']:.3f}% | {r['mismatched']} ({r['near_ties']}) | {r['decoder_max_abs']:.1e} |")


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def speed(args) -> None:
    from simvq.export import export_graphs, export_onnx, onnx_session

    torch.set_num_threads(args.threads)
    tok = build(args.preset, args.set, args.model)
    if tok.is_audio:
        length = int(args.seconds * tok.sample_rate) // tok.hop_length * tok.hop_length
        x = torch.randn(args.batch, 1, length, generator=torch.Generator().manual_seed(0)) * 0.1
        unit, per = "s audio/s", args.batch * length / tok.sample_rate
        api_in = x[:, 0]
    else:
        side = args.size or tok.image_size
        x, _ = held_out(tok, args.batch) if side == 32 else (torch.rand(args.batch, tok.in_channels, side, side), "")
        unit, per = "images/s", args.batch
        api_in = x
    indices = tok.encode(api_in)
    enc, dec = export_graphs(tok)
    results = {}
    with torch.inference_mode():
        results["eager"] = (_time(lambda: tok.encode(api_in), args.repeats), _time(lambda: tok.decode(indices), args.repeats))
        results["graph"] = (_time(lambda: enc(x), args.repeats), _time(lambda: dec(indices), args.repeats))
    if not args.no_compile:
        t0 = time.perf_counter()
        cenc, cdec = torch.compile(enc), torch.compile(dec)
        with torch.inference_mode():
            cenc(x), cdec(indices)
            compile_s = time.perf_counter() - t0
            results["compile"] = (_time(lambda: cenc(x), args.repeats), _time(lambda: cdec(indices), args.repeats))
        print(f"(torch.compile took {compile_s:.0f} s)")
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        export_onnx(tok, d)
        export_s = time.perf_counter() - t0
        sizes = {f.name: f.stat().st_size for f in Path(d).iterdir()}
        se, sd = onnx_session(Path(d) / "encoder.onnx", threads=args.threads), onnx_session(Path(d) / "decoder.onnx", threads=args.threads)
        xi, ii = x.numpy(), indices.cpu().numpy()
        ne, nd = se.get_inputs()[0].name, sd.get_inputs()[0].name
        results["onnx"] = (_time(lambda: se.run(None, {ne: xi}), args.repeats), _time(lambda: sd.run(None, {nd: ii}), args.repeats))
        agree = float((torch.from_numpy(se.run(None, {ne: xi})[0]) == indices.cpu()).float().mean())
    print(f"{args.preset} K={tok.codebook_size} batch {args.batch} ({per:g} {'s of audio' if tok.is_audio else 'images'}), "
          f"{args.threads} threads; export {export_s:.1f} s, files {', '.join(f'{k} {v / 2**20:.1f} MiB' for k, v in sorted(sizes.items()))}; "
          f"ONNX index agreement on this batch {100 * agree:.2f}%")
    base_e, base_d = results["eager"]
    print(f"| runtime | encode {unit} | x eager | decode {unit} | x eager |")
    print("|---|---|---|---|---|")
    for name, (te, td) in results.items():
        print(f"| {name} | {per / te:.3g} | {base_e / te:.2f} | {per / td:.3g} | {base_d / td:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({k: {"encode_s": v[0], "decode_s": v[1]} for k, v in results.items()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    r = sub.add_parser("roundtrip")
    r.add_argument("--presets", nargs="+", default=["image/photos-small", "audio/speech-small"])
    r.add_argument("--count", type=int, default=64, help="held-out images (or audio clips)")
    r.add_argument("--set", nargs="*", default=[], help="config overrides for every model")
    s = sub.add_parser("speed")
    s.add_argument("--preset", default="image/photos-small")
    s.add_argument("--model", help="a trained model folder instead of random weights")
    s.add_argument("--set", nargs="*", default=[])
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--size", type=int, help="image side (default: the config's image_size)")
    s.add_argument("--seconds", type=float, default=5.0)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--no-compile", action="store_true")
    s.add_argument("--json")
    args = p.parse_args()
    roundtrip(args) if args.part == "roundtrip" else speed(args)


if __name__ == "__main__":
    main()
