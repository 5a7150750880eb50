"""The retrofit experiment's summary, verdict, report section and figure, from hand-made run records."""

from __future__ import annotations

import math

import pytest

from simvq.compare.plots import retrofit_figure
from simvq.compare.retrofit_report import retrofit_section, retrofit_verdict, summarise_retrofit
from simvq.modalities.image.compare import REPORT, VERDICT

# (utilisation, PSNR) per seed 0 / 1 for each row
NUMBERS = {
    "before": ((0.004, 18.8), (0.004, 19.6)),
    "control": ((0.005, 21.2), (0.006, 21.8)),
    "keep": ((0.004, 20.9), (0.004, 21.1)),
    "respread": ((0.867, 22.8), (0.862, 23.8)),
    "fresh": ((0.919, 21.0), (0.951, 21.7)),
    "simvq": ((0.90, 25.6), (0.92, 25.4)),
}


def _record(seed, util, psnr, steps=150):
    return {"key": f"k{seed}", "steps": steps, "status": "ok", "eval": {"psnr_official_batch64": psnr, "ssim_x100": 50.0},
            "usage_eval": {"utilization": util, "perplexity": 10.0, "dead_codes": 100, "images": 2048, "tokens": 524288}}


def _experiment():
    per_seed = {}
    for seed in (0, 1):
        entry = per_seed[seed] = {"dead_codes": {"respread": {"strategy": "respread", "live": 32 + seed, "dead": 8160 - seed,
                                                               "source": "features"},
                                                 "fresh": {"strategy": "fresh", "live": 32 + seed, "dead": 8160 - seed,
                                                           "source": "fresh", "fit_relative": 0.93}}}
        for row, values in NUMBERS.items():
            entry[row] = _record(seed, *values[seed])
    return {"size": 8192, "seeds": [0, 1], "dead_code_items": 2048, "replaced": ["quantize"], "per_seed": per_seed}


def test_summary_is_mean_and_sample_spread_over_seeds():
    summary = summarise_retrofit(_experiment(), REPORT["retrofit_keys"])
    rows = {r["name"]: r for r in summary["rows"]}
    assert list(rows) == ["before", "control", "keep", "respread", "fresh", "simvq"]
    u = rows["respread"]["metrics"]["utilization"]
    assert u["mean"] == pytest.approx(0.8645) and u["std"] == pytest.approx(0.005 / math.sqrt(2))
    assert rows["fresh"]["metrics"]["psnr_official_batch64"]["mean"] == pytest.approx(21.35)
    assert [r["live"] for r in summary["dead_codes"]["fresh"]] == [32, 33]


def test_verdict_lines_follow_the_numbers():
    lines = retrofit_verdict(VERDICT, summarise_retrofit(_experiment(), REPORT["retrofit_keys"]))
    text = "\n".join(lines)
    # respread: 86.5% vs control 0.6%; PSNR 23.30 ± 0.71 vs 21.50 ± 0.42: +1.80 dB > 1.13 summed spread
    respread = next(line for line in lines if "`respread`" in line)
    assert "86.5 ± 0.4% of codes used" in respread and "+85.9 points" in respread
    assert "PSNR 23.30 ± 0.71 dB against 21.50 ± 0.42 dB (+1.80 dB)" in respread and respread.endswith("meets the target.")
    # fresh: PSNR 21.35 vs 21.50, lower by 0.15 dB (within the spread): misses, PSNR below the control's
    fresh = next(line for line in lines if "`fresh`" in line)
    assert "(-0.15 dB, within the seed spread)" in fresh and fresh.endswith("misses the target.")
    assert "met by `respread` of 3." in text
    # SimVQ from scratch 25.50 vs the best retrofit (respread) 23.30: -2.20 dB
    assert "the best retrofit by PSNR, `respread`, is at 23.30 ± 0.71 dB (-2.20 dB)" in text


def test_verdict_says_when_no_strategy_meets_the_target():
    retro = _experiment()
    for seed in (0, 1):
        retro["per_seed"][seed]["respread"] = _record(seed, 0.3, 22.0)
    text = "\n".join(retrofit_verdict(VERDICT, summarise_retrofit(retro, REPORT["retrofit_keys"])))
    assert "met by no strategy of 3." in text


def test_section_and_figure(tmp_path):
    summary = summarise_retrofit(_experiment(), REPORT["retrofit_keys"])
    section = retrofit_section(summary, REPORT["retrofit_columns"])
    table = section["table"].splitlines()
    assert len(table) == 2 + 6 and "| 86.5 ± 0.4 |" in table[5] and "23.30 ± 0.71" in table[5]
    assert "`fresh`: 32, 33 live code(s)" in section["paragraph"] and "93%" in section["paragraph"]
    path = retrofit_figure(summary, tmp_path / "retrofit.png")
    assert path and (tmp_path / "retrofit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert retrofit_figure(None, tmp_path / "none.png") is None
