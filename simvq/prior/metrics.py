"""Generation metrics of a token prior.

* Held-out NLL: nats -> bits per token (``/ ln 2``) and bits per image (``* h * w``); bits per image is
  comparable across codebook sizes and grids, bits per token is not.
* gFID: torchmetrics' ``FrechetInceptionDistance`` with a custom feature module, between decoded samples and
  held-out images. With ``SIMVQ_FID_INCEPTION_WEIGHTS`` (pytorch-fid's Inception) it is ``gfid``; otherwise
  it is ``proxy_gfid_classifier``, computed on the penultimate features of a small CNN classifier that the
  project trains on the data set's training split (weights cached in a folder; its held-out accuracy is
  reported next to the proxy). The proxy is on its own scale: never compare it with published gFID.
* Precision / recall (Kynkäänniemi et al. 2019): a sample is "precise" when it lies inside the k-NN ball
  (k = 3, radius = distance to the 3rd nearest other point) of at least one real feature; recall swaps roles.
* Class accuracy: for class-conditional priors, the share of samples the classifier assigns to the class
  they were asked for.
* Audio priors: bits per second (bits/token x the tokenizer's tokens/s) and per window instead of per image,
  and the audio modality's labelled sample-quality proxy (mean DNSMOS); the image metrics are named in
  ``not_computed``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from simvq.prior.likelihood import held_out_items, held_out_nll
from simvq.io import save_file_atomic
from simvq.metrics.inception import FIDInceptionV3, RandomConvFeatures
from simvq.modalities import build_datasets

log = logging.getLogger("simvq.prior")

CACHE_ENV = "SIMVQ_CACHE_DIR"
LN2 = math.log(2.0)


# ----- feature spaces ---------------------------------------------------------------------------------------
class SmallClassifier(nn.Module):
    """A small CNN for ``(B, C, S, S)`` images in ``[-1, 1]``; ``features`` are its penultimate layer (8 x width).

    Three conv + ReLU + 2x max-pool stages and a last conv + global average (about 3.7 M multiply-adds per
    32x32 image at width 16): small enough to train in minutes on a CPU, good enough to tell classes apart.
    """

    def __init__(self, *, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.width = in_channels, num_classes, width
        layers, c_in = [], in_channels
        for c_out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        layers += [nn.Conv2d(c_in, 8 * width, 3, padding=1), nn.BatchNorm2d(8 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(8 * width, num_classes)

    @property
    def num_features(self) -> int:
        return 8 * self.width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class ClassifierFeatures(nn.Module):
    """torchmetrics feature extractor: images in ``[0, 1]`` (``normalize=True``) -> classifier features."""

    def __init__(self, classifier: SmallClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x.float() * 2 - 1)


class InceptionFeatures(nn.Module):
    """torchmetrics feature extractor: pytorch-fid's Inception on images in ``[0, 1]``."""

    def __init__(self, inception: nn.Module) -> None:
        super().__init__()
        self.inception = inception.eval()
        self.num_features = inception.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return self.inception(x.float())


def inception_weights() -> str | None:
    """The Inception weights file from ``SIMVQ_FID_INCEPTION_WEIGHTS`` (None when unset; missing file = error)."""
    value = os.environ.get("SIMVQ_FID_INCEPTION_WEIGHTS") or None
    if value is not None and not Path(value).expanduser().is_file():
        raise FileNotFoundError(f"SIMVQ_FID_INCEPTION_WEIGHTS names {value}, which does not exist; fix the path or unset it")
    return value


# ----- the proxy classifier ---------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "simvq") / "prior-classifiers"


def _images_tensor(dataset, limit: int | None = None, *, train: bool) -> torch.Tensor:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    items = [dataset[(i, 0)] if train else dataset[i] for i in range(n)]
    return torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items]).float()


def train_classifier(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    eval_images: torch.Tensor,
    eval_labels: torch.Tensor,
    *,
    steps: int = 800,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    width: int = 16,
) -> tuple[SmallClassifier, float]:
    """Train :class:`SmallClassifier` (Adam, cosine LR, random shifts of up to 2 pixels); returns it and its held-out accuracy."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    num_classes = int(max(int(train_labels.max()), int(eval_labels.max()))) + 1
    model = SmallClassifier(in_channels=train_images.shape[1], num_classes=num_classes, width=width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(train_images), (batch_size,), generator=gen)
        x = train_images[idx]
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        loss = F.cross_entropy(model(x), train_labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    accuracy = float((classify(model, eval_images) == eval_labels).float().mean())
    return model, accuracy


@torch.no_grad()
def classify(model: SmallClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i : i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)])


def classifier_key(data_cfg: dict, steps: int) -> str:
    """What fixes the classifier: the data set, its size and channels, its folder, the training steps."""
    key = {k: data_cfg.get(k) for k in ("dataset", "path", "image_size", "channels", "train_limit", "eval_fraction")}
    key["steps"] = steps
    key["version"] = 1
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_or_train_classifier(tokenizer_config: dict, *, steps: int = 800, cache_dir: str | Path | None = None, progress: bool = False):
    """``(classifier, info)`` for the tokenizer's data set; trained once, cached in ``cache_dir/<key>/``.

    ``info`` holds ``accuracy`` (held-out, on the data set's full eval split) and what it was trained on.
    Returns ``(None, None)`` for data sets without labels.
    """
    from safetensors.torch import load_file, save_file

    from simvq.prior.data import dataset_labels

    cfg = json.loads(json.dumps(tokenizer_config))
    cfg["data"]["train_limit"] = None
    cfg["data"]["eval_limit"] = None
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / classifier_key(cfg["data"], steps)
    weights, info_path = folder / "model.safetensors", folder / "info.json"
    if weights.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        model = SmallClassifier(in_channels=info["in_channels"], num_classes=info["num_classes"], width=info["width"])
        model.load_state_dict(load_file(str(weights)))
        return model.eval(), info
    train_set, eval_set = build_datasets(cfg)
    train_labels, _ = dataset_labels(cfg, "train", len(train_set))
    eval_labels, names = dataset_labels(cfg, "eval", len(eval_set))
    if train_labels is None or eval_labels is None:
        return None, None
    if progress:
        print(f"[prior] training the proxy classifier on {len(train_set):,} labelled images ({steps} steps; cached in {folder})", flush=True)
    model, accuracy = train_classifier(
        _images_tensor(train_set, train=True), torch.from_numpy(train_labels),
        _images_tensor(eval_set, train=False), torch.from_numpy(eval_labels), steps=steps,
    )
    info = {
        "accuracy": accuracy, "eval_images": len(eval_set), "train_images": len(train_set), "steps": steps,
        "dataset": cfg["data"].get("dataset"), "class_names": names, "in_channels": model.in_channels,
        "num_classes": model.num_classes, "width": model.width,
    }
    save_file_atomic(weights, lambda tmp: save_file(model.state_dict(), str(tmp)))
    save_file_atomic(info_path, json.dumps(info, indent=2))
    return model, info


# ----- distances --------------------------------------------------------------------------------------------
def frechet_distance(feature: nn.Module, real: torch.Tensor, fake: torch.Tensor, *, batch_size: int = 256) -> float:
    """torchmetrics' FID between image sets ``(N, C, H, W)`` in ``[-1, 1]`` in the space of ``feature``."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=feature, normalize=True, reset_real_features=True)
    with torch.no_grad():
        for images, is_real in ((real, True), (fake, False)):
            for i in range(0, len(images), batch_size):
                fid.update(((images[i : i + batch_size].float() + 1) / 2).clamp(0, 1), real=is_real)
    return float(fid.compute())


@torch.no_grad()
def extract_features(feature: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Features ``(N, D)`` of images in ``[-1, 1]`` (the same input convention as :func:`frechet_distance`)."""
    return torch.cat([feature(((images[i : i + batch_size].float() + 1) / 2).clamp(0, 1)) for i in range(0, len(images), batch_size)])


def _kth_radius(points: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    out = []
    for i in range(0, len(points), chunk):
        d = torch.cdist(points[i : i + chunk], points)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: each point's distance to itself is 0
    return torch.cat(out)


def _covered(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    out = []
    for i in range(0, len(queries), chunk):
        d = torch.cdist(queries[i : i + chunk], centres)
        out.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, *, k: int = 3) -> dict:
    """Improved precision / recall (Kynkäänniemi et al. 2019) of feature sets ``(N, D)``, ``(M, D)``, in float64."""
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} real and generated samples")
    real, fake = real.double(), fake.double()
    precision = _covered(fake, real, _kth_radius(real, k)).double().mean()
    recall = _covered(real, fake, _kth_radius(fake, k)).double().mean()
    return {"precision": float(precision), "recall": float(recall), "k": k}


# ----- the evaluation ---------------------------------------------------------------------------------------
def evaluate_prior(
    prior_dir: str | Path,
    *,
    samples: int | None = None,
    seed: int | None = None,
    cfg_scale: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    classifier_dir: str | Path | None = None,
    classifier_steps: int | None = None,
    held_out_limit: int | None = None,
    held_out: dict | None = None,
    device: str = "cpu",
    progress: bool = False,
    return_images: bool = False,
) -> dict:
    """Held-out bits/token and bits/image, gFID (or its labelled proxy), precision/recall, class accuracy.

    An audio prior (windows of ``data.frames`` tokens) reports bits/token, bits per second and per window, and
    the modality's sample-quality proxy (mean DNSMOS of ``samples`` decoded samples next to as many held-out
    windows reconstructed through the tokenizer); ``not_computed`` names the image metrics left out.

    Settings default to the prior config's ``eval`` section. ``held_out_limit`` evaluates bits/token on the
    first N held-out grids only (default: all of the prior's eval split); ``held_out``, the
    :func:`held_out_nll` result that training already computed for this prior on its whole eval split (the
    ``metrics`` of :func:`~simvq.prior.train.train_prior`), is used instead of computing it again. Class-conditional priors are sampled with the
    classes in turn (sample ``i`` asks for class ``i mod num_classes``); unconditional ones without a class.
    """
    import time

    from simvq.modalities import modality_of
    from simvq.prior.data import data_config, load_or_encode, prior_datasets
    from simvq.prior.sample import check_sampling_args, decode, sample
    from simvq.prior.train import load_prior_with_tokenizer, token_rate, tokenizer_hash

    if held_out_limit is not None and (isinstance(held_out_limit, bool) or not isinstance(held_out_limit, int) or held_out_limit < 1):
        raise ValueError(f"held_out_limit must be a positive integer (held-out grids to score; None for all), got {held_out_limit!r}")
    t0 = time.perf_counter()
    prior, config, tokenizer, tok_config = load_prior_with_tokenizer(prior_dir, device=device)
    ev = dict(config["eval"])
    for key, value in (("samples", samples), ("seed", seed), ("cfg_scale", cfg_scale), ("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        if value is not None:
            ev[key] = value
    n = ev["samples"]
    classes = None
    if prior.conditional:
        classes = torch.arange(n) % prior.num_classes
    else:
        ev["cfg_scale"] = 1.0
    check_sampling_args(prior, n, classes, ev["temperature"], ev["top_k"], ev["top_p"], ev["cfg_scale"])

    pdata = config["data"]
    dcfg = data_config(tok_config, pdata)
    _, eval_set = prior_datasets(dcfg, pdata)
    eval_tokens, eval_labels, _ = load_or_encode(
        prior_dir, tokenizer, tokenizer_hash(tok_config), dcfg, eval_set, "eval", batch_size=pdata["encode_batch_size"],
        frames=pdata.get("frames"), crops=pdata.get("crops", 1),
    )
    modality = modality_of(tok_config)
    rate = token_rate(tokenizer, tok_config)
    result: dict = {"prior": str(Path(prior_dir)), "tokenizer": config["tokenizer"]["path"], "codebook_size": prior.codebook_size,
                    "grid": list(prior.grid), "num_classes": prior.num_classes}
    if held_out is not None and held_out_limit is None and held_out_items(held_out) == len(eval_tokens):
        nll = held_out
    else:
        nll = held_out_nll(prior, eval_tokens, eval_labels if prior.conditional else None,
                           batch_size=pdata["eval_batch_size"], limit=held_out_limit, tokens_per_second=rate)
    if rate is None:
        result.update(bits_per_token=nll["bits_per_token"], bits_per_image=nll["bits_per_image"], nll_images=nll["images"])
    else:
        result.update(bits_per_token=nll["bits_per_token"], bits_per_second=nll["bits_per_second"], bits_per_window=nll["bits_per_window"],
                      tokens_per_second=nll["tokens_per_second"], window_tokens=nll["window_tokens"], nll_windows=nll["windows"])

    gen_indices = sample(prior, n, classes=classes, temperature=ev["temperature"], top_k=ev["top_k"], top_p=ev["top_p"],
                         cfg_scale=ev["cfg_scale"], seed=ev["seed"], batch_size=ev["batch_size"])
    fake = decode(tokenizer, gen_indices, token_grid=modality.token_grid)
    settings = dict(seed=ev["seed"], cfg_scale=ev["cfg_scale"], temperature=ev["temperature"], top_k=ev["top_k"], top_p=ev["top_p"])
    if not modality.token_grid:  # audio windows: DNSMOS of samples next to reconstructed held-out windows
        references = decode(tokenizer, eval_tokens[:n], token_grid=False)
        result.update(samples=n, held_out_windows=len(eval_tokens), **settings)
        result.update(modality.prior_sample_metrics(fake, references, tok_config))
        result["not_computed"] = {
            "metrics": ["gfid", "proxy_gfid_classifier", "precision", "recall", "class_accuracy"],
            "reason": f"image metrics (a Frechet distance and k-NN precision/recall in an image feature space, a classifier's "
                      f"class accuracy); this prior models {modality.name} token windows",
        }
        result["wall_time_s"] = time.perf_counter() - t0
        if return_images:
            result["_audio"] = fake
            result["_indices"] = gen_indices
        return result
    real = _images_tensor(eval_set, train=False)
    result.update(samples=n, held_out_images=len(real), **settings)

    weights = inception_weights()
    steps = classifier_steps or ev["classifier_steps"]
    classifier, info = load_or_train_classifier(tok_config, steps=steps, cache_dir=classifier_dir, progress=progress)
    if weights is not None:
        feature, name = InceptionFeatures(FIDInceptionV3(weights=weights)), "gfid"
    elif classifier is not None:
        feature, name = ClassifierFeatures(classifier), "proxy_gfid_classifier"
    else:
        feature, name = RandomConvFeatures(seed=0), "proxy_gfid_random_conv"
    result["feature_space"] = name
    result[name] = frechet_distance(feature, real, fake)
    pr = precision_recall(extract_features(feature, real), extract_features(feature, fake), k=3)
    result.update(precision=pr["precision"], recall=pr["recall"], pr_k=pr["k"])
    if classifier is not None:
        result["classifier_accuracy"] = info["accuracy"]
        result["classifier_eval_images"] = info["eval_images"]
        result["classifier_steps"] = info["steps"]
        if prior.conditional:
            predicted = classify(classifier, fake)
            result["class_accuracy"] = float((predicted == classes).float().mean())
    result["wall_time_s"] = time.perf_counter() - t0
    if return_images:
        result["_images"] = fake
        result["_indices"] = gen_indices
    return result


__all__ = [
    "ClassifierFeatures", "InceptionFeatures", "SmallClassifier", "classify", "evaluate_prior", "extract_features",
    "frechet_distance", "held_out_nll", "load_or_train_classifier", "precision_recall", "train_classifier",
]
