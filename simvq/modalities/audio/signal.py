"""Signal helpers shared by the audio data, the speech corpus and the metrics."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from scipy.signal import resample_poly


def resample(wave: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling of a 1-D signal by the exact ratio ``target / orig`` (float32 out)."""
    if orig_rate == target_rate:
        return np.asarray(wave, dtype=np.float32)
    ratio = Fraction(int(target_rate), int(orig_rate))
    return resample_poly(np.asarray(wave, dtype=np.float64), ratio.numerator, ratio.denominator).astype(np.float32)


__all__ = ["resample"]
