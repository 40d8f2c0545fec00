"""The crontab's two tables in SysV shared memory: the origin table (a row per scheduled method)
and the run-time table (a row per due execution).

Owns their segments: creating them (mode 0600) in the master before it forks, checking that the
jobs fit, removing them at stop, and attaching to a running server's tables for inspection. The
record layout and locking are the compiled core's (``crontable.pyx``); keys come from ``sysv``.

It must not decide what is due or deliver anything (that is ``timer`` and ``exec``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import sysv_ipc  # type: ignore[import-not-found]

from .._core import OriginTable, RunTable, TableFull
from ..sysv import create_segment, default_key
from .rules import Job

__all__ = ["CronTables", "attach"]

log = logging.getLogger("pyswtask.cron")


class CronTables:
    """One server's origin and run-time tables; shared with the forked children as they are."""

    def __init__(self, jobs: list[Job], task_capacity: int, run_capacity: int,
                 key_base: int | None) -> None:
        if len(jobs) > task_capacity:
            raise TableFull(f"{len(jobs)} scheduled methods do not fit the origin table: "
                            f"raise the cron_task_capacity setting (now {task_capacity})")
        self.jobs = jobs
        self.task_capacity = task_capacity
        self.run_capacity = run_capacity
        self.key_base = key_base
        self.segments: list[Any] = []
        self.key = -1                   # the origin table's, once open
        self._tables: tuple[OriginTable, RunTable] | None = None

    def open(self, master_pid: int) -> None:
        """Creates both tables before the fork and fills the origin table."""
        base = self.key = self.key_base if self.key_base is not None else default_key(master_pid)
        origin_shm = create_segment(base, OriginTable.nbytes(self.task_capacity),
                                    setting="cron_shm_key", what="crontab", logger=log)
        self.segments.append(origin_shm)
        run_shm = create_segment(base + 1, RunTable.nbytes(self.run_capacity),
                                 setting="cron_shm_key", what="crontab", logger=log)
        self.segments.append(run_shm)
        origin = OriginTable(memoryview(origin_shm), create=True, capacity=self.task_capacity)
        runs = RunTable(memoryview(run_shm), create=True, capacity=self.run_capacity)
        now = int(time.time())
        for job in self.jobs:
            origin.add(job.rule, job.task, job.method, now, job.overlap)
        self._tables = (origin, runs)
        log.info("crontab: %d scheduled method(s), tables at SysV keys 0x%x and 0x%x",
                 len(self.jobs), base, base + 1)

    def close(self) -> None:
        """Detaches and removes both segments (the master, at stop)."""
        self._tables = None
        for shm in self.segments:
            try:
                shm.detach()
                shm.remove()
            except sysv_ipc.Error:
                pass
        self.segments = []

    def get(self) -> tuple[OriginTable, RunTable]:
        """Both tables; RuntimeError before open or after close."""
        if self._tables is None:
            raise RuntimeError("the crontab is not on in this server (Server(cron=True))")
        return self._tables


def attach(key: int) -> tuple[OriginTable, RunTable, list[Any]]:
    """The tables of a running server, for inspection (``pyswtask cron show``)."""
    try:
        segments = [sysv_ipc.SharedMemory(key), sysv_ipc.SharedMemory(key + 1)]
    except sysv_ipc.ExistentialError:
        raise LookupError(f"no crontab tables at SysV keys 0x{key:x}/0x{key + 1:x}: is the "
                          "server running with cron=True?") from None
    return OriginTable(memoryview(segments[0])), RunTable(memoryview(segments[1])), segments
