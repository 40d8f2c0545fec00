"""A task worker process: the compiled TaskLoop runs tasks one at a time, synchronously."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

from . import context, control
from ._core import Mailbox, QueueReader, TaskLoop
from .events import Event, events
from .executor import TaskExecutor
from .msgqueue import ReplySender
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
        signal.signal(signal.SIGUSR1, _ignore)
        signal.set_wakeup_fd(wfd)
        executor = TaskExecutor(events)
        mailbox = ctx.mailbox = Mailbox(worker_id, ipc.inbox_fd, ipc.out_fds, epoch=os.getpid(),
                                        on_protocol_error=log.error)
        ctx.load = ipc.load
        queue = _queue_options(server, worker_id, index)
        loop = TaskLoop(worker_id, index, ipc.task_fds, ipc.busy, rfd, execute=executor.execute,
                        on_signal=_is_stop, on_protocol_error=log.error,
                        inbox_fd=mailbox.fileno(), on_inbox=lambda: dispatch_messages(mailbox),
                        state=ipc.tw_state, max_tasks=server.settings["task_max_request"],
                        **queue)
    except Exception:
        log.exception("task worker %d could not start", worker_id)
        return context.EXIT_BOOT_ERROR
    server._run_hook("task_worker_start", worker_id)
    events.trigger(Event.TASK_WORKER_START, server, worker_id)
    control.announce_ready(server, os.getpid())
    loop.run(server.settings["max_wait_time"])
    reader = queue.get("reader")
    if reader is not None:
        if reader.error:
            log.error("task worker %d: its queue reader stopped: %s", worker_id,
                      os.strerror(reader.error))
        if reader.lost_parts:
            log.error("task worker %d: %d task(s) from the queue dropped: the rest of their "
                      "bodies never came", worker_id, reader.lost_parts)
    server._run_hook("task_worker_stop", worker_id)
    events.trigger(Event.TASK_WORKER_STOP, server, worker_id)
    return 0


def _queue_options(server: Server, worker_id: int, index: int) -> dict[str, Any]:
    """The server's message queue, read by a thread of this task worker (msgrcv cannot be
    polled); the thread wakes the loop through an eventfd."""
    queue = server.queue
    if queue is None:
        return {}
    wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    pid = os.getpid()
    reader = QueueReader(queue.msqid, queue.reader_type(index), queue.msgmax, wake_fd, pid)
    threading.Thread(target=reader.run, name="pyswtask-queue", daemon=True).start()
    replies = ReplySender(queue.msqid, worker_id)

    def on_stopping() -> None:
        if not queue.stop_reader(index, pid, server.settings["max_wait_time"]):
            log.error("task worker %d could not queue its reader's stop: queue full", worker_id)

    return {"reader": reader, "queue_fd": wake_fd, "on_reply": replies.send,
            "on_stopping": on_stopping}


def _ignore(signum: int, frame: Any) -> None:
    pass


def _is_stop(signums: bytes) -> int:
    """SIGTERM: stop, running what the workers sent; SIGUSR1 (a reload): hand over."""
    if signal.SIGTERM in signums:
        return 1
    return 2 if signal.SIGUSR1 in signums else 0
