"""The DAC discriminator of the audio recipe: band edges and shapes by hand, the complex STFT input, loudness
invariance, least-squares losses against hand values, wiring into the generator/discriminator objectives (off by
default, nothing built), gradients, config checks and one tiny training step."""

import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from simvq.config import load_config
from simvq.modalities.audio.spectral import MelReconstructionLoss
from simvq.modalities.audio.discriminators import (
    DAC_BANDS,
    AudioDiscriminator,
    DACDiscriminator,
    MultiBandSTFTDiscriminator,
    PeriodDiscriminator,
    audio_discriminator_loss,
    audio_generator_loss,
    dac_band_edges,
    dac_feature_matching_loss,
    discriminator_adversarial_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
)

TINY_DAC = ["loss.dac_weight=1", "loss.dac_windows=[256,128]", "loss.dac_channels=4", "loss.dac_periods=[2]"]


def _wave(batch=2, length=1600, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length) / 16000.0
    tone = 0.3 * torch.sin(2 * math.pi * 440.0 * t)
    return (tone + 0.05 * torch.randn(batch, 1, length, generator=g)).float()


def test_band_edges_by_hand():
    # window 2048 -> 1025 bins; DAC's fractions 0, .1, .25, .5, .75, 1 -> int(f * 1025)
    assert dac_band_edges(2048) == [(0, 102), (102, 256), (256, 512), (512, 768), (768, 1025)]
    # window 64 -> 33 bins: int(3.3) = 3, int(8.25) = 8, int(16.5) = 16, int(24.75) = 24, 33
    assert dac_band_edges(64) == [(0, 3), (3, 8), (8, 16), (16, 24), (24, 33)]
    assert dac_band_edges(64, [(0.0, 1.0)]) == [(0, 33)]


def test_multiband_shapes_by_hand():
    d = MultiBandSTFTDiscriminator(64, channels=3)
    assert d.hop == 16 and len(d.band_convs) == 5
    x = _wave(2, 200)
    spec = d.spectrogram(x)
    assert spec.shape == (2, 2, 13, 33)  # real/imag, 1 + 200 // 16 frames (centred), 64 // 2 + 1 bins
    logits, fmap = d(x)
    assert len(fmap) == 5 * 5 + 1  # five convs per band, then the logits map
    # band widths 3, 5, 8, 8, 9 bins; the three stride-2 convs give ceil(w / 2) three times: 1, 1, 1, 1, 2
    widths = [3, 5, 8, 8, 9]
    after = [1, 1, 1, 1, 2]
    for b, (w, a) in enumerate(zip(widths, after)):
        maps = fmap[5 * b : 5 * b + 5]
        assert [m.shape[-1] for m in maps] == [w, math.ceil(w / 2), math.ceil(w / 4), a, a]
        assert all(m.shape[:3] == (2, 3, 13) for m in maps)
    assert fmap[-1].shape == (2, 1, 13, sum(after))
    assert logits.shape == (2, 13 * sum(after))
    torch.testing.assert_close(logits, fmap[-1].flatten(1))


def test_spectrogram_is_the_complex_rectangular_window_stft():
    d = MultiBandSTFTDiscriminator(64, channels=2)
    x = _wave(1, 300, seed=3)
    spec = d.spectrogram(x)
    padded = np.pad(x[0, 0].double().numpy(), 32, mode="reflect")  # centred: window / 2 on each side
    for frame in (0, 5, 18):
        expected = np.fft.rfft(padded[16 * frame : 16 * frame + 64])  # no window taper
        np.testing.assert_allclose(spec[0, 0, frame].numpy(), expected.real, atol=1e-4)
        np.testing.assert_allclose(spec[0, 1, frame].numpy(), expected.imag, atol=1e-4)
    # a clip shorter than half a window still works (zero padding instead of reflect)
    logits, _ = MultiBandSTFTDiscriminator(256, channels=2)(_wave(1, 100))
    assert torch.isfinite(logits).all()


def test_dac_discriminator_outputs_and_loudness_invariance():
    torch.manual_seed(0)
    d = DACDiscriminator(windows=(64, 32), channels=2, bands=DAC_BANDS[:2] + ((0.25, 1.0),), periods=(2, 3), period_channels=(2, 4, 4, 4))
    x = _wave(2, 320)
    logits, fmaps = d(x)
    assert len(logits) == len(fmaps) == 4
    # DAC's period discriminators keep the first layer's map (Vocos' drop it): 5 convs + logits
    assert [len(f) for f in fmaps] == [6, 6, 3 * 5 + 1, 3 * 5 + 1]
    assert len(PeriodDiscriminator(2, channels=(2, 4, 4, 4))(x)[1]) == 5
    # DC removal + peak normalisation: the discriminator sees shape, not gain or offset
    pre = d.preprocess(x)
    torch.testing.assert_close(pre.mean(-1), torch.zeros(2, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(pre.abs().amax(-1), torch.full((2, 1), 0.8))
    louder, _ = d(3.0 * x + 0.25)
    for a, b in zip(logits, louder):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_least_squares_losses_by_hand():
    real = [torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0]])]
    fake = [torch.tensor([[0.5, -1.0]]), torch.tensor([[2.0]])]
    # generator: mean((1 - f)^2) summed: (0.25 + 4) / 2 + 1 = 3.125
    assert float(lsgan_generator_loss(fake)) == pytest.approx(3.125)
    # discriminator: mean(f^2) + mean((1 - r)^2) summed: (0.625 + 0.5) + (4 + 4) = 9.125
    assert float(lsgan_discriminator_loss(real, fake)) == pytest.approx(9.125)
    # feature matching: mean |r - f| over every map but the last (the logits), summed
    real_maps = [[torch.ones(2), torch.zeros(3), torch.full((1,), 100.0)], [torch.tensor([1.0, 2.0]), torch.zeros(1)]]
    fake_maps = [[torch.zeros(2, requires_grad=True), torch.full((3,), 2.0), torch.zeros(1)], [torch.tensor([2.0, 4.0]), torch.ones(1)]]
    real_maps[0][0].requires_grad_(True)
    fm = dac_feature_matching_loss(real_maps, fake_maps)
    assert float(fm.detach()) == pytest.approx(1.0 + 2.0 + 1.5)
    fm.backward()
    assert real_maps[0][0].grad is None and fake_maps[0][0].grad is not None  # the real side is detached


def _tiny_loss(**extra):
    loss = load_config("audio/speech-tiny")["loss"]
    loss.update(extra)
    return loss


def _quant(value=0.01):
    v = torch.tensor(value)
    return SimpleNamespace(loss=v, commitment_loss=0.25 * v, codebook_loss=v)


def test_disabled_builds_nothing_and_keeps_the_losses():
    loss_off = _tiny_loss()
    assert loss_off["dac_weight"] == 0.0
    torch.manual_seed(0)
    off = AudioDiscriminator.from_loss_config(loss_off)
    legacy = {k: v for k, v in loss_off.items() if not k.startswith("dac_")}  # a loss section from before the DAC keys
    torch.manual_seed(0)
    old = AudioDiscriminator.from_loss_config(legacy)
    assert off.dac is None and not any("dac" in n for n, _ in off.named_parameters())
    assert list(off.state_dict()) == list(old.state_dict())
    assert sum(p.numel() for p in off.parameters()) == sum(p.numel() for p in old.parameters())

    mel = MelReconstructionLoss(sample_rate=16000, n_fft=256, hop_length=64, n_mels=20)
    x, x_hat = _wave(2, 1600, seed=1), _wave(2, 1600, seed=2)
    total, logs = audio_generator_loss(x=x, x_hat=x_hat, quant=_quant(), mel_loss=mel, discriminator=off, loss=loss_off, gan_active=True)
    total_legacy, logs_legacy = audio_generator_loss(x=x, x_hat=x_hat, quant=_quant(), mel_loss=mel, discriminator=old, loss=legacy, gan_active=True)
    assert list(logs) == list(logs_legacy) and "gan_g_dac" not in logs
    torch.testing.assert_close(total, total_legacy)
    # ... and equal to the MPD/MRD objective composed by hand
    real_p, real_pm = off.mpd(x)
    fake_p, fake_pm = off.mpd(x_hat)
    real_r, real_rm = off.mrd(x)
    fake_r, fake_rm = off.mrd(x_hat)
    by_hand = 45.0 * mel(x_hat, x) + 1000.0 * 0.01
    by_hand = by_hand + generator_adversarial_loss(fake_p) + generator_adversarial_loss(fake_r)
    by_hand = by_hand + feature_matching_loss(real_pm, fake_pm) + feature_matching_loss(real_rm, fake_rm)
    torch.testing.assert_close(total, by_hand)
    d_total, d_logs = audio_discriminator_loss(x=x, x_hat=x_hat, discriminator=off, loss=loss_off)
    assert list(d_logs) == ["disc_mpd", "disc_mrd", "disc_loss"]
    torch.testing.assert_close(d_total, discriminator_adversarial_loss(real_p, fake_p) + discriminator_adversarial_loss(real_r, fake_r))

    # a built DAC discriminator is ignored while dac_weight is 0
    on = AudioDiscriminator.from_loss_config(_tiny_loss(dac_weight=1.0, dac_windows=[128], dac_channels=2, dac_periods=[]))
    on.load_state_dict(off.state_dict(), strict=False)
    total_ignored, _ = audio_generator_loss(x=x, x_hat=x_hat, quant=_quant(), mel_loss=mel, discriminator=on, loss=loss_off, gan_active=True)
    torch.testing.assert_close(total_ignored, total)


def test_enabled_terms_are_weighted_as_documented():
    torch.manual_seed(0)
    loss = _tiny_loss(dac_weight=3.0, gan_weight=0.5, feature_matching_weight=2.0, mrd_weight=0.7, dac_windows=[128], dac_channels=2, dac_periods=[2])
    disc = AudioDiscriminator.from_loss_config(loss)
    assert isinstance(disc.dac, DACDiscriminator) and len(disc.dac.discriminators) == 2
    mel = MelReconstructionLoss(sample_rate=16000, n_fft=256, hop_length=64, n_mels=20)
    x, x_hat = _wave(2, 1600, seed=1), _wave(2, 1600, seed=2)
    total, logs = audio_generator_loss(x=x, x_hat=x_hat, quant=_quant(), mel_loss=mel, discriminator=disc, loss=loss, gan_active=True)
    expected = 45.0 * logs["mel_loss"] + 1000.0 * logs["quant_loss"]
    expected += 0.5 * (logs["gan_g_mpd"] + 0.7 * logs["gan_g_mrd"]) + 2.0 * (logs["fm_mpd"] + 0.7 * logs["fm_mrd"])
    expected += 3.0 * (0.5 * logs["gan_g_dac"] + 2.0 * logs["fm_dac"])
    assert float(total.detach()) == pytest.approx(float(expected), rel=1e-5)
    fake_d, fake_maps = disc.dac(x_hat)
    assert float(logs["gan_g_dac"]) == pytest.approx(float(lsgan_generator_loss(fake_d).detach()), rel=1e-6)
    assert float(logs["fm_dac"]) == pytest.approx(float(dac_feature_matching_loss(disc.dac(x)[1], fake_maps).detach()), rel=1e-6)
    d_total, d_logs = audio_discriminator_loss(x=x, x_hat=x_hat, discriminator=disc, loss=loss)
    assert float(d_logs["disc_dac"]) == pytest.approx(float(lsgan_discriminator_loss(disc.dac(x)[0], fake_d).detach()), rel=1e-5)
    assert float(d_total.detach()) == pytest.approx(float(d_logs["disc_mpd"] + 0.7 * d_logs["disc_mrd"] + 3.0 * d_logs["disc_dac"]), rel=1e-5)


def test_gradients_reach_generator_output_and_every_dac_weight():
    torch.manual_seed(0)
    dac = DACDiscriminator(windows=(128, 64), channels=2, periods=(2,), period_channels=(2, 4, 4, 4))
    x = _wave(2, 800, seed=1)
    x_hat = _wave(2, 800, seed=2).requires_grad_(True)
    fake, fake_maps = dac(x_hat)
    (lsgan_generator_loss(fake) + dac_feature_matching_loss(dac(x)[1], fake_maps)).backward()
    assert x_hat.grad is not None and torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0
    dac.zero_grad(set_to_none=True)
    x_hat.grad = None
    loss = _tiny_loss(dac_weight=1.0)
    holder = SimpleNamespace(mpd=lambda w: ([torch.zeros(1)], [[torch.zeros(1)]]), mrd=lambda w: ([torch.zeros(1)], [[torch.zeros(1)]]), dac=dac)
    d_total, _ = audio_discriminator_loss(x=x, x_hat=x_hat, discriminator=holder, loss=loss)
    d_total.backward()
    assert x_hat.grad is None  # the discriminator step never reaches the generator
    for name, p in dac.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for n, p in dac.named_parameters() if n.endswith("original1"))


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (["loss.dac_weight=-1"], ValueError, "loss.dac_weight must be >= 0"),
        (["loss.dac_weight=1", "loss.gan_weight=0", "loss.feature_matching_weight=0"], ValueError, "GAN is off"),
        (["loss.dac_channels=0"], ValueError, "loss.dac_channels must be >= 1"),
        (["loss.dac_windows=[16]"], ValueError, "loss.dac_windows: DAC window 16 has 9 frequency bins, too few for band 0"),
        (["loss.dac_windows=[2]"], ValueError, "integer >= 4"),
        (["loss.dac_windows=[1024.5]"], TypeError, r"loss.dac_windows\[0\] must be an integer"),
        (["loss.dac_bands=[[0.5,0.2]]"], ValueError, r"loss.dac_bands\[0\] must be a pair"),
        (["loss.dac_bands=[[0.1]]"], ValueError, r"loss.dac_bands\[0\] must be a pair"),
        (["loss.dac_bands=[]"], ValueError, "at least one"),
        (["loss.dac_periods=[0]"], ValueError, "loss.dac_periods must be positive"),
        (["loss.dac_windows=[]", "loss.dac_periods=[]"], ValueError, "both empty"),
        (["loss.dac_wieght=1"], ValueError, "valid keys"),
    ],
)
def test_bad_dac_config_values_raise_clear_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        load_config("audio/speech-tiny", overrides)


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="too few for band 0"):
        MultiBandSTFTDiscriminator(16)
    with pytest.raises(ValueError, match="channels"):
        MultiBandSTFTDiscriminator(64, channels=0)
    with pytest.raises(ValueError, match="at least one STFT window or period"):
        DACDiscriminator(windows=(), periods=())


def test_presets_official_on_cpu_presets_off():
    official = load_config("audio/official-24k")["loss"]
    assert official["dac_weight"] == 1.0 and official["gan_weight"] == 1.0 and official["feature_matching_weight"] == 1.0
    assert official["dac_windows"] == [2048, 1024, 512] and official["dac_channels"] == 32
    assert official["dac_periods"] == [2, 3, 5, 7, 11]
    assert [tuple(b) for b in official["dac_bands"]] == list(DAC_BANDS)
    for name in ("audio/speech-small", "audio/speech-tiny"):
        assert load_config(name)["loss"]["dac_weight"] == 0.0, name
    assert AudioDiscriminator.from_loss_config(load_config("audio/speech-tiny")["loss"]).dac is None


def test_one_tiny_training_step_with_the_dac_discriminator():
    from simvq.modalities import get_modality

    torch.manual_seed(0)
    cfg = load_config("audio/speech-tiny", TINY_DAC)
    task = get_modality("audio").task(cfg)
    model, disc, mel = task.build_model(), task.build_discriminator(), task.build_loss_modules()
    assert disc.dac is not None
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
    x = _wave(2, 3200, seed=4)
    dac_before = [p.detach().clone() for p in disc.dac.parameters()]
    gen_before = [p.detach().clone() for p in model.decoder.parameters()]

    x_hat, quant = model(x)
    g_loss, logs = task.generator_loss(x=x, x_hat=x_hat, quant=quant, discriminator=disc, loss_modules=mel, step=0)
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    d_loss, d_logs = task.discriminator_loss(x=x, x_hat=x_hat.detach(), discriminator=disc, step=0)
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()

    logs.update(d_logs)
    for key in ("loss", "gan_g_dac", "fm_dac", "disc_dac", "disc_loss"):
        assert key in logs and math.isfinite(float(logs[key])), key
    assert any(not torch.equal(a, b) for a, b in zip(dac_before, disc.dac.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(gen_before, model.decoder.parameters()))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_tiny_training_run_with_the_dac_discriminator(tmp_path):
    from simvq.training import train

    result = train(
        "audio/speech-tiny", out_dir=tmp_path / "run", progress=False, max_steps=2,
        overrides=[f"data.path={tmp_path / 'corpus'}", "trainer.checkpoint_every=0", "trainer.sample_every=0", *TINY_DAC],
    )
    assert not result.diverged and result.steps == 2
    last = result.history[-1]
    for key in ("gan_g_dac", "fm_dac", "disc_dac", "gan_g_mpd", "disc_mpd"):
        assert key in last and math.isfinite(last[key]), key
