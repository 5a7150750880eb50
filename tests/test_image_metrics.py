"""Image metrics (PSNR conventions, SSIM, FID / proxy), LPIPS and the perceptual-loss fallback.

References: hand-computed PSNRs, skimage (the official evaluation's own calls), scipy's sqrtm Fréchet
distance, a naive LPIPS written from the paper's recipe, torchvision's published Inception parameter count.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from simvq.modalities.image.perceptual import LPIPS, PerceptualLoss, lpips_heads_file, multiscale_ssim_loss
from simvq.metrics import FIDInceptionV3, RandomConvFeatures
from simvq.modalities.image.metrics import ImageMetrics, psnr_per_image, to_official_uint8


def _const(value, n=1, c=3, size=16):
    return torch.full((n, c, size, size), float(value))


# ----- PSNR -----------------------------------------------------------------------------------------------
def test_official_uint8_truncates_like_the_official_code():
    x = torch.tensor([-1.0, 0.0, 0.5, -0.5, 0.125, 1.0, 1.5]).view(1, 1, 1, 7)
    # (x + 1) / 2 * 255 = 0, 127.5, 191.25, 63.75, 143.4375, 255 -> truncated; 1.5 is clamped to 1
    assert to_official_uint8(x).flatten().tolist() == [0, 127, 191, 63, 143, 255, 255]
    r = torch.rand(2, 3, 8, 8) * 2 - 1
    ref = (((r.numpy() + 1) / 2) * 255.0).astype(np.uint8)  # numpy's cast truncates as torch's does
    assert np.array_equal(to_official_uint8(r).numpy(), ref)


def test_psnr_constant_error_hand_values():
    x = _const(0.0, n=2)  # -> 127
    x_hat = _const(0.5, n=2)  # -> 191: an error of 64 levels everywhere
    expected = 20 * math.log10(255 / 64)
    assert psnr_per_image(x, x_hat).tolist() == pytest.approx([expected, expected], abs=1e-9)
    m = ImageMetrics(fid=None, lpips=None, ssim=False)
    m.update(x, x_hat)
    out = m.compute()
    assert out["psnr_official_batch64"] == pytest.approx(expected, abs=1e-9)
    assert out["psnr_per_image"] == pytest.approx(expected, abs=1e-9)
    assert out["num_images"] == 2


def test_batch64_psnr_differs_from_per_image_and_matches_hand_formula():
    # 32 images off by 64 levels, 32 off by 16 levels, fed in loader batches of 10
    x = _const(0.0, n=64)
    x_hat = torch.cat([_const(0.5, n=32), _const(0.125, n=32)])
    m = ImageMetrics(fid=None, lpips=None, ssim=False)
    for i in range(0, 64, 10):
        m.update(x[i : i + 10], x_hat[i : i + 10])
    out = m.compute()
    a, b = 64 / 255, 16 / 255
    per_image = (20 * math.log10(1 / a) + 20 * math.log10(1 / b)) / 2
    batch = 10 * math.log10(1 / ((a * a + b * b) / 2))
    assert out["psnr_per_image"] == pytest.approx(per_image, abs=1e-9)
    assert out["psnr_official_batch64"] == pytest.approx(batch, abs=1e-9)
    assert out["psnr_official_batch64"] < out["psnr_per_image"] - 2  # ~ 15.0 dB vs ~ 18.0 dB
    # the official call: skimage on the whole (B, H, W, C) batch of quantised floats
    gt = to_official_uint8(x).permute(0, 2, 3, 1).numpy().astype(np.float32) / 255
    rec = to_official_uint8(x_hat).permute(0, 2, 3, 1).numpy().astype(np.float32) / 255
    assert out["psnr_official_batch64"] == pytest.approx(peak_signal_noise_ratio(gt, rec), abs=1e-4)


def test_batch64_groups_across_loader_batches_and_counts_last_partial_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(100, 3, 8, 8, generator=gen) * 2 - 1
    x_hat = (x + 0.2 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    gt = to_official_uint8(x).permute(0, 2, 3, 1).numpy().astype(np.float32) / 255
    rec = to_official_uint8(x_hat).permute(0, 2, 3, 1).numpy().astype(np.float32) / 255
    expected = (peak_signal_noise_ratio(gt[:64], rec[:64]) + peak_signal_noise_ratio(gt[64:], rec[64:])) / 2
    results = []
    for loader_batch in (7, 64, 100):
        m = ImageMetrics(fid=None, lpips=None, ssim=False)
        for i in range(0, 100, loader_batch):
            m.update(x[i : i + loader_batch], x_hat[i : i + loader_batch])
        results.append(m.compute()["psnr_official_batch64"])
        assert m.compute() == m.compute()  # compute() does not consume the open batch
    assert results == pytest.approx([expected] * 3, abs=1e-4)
    per_image = np.mean([peak_signal_noise_ratio(gt[i], rec[i]) for i in range(100)])
    m = ImageMetrics(fid=None, lpips=None, ssim=False)
    m.update(x, x_hat)
    assert m.compute()["psnr_per_image"] == pytest.approx(per_image, abs=1e-4)


# ----- SSIM -----------------------------------------------------------------------------------------------
def test_ssim_x100_equals_skimage_on_quantised_images():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 24, 24, generator=gen) * 2 - 1
    x_hat = (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    m = ImageMetrics(fid=None, lpips=None)
    m.update(x, x_hat)
    got = m.compute()["ssim_x100"]
    q = lambda t: (((t.numpy() + 1) / 2) * 255).astype(np.uint8).transpose(0, 2, 3, 1).astype(np.float32) / 255  # noqa: E731
    ref = np.mean([structural_similarity(q(x_hat)[i], q(x)[i], data_range=1.0, channel_axis=-1) for i in range(3)])
    assert got == pytest.approx(100 * ref, abs=1e-4)
    assert 0 < got < 100
    m2 = ImageMetrics(fid=None, lpips=None)
    m2.update(x, x)
    assert m2.compute()["ssim_x100"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="7x7"):
        m2.update(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))


def test_metric_input_errors():
    m = ImageMetrics(fid=None, lpips=None)
    with pytest.raises(ValueError, match="before any update"):
        m.compute()
    with pytest.raises(ValueError, match="same shape"):
        m.update(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 9))
    with pytest.raises(ValueError, match="psnr_batch_size"):
        ImageMetrics(psnr_batch_size=0)


# ----- FID ------------------------------------------------------------------------------------------------
def test_fid_inception_architecture_and_weight_loading(tmp_path, monkeypatch):
    model = FIDInceptionV3(random_init=True, resize_input=False)
    # torchvision publishes 27,161,264 parameters for inception_v3 (with AuxLogits and a 1000-way fc);
    # minus AuxLogits (98,304 + 256 + 2,457,600 + 1,536 + 769,000) and fc (2,049,000) leaves the feature net
    aux = 98_304 + 256 + 2_457_600 + 1_536 + 769_000
    assert sum(p.numel() for p in model.parameters()) == 27_161_264 - aux - 2_049_000 == 21_785_568
    sd = model.state_dict()
    expected = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    with torch.no_grad():
        feats = model(torch.rand(1, 3, 75, 75))  # the smallest input the graph accepts
    assert feats.shape == (1, 2048) and bool((feats >= 0).all())
    # a file in pytorch-fid's layout (with its 1008-way fc) loads key for key, via the env var too
    state = dict(sd)  # random values: a fresh model draws different ones, so equality proves the load
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    monkeypatch.setenv("SIMVQ_FID_INCEPTION_WEIGHTS", str(path))
    metrics = ImageMetrics(lpips=None)
    assert metrics.fid_key == "rfid" and "proxy_fid_random_conv" not in metrics.notes
    loaded = metrics._fid_extractor
    assert torch.equal(loaded.Mixed_6c.branch7x7_2.conv.weight, state["Mixed_6c.branch7x7_2.conv.weight"])
    assert torch.equal(loaded.Mixed_7c.branch_pool.bn.running_mean, state["Mixed_7c.branch_pool.bn.running_mean"])
    torch.save({"Conv2d_1a_3x3.conv.weight": state["Conv2d_1a_3x3.conv.weight"]}, path)
    with pytest.raises(ValueError, match="missing"):
        FIDInceptionV3()
    monkeypatch.setenv("SIMVQ_FID_INCEPTION_WEIGHTS", str(tmp_path / "absent.pth"))
    with pytest.raises(FileNotFoundError, match="SIMVQ_FID_INCEPTION_WEIGHTS"):
        ImageMetrics()
    monkeypatch.delenv("SIMVQ_FID_INCEPTION_WEIGHTS")
    with pytest.raises(FileNotFoundError, match="SIMVQ_FID_INCEPTION_WEIGHTS"):
        ImageMetrics(fid="inception")


def _frechet_scipy(f1, f2):
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_proxy_fid_is_labelled_and_equals_scipy_frechet_distance(monkeypatch):
    monkeypatch.delenv("SIMVQ_FID_INCEPTION_WEIGHTS", raising=False)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(160, 3, 16, 16, generator=gen) * 2 - 1
    x_hat = (0.6 * x + 0.2 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    m = ImageMetrics(lpips=None, ssim=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # e.g. inside Lightning's bf16 validation: no effect
        for i in range(0, 160, 80):
            m.update(x[i : i + 80], x_hat[i : i + 80])
    out = m.compute()
    assert "rfid" not in out and m.fid_key == "proxy_fid_random_conv"
    assert "not rFID" in m.notes["proxy_fid_random_conv"]
    net = RandomConvFeatures(seed=0)
    with torch.no_grad():
        f1 = net((x + 1) / 2).double().numpy()
        f2 = net((x_hat + 1) / 2).double().numpy()
    ref = _frechet_scipy(f1, f2)
    assert ref > 0
    assert out["proxy_fid_random_conv"] == pytest.approx(ref, rel=1e-5)  # bf16 features would be ~2e-4 off


# ----- LPIPS ----------------------------------------------------------------------------------------------
_VGG_PLAN = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_VGG_TAP_AFTER_CONV = {2, 4, 7, 10, 13}  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


def _naive_vgg_taps(w, x):
    """VGG16 written from its layer plan; ``w`` holds torchvision-style ``features.N`` tensors."""
    taps, idx, n_conv = [], 0, 0
    for item in _VGG_PLAN:
        if item == "M":
            x = F.max_pool2d(x, 2, 2)
            idx += 1
            continue
        x = F.relu(F.conv2d(x, w[f"features.{idx}.weight"], w[f"features.{idx}.bias"], padding=1))
        idx += 2
        n_conv += 1
        if n_conv in _VGG_TAP_AFTER_CONV:
            taps.append(x)
    return taps


def _naive_alex_taps(w, x):
    c = lambda x, i, s, p: F.relu(F.conv2d(x, w[f"features.{i}.weight"], w[f"features.{i}.bias"], stride=s, padding=p))  # noqa: E731
    t1 = c(x, 0, 4, 2)
    t2 = c(F.max_pool2d(t1, 3, 2), 3, 1, 2)
    t3 = c(F.max_pool2d(t2, 3, 2), 6, 1, 1)
    t4 = c(t3, 8, 1, 1)
    t5 = c(t4, 10, 1, 1)
    return [t1, t2, t3, t4, t5]


def _naive_lpips(net, w, heads, x, y):
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    taps = _naive_vgg_taps if net == "vgg" else _naive_alex_taps
    fx, fy = taps(w, (x - shift) / scale), taps(w, (y - shift) / scale)
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for k, (a, b) in enumerate(zip(fx, fy)):
        a, b = a.double(), b.double()
        na = a / (torch.sqrt((a * a).sum(1, keepdim=True)) + 1e-10)
        nb = b / (torch.sqrt((b * b).sum(1, keepdim=True)) + 1e-10)
        weighted = ((na - nb) ** 2 * heads[f"lin{k}.model.1.weight"].double()).sum(1)
        total += weighted.mean(dim=(1, 2))
    return total


@pytest.mark.parametrize("net,size", [("vgg", 32), ("alex", 64)])
def test_lpips_matches_naive_implementation_and_loads_heads(net, size, tmp_path, monkeypatch):
    monkeypatch.delenv("SIMVQ_LPIPS_VGG_WEIGHTS", raising=False)
    monkeypatch.delenv("SIMVQ_LPIPS_ALEX_WEIGHTS", raising=False)
    heads = torch.load(lpips_heads_file(net), map_location="cpu", weights_only=True)
    model = LPIPS(net=net, random_backbone=True, seed=3)
    for k in range(5):
        assert torch.equal(getattr(model, f"head{k}"), heads[f"lin{k}.model.1.weight"].float())
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, size, size, generator=gen) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    w = {f"features.{k}": v for k, v in model.backbone.features.state_dict().items()}
    with torch.no_grad():
        got = model(x, y)
        assert torch.equal(model(x, x), torch.zeros(2))
    ref = _naive_lpips(net, w, heads, x, y)
    assert torch.allclose(got.double(), ref, rtol=1e-4)
    assert bool((got > 0).all())
    # torchvision-layout backbone file (with classifier keys) through the environment variable
    state = {**w, "classifier.6.weight": torch.zeros(1000, 4096)}
    path = tmp_path / f"{net}.pth"
    torch.save(state, path)
    env = "SIMVQ_LPIPS_VGG_WEIGHTS" if net == "vgg" else "SIMVQ_LPIPS_ALEX_WEIGHTS"
    monkeypatch.setenv(env, str(path))
    loaded = LPIPS(net=net)
    assert loaded.name == f"lpips-{net}"
    with torch.no_grad():
        assert torch.allclose(loaded(x, y), got)
    if net == "alex":  # the metric wiring once, with the cheaper backbone
        metrics = ImageMetrics(fid=None, ssim=False)
        metrics.update(x, y)
        out = metrics.compute()
        assert out["lpips_alex"] == pytest.approx(float(got.mean()), rel=1e-5) and "lpips_vgg" not in out
    monkeypatch.delenv(env)
    with pytest.raises(FileNotFoundError, match=env):
        LPIPS(net=net)
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="lacks LPIPS"):
        LPIPS(net=net, backbone_weights=path)


def test_perceptual_loss_fallback_is_labelled_and_is_multiscale_ssim(monkeypatch, caplog):
    monkeypatch.delenv("SIMVQ_LPIPS_VGG_WEIGHTS", raising=False)
    with caplog.at_level("WARNING"):
        loss = PerceptualLoss()
    assert loss.name == "fallback-multiscale-ssim"
    assert "OFFLINE FALLBACK" in caplog.text
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    got = float(loss(x, y))

    def sk(a, b):  # Gaussian SSIM as in Wang et al., via skimage
        return np.mean([
            structural_similarity(a[i].numpy(), b[i].numpy(), channel_axis=0, data_range=2.0, gaussian_weights=True,
                                  sigma=1.5, use_sample_covariance=False)
            for i in range(a.shape[0])
        ])  # fmt: skip

    x2, y2 = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)  # 32 and 16 fit the 11x11 window; 8 does not
    ref = ((1 - sk(x, y)) + (1 - sk(x2, y2))) / 2
    assert got == pytest.approx(ref, abs=1e-5)
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed-precision training must not change the value
        assert float(loss(x, y)) == pytest.approx(got, abs=1e-5)
    y.requires_grad_(True)
    multiscale_ssim_loss(x, y).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    with pytest.raises(FileNotFoundError, match="SIMVQ_LPIPS_VGG_WEIGHTS"):
        PerceptualLoss(fallback="error")
