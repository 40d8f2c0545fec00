"""Where perf/run.py and perf/report.py write: never over the committed run by default."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PERF = ROOT / "perf"
COMMITTED = PERF / "results" / "latest.jsonl"

# The suite also runs from an installed wheel, outside the tree: no perf/ there.
pytestmark = pytest.mark.skipif(not (PERF / "run.py").is_file(), reason="no perf/ next to the tests")


def test_run_writes_a_new_ignored_file_unless_out_names_one() -> None:
    # In a child: run.py puts perf/ first on sys.path for its own modules.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import run; "
            "print(run.output_path(None)); print(run.output_path(sys.argv[2]))")
    out = subprocess.run([sys.executable, "-c", code, str(PERF), str(COMMITTED)], capture_output=True,
                         text=True, timeout=60, check=True).stdout.split("\n")
    default, chosen = Path(out[0]), Path(out[1])
    assert default.parent == PERF / "results" / "local"
    assert default.name.startswith("run-") and default.suffix == ".jsonl"
    assert chosen == COMMITTED, "--out perf/results/latest.jsonl must still replace the committed run"
    if (ROOT / ".git").exists() and shutil.which("git"):
        ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(default)],
                                 timeout=30)
        assert ignored.returncode == 0, f"{default} would show up as a new file to commit"
    help_text = subprocess.run([sys.executable, str(PERF / "run.py"), "--help"], capture_output=True,
                               text=True, timeout=60, check=True).stdout
    assert "perf/results/local/run-*.jsonl" in help_text


def test_report_of_another_run_goes_beside_it(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("perf_report", PERF / "report.py")
    assert spec is not None and spec.loader is not None
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert report.default_outputs(str(COMMITTED)) == (str(PERF / "RESULTS.md"),
                                                      str(PERF / "results.png"))
    run = tmp_path / "run-20260101T000000Z.jsonl"
    assert report.default_outputs(str(run)) == (str(tmp_path / "run-20260101T000000Z.md"),
                                                str(tmp_path / "run-20260101T000000Z.png"))
