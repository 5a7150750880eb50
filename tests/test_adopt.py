"""docs/adopt.md's Python snippets are run as they are written: a snippet that stops working fails here."""

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "adopt.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)


def test_adopt_page_has_a_snippet_per_path():
    # new run (this library, taming style, vector-quantize-pytorch style) and a trained model (retrofit)
    assert len(SNIPPETS) >= 4
    text = "\n".join(SNIPPETS)
    for name in ("SimVQ(", "TamingSimVQ(", "VectorQuantizeSimVQ(", "retrofit(model, dead_codes="):
        assert name in text


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_adopt_snippet_runs(index, capsys):
    exec(compile(SNIPPETS[index], f"docs/adopt.md snippet {index}", "exec"), {"__name__": "__adopt__"})
