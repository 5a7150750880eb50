"""Token priors (generation) on any tokenizer and their metrics.

``train_prior`` trains a GPT-style prior on a tokenizer's token grids, ``sample`` draws grids from it (KV
cache, temperature / top-k / top-p, classifier-free guidance), ``evaluate_prior`` measures held-out bits per
token and image, gFID (or its labelled proxy), precision / recall and class accuracy. On an audio tokenizer
an item is a window of ``data.frames`` tokens (grid ``(1, frames)``), measured in bits per token and per
second with a labelled DNSMOS proxy of sample quality.
"""

from simvq.prior.config import load_prior_config
from simvq.prior.metrics import evaluate_prior, frechet_distance, held_out_nll, precision_recall
from simvq.prior.model import KVCache, TokenPrior
from simvq.prior.sample import decode, sample, save_image_grid
from simvq.prior.train import load_prior, load_prior_with_tokenizer, train_prior

__all__ = [
    "KVCache", "TokenPrior", "decode", "evaluate_prior", "frechet_distance", "held_out_nll", "load_prior",
    "load_prior_config", "load_prior_with_tokenizer", "precision_recall", "sample", "save_image_grid", "train_prior",
]
