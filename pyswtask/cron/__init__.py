"""The crontab: ``@scheduled`` task methods run at one-second precision (Swoft's crontab, fixed).

Design, as in Swoft: two shared-memory tables created by the master before it forks (the
origin table, a row per scheduled method; the run-time table, a row per due execution), and two
user processes that share them without messages:

- ``cronTimer`` (``timer``) writes each minute's due rows 1.5 s before the minute starts
  (mid-second, away from the runs), aligned to the wall clock (and at start-up, the rest of the
  current minute from the next whole second), and frees finished rows;
- ``cronExec`` (``exec``) sleeps until just before the next due second, claims the due rows
  and delivers them to the task workers, the runs of jobs known to be quick together to one
  task worker. A row whose second passed while it was late is still delivered within
  ``cron_grace`` seconds, else marked skipped and logged; a row is claimed once, so it is
  never delivered twice.

The task runs in a task worker inside a small wrapper (``runner``) that writes running / done /
failed and the duration back into both tables. Rules and zones are in ``rules``; the tables'
segments in ``tables``; their SysV keys in ``pyswtask.sysv``.

Once per cluster (``@scheduled(once_per_cluster=True)``, or ``cron_cluster=True`` for every
rule): each node computes its due runs as above, and the exec processes race for a lease in
Redis per (rule, due second); one node runs it. The Redis side is ``lease``, the exec process's
side ``race``.

This module holds ``Crontab``, the master's handle that ties them together, and re-exports what
callers use. The package must not import ``pyswtask.server`` or ``pyswtask.master`` at run time:
they sit above it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._core import OriginTable, RunTable
from ..cluster.node import node_name
from ..process import ProcessSpec
from ..sysv import DEFAULT_KEY_BASE, default_key
from .exec import EXEC_PROCESS, CronExec
from .lease import ClusterLeases, recent_runs
from .rules import (
    CronRuleError,
    Job,
    collect_jobs,
    due_seconds,
    minute_start,
    next_times,
    normalize_rule,
    scheduled,
    zone,
)
from .runner import CRON_TASK, CronRunner, due_second
from .tables import CronTables, attach
from .timer import TIMER_PROCESS, CronTimer

if TYPE_CHECKING:
    from ..roles import ServerHandle

__all__ = ["scheduled", "CronRuleError", "normalize_rule", "next_times", "Crontab",
           "due_second", "due_seconds", "zone", "collect_jobs", "minute_start", "Job", "attach",
           "default_key", "DEFAULT_KEY_BASE", "CRON_TASK", "CronRunner", "TIMER_PROCESS",
           "EXEC_PROCESS", "ClusterLeases", "recent_runs"]


class Crontab:
    """The master's handle: jobs, the two tables in SysV shared memory, the two processes."""

    def __init__(self, server: ServerHandle) -> None:
        settings = server.settings
        self.server = server
        self.tz = zone(settings["timezone"])
        self.grace = int(settings["cron_grace"])
        self.jobs = collect_jobs()
        if settings["cron_cluster"]:
            self.jobs = [job._replace(cluster=True) for job in self.jobs]
        clustered = [job.name for job in self.jobs if job.cluster]
        if clustered and settings["cluster"] is None:
            raise ValueError(f"once-per-cluster rules ({', '.join(clustered[:3])}"
                             f"{', ...' if len(clustered) > 3 else ''}) need the cluster "
                             "setting: the Redis URL their leases are taken in")
        # Made at open(), when the master's pid (the default node name) is known.
        self.leases: ClusterLeases | None = None
        self._tables = CronTables(self.jobs, settings["cron_task_capacity"],
                                  settings["cron_run_capacity"], settings["cron_shm_key"])
        self.timer = CronTimer(self.jobs, self._tables, self.tz, self.grace)
        self.exec = CronExec(self.jobs, self._tables, self.grace)

    def open(self, master_pid: int) -> None:
        """Creates both tables (mode 0600) before the fork and fills the origin table; with
        once-per-cluster rules, checks that the cluster's Redis answers (``ClusterUnavailable``
        naming its URL if not)."""
        settings = self.server.settings
        if any(job.cluster for job in self.jobs):
            leases = ClusterLeases(settings["cluster"], node_name(settings, master_pid),
                                   self.grace)
            leases.check()
            self.leases = self.exec.leases = leases
        self._tables.open(master_pid)

    @property
    def key(self) -> int:
        """The SysV key of the origin table (the run-time table's is one more), once open."""
        return self._tables.key

    def close(self) -> None:
        """Removes both tables (the master, at stop)."""
        self._tables.close()

    def processes(self) -> list[ProcessSpec]:
        """The timer and exec user processes, for the master to fork and supervise."""
        return [ProcessSpec(self.timer.main, TIMER_PROCESS),
                ProcessSpec(self.exec.main, EXEC_PROCESS)]

    def tables(self) -> tuple[OriginTable, RunTable]:
        """Both tables; RuntimeError when they are not open in this process."""
        return self._tables.get()
