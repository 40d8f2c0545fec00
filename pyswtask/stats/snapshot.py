"""A server's stats as a plain dict, read from its shared memory (no message to the master):
``server.stats()`` inside the server, ``pyswtask.stats.read(...)`` from any program of the
same user, ``pyswtask status`` and the metrics on top of them.

The snapshot's keys:

- ``master_pid``, ``running`` (the master is alive), ``started`` (Unix time), ``uptime`` (s)
- ``worker_num``, ``task_worker_num``, ``idle_task_workers``
- ``tasks``: ``run``, ``failed`` (raised, or refused), ``lost`` (went down with a task worker),
  ``timed_out`` (the caller stopped waiting), all processes together; ``delivered``
- ``waiting``: tasks without a result, all workers together
- ``respawns``: count by cause (``signal``, ``exit_code``, ``recycled``, ``reload``,
  ``exited``); ``max_request_recycles``, ``task_max_request_recycles``
- ``queue``: None, or the message queue's ``msqid``, ``messages`` and ``bytes`` waiting
- ``cron``: None, or ``due``, ``run``, ``late``, ``skipped``, ``failed`` and ``jobs`` (per
  scheduled method: ``rule``, ``task``, ``method``, ``runs``, ``failures``, ``last_status``,
  ``last_due``, ``last_duration``, ``next``)
- ``workers``: per worker ``id``, ``pid``, ``state`` ("up"/"down"), ``started``, ``respawns``,
  ``rss`` (resident bytes), ``waiting``, ``delivered``, ``lost``, ``timed_out``
- ``task_workers``: per task worker ``id``, ``index``, ``pid``, ``state``, ``started``,
  ``respawns``, ``rss``, ``idle``, ``run``, ``failed``, ``waiting`` (tasks the workers sent
  it that it has not started), ``lost`` (the workers' tasks that went down with it),
  ``timed_out`` (the workers' tasks sent to it whose caller stopped waiting); ``waiting``,
  ``lost`` and ``timed_out`` are None in ``task_ipc_mode`` 3, where the queue picks the task
  worker (the totals are in ``tasks`` and ``workers``). Tasks that separate programs deliver
  through the queue are not in them.
- ``processes``: per user process ``id``, ``name``, ``pid``, ``state``, ``started``,
  ``respawns``, ``rss``
- ``task_methods``: per ``"name.method"``: ``ok``, ``failed``, ``seconds`` (sum of run times)
  and ``buckets`` (cumulative runs at or below each of ``duration_buckets``, then all)
- ``duration_buckets``: the histogram's upper bounds, seconds

Counters are totals over the life of the server: a respawned process's slot counts on.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from .. import sysv
from .._core import TW_BUSY
from ..counters import CAUSES, DURATION_BOUNDS, TASK_ROWS, StatsSegment, StatsUnreadable, attach
from ..errors import ServerNotRunning

__all__ = ["read", "snapshot", "StatsUnreadable", "resolve_key", "rss_bytes"]

_STATES = {0: "down", 1: "up"}
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int | None) -> int | None:
    """The resident memory of a process, from /proc/PID/statm; None when it is gone."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def resolve_key(*, pid_file: str | None = None, pid: int | None = None,
                key: int | None = None) -> int:
    """The stats segment's key from one of: the pid file, the master's pid, the key itself
    (the stats_shm_key setting). ServerNotRunning when the pid file names no server."""
    given = [v for v in (pid_file, pid, key) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of pid_file, pid and key")
    if key is not None:
        return key
    if pid_file is not None:
        try:
            with open(pid_file) as f:
                pid = int(f.read().split()[0])
        except FileNotFoundError:
            raise ServerNotRunning(f"no pid file {pid_file}: the server is not running") from None
        except (ValueError, IndexError):
            raise ServerNotRunning(f"the pid file {pid_file} holds no pid") from None
        except OSError as exc:
            raise StatsUnreadable(f"cannot read the pid file {pid_file}: {exc}") from None
    assert pid is not None
    return sysv.stats_key(pid)


def read(*, pid_file: str | None = None, pid: int | None = None,
         key: int | None = None) -> dict[str, Any]:
    """The snapshot (keys above) of a running server found by its pid file, its master's pid
    or its stats key. ServerNotRunning when there is no such server; StatsUnreadable when
    its stats cannot be read (permission, another layout)."""
    k = resolve_key(pid_file=pid_file, pid=pid, key=key)
    try:
        seg = attach(k)
    except LookupError:
        where = f"pid {pid}" if pid is not None else f"SysV key 0x{k:x}" if key is not None \
            else f"pid file {pid_file}"
        raise ServerNotRunning(f"no running pyswtask server ({where}): no stats segment at "
                               f"SysV key 0x{k:x}") from None
    try:
        master = int(seg.header["master_pid"])
        if pid is not None and master != pid:
            raise ServerNotRunning(f"no running pyswtask server with master pid {pid}")
        snap = snapshot(seg)
    finally:
        seg.close()
    if not snap["running"]:
        raise ServerNotRunning(f"the server of master pid {master} is gone (its stats segment "
                               "is left over)")
    return snap


def snapshot(seg: StatsSegment) -> dict[str, Any]:
    """The stats in the segment, as a plain dict (keys above)."""
    h = seg.header
    master = int(h["master_pid"])
    started = float(h["started"])
    w, t = seg.worker_num, seg.task_worker_num
    slots = seg.slots.copy()    # one pass over the shared memory, then read at leisure
    busy = bytes(seg.busy[:t])
    load = list(seg.load)
    sent = seg.sent.copy()
    lost = seg.lost.copy()
    timed_out = seg.timed_out.copy()
    # In mode 3 the queue picks the task worker: what waits for which one is not known.
    per_tw = int(h["task_ipc_mode"]) != 3
    workers, task_workers, processes = [], [], []
    for i, s in enumerate(slots):
        up = int(s["state"]) == 1
        common = {"id": i, "pid": int(s["pid"]) or None, "state": _STATES.get(int(s["state"]),
                  "?"), "started": float(s["started"]) or None, "respawns": int(s["respawns"]),
                  "rss": rss_bytes(int(s["pid"])) if up else None}
        if i < w:
            workers.append({**common, "waiting": load[i], "delivered": int(sent[i].sum()),
                            "lost": int(s["lost"]), "timed_out": int(s["timed_out"])})
        elif i < w + t:
            # Sent to it, less started by it (tasks sent again after a death count once).
            waiting = max(0, int(sent[:, i - w].sum()) - int(s["tasks_started"])) \
                if per_tw else None
            task_workers.append({**common, "index": i - w, "idle": not busy[i - w] & TW_BUSY,
                                 "run": int(s["tasks_run"]), "failed": int(s["tasks_failed"]),
                                 "waiting": waiting,
                                 "lost": int(lost[:, i - w].sum()) if per_tw else None,
                                 "timed_out": int(timed_out[:, i - w].sum()) if per_tw
                                 else None})
        else:
            processes.append({**common, "name": bytes(s["name"]).decode(errors="replace")})
    return {
        "master_pid": master,
        "running": sysv.pid_alive(master),
        "started": started,
        "uptime": max(0.0, time.time() - started),
        "worker_num": w,
        "task_worker_num": t,
        "idle_task_workers": sum(1 for tw in task_workers if tw["idle"] and tw["state"] == "up"),
        "tasks": {"run": int(slots["tasks_run"].sum()), "failed": int(slots["tasks_failed"].sum()),
                  "lost": int(slots["lost"].sum()), "timed_out": int(slots["timed_out"].sum())},
        "delivered": int(sent.sum()),
        "waiting": sum(load),
        "respawns": {cause: int(n) for cause, n in zip(CAUSES, h["respawns"])},
        "max_request_recycles": int(h["max_request_recycles"]),
        "task_max_request_recycles": int(h["task_max_request_recycles"]),
        "queue": _queue(int(h["queue_msqid"])),
        "cron": _cron(int(h["cron_key"]), bytes(h["timezone"]).decode() or None, slots),
        "workers": workers,
        "task_workers": task_workers,
        "processes": processes,
        "task_methods": _methods(seg),
        "duration_buckets": list(DURATION_BOUNDS),
    }


def _methods(seg: StatsSegment) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    rows = seg.rows.copy()
    for tw in range(rows.shape[0]):
        for i in range(TASK_ROWS):
            r = rows[tw, i]
            name = bytes(r["name"]).decode(errors="replace")
            if i == TASK_ROWS - 1:
                name = "other"
            elif not name:
                break
            if not r["ok"] and not r["failed"]:
                continue
            m = out.setdefault(name, {"ok": 0, "failed": 0, "seconds": 0.0,
                                      "buckets": [0] * (len(DURATION_BOUNDS) + 1)})
            m["ok"] += int(r["ok"])
            m["failed"] += int(r["failed"])
            m["seconds"] += float(r["seconds"])
            m["buckets"] = [a + int(b) for a, b in zip(m["buckets"], r["buckets"])]
    for m in out.values():
        m["buckets"] = [int(v) for v in np.cumsum(m["buckets"])]
    return out


def _queue(msqid: int) -> dict[str, int] | None:
    if msqid < 0:
        return None
    try:
        with open("/proc/sysvipc/msg") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1]) == msqid:
                    return {"msqid": msqid, "messages": int(fields[4]), "bytes": int(fields[3])}
    except (OSError, ValueError, IndexError):
        pass
    return {"msqid": msqid, "messages": 0, "bytes": 0}


def _cron(key: int, tz: str | None, slots: np.ndarray) -> dict[str, Any] | None:
    if key < 0:
        return None
    from .._core import RunStatus
    from ..cron import attach as cron_attach
    from ..cron import next_times

    out: dict[str, Any] = {"due": int(slots["cron_due"].sum()), "run": 0,
                           "late": int(slots["cron_late"].sum()),
                           "skipped": int(slots["cron_skipped"].sum()), "failed": 0, "jobs": []}
    try:
        origin, _runs, segments = cron_attach(key)
    except LookupError:
        return out
    try:
        for r in origin.rows():
            out["run"] += r["run_count"]
            out["failed"] += r["fail_count"]
            try:
                nxt: float | None = next_times(r["rule"], 1, tz)[0].timestamp()
            except ValueError:
                nxt = None
            out["jobs"].append({
                "job": r["job"], "rule": r["rule"], "task": r["task"], "method": r["method"],
                "runs": r["run_count"], "failures": r["fail_count"],
                "last_status": RunStatus(r["last_status"]).name if r["last_due"] >= 0 else None,
                "last_due": r["last_due"] if r["last_due"] >= 0 else None,
                "last_duration": r["last_duration"], "next": nxt})
    finally:
        del origin, _runs       # they hold views of the segments
        for shm in segments:
            shm.detach()
    return out
