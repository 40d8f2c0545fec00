"""The built-in task the exec process delivers (``pyswtask.cron``): in a task worker, waits for
the run's second if it came early, runs one scheduled method and writes running / done / failed
and the duration into both tables. Also owns ``due_second``, the context variable a scheduled
method reads its due second from.

A run won in the cluster comes with its lease value: it runs only if ``ClusterLeases.start``
says the lease is still its own (see ``lease``), and its outcome is written to Redis too.

It must not claim or skip rows (that is ``exec``); it finds the tables through the server's
crontab, which the forked task worker inherited.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from typing import TYPE_CHECKING, Any

from .. import registry, roles
from .._core import OriginTable, RunStatus, RunTable
from ..errors import ClusterUnavailable
from .lease import holder_node, lease_seconds

if TYPE_CHECKING:
    from .lease import ClusterLeases

__all__ = ["CRON_TASK", "CronRunner", "due_second"]

log = logging.getLogger("pyswtask.cron")

CRON_TASK = "pyswtask.cron"

due_second: contextvars.ContextVar[int | None] = contextvars.ContextVar("pyswtask_cron_due",
                                                                     default=None)
"""In a scheduled method: the unix second this run was due (None outside a crontab run)."""


@registry.task(CRON_TASK)
class CronRunner:
    """The built-in task the exec process delivers: runs a scheduled method in a task worker
    and writes its outcome into both tables."""

    def run(self, row: int, job: int, sec: int, lease: str | None = None) -> Any:
        role = roles.current()
        server = role.server
        crontab = getattr(server, "crontab", None)
        if crontab is None:
            raise RuntimeError("the crontab is not on in this server (Server(cron=True))")
        origin, runs = crontab.tables()
        spec = crontab.jobs[job]
        # A cluster run is started in Redis first, in the time it came early.
        leases: ClusterLeases | None = crontab.leases if lease is not None else None
        if leases is not None and lease is not None and \
                not _start(leases, origin, runs, row, job, spec.name, sec, lease):
            return None
        # The exec process delivers a little before the second (exec.LEAD); a run never starts
        # before it. That wait is not the run's time: counted, every run would look slow to
        # its task worker, which then sends each run's result before starting the next one,
        # a wake-up of the worker per run while the second's runs are starting.
        waited = _wait_for(sec)
        if waited > 0 and hasattr(role, "not_counted"):
            role.not_counted(waited)
        runs.set_status(row, RunStatus.RUNNING, time.time())
        started = time.monotonic()
        token = due_second.set(sec)
        try:
            fn, on_loop = registry.resolve(spec.task, spec.method)
            result = fn()
            if on_loop and inspect.iscoroutine(result):
                result = asyncio.run(result)
        except BaseException as exc:
            took = time.monotonic() - started
            runs.set_status(row, RunStatus.FAILED, duration=took)
            origin.finish(job, sec, RunStatus.FAILED, took)
            if leases is not None:
                _finish(leases, spec.name, sec, "failed", took, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            due_second.reset(token)
        took = time.monotonic() - started
        runs.set_status(row, RunStatus.DONE, duration=took)
        origin.finish(job, sec, RunStatus.DONE, took)
        if leases is not None:
            _finish(leases, spec.name, sec, "done", took)
        return result


# The last stretch before the second is spun, not slept: a sleep ends 0.1-0.2 ms late on an
# idle machine, and later when both cores are busy (the woken process waits for a core), while a
# process already running sees the second come. Spinning this long once a second costs nothing.
SPIN = 0.002


def _wait_for(sec: int) -> float:
    """Returns at the start of unix second sec (at once if it has begun): the seconds waited."""
    early = sec - time.time()
    if early <= 0:
        return 0.0
    if early > SPIN:
        time.sleep(early - SPIN)
    while time.time() < sec:
        pass
    return early


def _start(leases: ClusterLeases, origin: OriginTable, runs: RunTable, row: int, job: int,
           name: str, sec: int, lease: str) -> bool:
    """Whether this delivery may run: its lease is still its own. Retries a Redis that does
    not answer for as long as a lease lasts, then leaves the run to the lease's expiry (after
    which the nodes race for it again)."""
    give_up = time.monotonic() + lease_seconds(leases.grace)
    while True:
        try:
            other = leases.start(name, sec, lease)
            break
        except ClusterUnavailable as exc:
            if time.monotonic() >= give_up:
                origin.abandon(job)
                log.error("crontab: run of %s due at %d not started: %s; the nodes race for it "
                          "again when its lease expires", name, sec, exc)
                return False
            time.sleep(0.1)
    if other is None:
        return True
    origin.abandon(job)
    if holder_node(other) != leases.node:
        runs.set_status(row, RunStatus.ELSEWHERE)
    log.info("crontab: run of %s due at %d not started here: its lease expired before it came "
             "to start, and %s has it now", name, sec, holder_node(other))
    return False


def _finish(leases: ClusterLeases, name: str, sec: int, state: str, took: float,
            error: str = "") -> None:
    try:
        leases.finish(name, sec, state, took, error)
    except ClusterUnavailable as exc:
        log.warning("crontab: outcome of %s due at %d (%s) not recorded in the cluster: %s",
                    name, sec, state, exc)
