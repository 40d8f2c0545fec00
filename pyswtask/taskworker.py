"""A task worker process: the compiled TaskLoop runs tasks one at a time, synchronously."""

from __future__ import annotations

import logging
import os
import signal
from typing import TYPE_CHECKING, Any

from . import context
from ._core import Mailbox, TaskLoop
from .events import Event, events
from .executor import TaskExecutor
from .pipe import dispatch_messages

if TYPE_CHECKING:
    from .ipc import ChildIpc
    from .server import Server

log = logging.getLogger("pyswtask.task_worker")


def run_task_worker(server: Server, worker_id: int, index: int, ipc: ChildIpc) -> int:
    ctx = context.current
    ctx.enter(context.TASK_WORKER, worker_id, server)
    try:
        # The loop learns of SIGTERM through this pipe; the handler itself does nothing, so a
        # task in progress is never interrupted and the loop decides when to stop.
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGTERM, _ignore)
        signal.set_wakeup_fd(wfd)
        executor = TaskExecutor(events)
        mailbox = ctx.mailbox = Mailbox(worker_id, ipc.inbox_fd, ipc.out_fds, epoch=os.getpid(),
                                        on_protocol_error=log.error)
        ctx.load = ipc.load
        loop = TaskLoop(worker_id, index, ipc.task_fds, ipc.busy, rfd, execute=executor.execute,
                        on_signal=_is_stop, on_protocol_error=log.error,
                        inbox_fd=mailbox.fileno(), on_inbox=lambda: dispatch_messages(mailbox))
    except Exception:
        log.exception("task worker %d could not start", worker_id)
        return context.EXIT_BOOT_ERROR
    server._run_hook("task_worker_start", worker_id)
    events.trigger(Event.TASK_WORKER_START, server, worker_id)
    loop.run(server.settings["max_wait_time"])
    server._run_hook("task_worker_stop", worker_id)
    events.trigger(Event.TASK_WORKER_STOP, server, worker_id)
    return 0


def _ignore(signum: int, frame: Any) -> None:
    pass


def _is_stop(signums: bytes) -> bool:
    return signal.SIGTERM in signums
