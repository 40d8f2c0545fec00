"""What a task knows about its own delivery (``Task.current()``), and what a FINISH_TASK
listener knows about the origin of the task that finished.

Both are built on demand from what the wire already carries: the frame header (task id, source
worker, whether a separate program sent it, times resent: the core reads them) and the
envelope's optional fields (the CO deadline, the origin of
a task a worker delivered for another process). Nothing here is on the per-task path: the task
loop keeps the raw pieces, and a ``TaskContext`` exists only once someone asks for it. This
module must not import a role or a transport.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .envelope import ORIGIN_NAMES, ORIGIN_PROGRAM, ORIGIN_WORKER, TYPE_CO

__all__ = ["TaskContext", "TaskOrigin", "context_from_wire"]


@dataclass(frozen=True)
class TaskOrigin:
    """The process a task was delivered from: its pid and its role, one of ``"worker"``,
    ``"user_process"``, ``"cron"`` (the crontab's cronExec process) or ``"program"`` (a
    separate program, through the message queue)."""

    pid: int
    role: str


@dataclass(frozen=True)
class TaskContext:
    """The task running now, as ``Task.current()`` gives it inside a task method.

    - ``id``: the task id (the one ``Task.deliver`` returned for ASYNC, and FINISH_TASK names).
    - ``name``, ``method``: what was called.
    - ``type``: ``"co"`` when the delivering process waits for the result, else ``"async"``.
    - ``origin_pid``, ``origin_role``: the process that delivered it. A user process's and the
      crontab's tasks go through a worker, but their origin is that process, not the worker.
    - ``deadline``: for CO, the unix time (``time.time()``) the caller stops waiting; a result
      after it is dropped. None for ASYNC.
    - ``attempt``: 1, or more when the task was sent again because the task worker that held
      it died before starting it (a task that started is never run again).
    - ``worker_id``: the worker it came through (None from a separate program).
    - ``task_worker_id``: the task worker running it.
    """

    id: int
    name: str
    method: str
    type: Literal["co", "async"]
    origin_pid: int
    origin_role: str
    deadline: float | None
    attempt: int
    worker_id: int | None
    task_worker_id: int

    @property
    def origin(self) -> TaskOrigin:
        """(pid, role) of the delivering process, as FINISH_TASK listeners get it."""
        return TaskOrigin(self.origin_pid, self.origin_role)


def context_from_wire(envelope: tuple[Any, ...], task_id: int, src: int, command: bool,
                      attempt: int, task_worker_id: int) -> TaskContext:
    """The context of a task from its envelope and what the core read in its frame
    (TaskLoop.current()): ``command`` for a separate program's task. A task id's high 32 bits
    are the delivering process's pid."""
    if len(envelope) >= 9 and envelope[7]:
        pid, role = envelope[7], ORIGIN_NAMES.get(envelope[8], "user_process")
    else:
        pid, role = task_id >> 32, ORIGIN_NAMES[ORIGIN_PROGRAM if command else ORIGIN_WORKER]
    return TaskContext(
        id=task_id, name=envelope[0], method=envelope[1],
        type="co" if envelope[3] == TYPE_CO else "async", origin_pid=pid, origin_role=role,
        deadline=envelope[6] if len(envelope) >= 7 else None, attempt=attempt,
        worker_id=None if command else src, task_worker_id=task_worker_id)
