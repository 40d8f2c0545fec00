"""Runs the Swoole side of a workload (perf/swoole/*.php) when PHP and the swoole extension
are installed; says so in one line when they are not."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "swoole")
_checked: list[str | None] = []


def version() -> str | None:
    """The swoole extension's version, or None (printing why, once, to stderr)."""
    if not _checked:
        _checked.append(_probe())
        if _checked[0] is None:
            print("swoole: not installed (`php --ri swoole` failed); Swoole workloads skipped "
                  "(perf/swoole/README.md says how to install it)", file=sys.stderr, flush=True)
    return _checked[0]


def _probe() -> str | None:
    if shutil.which("php") is None:
        return None
    try:
        out = subprocess.run(["php", "--ri", "swoole"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    for line in out.stdout.splitlines():
        if line.strip().lower().startswith("version"):
            return line.split("=>")[-1].strip()
    return "unknown"


def run(script: str, *args: str, timeout: float = 300.0) -> list[dict[str, Any]]:
    """The JSON lines a script printed; [] when Swoole is missing or the script failed."""
    if version() is None:
        return []
    try:
        out = subprocess.run(["php", os.path.join(HERE, script), *args], capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"swoole: {script} {' '.join(args)} timed out", file=sys.stderr)
        return []
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    good = [r for r in rows if r.get("value") is not None]
    if out.returncode != 0 or len(good) < len(rows) or not rows:
        print(f"swoole: {script} {' '.join(args)} failed (exit {out.returncode}): "
              f"{out.stderr.strip()[-300:]}", file=sys.stderr)
    return good
