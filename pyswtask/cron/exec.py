"""The ``cronExec`` user process: sleeps until just before the next due second (``LEAD``),
claims the due rows of the run-time table and delivers them to the task workers through a
worker; each run waits in its task worker for its second (``runner``).

A row whose second passed while it was late is still delivered within ``cron_grace`` seconds,
else marked skipped and logged; a row is claimed once, so it is never delivered twice. A job with
``overlap=False`` whose previous run is in flight is skipped here. Rows of once-per-cluster jobs
go through the race for their lease (``race``) and are delivered only where it is won; local
rows are delivered first, so a slow Redis does not hold them.

It must not write rows (that is ``timer``) nor run the scheduled method (that is ``runner``, in a
task worker).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import roles
from .._core import OriginTable, RunStatus, RunTable
from ..envelope import ORIGIN_CRON
from .race import ClusterRace
from .rules import Job
from .runner import CRON_TASK
from .tables import CronTables

if TYPE_CHECKING:
    from ..counters import StatsSegment
    from ..roles import Process, ServerHandle
    from .lease import ClusterLeases

__all__ = ["EXEC_PROCESS", "CronExec"]

log = logging.getLogger("pyswtask.cron")

EXEC_PROCESS = "cronExec"

# A run is delivered this long before its second and waits in its task worker for the second
# itself (runner.run): the hops exec -> worker -> task worker take about a millisecond on an
# idle machine and a few when the cores are busy, which would otherwise be added to every run's
# start.
LEAD = 0.004

# The runs of one second whose jobs are known to be quick (their last run took under QUICK_RUN)
# go to one task worker together, up to PILE_BUDGET of their last run times a pile: it runs
# them one after another as its second comes. Spread over the task workers, every one of them
# waits for the second (spinning its last stretch, see runner), which leaves no core free for
# anything else and gets one of them preempted for a scheduler slice (a millisecond or more)
# as the runs should start. Runs of other jobs, and of jobs not run yet, are spread as before.
QUICK_RUN = 0.0005
PILE_BUDGET = 0.001

# A due run: (its row in the run-time table, its job, its second, its lease or None).
Run = tuple[int, int, int, "str | None"]


class CronExec:
    """What the cronExec process runs; built in the master, run after the fork."""

    def __init__(self, jobs: list[Job], tables: CronTables, grace: int) -> None:
        self.jobs = jobs
        self.tables = tables
        self.grace = grace
        # Set by the crontab when some job runs once per cluster.
        self.leases: ClusterLeases | None = None
        self.race: ClusterRace | None = None

    def main(self, server: ServerHandle, proc: Process) -> None:
        """The process body: claims and delivers due rows until the server stops it."""
        origin, runs = self.tables.get()
        stats, slot = server.stats_segment, roles.current().worker_id
        if self.leases is not None:
            self.race = ClusterRace(self.leases, self.jobs, runs, self.grace)
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
            if self.race is not None:
                self.race.join([d for d in due if self.jobs[d[1]].cluster])
                due = [d for d in due if not self.jobs[d[1]].cluster]
            if due:
                self._deliver(origin, runs, [(row, job, sec, None) for row, job, sec in due],
                              stats, slot)
            if self.race:
                won = self.race.step(now)
                if won:
                    self._deliver(origin, runs, won, stats, slot)
            self._sleep_to_next(proc, runs)

    def _deliver(self, origin: OriginTable, runs: RunTable, due: Sequence[Run],
                 stats: StatsSegment | None = None, slot: int = -1) -> None:
        """Delivers the runs due together in one pipe message, the quick ones in piles (see
        QUICK_RUN), so that they leave the worker together and the last of them does not wait
        for a hop per run before it. A run won in the cluster carries its lease value, under
        which its runner starts it."""
        going: list[Run] = []
        for row, job, sec, lease in due:
            if origin.begin(job):
                going.append((row, job, sec, lease))
                continue
            runs.set_status(row, RunStatus.SKIPPED)
            if stats is not None:
                stats.add(slot, "cron_skipped")
            log.info("crontab: run of %s.%s due at %d skipped: the previous one is still "
                     "running (overlap=False)", self.jobs[job].task, self.jobs[job].method, sec)
            if lease is not None:
                self._settle_skipped(row, job, sec, lease)
        if not going:
            return
        # DELIVERED before the send, not after: a run that fails at once in its task worker
        # writes FAILED, and a DELIVERED written once the send returned would hide it.
        now = time.time()
        for row, _job, _sec, _lease in going:
            runs.set_status(row, RunStatus.DELIVERED, now)
        # One message: the worker picks a task worker for each pile and spreads the rest in
        # one turn, before any task worker has read its share and turned busy.
        piles, spread = self._piles(origin, going)
        self._send(origin, runs, [run for pile in piles for run in pile] + spread,
                   [len(pile) for pile in piles])

    @staticmethod
    def _piles(origin: OriginTable, going: list[Run]) -> tuple[list[list[Run]], list[Run]]:
        """(piles of quick runs, each for one task worker; the other runs). A cluster run
        never piles: it asks Redis before its second, which the runs before it would delay."""
        piles: list[list[Run]] = []
        spread: list[Run] = []
        total = 0.0
        for run in going:
            took = origin.last_duration(run[1]) if run[3] is None else None
            if took is None or took >= QUICK_RUN:
                spread.append(run)
                continue
            if not piles or total + took > PILE_BUDGET:
                piles.append([])
                total = 0.0
            piles[-1].append(run)
            total += took
        return piles, spread

    def _send(self, origin: OriginTable, runs: RunTable, going: list[Run],
              piles: list[int]) -> None:
        try:
            roles.current().deliver_many_by_process([
                (CRON_TASK, "run", [row, job, sec] if lease is None else [row, job, sec, lease])
                for row, job, sec, lease in going], origin_role=ORIGIN_CRON, piles=piles)
        except Exception as exc:
            for row, job, sec, lease in going:
                log.error("crontab: run of %s.%s due at %d not delivered: %s",
                          self.jobs[job].task, self.jobs[job].method, sec, exc)
                runs.set_status(row, RunStatus.FAILED)
                origin.finish(job, sec, RunStatus.FAILED, 0.0)
                if self.race is not None and lease is not None:
                    # Its lease expires unstarted: another node takes the run.
                    self.race.drop(row)

    def _settle_skipped(self, row: int, job: int, sec: int, lease: str) -> None:
        """A won run skipped for overlap=False is settled in Redis too, so that no other node
        takes it when the lease expires."""
        assert self.leases is not None and self.race is not None
        self.race.drop(row)
        try:
            self.leases.start(self.jobs[job].name, sec, lease, state="skipped")
        except Exception as exc:
            log.warning("crontab: skipped run of %s due at %d not recorded in the cluster: %s",
                        self.jobs[job].name, sec, exc)

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
