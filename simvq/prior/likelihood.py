"""Held-out negative log-likelihood of a token prior (bits per token and per image, or per second of audio)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


@torch.no_grad()
def held_out_nll(prior, tokens: torch.Tensor, labels: torch.Tensor | None = None, *, batch_size: int = 64, limit: int | None = None,
                 tokens_per_second: float | None = None) -> dict:
    """Mean negative log-likelihood of token grids ``(N, h, w)`` under ``prior`` (label dropout off).

    Returns ``nats_per_token``, ``bits_per_token``, ``bits_per_image`` and ``images``. With
    ``tokens_per_second`` (an audio tokenizer's token rate; the grids are windows ``(N, 1, frames)``) it returns
    ``bits_per_second = bits_per_token * tokens_per_second``, ``bits_per_window`` and ``windows`` instead of
    the per-image figures, and the rate itself.
    """
    was_training = prior.training
    prior.eval()
    device = prior.head.weight.device
    n = len(tokens) if limit is None else min(limit, len(tokens))
    total, count = 0.0, 0
    try:
        for lo in range(0, n, batch_size):
            seq = tokens[lo : min(n, lo + batch_size)].reshape(-1, prior.seq_len).to(device)
            lab = None if labels is None else labels[lo : lo + len(seq)].to(device)
            logits = prior(seq[:, :-1], lab)
            # float32 log-softmax per token, summed in float64
            nll = F.cross_entropy(logits.reshape(-1, prior.codebook_size).float(), seq.reshape(-1), reduction="none")
            total += float(nll.double().sum())
            count += seq.numel()
    finally:
        prior.train(was_training)
    nats = total / count
    bits = nats / LN2
    if tokens_per_second is not None:
        return {
            "nats_per_token": nats,
            "bits_per_token": bits,
            "bits_per_second": bits * float(tokens_per_second),
            "bits_per_window": bits * prior.seq_len,
            "tokens_per_second": float(tokens_per_second),
            "window_tokens": prior.seq_len,
            "windows": n,
        }
    return {
        "nats_per_token": nats,
        "bits_per_token": bits,
        "bits_per_image": bits * prior.seq_len,
        "images": n,
    }


def held_out_items(nll: dict) -> int:
    """How many held-out items (images or audio windows) a :func:`held_out_nll` result covers."""
    return int(nll["windows"] if "windows" in nll else nll["images"])


__all__ = ["held_out_items", "held_out_nll"]
