"""The sdist carries everything a build needs, and a build without a compiler says so."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not (ROOT / "pyswtask" / "_core.pyx").is_file(),
                                reason="no source tree next to the tests")


def tracked(pattern: str) -> set[str]:
    return {str(p.relative_to(ROOT)) for p in ROOT.glob(pattern)}


def test_the_sdist_holds_every_file_the_build_needs(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation",
                          "--outdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (sdist,) = tmp_path.glob("pyswtask-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = (tracked("pyswtask/*.py") | tracked("pyswtask/*/*.py")
              | tracked("pyswtask/core/*.pyx") | tracked("pyswtask/core/*.pxd")
              | tracked("pyswtask/includes/*.pxd")
              | {"pyswtask/_core.pyx", "pyswtask/_core.pxd", "pyswtask/_core.pyi",
                 "pyswtask/py.typed", "setup.py", "pyproject.toml", "README.md", "MANIFEST.in"})
    assert needed <= names, f"missing from the sdist: {sorted(needed - names)}"
    generated = [n for n in names if n.endswith((".c", ".so", ".html"))]
    assert not generated, f"generated files in the sdist: {generated}"


def test_building_without_a_compiler_says_so() -> None:
    env = dict(os.environ, CC="/nonexistent/cc")
    out = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp",
                          "build/no-compiler"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0
    assert "building pyswtask needs a C compiler, and '/nonexistent/cc' was not found" in out.stderr
