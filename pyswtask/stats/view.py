"""The live view of ``pyswtask status``: snapshots (``pyswtask.stats``) drawn as rich tables and
redrawn every interval, with tasks/s taken from the difference of two snapshots.

It draws; reading the stats is ``pyswtask.stats``'s. Needs rich (``pyswtask[status]``).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Callable

from rich.console import Group
from rich.live import Live
from rich.table import Table

__all__ = ["live", "render"]

Snapshot = dict[str, Any]


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.1f} MiB"


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts).strftime("%H:%M:%S")


def render(snap: Snapshot, prev: Snapshot | None = None, dt: float = 1.0) -> Group:
    """One screen: the server, its processes, its queue and its crontab."""
    def rate(kind: str, i: int, key: str) -> str:
        if prev is None or dt <= 0:
            return "-"
        return f"{(snap[kind][i][key] - prev[kind][i][key]) / dt:.0f}"

    t = snap["tasks"]
    head = Table.grid(padding=(0, 2))
    head.add_row(f"master [bold]{snap['master_pid']}[/]",
                 f"up {snap['uptime']:.0f} s",
                 f"idle task workers {snap['idle_task_workers']}/{snap['task_worker_num']}",
                 f"run {t['run']}", f"failed {t['failed']}", f"lost {t['lost']}",
                 f"timed out {t['timed_out']}",
                 "respawns " + ", ".join(f"{k} {v}" for k, v in snap["respawns"].items() if v)
                 if any(snap["respawns"].values()) else "no respawns")
    procs = Table(title="processes", expand=True)
    for col in ("id", "role", "pid", "state", "RSS", "tasks/s", "waiting", "done", "failed",
                "respawns"):
        procs.add_column(col, justify="left" if col in ("role", "state") else "right")
    for i, w in enumerate(snap["workers"]):
        procs.add_row(str(w["id"]), "worker", str(w["pid"] or "-"), w["state"], _mib(w["rss"]),
                      rate("workers", i, "delivered"), str(w["waiting"]), str(w["delivered"]),
                      "-", str(w["respawns"]))
    for i, tw in enumerate(snap["task_workers"]):
        state = tw["state"] if tw["state"] != "up" else "idle" if tw["idle"] else "busy"
        procs.add_row(str(tw["id"]), "task worker", str(tw["pid"] or "-"), state,
                      _mib(tw["rss"]), rate("task_workers", i, "run"),
                      "-" if tw["waiting"] is None else str(tw["waiting"]), str(tw["run"]),
                      str(tw["failed"]), str(tw["respawns"]))
    for p in snap["processes"]:
        procs.add_row(str(p["id"]), f"process {p['name']}", str(p["pid"] or "-"), p["state"],
                      _mib(p["rss"]), "-", "-", "-", "-", str(p["respawns"]))
    parts: list[Any] = [head, procs]
    if snap["queue"] is not None:
        q = snap["queue"]
        parts.append(f"message queue {q['msqid']}: {q['messages']} message(s), {q['bytes']} "
                     "bytes waiting")
    cron = snap["cron"]
    if cron is not None:
        jobs = Table(title=f"crontab: due {cron['due']}, run {cron['run']}, late {cron['late']}, "
                     f"skipped {cron['skipped']}, failed {cron['failed']}", expand=True)
        for col in ("rule", "task.method", "next", "last due", "last", "took ms", "runs",
                    "fails"):
            jobs.add_column(col)
        for j in cron["jobs"]:
            jobs.add_row(j["rule"], f"{j['task']}.{j['method']}", _when(j["next"]),
                         _when(j["last_due"]), j["last_status"] or "-",
                         f"{j['last_duration'] * 1000:.1f}" if j["last_status"] else "-",
                         str(j["runs"]), str(j["failures"]))
        parts.append(jobs)
    return Group(*parts)


def live(take: Callable[[], Snapshot], first: Snapshot, interval: float = 1.0) -> None:
    """Redraws every interval until ^C, or until take() raises (the server stopped)."""
    prev, snap, at = None, first, time.monotonic()
    with Live(render(snap), auto_refresh=False, screen=False) as view:
        while True:
            time.sleep(interval)
            now = time.monotonic()
            prev, snap, dt = snap, take(), now - at
            at = now
            view.update(render(snap, prev, dt), refresh=True)
