"""The command line starts, reports its version and prints help (run as a separate process)."""

from __future__ import annotations

import subprocess
import sys

import simvq


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simvq.cli", *args], capture_output=True, text=True, timeout=120)


def test_version():
    proc = _run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"simvq {simvq.__version__}"


def test_help():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: simvq")
    assert "--version" in proc.stdout

