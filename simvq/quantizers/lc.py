"""VQGAN-LC (Zhu et al. 2024, "Scaling the Codebook Size of VQGAN to 100,000 with a Utilization Rate of 99%").

The codebook is a *frozen* set of feature vectors, in the paper the k-means centroids of a pretrained
vision encoder's patch features, mapped into the latent space by one learned linear projector. The codes in
use are ``P(C) = C P^T + b``; the plain VQ loss trains ``P`` (codebook term) and the encoder (commitment).
Defaults follow the official code: projector weight drawn ``Normal(0, dim**-0.5)`` (bias: PyTorch default),
loss ``1.0 * commitment + 0.33 * codebook``.

This is structurally SimVQ with an informed instead of a random frozen matrix, so it reuses
:class:`~simvq.quantizers.simvq.SimVQ` (search, loss, decoding) and only changes how ``C`` is made.
Use :func:`kmeans_init` to build ``init_features`` from your own encoder's features.
"""

from __future__ import annotations

import torch

from simvq.quantizers.registry import register_quantizer
from simvq.quantizers.search import DEFAULT_CHUNK_ELEMENTS, nearest_code
from simvq.quantizers.simvq import SimVQ


KMEANS_INITS = ("kmeans++", "random")


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Arthur & Vassilvitskii 2007: each next seed drawn with probability proportional to D(x)^2.

    Sampling is by inverse CDF with uniforms from the CPU ``generator`` (same seeds on any device) and stays
    on ``x.device`` without a host sync per step.
    """
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=generator).to(x.device)
    centroids = [x.index_select(0, first)]
    x_sq = x.pow(2).sum(1)

    def sq_dist(c: torch.Tensor) -> torch.Tensor:  # ||x - c||^2 for one (1, D) centroid, via a mat-vec
        return (x_sq - 2 * (x @ c[0]) + c.pow(2).sum()).clamp_min(0)

    min_sq = sq_dist(centroids[0])
    for _ in range(1, k):
        cdf = torch.cumsum(min_sq.double(), 0)
        u = torch.rand(1, generator=generator, dtype=torch.float64).to(x.device) * cdf[-1]
        pick = torch.searchsorted(cdf, u, right=True).clamp_max(n - 1)  # all-zero weights: the last point
        centroids.append(x.index_select(0, pick))
        min_sq = torch.minimum(min_sq, sq_dist(centroids[-1]))
    return torch.cat(centroids)


@torch.no_grad()
def kmeans_init(
    features: torch.Tensor, k: int, iters: int = 10, seed: int = 0, init: str = "kmeans++"
) -> torch.Tensor:
    """k-means centroids (Lloyd's algorithm) of ``features``, for an LC codebook.

    Args:
        features: ``(N, D)`` floating-point feature vectors, ``N >= k``.
        k: number of centroids.
        iters: Lloyd iterations after the seeding (0 returns the seeds).
        seed: seed of the seeding and of re-seeding empty clusters (reproducible on any device).
        init: ``"kmeans++"`` (D^2 seeding, as scikit-learn; k sequential steps of O(N D) each) or
            ``"random"`` (k distinct random rows; instant, but Lloyd may then stop in a poorer local
            minimum; use it for very large k on a CPU).

    Returns:
        ``(k, D)`` fp32 centroids on ``features.device``. An empty cluster is re-seeded with a random
        feature vector, so every centroid stays a meaningful code.
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise ValueError(
            f"features must be a floating-point (N, D) tensor, got "
            f"{getattr(features, 'dtype', type(features).__name__)} of shape {tuple(getattr(features, 'shape', ()))}"
        )
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if features.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} feature vectors, got {features.shape[0]}; pass more features")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 0:
        raise ValueError(f"iters must be an integer >= 0, got {iters!r}")
    x = features.detach().float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("features contain NaN or Inf; clean them before running k-means")
    if init not in KMEANS_INITS:
        raise ValueError(f"init must be one of {KMEANS_INITS}, got {init!r}")
    generator = torch.Generator().manual_seed(int(seed))  # CPU generator: same picks on every device
    if init == "kmeans++":
        centroids = _kmeans_plus_plus(x, k, generator)
    else:
        centroids = x[torch.randperm(x.shape[0], generator=generator)[:k].to(x.device)].clone()
    for _ in range(iters):
        assign = nearest_code(x, centroids)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled].unsqueeze(1).float()
        empty = (~filled).nonzero().squeeze(1)
        if empty.numel():
            reseed = torch.randint(x.shape[0], (empty.numel(),), generator=generator).to(x.device)
            centroids[empty] = x[reseed]
    return centroids


@register_quantizer("lc_vq")
class LCVectorQuantizer(SimVQ):
    """Frozen feature codebook + learned linear projector (VQGAN-LC).

    Args:
        dim: latent (code) dimension.
        codebook_size: number of codes ``K``; inferred from ``init_features`` when omitted.
        init_features: ``(K, feature_dim)`` frozen codebook, e.g. ``kmeans_init(encoder_features, K)``.
            When omitted (documented fallback), ``C`` is random ``Normal(0, feature_dim**-0.5)`` features
            and the quantizer equals SimVQ with a ``feature_dim``-wide frozen matrix.
        feature_dim: width of the features (default: ``init_features.shape[1]``, else ``dim``).
        bias: projector bias.
        commitment_weight, codebook_weight: the two named loss weights (official VQGAN-LC: 1.0, 0.33).
        rotation_trick, channel_first, check_finite, search_chunk_elements, search: as for :class:`SimVQ`.

    State-dict keys: ``embedding.weight`` (``C``, frozen, saved), ``embedding_proj.weight`` / ``.bias``
    (the projector). :attr:`codebook` is ``(K, dim)``, the projected features.
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int | None = None,
        init_features: torch.Tensor | None = None,
        feature_dim: int | None = None,
        bias: bool = True,
        commitment_weight: float = 1.0,
        codebook_weight: float = 0.33,
        rotation_trick: bool = False,
        channel_first: bool = True,
        check_finite: bool = True,
        search_chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
        search: str = "auto",
    ) -> None:
        if init_features is not None:
            if not isinstance(init_features, torch.Tensor) or init_features.dim() != 2:
                raise ValueError(
                    f"init_features must be a (K, feature_dim) tensor, got shape "
                    f"{tuple(getattr(init_features, 'shape', ()))}"
                )
            if not init_features.is_floating_point() or not bool(torch.isfinite(init_features).all()):
                raise ValueError("init_features must be finite floating-point values")
            num, width = init_features.shape
            if codebook_size is not None and codebook_size != num:
                raise ValueError(
                    f"codebook_size={codebook_size} does not match init_features with {num} rows; "
                    "omit codebook_size or pass matching features"
                )
            if feature_dim is not None and feature_dim != width:
                raise ValueError(f"feature_dim={feature_dim} does not match init_features width {width}")
            codebook_size, feature_dim = num, width
        if codebook_size is None:
            raise ValueError("LCVectorQuantizer needs codebook_size or init_features (K, feature_dim)")
        super().__init__(
            dim=dim,
            codebook_size=codebook_size,
            frozen_codebook_dim=dim if feature_dim is None else feature_dim,
            bias=bias,
            transform="linear",
            learnable_codebook=False,
            rotation_trick=rotation_trick,
            commitment_weight=commitment_weight,
            codebook_weight=codebook_weight,
            channel_first=channel_first,
            check_finite=check_finite,
            search_chunk_elements=search_chunk_elements,
            search=search,
        )
        self.feature_dim = self.frozen_codebook_dim
        with torch.no_grad():
            torch.nn.init.normal_(self.embedding_proj.weight, std=dim**-0.5)
            if init_features is not None:
                self.embedding.weight.copy_(init_features)
