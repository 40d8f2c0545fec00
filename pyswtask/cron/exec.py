"""The ``cronExec`` user process: sleeps until just before the next due second (``LEAD``),
claims the due rows of the run-time table and delivers them to the task workers through a
worker; each run waits in its task worker for its second (``runner``).

A row whose second passed while it was late is still delivered within ``cron_grace`` seconds,
else marked skipped and logged; a row is claimed once, so it is never delivered twice. A job with
``overlap=False`` whose previous run is in flight is skipped here.

It must not write rows (that is ``timer``) nor run the scheduled method (that is ``runner``, in a
task worker).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from .. import roles
from .._core import OriginTable, RunStatus, RunTable
from ..envelope import ORIGIN_CRON
from .rules import Job
from .runner import CRON_TASK
from .tables import CronTables

if TYPE_CHECKING:
    from ..roles import Process, ServerHandle
    from ..stats.segment import StatsSegment

__all__ = ["EXEC_PROCESS", "CronExec"]

log = logging.getLogger("pyswtask.cron")

EXEC_PROCESS = "cronExec"

# A run is delivered this long before its second and waits in its task worker for the second
# itself (runner.run): the hops exec -> worker -> task worker take about a millisecond, which
# would otherwise be added to every run's start.
LEAD = 0.002


class CronExec:
    """What the cronExec process runs; built in the master, run after the fork."""

    def __init__(self, jobs: list[Job], tables: CronTables, grace: int) -> None:
        self.jobs = jobs
        self.tables = tables
        self.grace = grace

    def main(self, server: ServerHandle, proc: Process) -> None:
        """The process body: claims and delivers due rows until the server stops it."""
        origin, runs = self.tables.get()
        stats, slot = server.stats_segment, roles.current().worker_id
        while True:
            now = time.time()
            due, skipped = runs.claim_due(int(now + LEAD), self.grace)
            for _row, job, sec in skipped:
                log.warning("crontab: run of %s.%s due at %d skipped: more than %d s late",
                            self.jobs[job].task, self.jobs[job].method, sec, self.grace)
            if stats is not None and (due or skipped):
                # Late: claimed a whole second or more after its due second.
                stats.add(slot, "cron_due", len(due) + len(skipped))
                stats.add(slot, "cron_late", sum(1 for _r, _j, sec in due if now - sec >= 1.0))
                stats.add(slot, "cron_skipped", len(skipped))
            if due:
                self._deliver(origin, runs, due, stats, slot)
            self._sleep_to_next(proc, runs)

    def _deliver(self, origin: OriginTable, runs: RunTable, due: list[tuple[int, int, int]],
                 stats: StatsSegment | None = None, slot: int = -1) -> None:
        """Delivers the runs due together in one pipe message, so that they leave the worker
        together and the last of them does not wait for a hop per run before it."""
        going = []
        for row, job, sec in due:
            if origin.begin(job):
                going.append((row, job, sec))
            else:
                runs.set_status(row, RunStatus.SKIPPED)
                if stats is not None:
                    stats.add(slot, "cron_skipped")
                log.info("crontab: run of %s.%s due at %d skipped: the previous one is still "
                         "running (overlap=False)", self.jobs[job].task, self.jobs[job].method, sec)
        if not going:
            return
        # DELIVERED before the send, not after: a run that fails at once in its task worker
        # writes FAILED, and a DELIVERED written once the send returned would hide it.
        now = time.time()
        for row, _job, _sec in going:
            runs.set_status(row, RunStatus.DELIVERED, now)
        try:
            roles.current().deliver_many_by_process([(CRON_TASK, "run", [row, job, sec])
                                                     for row, job, sec in going],
                                                    origin_role=ORIGIN_CRON)
        except Exception as exc:
            for row, job, sec in going:
                log.error("crontab: run of %s.%s due at %d not delivered: %s",
                          self.jobs[job].task, self.jobs[job].method, sec, exc)
                runs.set_status(row, RunStatus.FAILED)
                origin.finish(job, sec, RunStatus.FAILED, 0.0)
            return

    @staticmethod
    def _sleep_to_next(proc: Process, runs: RunTable) -> None:
        """Until LEAD before the next due second, or 0.5 s at most; a 'rows written' message
        wakes it."""
        now = time.time()
        nxt = runs.next_due()
        wake = now + 0.5 if nxt is None else min(nxt - LEAD, now + 0.5)
        left = wake - now
        if left > 0.003:
            # poll() counts in whole milliseconds: sleep the last stretch with nanosleep.
            proc.read_messages(left - 0.002)
            left = wake - time.time()
        if left > 0:
            time.sleep(left)
