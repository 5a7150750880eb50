"""benchmarks/search_paths.py: it runs, compares every path's answer with the exact path's, and refuses bad shapes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from simvq.quantizers.search import resolve_search

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "search_paths.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_it_times_every_path_and_every_answer_agrees():
    proc = _run("--shapes", "2x40x8,17x300x24", "--rounds", "1", "--min-seconds", "0", "--split", "--threads", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and line.split("|")[1].strip()[0].isdigit()]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| tokens"))
    assert [r.split("|")[1].strip() for r in rows] == ["2 x 40 x 8", "17 x 300 x 24"]
    for row, shape in zip(rows, [(2, 40, 8), (17, 300, 24)]):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == resolve_search("auto", "cpu", torch.float32, *shape)
        assert len(cells) == len(header.strip("|").split("|"))
        assert not any(c.endswith("*") for c in cells[2:])  # every path gave the exact path's answer
        assert cells[2].endswith("(1.00x)")  # the exact path against itself


def test_a_bad_shape_is_one_line_and_exit_2():
    proc = _run("--shapes", "4x16")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "a shape is TOKENSxCODESxWIDTH" in proc.stderr.strip().splitlines()[-1]
