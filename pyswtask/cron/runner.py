"""The built-in task the exec process delivers (``pyswtask.cron``): in a task worker, waits for
the run's second if it came early, runs one scheduled method and writes running / done / failed
and the duration into both tables. Also owns ``due_second``, the context variable a scheduled
method reads its due second from.

It must not claim or skip rows (that is ``exec``); it finds the tables through the server's
crontab, which the forked task worker inherited.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import time
from typing import Any

from .. import registry, roles
from .._core import RunStatus

__all__ = ["CRON_TASK", "CronRunner", "due_second"]

CRON_TASK = "pyswtask.cron"

due_second: contextvars.ContextVar[int | None] = contextvars.ContextVar("pyswtask_cron_due",
                                                                     default=None)
"""In a scheduled method: the unix second this run was due (None outside a crontab run)."""


@registry.task(CRON_TASK)
class CronRunner:
    """The built-in task the exec process delivers: runs a scheduled method in a task worker
    and writes its outcome into both tables."""

    def run(self, row: int, job: int, sec: int) -> Any:
        server = roles.current().server
        crontab = getattr(server, "crontab", None)
        if crontab is None:
            raise RuntimeError("the crontab is not on in this server (Server(cron=True))")
        origin, runs = crontab.tables()
        spec = crontab.jobs[job]
        # The exec process delivers a little before the second (exec.LEAD); a run never starts
        # before it.
        early = sec - time.time()
        if early > 0:
            time.sleep(early)
        runs.set_status(row, RunStatus.RUNNING, time.time())
        started = time.monotonic()
        token = due_second.set(sec)
        try:
            fn, on_loop = registry.resolve(spec.task, spec.method)
            result = fn()
            if on_loop and inspect.iscoroutine(result):
                result = asyncio.run(result)
        except BaseException:
            took = time.monotonic() - started
            runs.set_status(row, RunStatus.FAILED, duration=took)
            origin.finish(job, sec, RunStatus.FAILED, took)
            raise
        finally:
            due_second.reset(token)
        took = time.monotonic() - started
        runs.set_status(row, RunStatus.DONE, duration=took)
        origin.finish(job, sec, RunStatus.DONE, took)
        return result
