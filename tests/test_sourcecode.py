"""Lint and type checks, run as tests so that CI fails on them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_ruff() -> None:
    result = run("ruff", "check", "pyswtask", "tests", "perf", "examples")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_on_the_package_and_the_demo() -> None:
    result = run("mypy", "--strict", "pyswtask", "examples/demo.py")
    assert result.returncode == 0, result.stdout + result.stderr
