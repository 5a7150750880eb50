"""Image reconstruction metrics with the official SimVQ evaluation conventions, each result labelled.

Conventions of the official ``evaluation.py`` (reproduced here, REFERENCE §2):
- reconstructions are clamped to ``[-1, 1]``; both images are mapped to ``[0, 1]`` and quantised to uint8
  the way the official code does it, ``(x * 255).to(uint8)`` (truncation, not rounding), then back to float
  ``/ 255``;
- PSNR (``psnr_official_batch64``): ``skimage.metrics.peak_signal_noise_ratio`` called on a whole batch of 64
  images at once (data range 1): ``10 log10(1 / mean squared error over the batch)``, then averaged over
  batches; the last, smaller batch counts as one batch. Batches of 64 are formed here from consecutive
  images whatever the loader's batch size. A batch-mean MSE weights bad images less than per-image PSNRs do,
  so this reads differently from ``psnr_per_image`` (the mean of per-image PSNRs, also reported);
- SSIM (``ssim_x100``): ``skimage.metrics.structural_similarity(rec, gt, data_range=1.0, channel_axis=-1)``
  per image on the uint8-quantised images (7x7 uniform window, sample covariance: skimage's defaults),
  mean over images, times 100. (The official loop averages per-batch means, which differs only through the
  last partial batch.) Images must be at least 7x7;
- LPIPS (``lpips_alex``, ``lpips_vgg``): on the unquantised ``[-1, 1]`` images, mean over images; computed only
  when the backbone weights are available (see :mod:`simvq.modalities.image.perceptual`);
- rFID (``rfid``): Fréchet distance between the pool3 features (pytorch-fid InceptionV3) of all originals and
  all reconstructions, both in ``[0, 1]`` unquantised. Without the Inception weights the key is
  ``proxy_fid_random_conv`` instead (a fixed random CNN, :class:`~simvq.metrics.inception.RandomConvFeatures`),
  which is not comparable with published rFID.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from simvq.metrics.inception import FIDInceptionV3, RandomConvFeatures, resolve_fid_weights


def to_official_uint8(x: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` images -> uint8 exactly as the official evaluation does: ``((x + 1) / 2 * 255).to(uint8)``.

    Values are clamped to ``[-1, 1]`` first; the cast truncates toward zero.
    """
    x = x.detach().float().clamp(-1.0, 1.0)
    return (((x + 1.0) / 2.0) * 255.0).to(torch.uint8)


def psnr(mse: torch.Tensor | float, data_range: float = 1.0) -> torch.Tensor:
    """``10 log10(data_range^2 / mse)`` (``inf`` for ``mse == 0``)."""
    mse = torch.as_tensor(mse, dtype=torch.float64)
    return 10.0 * torch.log10(data_range**2 / mse)


def psnr_per_image(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR ``(B,)`` in dB of uint8-quantised ``[-1, 1]`` images (data range 1)."""
    a = to_official_uint8(x).double() / 255.0
    b = to_official_uint8(x_hat).double() / 255.0
    return psnr((a - b).pow(2).flatten(1).mean(dim=1))


def psnr_batch(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Official-style PSNR of one batch: MSE over the whole batch, then ``10 log10(1 / MSE)``."""
    a = to_official_uint8(x).double() / 255.0
    b = to_official_uint8(x_hat).double() / 255.0
    return float(psnr((a - b).pow(2).mean()))


def ssim_per_image(x: torch.Tensor, x_hat: torch.Tensor) -> np.ndarray:
    """Per-image SSIM ``(B,)`` (0..1) as the official evaluation computes it (skimage, uint8-quantised)."""
    from skimage.metrics import structural_similarity

    if min(x.shape[-2:]) < 7:
        raise ValueError(f"SSIM needs images of at least 7x7 pixels (skimage's window), got {tuple(x.shape[-2:])}")
    gt = (to_official_uint8(x).permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)) / 255.0
    rec = (to_official_uint8(x_hat).permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)) / 255.0
    return np.array([structural_similarity(rec[i], gt[i], data_range=1.0, channel_axis=-1) for i in range(len(gt))])


def _check_pair(x: torch.Tensor, x_hat: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(x_hat, torch.Tensor):
        raise TypeError("images must be torch tensors")
    if x.shape != x_hat.shape or x.dim() != 4:
        raise ValueError(
            f"originals and reconstructions must both be (B, C, H, W) with the same shape, got {tuple(x.shape)} "
            f"and {tuple(x_hat.shape)}"
        )
    if not x.is_floating_point() or not x_hat.is_floating_point():
        raise TypeError("images must be floating point in [-1, 1]")


class ImageMetrics:
    """Accumulates reconstruction metrics over an evaluation set; see the module docstring for conventions.

    ``update(x, x_hat)`` with originals and reconstructions ``(B, C, H, W)`` in ``[-1, 1]`` (any batch size);
    ``compute()`` returns a dict of floats whose keys say what each number is (single process: under
    torch.distributed, gather originals and reconstructions to one rank or evaluate on one rank):
    ``psnr_official_batch64``, ``psnr_per_image``, ``ssim_x100``, ``lpips_vgg`` / ``lpips_alex`` (when their
    weights exist), ``rfid`` or ``proxy_fid_random_conv``, ``num_images``. :attr:`notes` explains each key.

    Args:
        psnr_batch_size: images per PSNR batch (official 64).
        fid: ``"auto"`` (rFID when the Inception weights are found, else the proxy), ``"inception"`` (require the
            weights), ``"proxy"``, or ``None`` (skip).
        fid_weights: pytorch-fid Inception weights file (default: ``SIMVQ_FID_INCEPTION_WEIGHTS``).
        lpips: ``"auto"`` (each of VGG / AlexNet when its backbone weights are found), ``"require"`` (both,
            error otherwise), or ``None`` (skip).
        lpips_weights: ``{"vgg": path, "alex": path}`` backbone files (default: the environment variables).
        ssim: compute SSIM (CPU, skimage).
        device: where the feature networks run (default: the device of the first batch).
    """

    def __init__(
        self,
        *,
        psnr_batch_size: int = 64,
        fid: str | None = "auto",
        fid_weights: str | os.PathLike | None = None,
        lpips: str | None = "auto",
        lpips_weights: dict | None = None,
        ssim: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        if not isinstance(psnr_batch_size, int) or psnr_batch_size < 1:
            raise ValueError(f"psnr_batch_size must be a positive integer, got {psnr_batch_size!r}")
        if fid not in ("auto", "inception", "proxy", None):
            raise ValueError(f"fid must be 'auto', 'inception', 'proxy' or None, got {fid!r}")
        if lpips not in ("auto", "require", None):
            raise ValueError(f"lpips must be 'auto', 'require' or None, got {lpips!r}")
        self.psnr_batch_size = psnr_batch_size
        self.use_ssim = bool(ssim)
        self.device = torch.device(device) if device is not None else None
        self.notes: dict[str, str] = {
            "psnr_official_batch64": f"PSNR of the batch-mean MSE over consecutive batches of {psnr_batch_size} "
            "uint8-quantised images, averaged over batches (official SimVQ convention)",
            "psnr_per_image": "mean of per-image PSNRs (uint8-quantised images, data range 1)",
        }
        if psnr_batch_size != 64:
            self.notes["psnr_official_batch64"] += " [NOTE: batch size differs from the official 64]"
        if self.use_ssim:
            self.notes["ssim_x100"] = "100 x mean per-image SSIM, skimage defaults, uint8-quantised (official)"

        # rFID or its proxy
        self.fid_key: str | None = None
        self._fid_extractor = None
        if fid is not None:
            path = resolve_fid_weights(fid_weights)
            if fid == "inception" or (fid == "auto" and path is not None):
                self._fid_extractor = FIDInceptionV3(weights=path)  # raises with instructions when path is None
                self.fid_key = "rfid"
                self.notes["rfid"] = "Frechet distance of pytorch-fid InceptionV3 pool3 features (2048-d)"
            else:
                self._fid_extractor = RandomConvFeatures(seed=0)
                self.fid_key = "proxy_fid_random_conv"
                self.notes[self.fid_key] = (
                    "OFFLINE PROXY, not rFID: Frechet distance of a fixed random CNN's 256-d features "
                    "(Inception weights not given; set SIMVQ_FID_INCEPTION_WEIGHTS for rFID)"
                )
        # LPIPS
        from simvq.modalities.image.perceptual import LPIPS, resolve_backbone_weights

        self._lpips: dict[str, LPIPS] = {}
        if lpips is not None:
            given = dict(lpips_weights or {})
            unknown = set(given) - {"vgg", "alex"}
            if unknown:
                raise ValueError(f"lpips_weights keys must be 'vgg' and/or 'alex', got {sorted(unknown)}")
            for net in ("alex", "vgg"):
                path = resolve_backbone_weights(net, given.get(net))
                if path is None and lpips == "require":
                    LPIPS(net=net)  # raises with instructions
                if path is not None:
                    self._lpips[net] = LPIPS(net=net, backbone_weights=path)
                    self.notes[f"lpips_{net}"] = f"LPIPS v0.1 ({net}), mean over images, on [-1, 1] images"
        self._fid_metric = None
        self.reset()

    # ----- state ---------------------------------------------------------------------------------------
    def reset(self) -> None:
        self._n = 0
        self._batch_psnrs: list[float] = []
        self._open_se = 0.0  # squared-error sum of the batch being filled
        self._open_count = 0  # values in it
        self._open_images = 0
        self._psnr_image_sum = 0.0
        self._ssim_sum = 0.0
        self._lpips_sum = {net: 0.0 for net in self._lpips}
        if self._fid_metric is not None:
            self._fid_metric.reset()

    def _ensure_device(self, x: torch.Tensor) -> torch.device:
        if self.device is None:
            self.device = x.device
        return self.device

    def _fid(self):
        if self._fid_metric is None:
            from torchmetrics.image.fid import FrechetInceptionDistance

            self._fid_metric = FrechetInceptionDistance(feature=self._fid_extractor, reset_real_features=True, normalize=True)
            self._fid_metric.to(self.device)
        return self._fid_metric

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Add a batch of originals ``x`` and reconstructions ``x_hat``, ``(B, C, H, W)`` in ``[-1, 1]``.

        Runs in fp32 even inside an autocast region (e.g. Lightning's mixed-precision validation), so the
        values do not depend on the training precision.
        """
        _check_pair(x, x_hat)
        if x.shape[0] == 0:
            return
        device = self._ensure_device(x)
        with torch.autocast(device_type=device.type, enabled=False):
            self._update(x, x_hat, device)

    def _update(self, x: torch.Tensor, x_hat: torch.Tensor, device: torch.device) -> None:
        x = x.detach().float().clamp(-1, 1)
        x_hat = x_hat.detach().float().clamp(-1, 1)  # the official evaluation clamps reconstructions

        # PSNR: per-image squared errors of the quantised images, then grouped into batches of 64
        a = to_official_uint8(x).double() / 255.0
        b = to_official_uint8(x_hat).double() / 255.0
        se = (a - b).pow(2).flatten(1)
        per_image_se = se.sum(dim=1).cpu().tolist()
        values = se.shape[1]
        self._psnr_image_sum += float(psnr(se.mean(dim=1)).sum())
        for s in per_image_se:
            self._open_se += s
            self._open_count += values
            self._open_images += 1
            if self._open_images == self.psnr_batch_size:
                self._batch_psnrs.append(float(psnr(self._open_se / self._open_count)))
                self._open_se, self._open_count, self._open_images = 0.0, 0, 0

        if self.use_ssim:
            self._ssim_sum += float(ssim_per_image(x, x_hat).sum())
        for net, module in self._lpips.items():
            module.to(device)
            self._lpips_sum[net] += float(module(x.to(device), x_hat.to(device)).sum())
        if self._fid_extractor is not None:
            fid = self._fid()
            fid.update(((x + 1) / 2).to(device), real=True)
            fid.update(((x_hat + 1) / 2).to(device), real=False)
        self._n += x.shape[0]

    def compute(self) -> dict[str, float]:
        """The metrics over everything seen since the last :meth:`reset` (does not change the state)."""
        if self._n == 0:
            raise ValueError("ImageMetrics.compute() called before any update(); evaluate at least one batch")
        batches = list(self._batch_psnrs)
        if self._open_images:
            batches.append(float(psnr(self._open_se / self._open_count)))
        out = {
            "psnr_official_batch64": float(sum(batches) / len(batches)),
            "psnr_per_image": self._psnr_image_sum / self._n,
        }
        if self.use_ssim:
            out["ssim_x100"] = 100.0 * self._ssim_sum / self._n
        for net in self._lpips:
            out[f"lpips_{net}"] = self._lpips_sum[net] / self._n
        if self.fid_key is not None:
            if self._n < 2:
                out[self.fid_key] = math.nan  # a covariance needs at least two images
            else:
                out[self.fid_key] = float(self._fid().compute())
        out["num_images"] = float(self._n)
        return out


__all__ = ["ImageMetrics", "psnr", "psnr_batch", "psnr_per_image", "ssim_per_image", "to_official_uint8"]
