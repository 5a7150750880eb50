"""Image tokenizer: official layout, shapes, parameter count, output range, discriminator, GAN losses."""

import pytest
import torch

from simvq.modalities import build_tokenizer
from simvq.modalities.image.model import IMAGE_PRESETS, ImageTokenizer
from simvq.modalities.image.model import depth_to_space
from simvq.quantizers import SimVQ


def _conv(i, o, k, bias):
    return i * o * k * k + (o if bias else 0)


def _gn(c):
    return 2 * c


def _res(i, o):
    return _gn(i) + _conv(i, o, 3, False) + _gn(o) + _conv(o, o, 3, False) + (i * o if i != o else 0)


def _hand_count_official_128():
    """Parameter count of the official 128x128 encoder/decoder written out from the layer list."""
    enc = _conv(3, 128, 3, False)
    enc += _res(128, 128) + _res(128, 128) + _conv(128, 128, 3, True)  # level 0 + downsample
    enc += _res(128, 256) + _res(256, 256) + _conv(256, 256, 3, True)  # level 1
    enc += _res(256, 256) + _res(256, 256) + _conv(256, 256, 3, True)  # level 2
    enc += _res(256, 512) + _res(512, 512)  # level 3, no downsample
    enc += 2 * _res(512, 512) + _gn(512) + _conv(512, 128, 1, True)
    dec = _conv(128, 512, 3, True) + 2 * _res(512, 512)
    dec += 2 * _res(512, 512) + _conv(512, 2048, 3, True)  # level 3 + upsampler (4x channels)
    dec += _res(512, 256) + _res(256, 256) + _conv(256, 1024, 3, True)  # level 2
    dec += 2 * _res(256, 256) + _conv(256, 1024, 3, True)  # level 1
    dec += _res(256, 128) + _res(128, 128)  # level 0, no upsampler
    dec += _gn(128) + _conv(128, 3, 3, True)
    return enc, dec


@pytest.fixture(scope="module")
def official():
    torch.manual_seed(0)
    return ImageTokenizer(quantizer=SimVQ(dim=128, codebook_size=1024), **IMAGE_PRESETS["official-128"]).eval()


def test_official_parameter_count_matches_hand_count(official):
    enc, dec = _hand_count_official_128()
    assert (enc, dec) == (24_282_496, 39_851_907)  # the hand figures, also printed in the docs
    assert sum(p.numel() for p in official.encoder.parameters()) == enc
    assert sum(p.numel() for p in official.decoder.parameters()) == dec
    # SimVQ: frozen C (1024 x 128) + W (128 x 128) + b (128)
    assert sum(p.numel() for p in official.quantize.parameters()) == 1024 * 128 + 128 * 128 + 128


def test_official_key_names_and_shapes(official):
    sd = official.state_dict()
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.weight": (256, 256, 3, 3),
        "encoder.down.2.downsample.bias": (256,),
        "encoder.mid_block.1.conv2.weight": (512, 512, 3, 3),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (128, 512, 1, 1),
        "encoder.conv_out.bias": (128,),
        "decoder.conv_in.bias": (512,),
        "decoder.up.3.upsample.conv1.weight": (2048, 512, 3, 3),
        "decoder.up.2.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.conv_out.weight": (3, 128, 3, 3),
        "quantize.embedding.weight": (1024, 128),
        "quantize.embedding_proj.weight": (128, 128),
        "quantize.embedding_proj.bias": (128,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "encoder.down.3.downsample.weight" not in sd
    assert "decoder.up.0.upsample.conv1.weight" not in sd
    assert "encoder.conv_in.bias" not in sd and "encoder.down.0.block.0.conv1.bias" not in sd


def test_official_128_gives_256_tokens(official):
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        out = official.encode(x)  # the decoder's shapes are covered by the small models and the key test
    assert out.indices.shape == (1, 16, 16) and out.indices.numel() == 256
    assert out.quantized.shape == (1, 128, 16, 16)
    assert official.token_shape(128, 128) == (16, 16) and official.downsample_factor == 8


def test_depth_to_space_is_dcr_order():
    # 4 input channels holding 0..3 -> each 2x2 output block reads [[0, 1], [2, 3]] (channel = i * 2 + j)
    x = torch.arange(4.0).view(1, 4, 1, 1).expand(1, 4, 2, 3)
    y = depth_to_space(x, 2)
    assert y.shape == (1, 1, 4, 6)
    block = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    assert torch.equal(y[0, 0], block.repeat(2, 3))
    # with 2 output channels, channel index is (i * 2 + j) * C + c
    x = torch.arange(8.0).view(1, 8, 1, 1)
    y = depth_to_space(x, 2)
    assert torch.equal(y[0, 1], torch.tensor([[1.0, 3.0], [5.0, 7.0]]))


def _small(**kw):
    cfg = {"modality": "image", "model": {"preset": "small-rgb-32", **kw}, "quantizer": {"name": "simvq", "codebook_size": 64}}
    return build_tokenizer(cfg)


def test_small_preset_roundtrip_and_decode_indices():
    torch.manual_seed(0)
    model = _small().eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        x_hat, out = model(x)
        again = model.decode_indices(out.indices)
    assert out.indices.shape == (2, 8, 8)
    assert torch.allclose(again, x_hat, atol=1e-5)
    rec = model.reconstruct(x)
    assert rec.min() >= -1 and rec.max() <= 1
    assert torch.equal(rec, x_hat.clamp(-1, 1))


def test_decoder_output_is_raw_and_reconstruct_clamps():
    torch.manual_seed(0)
    model = _small().eval()
    with torch.no_grad():
        model.decoder.conv_out.bias.fill_(5.0)  # push outputs outside [-1, 1]
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        raw, _ = model(x)
    assert raw.max() > 1  # training losses see the unclamped output, as officially
    rec = model.reconstruct(x)
    assert rec.max() == 1.0 and rec.min() >= -1


def test_grey_preset_and_gradients():
    cfg = {"modality": "image", "model": {"preset": "small-grey-32"}, "quantizer": {"name": "simvq", "codebook_size": 32}}
    model = build_tokenizer(cfg)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    x_hat, out = model(x)
    ((x_hat - x).abs().mean() + out.loss).backward()
    assert model.encoder.conv_in.weight.grad is not None and model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding_proj.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None  # frozen C


def test_bad_inputs_give_clear_errors():
    model = _small()
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="channels-last"):
        model(torch.zeros(1, 32, 32, 3))
    with pytest.raises(TypeError, match="floating point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="valid keys"):
        _small(width=3)
    with pytest.raises(ValueError, match="preset"):
        build_tokenizer({"modality": "image", "model": {"preset": "nope"}, "quantizer": {"name": "simvq", "codebook_size": 8}})
    with pytest.raises(ValueError, match="divisible by 32"):
        _small(ch=48)
    with pytest.raises(ValueError, match="z_channels"):
        build_tokenizer({"modality": "image", "model": {"preset": "small-rgb-32"}, "quantizer": {"name": "simvq", "codebook_size": 8, "dim": 3}})
    with pytest.raises(ValueError, match="modality"):
        build_tokenizer({"modality": "video", "model": {}, "quantizer": {"name": "simvq"}})


# ----- discriminator and GAN losses -----------------------------------------------------------------------
from simvq.losses import adversarial as adv  # noqa: E402
from simvq.modalities.image.discriminator import NLayerDiscriminator  # noqa: E402


def test_patchgan_shapes_parameter_count_and_init():
    torch.manual_seed(0)
    d = NLayerDiscriminator()
    # pix2pix reports 2.765 M parameters for this discriminator; by hand:
    hand = (3 * 64 * 16 + 64) + (64 * 128 * 16 + 2 * 128) + (128 * 256 * 16 + 2 * 256) + (256 * 512 * 16 + 2 * 512) + (512 * 16 + 1)
    assert sum(p.numel() for p in d.parameters()) == hand == 2_765_633
    with torch.no_grad():
        assert d(torch.zeros(2, 3, 128, 128)).shape == (2, 1, 14, 14)
        assert d(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 2, 2)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in d.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == 5 and len(bns) == 2 + 1
    big = convs[3].weight  # 2M draws: tight bounds on N(0, 0.02)
    assert abs(big.mean().item()) < 1e-3 and abs(big.std().item() - 0.02) < 5e-4
    w = torch.cat([b.weight for b in bns])
    assert abs(w.mean().item() - 1) < 0.01 and 0.01 < w.std().item() < 0.03
    assert all(bool((b.bias == 0).all()) for b in bns)
    # official key layout loss.discriminator.main.{i}
    keys = set(d.state_dict())
    assert {"main.0.weight", "main.0.bias", "main.2.weight", "main.3.weight", "main.3.running_mean", "main.11.bias"} <= keys
    assert "main.2.bias" not in keys  # conv before BatchNorm has no bias
    grey = NLayerDiscriminator(in_channels=1, ndf=16, n_layers=2)
    assert grey(torch.zeros(2, 1, 32, 32)).shape == (2, 1, 6, 6)
    with pytest.raises(ValueError, match="n_layers"):
        NLayerDiscriminator(n_layers=0)


def test_hinge_and_non_saturating_hand_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2] -> 1
    assert adv.hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert adv.discriminator_loss("hinge", real, fake).item() == pytest.approx(11 / 12)
    assert adv.hinge_g_loss(fake).item() == pytest.approx(1 / 3)
    import math

    logits = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]], [[[1.0, 3.0], [-2.0, 2.0]]]])  # (2, 1, 2, 2)
    # official: per-image mean logit (0 and 1) then softplus(-m)
    expected = 0.5 * (math.log(2) + math.log1p(math.exp(-1)))
    assert adv.generator_loss("non_saturating", logits).item() == pytest.approx(expected, rel=1e-6)
    per_logit = sum(math.log1p(math.exp(-v)) for v in [0, 0, 0, 0, 1, 3, -2, 2]) / 8
    assert adv.vanilla_g_loss(logits).item() == pytest.approx(per_logit, rel=1e-6)
    assert adv.vanilla_d_loss(real, fake).item() == pytest.approx(
        0.5 * (sum(math.log1p(math.exp(-v)) for v in [2, 0.5, -1]) / 3 + sum(math.log1p(math.exp(v)) for v in [-2, 0, 1]) / 3), rel=1e-6
    )
    with pytest.raises(ValueError, match="hinge"):
        adv.discriminator_loss("wgan", real, fake)
    with pytest.raises(ValueError, match="non_saturating"):
        adv.generator_loss("nope", fake)
