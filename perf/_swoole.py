"""Runs the Swoole side of a workload (perf/swoole/*.php) when PHP and the swoole extension
are installed; says so in one line when they are not."""

from __future__ import annotations

import json
import os
import shutil
import signal
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


TMPFS_DIR = "/dev/shm"
_tmpfs: list[str | None] = []


def tmpfs_dir() -> str | None:
    """A tmpfs directory for Swoole's task_tmpdir (the swoole_tmpfs variant of the large-body
    workloads), or None (printing why, once, to stderr)."""
    if not _tmpfs:
        _tmpfs.append(_tmpfs_probe(TMPFS_DIR))
        if _tmpfs[0] is None:
            print(f"swoole_tmpfs: {TMPFS_DIR} is not a writable tmpfs; the Swoole variant with "
                  "task_tmpdir on a tmpfs is skipped", file=sys.stderr, flush=True)
    return _tmpfs[0]


def _tmpfs_probe(path: str) -> str | None:
    try:
        with open("/proc/mounts") as f:
            mounts = {fields[1]: fields[2] for fields in (ln.split() for ln in f) if len(fields) > 2}
    except OSError:
        return None
    if mounts.get(path) != "tmpfs" or not os.access(path, os.W_OK | os.X_OK):
        return None
    return path


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
    """The JSON lines a script printed; [] when Swoole is missing or the script failed. The
    script and every process its server forked run in a process group of their own, which is
    killed when the script has exited or timed out (nothing is left behind)."""
    if version() is None:
        return []
    proc = subprocess.Popen(["php", os.path.join(HERE, script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=os.setpgrp)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"swoole: {script} {' '.join(args)} timed out", file=sys.stderr)
        return []
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    good = [r for r in rows if r.get("value") is not None]
    if proc.returncode != 0 or len(good) < len(rows) or not rows:
        print(f"swoole: {script} {' '.join(args)} failed (exit {proc.returncode}): "
              f"{stderr.strip()[-300:]}", file=sys.stderr)
    return good


def renamed(rows: list[dict[str, Any]], names: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    """Rows with workload w renamed to names[w] = (workload, system), so that a Swoole result
    pairs with pyswtask's of the same workload (e.g. co_roundtrip_taskco -> co_roundtrip,
    "swoole taskCo"). Workloads not named keep theirs."""
    out = []
    for r in rows:
        workload, system = names.get(r["workload"], (r["workload"], r["system"]))
        out.append(dict(r, workload=workload, system=system, swoole_workload=r["workload"]))
    return out
