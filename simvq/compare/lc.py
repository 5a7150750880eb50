"""VQGAN-LC's starting codebook: k-means centroids of a trained encoder's features."""

from __future__ import annotations

from pathlib import Path

import torch

from simvq.checkpoints import load_tokenizer
from simvq.compare.plan import PlannedRun
from simvq.modalities import build_datasets
from simvq.quantizers.lc import kmeans_init


def _encoder_features(model_dir: Path, config: dict, count: int, max_passes: int = 32) -> torch.Tensor:
    """``(count, dim)`` encoder output vectors of a trained model on training items (for k-means).

    Items are training crops (images ``(B, dim, h, w)`` or audio ``(B, dim, T)`` features); when one pass over a
    small training set gives fewer than ``count`` vectors, further passes draw other crops (other seeds).
    """
    model = load_tokenizer(model_dir).eval()
    train_set, _ = build_datasets(config)
    feats, seen = [], 0
    g = torch.Generator().manual_seed(int(config["seed"]))
    order = torch.randperm(len(train_set), generator=g).tolist()
    n = len(order)
    with torch.no_grad():
        for rep in range(max_passes):
            i = 0
            while seen < count and i < n:
                batch = torch.stack([train_set[(j, j + rep * n)] for j in order[i : i + 64]])
                i += 64
                z = model.encoder(batch)
                flat = z.movedim(1, -1).reshape(-1, z.shape[1])
                feats.append(flat)
                seen += flat.shape[0]
            if seen >= count:
                break
    return torch.cat(feats)[:count]


def lc_codebook(run: PlannedRun, donor: dict | None) -> tuple[dict | None, str]:
    """VQGAN-LC's frozen codebook: k-means centroids of encoder features, when a trained encoder exists.

    The encoder is the SimVQ run's of the same size and seed (a trained encoder of this data, as VQGAN-LC
    uses a pretrained backbone); without one the LC quantizer keeps its documented fallback, a random
    frozen matrix.
    """
    if donor is None or not donor.get("model_dir") or not Path(donor["model_dir"]).is_dir():
        return None, "random frozen matrix (no SimVQ encoder of the same size and seed to take features from)"
    k = run.codebook_size
    feats = _encoder_features(Path(donor["model_dir"]), run.config, max(4 * k, 8192))
    # k-means++ seeding is k sequential passes: at large k, random seeding + Lloyd keeps CPU runs short
    init = "kmeans++" if k <= 2048 else "random"
    centroids = kmeans_init(feats, k, iters=10, seed=run.seed, init=init)
    return (
        {"quantize.embedding.weight": centroids},
        f"k-means ({init} seeding, 10 Lloyd iterations) of {feats.shape[0]} encoder features of the trained "
        "SimVQ run with the same K and seed",
    )


__all__ = ["lc_codebook"]
