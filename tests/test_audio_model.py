"""Audio tokenizer: SEANet geometry and causality, the ISTFT head, lengths, and official-checkpoint conversion."""

import math

import pytest
import torch
from torch import nn

from simvq.modalities.audio.model import (
    AUDIO_PRESETS,
    AudioTokenizer,
    CausalConv1d,
    ISTFTHead,
    SameISTFT,
    SEANetEncoder,
    build_audio_tokenizer,
    convert_official_audio_state_dict,
    is_official_audio_state_dict,
)
from simvq.quantizers import SimVQ


def tiny(codebook_size=64, **overrides):
    torch.manual_seed(0)
    return build_audio_tokenizer({"model": {"preset": "tiny-16k", **overrides}, "quantizer": {"name": "simvq", "codebook_size": codebook_size}})


def test_official_seanet_downsamples_by_reversed_ratios_with_hop_320():
    enc = SEANetEncoder(**{k: AUDIO_PRESETS["official-24k"][k] for k in ("n_filters", "ratios", "dimension", "lstm_layers")})
    strided = [m for m in enc.modules() if isinstance(m, CausalConv1d) and m.stride > 1]
    # EnCodec applies the decoder-order ratios [8, 5, 4, 2] reversed in the encoder
    assert [m.stride for m in strided] == [2, 4, 5, 8]
    assert [m.conv.conv.kernel_size[0] for m in strided] == [4, 8, 10, 16]
    assert [m.conv.conv.out_channels for m in strided] == [64, 128, 256, 512]
    assert enc.hop_length == 320
    assert isinstance(enc.model[13].lstm, nn.LSTM) and enc.model[13].lstm.num_layers == 2
    assert enc.model[15].conv.conv.out_channels == 512 and enc.model[15].conv.conv.kernel_size[0] == 7
    with torch.no_grad():
        z = enc(torch.randn(2, 1, 320 * 7))
    assert z.shape == (2, 512, 7)


def test_encoder_is_causal():
    model = tiny()
    enc = model.encoder.eval()
    x = torch.randn(1, 1, 320 * 16)
    y = x.clone()
    y[..., 3200:] = torch.randn(1, 1, 320 * 6)  # change only the future, from sample 3200 (frame 10) on
    with torch.no_grad():
        zx, zy = enc(x), enc(y)
    # frame t sees samples up to (t + 1) * 320 - 1 (EnCodec's reflect padding at the very start reads a few
    # frames ahead, never past frame 6): frames 0..9 must not move, later ones do
    torch.testing.assert_close(zx[..., :10], zy[..., :10])
    assert (zx[..., 10:] - zy[..., 10:]).abs().max() > 1e-4


@pytest.mark.parametrize("length", [320 * 6, 320 * 6 + 17, 100])
def test_tokenizer_lengths(length):
    model = tiny().eval()
    x = torch.rand(2, 1, length) * 2 - 1
    with torch.no_grad():
        x_hat, q = model(x)
        enc = model.encode(x)
        dec = model.decode_indices(enc.indices)
    assert x_hat.shape == x.shape
    assert q.indices.shape == (2, math.ceil(length / 320))
    assert dec.shape == (2, 1, q.indices.shape[1] * 320)
    # decoding the indices is what forward does (before trimming)
    torch.testing.assert_close(dec[..., :length], x_hat)


def test_tokenizer_rejects_bad_input():
    model = tiny()
    with pytest.raises(ValueError, match=r"\(B, 1, T\)"):
        model(torch.zeros(2, 320))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 1, 320, dtype=torch.long))
    with pytest.raises(ValueError, match="must equal"):
        AudioTokenizer(quantizer=SimVQ(dim=16, codebook_size=8), sample_rate=16000, dimension=32)
    with pytest.raises(ValueError, match="unknown audio preset"):
        build_audio_tokenizer({"model": {"preset": "nope"}, "quantizer": {"name": "simvq", "codebook_size": 8}})
    with pytest.raises(ValueError, match="valid keys"):
        build_audio_tokenizer({"model": {"preset": "tiny-16k", "chanels": 3}, "quantizer": {"name": "simvq", "codebook_size": 8}})


def _same_stft(x: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """Reference analysis: pad (n_fft - hop) / 2 on both sides, Hann frames every hop, real FFT."""
    pad = (n_fft - hop) // 2
    frames = torch.nn.functional.pad(x, (pad, pad)).unfold(-1, n_fft, hop)  # (B, F, n_fft)
    window = torch.hann_window(n_fft, periodic=True, dtype=x.dtype)
    return torch.fft.rfft(frames * window, dim=-1).transpose(1, 2)


def test_same_istft_inverts_a_known_stft():
    torch.manual_seed(1)
    n_fft, hop, frames = 1280, 320, 12
    t = torch.arange(frames * hop, dtype=torch.float64) / 24000
    x = (0.5 * torch.sin(2 * math.pi * 440 * t) + 0.1 * torch.randn(frames * hop, dtype=torch.float64))[None]
    spec = _same_stft(x, n_fft, hop)
    assert spec.shape == (1, n_fft // 2 + 1, frames)
    istft = SameISTFT(n_fft=n_fft, hop_length=hop).double()
    y = istft(spec)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)  # the buffer window is fp32-rounded


def test_istft_head_magnitude_is_exp_clipped_at_100_and_phase_is_cos_sin():
    n_fft, hop, dim = 64, 16, 8
    head = ISTFTHead(dim=dim, n_fft=n_fft, hop_length=hop).double()
    bins = n_fft // 2 + 1
    log_mag = torch.linspace(-3.0, 8.0, bins, dtype=torch.float64)  # exp(8) > 100: clipped
    phase = torch.linspace(-3.0, 3.0, bins, dtype=torch.float64)
    with torch.no_grad():
        head.out.weight.zero_()
        head.out.bias.copy_(torch.cat([log_mag, phase]))
    y = head(torch.zeros(1, 5, dim, dtype=torch.float64))
    mag = torch.exp(log_mag).clamp(max=100.0)
    spec = (mag * torch.exp(1j * phase))[None, :, None].expand(1, bins, 5)
    torch.testing.assert_close(y.double(), SameISTFT(n_fft=n_fft, hop_length=hop).double()(spec), atol=1e-4, rtol=1e-4)
    assert y.shape == (1, 5 * hop)


# ----- official checkpoint conversion -----------------------------------------------------------------------


def _to_official_layout(model: AudioTokenizer) -> dict:
    """What an official Lightning checkpoint's state_dict looks like for ``model``'s weights."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("usage.counts"):
            continue
        k = k.replace(".parametrizations.weight.original0", ".weight_g").replace(".parametrizations.weight.original1", ".weight_v")
        if k.startswith("decoder."):
            k = k[len("decoder.") :]  # the official model keeps backbone/head at the top
        sd[k] = v.clone()
    # things the converter must drop: the unused SEANet decoder and the discriminators
    sd["decoder.model.0.conv.conv.weight_g"] = torch.ones(32, 1, 1)
    sd["decoder.model.0.conv.conv.weight_v"] = torch.ones(32, 512, 7)
    sd["loss.multiperioddisc.discriminators.0.convs.0.weight_v"] = torch.zeros(32, 1, 5, 1)
    return sd


def test_convert_official_audio_checkpoint_reproduces_tokens_and_waveforms():
    source = tiny(codebook_size=32).eval()
    official = _to_official_layout(source)
    assert is_official_audio_state_dict(official)
    target = tiny(codebook_size=32)
    torch.manual_seed(123)
    for p in target.parameters():  # make sure nothing survives from the target's own initialisation
        p.data.normal_()
    target.load_state_dict(convert_official_audio_state_dict(official, target), strict=False)
    target.eval()
    x = torch.rand(2, 1, 320 * 8) * 2 - 1
    with torch.no_grad():
        a, qa = source(x)
        b, qb = target(x)
    assert torch.equal(qa.indices, qb.indices)
    torch.testing.assert_close(a, b)


def test_convert_prefers_ema_copies_and_maps_old_weight_norm():
    source = tiny(codebook_size=16)
    official = _to_official_layout(source)
    # an EMA copy of the first conv, stored as old-style weight norm under a dot-less name
    old = torch.nn.utils.weight_norm(nn.Conv1d(1, 4, 7))  # the deprecated API the official code used
    official["model_ema.encodermodel0convconvweight_g"] = old.weight_g.detach().clone()
    official["model_ema.encodermodel0convconvweight_v"] = old.weight_v.detach().clone()
    official["model_ema.encodermodel0convconvbias"] = old.bias.detach().clone()
    target = tiny(codebook_size=16)
    target.load_state_dict(convert_official_audio_state_dict(official, target, use_ema=True), strict=False)
    conv = target.encoder.model[0].conv.conv
    x = torch.randn(1, 1, 50)
    torch.testing.assert_close(conv(x), old(x))
    plain = tiny(codebook_size=16)
    plain.load_state_dict(convert_official_audio_state_dict(official, plain, use_ema=False), strict=False)
    torch.testing.assert_close(plain.encoder.model[0].conv.conv.weight, source.encoder.model[0].conv.conv.weight)


def test_convert_reports_missing_and_mismatched_tensors():
    source = tiny(codebook_size=16)
    official = _to_official_layout(source)
    del official["backbone.embed.weight"]
    with pytest.raises(ValueError, match="missing.*backbone.embed.weight"):
        convert_official_audio_state_dict(official, tiny(codebook_size=16))
    with pytest.raises(ValueError, match="other shapes.*quantize.embedding.weight"):
        convert_official_audio_state_dict(_to_official_layout(source), tiny(codebook_size=32))


def test_official_preset_matches_published_geometry():
    p = AUDIO_PRESETS["official-24k"]
    assert (p["sample_rate"], p["dimension"], p["backbone_dim"], p["backbone_intermediate_dim"], p["backbone_layers"], p["n_fft"]) == (
        24000, 512, 768, 2304, 12, 1280)
    model = build_audio_tokenizer({"model": {"preset": "official-24k"}, "quantizer": {"name": "simvq", "codebook_size": 4096}})
    assert model.tokens_per_second == 75
    assert model.bitrate == pytest.approx(900.0)  # 0.9 kbps at K = 4096 (REFERENCE §3)
    gammas = torch.stack([b.gamma.detach() for b in model.decoder.backbone.convnext])
    assert gammas.shape == (12, 768)
    torch.testing.assert_close(gammas, torch.full((12, 768), 1 / 12))


def test_convert_official_checkpoint_file_to_model_dir(tmp_path):
    """A Lightning .ckpt in the official layout -> `convert_official` -> model dir with the same tokens/audio.

    The architecture is read from the tensor shapes, so a small official-layout model converts as well.
    """
    from simvq.checkpoints import convert_official, load_tokenizer

    source = tiny(codebook_size=16).eval()
    torch.save({"state_dict": _to_official_layout(source), "epoch": 3}, tmp_path / "official.ckpt")
    out = convert_official(tmp_path / "official.ckpt", tmp_path / "model", use_ema=False)
    model = load_tokenizer(out)
    assert model.encoder.ratios == [2, 4, 5, 8] and model.quantize.codebook_size == 16
    x = torch.rand(1, 1, 320 * 5) * 2 - 1
    with torch.no_grad():
        a, qa = source(x)
        b, qb = model(x)
    assert torch.equal(qa.indices, qb.indices)
    torch.testing.assert_close(a, b)


def test_encoder_init_gain_redraws_convs_variance_preserving_and_spreads_tokens():
    # the effective weight of every encoder conv is exactly the N(0, gain^2 / fan_in) draw, with zero bias
    torch.manual_seed(0)
    enc = SEANetEncoder(n_filters=16, dimension=8, init_gain=1.0)
    convs = [m.conv.conv for m in enc.modules() if isinstance(m, CausalConv1d)]
    big = max(convs, key=lambda c: c.weight.numel())
    fan_in = big.weight.shape[1] * big.weight.shape[2]
    assert big.weight.std().item() == pytest.approx(1 / math.sqrt(fan_in), rel=0.05)
    assert all(torch.count_nonzero(c.bias) == 0 for c in convs)
    # PyTorch's default draw (weight variance 1 / (3 fan_in)) vs the redraw: the tokens' spread over frames
    torch.manual_seed(0)
    default = SEANetEncoder(n_filters=16, dimension=8)
    torch.manual_seed(1)
    t = torch.arange(32000) / 16000
    x = (0.3 * torch.sin(2 * math.pi * 220 * t * (1 + t)) * torch.sin(2 * math.pi * 3 * t)).reshape(1, 1, -1)
    with torch.no_grad():
        spread_default = default(x)[0].std(dim=1).mean().item()
        spread_gain = enc(x)[0].std(dim=1).mean().item()
    assert spread_gain > 10 * spread_default
    with pytest.raises(ValueError, match="init_gain"):
        SEANetEncoder(n_filters=4, dimension=8, init_gain=-1.0)
    with pytest.raises(ValueError, match="init_gain"):
        SEANetEncoder(n_filters=4, dimension=8, init_gain=True)


def test_encoder_init_gain_is_a_config_key_and_official_keeps_default_init():
    assert AUDIO_PRESETS["official-24k"]["encoder_init_gain"] is None
    torch.manual_seed(0)
    a = tiny()
    torch.manual_seed(0)
    b = tiny(encoder_init_gain=None)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c = tiny(encoder_init_gain=1.0)
    conv = c.encoder.model[0].conv.conv
    assert torch.count_nonzero(conv.bias) == 0
