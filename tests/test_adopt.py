"""docs/adopt.md's Python snippets are run as they are written, and its command lines are parsed by the CLI:
a snippet that stops working fails here."""

import re
import shlex
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "adopt.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)
COMMANDS = [line for block in re.findall(r"```bash\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)
            for line in block.splitlines() if line.startswith("simvq ")]


def test_adopt_page_has_a_snippet_per_path():
    # new run (this library, taming style, vector-quantize-pytorch style) and a trained model (retrofit)
    assert len(SNIPPETS) >= 4
    text = "\n".join(SNIPPETS)
    for name in ("SimVQ(", "TamingSimVQ(", "VectorQuantizeSimVQ(", "retrofit(model, dead_codes="):
        assert name in text


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_adopt_snippet_runs(index, capsys):
    # the real third-party classes (scripts/install.sh installs both)
    for module, package in (("taming.modules.vqvae.quantize", "from taming"), ("vector_quantize_pytorch", "from vector_quantize_pytorch")):
        if package in SNIPPETS[index]:
            pytest.importorskip(module)
    exec(compile(SNIPPETS[index], f"docs/adopt.md snippet {index}", "exec"), {"__name__": "__adopt__"})


def test_adopt_page_command_lines_parse():
    # the three paths: retrofit + train on (path 2), compare on your data (path 3)
    from simvq.cli import _build_parser

    assert {shlex.split(c)[1] for c in COMMANDS} >= {"retrofit", "train", "compare"}
    parser = _build_parser()
    for command in COMMANDS:
        args = parser.parse_args(shlex.split(command, comments=True)[1:])  # an unknown option exits here
        assert args.command == shlex.split(command)[1]
