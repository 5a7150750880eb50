"""Sampling token grids from a :class:`~simvq.prior.model.TokenPrior`, decoding them (images or audio windows), writing image grids.

Each step draws one uniform number per row from a CPU ``torch.Generator`` and inverts the cumulative
distribution of the filtered probabilities, so the same seed gives the same tokens whether the KV cache is
used or the whole prefix is recomputed (the two paths differ only in float rounding of the logits).

Classifier-free guidance runs the conditional and the "no class" rows in one batch and mixes the logits as
``uncond + s * (cond - uncond)``, written ``cond + (s - 1) * (cond - uncond)``; at ``s == 1`` the guided
logits are the conditional ones, so the unconditional half is skipped and the result equals plain
conditional sampling exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from simvq.prior.model import TokenPrior


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)``; exactly ``cond`` when ``scale == 1``."""
    if scale == 1.0:
        return cond
    return cond + (scale - 1.0) * (cond - uncond)


def filter_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Probabilities ``(B, K)`` after temperature, top-k (0: off) and nucleus top-p (1.0: off) filtering."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the strictly more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row ``i`` takes the first token whose cumulative probability exceeds ``u_i * total``."""
    cdf = torch.cumsum(probs.double(), dim=-1)
    target = (uniform.double().to(probs.device) * cdf[:, -1]).unsqueeze(-1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    last = cdf.argmax(dim=-1)  # the last token with non-zero probability (first index of the maximum)
    return torch.minimum(index, last)


def check_sampling_args(prior: TokenPrior, n: int, classes, temperature, top_k, top_p, cfg_scale) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of samples must be a positive integer, got {n!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if not cfg_scale >= 0:
        raise ValueError(f"cfg_scale must be >= 0 (1 = no guidance), got {cfg_scale}")
    if classes is not None:
        if not prior.conditional:
            raise ValueError("this prior is unconditional (trained without labels): sample it without a class")
        bad = [int(c) for c in torch.as_tensor(classes).reshape(-1).tolist() if not 0 <= int(c) < prior.num_classes]
        if bad:
            raise ValueError(f"class {bad[0]} is outside the prior's labels 0..{prior.num_classes - 1}; pick one of them")


def resolve_classes(prior: TokenPrior, n: int, classes) -> torch.Tensor | None:
    """``(n,)`` class ids: an int repeats, a sequence is used as given; None -> None."""
    if classes is None:
        return None
    if isinstance(classes, int):
        return torch.full((n,), classes, dtype=torch.long)
    out = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
    if out.numel() != n:
        raise ValueError(f"give one class per sample ({n}), got {out.numel()}")
    return out


@torch.no_grad()
def sample(
    prior: TokenPrior,
    n: int,
    *,
    classes=None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_scale: float = 1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Draw ``n`` token grids ``(n, h, w)`` (int64).

    Args:
        classes: None (unconditional; for a conditional prior the "no class" row), an int for every sample,
            or ``n`` class ids.
        temperature, top_k, top_p: LlamaGen's defaults are 1.0, 0 (off) and 1.0 (off).
        cfg_scale: classifier-free guidance scale ``s`` (needs ``classes``); 1 = none.
        generator / seed: a CPU ``torch.Generator`` or a seed for a new one (default seed 0).
        use_cache: KV cache (one token per step) or recompute the prefix every step (for checking).
        batch_size: rows per forward pass (default: all ``n``).
    """
    check_sampling_args(prior, n, classes, temperature, top_k, top_p, cfg_scale)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer (rows per forward pass), got {batch_size!r}")
    labels = resolve_classes(prior, n, classes)
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    was_training = prior.training
    prior.eval()
    try:
        chunks = []
        step = batch_size or n
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            part = None if labels is None else labels[lo:hi]
            chunks.append(
                _sample_batch(prior, hi - lo, part, temperature, top_k, top_p, cfg_scale, generator, use_cache)
            )
    finally:
        prior.train(was_training)
    return torch.cat(chunks).reshape(n, *prior.grid)


def _sample_batch(prior, n, labels, temperature, top_k, top_p, cfg_scale, generator, use_cache) -> torch.Tensor:
    device = prior.head.weight.device
    labels = prior.labels_or_null(labels, n, device)
    guide = cfg_scale != 1.0 and prior.conditional and bool((labels != prior.null_class).any())
    rows = torch.cat([labels, torch.full_like(labels, prior.null_class)]) if guide else labels

    def next_token(logits: torch.Tensor) -> torch.Tensor:
        if guide:
            logits = guided_logits(logits[:n], logits[n:], cfg_scale)
        probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        return draw(probs, torch.rand(n, generator=generator))

    tokens = torch.empty(n, 0, dtype=torch.long, device=device)
    if use_cache:
        cache = prior.new_cache(rows.shape[0])
        logits = prior.start(rows, cache)
        for i in range(prior.seq_len):
            tok = next_token(logits)
            tokens = torch.cat([tokens, tok[:, None]], dim=1)
            if i + 1 < prior.seq_len:
                logits = prior.step(torch.cat([tok, tok]) if guide else tok, cache)
    else:
        for _ in range(prior.seq_len):
            prefix = torch.cat([tokens, tokens]) if guide else tokens
            logits = prior(prefix, rows)[:, -1]
            tokens = torch.cat([tokens, next_token(logits)[:, None]], dim=1)
    return tokens


@torch.no_grad()
def decode(tokenizer, indices: torch.Tensor, *, batch_size: int = 64, token_grid: bool = True) -> torch.Tensor:
    """Images ``(n, C, H, W)`` in ``[-1, 1]`` from token grids ``(n, h, w)``; with ``token_grid=False`` (audio)
    waveforms ``(n, 1, frames * hop)`` in ``[-1, 1]`` from windows ``(n, 1, frames)``."""
    if not token_grid:
        if indices.dim() != 3 or indices.shape[1] != 1:
            raise ValueError(f"audio windows must have the shape (n, 1, frames), got {tuple(indices.shape)}")
        indices = indices[:, 0]
    device = next(tokenizer.parameters()).device
    out = [tokenizer.decode_indices(indices[i : i + batch_size].to(device)).clamp(-1, 1).cpu() for i in range(0, len(indices), batch_size)]
    return torch.cat(out)


def image_grid(images: torch.Tensor, *, nrow: int = 8, pad: int = 2) -> torch.Tensor:
    """Tile ``(n, C, H, W)`` images in ``[-1, 1]`` into one uint8 array ``(rows*(H+pad)+pad, ..., C)``."""
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    nrows = -(-n // ncol)
    grid = torch.ones(c, nrows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        top, left = pad + (i // ncol) * (h + pad), pad + (i % ncol) * (w + pad)
        grid[:, top : top + h, left : left + w] = images[i].float().clamp(-1, 1)
    return ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)


def save_png(array: torch.Tensor, path: str | Path, *, scale: int = 1) -> Path:
    """Write a uint8 ``(H, W, C)`` array as a PNG (atomically); ``scale`` enlarges it (nearest)."""
    from PIL import Image

    from simvq.io import save_file_atomic

    arr = array.numpy()
    image = Image.fromarray(arr[:, :, 0] if arr.shape[-1] == 1 else arr)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return save_file_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def save_image_grid(images: torch.Tensor, path: str | Path, *, nrow: int = 8, scale: int = 1) -> Path:
    """Write images ``(n, C, H, W)`` in ``[-1, 1]`` as one grid PNG."""
    return save_png(image_grid(images, nrow=nrow), path, scale=scale)


__all__ = ["check_sampling_args", "decode", "draw", "filter_logits", "guided_logits", "image_grid", "sample", "save_image_grid", "save_png"]
