"""Lint and type checks, run as tests so that CI fails on them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# These check the source tree; a copy of the tests run against an installed wheel has none.
pytestmark = pytest.mark.skipif(not (ROOT / "pyswtask" / "_core.pyx").is_file(),
                                reason="no source tree next to the tests")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_ruff() -> None:
    result = run("ruff", "check", "pyswtask", "tests", "perf", "examples")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_on_the_package_and_the_demo() -> None:
    result = run("mypy", "--strict", "pyswtask", "examples/demo.py", "examples/http_app.py",
                 "examples/fastapi_app.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_layers_hold() -> None:
    """The import-linter contracts of pyproject.toml: no module imports a layer above its own,
    and the roles stand on their shared base only."""
    result = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_only_the_core_speaks_the_wire_format() -> None:
    """Frames, fragments and their constants belong to the compiled core: no Python module of
    the package builds or parses frame bytes itself."""
    wire = re.compile(r"\b(FRAME_[A-Z]+|FLAG_[A-Z_]+|HEADER_SIZE|pack_frame|parse_frames)\b")
    offenders = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
                 for path in sorted((ROOT / "pyswtask").rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if wire.search(line)]
    assert not offenders, "\n".join(offenders)
