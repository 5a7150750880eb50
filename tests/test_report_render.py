"""The committed example reports re-render byte for byte from their ``results.json``.

``docs/report`` (images) and ``docs/report-audio`` (audio) were written by ``simvq compare``; rendering
their ``results.json`` again, with the figures that exist in their ``plots/`` folders, must give exactly
the committed ``report.md``. This pins the Markdown the renderer writes for both modalities.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simvq.compare import VARIANTS
from simvq.compare.report import render_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _figures(folder: Path) -> dict:
    """``{figure name: path relative to the report}`` for every PNG in the report's ``plots/`` folder."""
    return {p.stem: f"plots/{p.name}" for p in sorted((folder / "plots").glob("*.png"))}


@pytest.mark.parametrize("name", ["report", "report-audio"])
def test_committed_report_rerenders_byte_for_byte(name):
    folder = DOCS / name
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    expected = (folder / "report.md").read_text(encoding="utf-8")
    rendered = render_markdown(results, _figures(folder), VARIANTS)
    assert rendered == expected


def test_missing_figure_leaves_its_reference_out():
    folder = DOCS / "report"
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    figures = _figures(folder)
    figures.pop("retrofit")
    rendered = render_markdown(results, figures, VARIANTS)
    assert "plots/retrofit.png" not in rendered and "plots/loss_curves.png" in rendered
