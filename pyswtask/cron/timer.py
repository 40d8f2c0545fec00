"""The ``cronTimer`` user process: writes each minute's due rows into the run-time table a
second and a half before the minute starts, aligned to the wall clock (and at start-up, the
rest of the current minute from the next whole second), frees finished rows, and wakes the exec
process when it wrote rows.

It must not deliver or run anything: rows are claimed and delivered by ``exec`` alone, so that a
run is delivered once.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING

from .. import roles
from .._core import RunStatus
from .exec import EXEC_PROCESS
from .rules import Job, due_seconds, minute_start
from .tables import CronTables

if TYPE_CHECKING:
    from ..roles import Process, ServerHandle

__all__ = ["TIMER_PROCESS", "CronTimer"]

log = logging.getLogger("pyswtask.cron")

TIMER_PROCESS = "cronTimer"
# Finished rows stay this long for inspection; unfinished ones this long before they count as
# lost (their task worker died, say).
KEEP_FINISHED = 120
STALE_AFTER = 3600
# The minute's rows are written this long before it: in the middle of a second, away from the
# runs, which start at whole seconds. At a whole second the fill's burst of work (every rule's
# due seconds, a row each) took a core from task workers running that second's runs, and
# started them 2-3 ms late once a minute.
FILL_AHEAD = 1.5


class CronTimer:
    """What the cronTimer process runs; built in the master, run after the fork."""

    def __init__(self, jobs: list[Job], tables: CronTables, tz: tzinfo, grace: int) -> None:
        self.jobs = jobs
        self.tables = tables
        self.tz = tz
        self.grace = grace

    def main(self, server: ServerHandle, proc: Process) -> None:
        """The process body: fills minute after minute until the server stops it."""
        now = time.time()
        # A fresh server starts with the next whole second: the one under way began before
        # anything could run it, and running it now would be up to a second late (two runs of
        # an every-second rule in one wall-clock second, a */2 rule starting at an odd one). A
        # respawned timer (the table has rows) also writes the seconds it missed, within the
        # grace period: they are delivered late, once (rows are unique per job and second).
        _, runs = self.tables.get()
        since = int(now) + 1 if runs.used == 0 else int(now) - self.grace
        self.fill(minute_start(now), max(since, minute_start(now)))
        next_minute = minute_start(now) + 60
        while True:
            # Ahead, so the rows of second 0 are there before it comes.
            self._sleep_until(proc, next_minute - FILL_AHEAD)
            now = time.time()
            if now >= next_minute + 60:
                # The clock jumped forward (or we were stopped): catch up from the current
                # minute; what lies between is past the grace period anyway.
                next_minute = minute_start(now)
            self.fill(next_minute, next_minute)
            self.clean(now)
            next_minute += 60

    def fill(self, minute: int, from_sec: int) -> int:
        """Writes the due rows of one minute, from from_sec on; returns how many were new."""
        _, runs = self.tables.get()
        stamp = datetime.fromtimestamp(minute, self.tz).strftime("%Y%m%d%H%M")
        added = full = 0
        for job_id, job in enumerate(self.jobs):
            for sec in due_seconds(job.expr, minute, self.tz):
                if sec < from_sec:
                    continue
                row = runs.insert(job_id, job.task, job.method, stamp, sec)
                if row >= 0:
                    added += 1
                elif row == -1:
                    full += 1
        if full:
            log.error("crontab: run-time table full: %d due run(s) of minute %s not recorded "
                      "(%d dropped in all); raise the cron_run_capacity setting (now %d)",
                      full, stamp, runs.dropped, runs.capacity)
        if added:
            self._wake_exec()
        return added

    def clean(self, now: float) -> None:
        """Frees finished rows past KEEP_FINISHED; logs and fails unfinished ones past
        STALE_AFTER."""
        origin, runs = self.tables.get()
        for _row, job, sec, status in runs.clean(int(now) - KEEP_FINISHED, int(now) - STALE_AFTER):
            log.error("crontab: run of %s.%s due at %d never finished (last status %s); "
                      "dropped", self.jobs[job].task, self.jobs[job].method, sec,
                      RunStatus(status).name)
            origin.finish(job, sec, RunStatus.FAILED, 0.0)

    def _wake_exec(self) -> None:
        server = roles.current().server
        if server is not None:
            exec_id = server.process_id(EXEC_PROCESS)
            if exec_id is not None:
                try:
                    server.send_message(None, exec_id, type="cron.rows", timeout=0.5)
                except Exception as exc:  # the exec process wakes every 0.5 s anyway
                    log.debug("crontab: could not wake the exec process: %s", exc)

    @staticmethod
    def _sleep_until(proc: Process, wall: float) -> None:
        while (left := wall - time.time()) > 0:
            proc.read_messages(min(left, 1.0))
