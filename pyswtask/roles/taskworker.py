"""The task worker role: the compiled TaskLoop runs tasks one at a time, synchronously (with
``task_enable_coroutine``, ``async def`` ones as coroutines, many at once).

It reads tasks from every worker's channel and, when the server has one, from the message
queue (on a reader thread; in task_ipc_mode 2 and 3, where tasks come only from the queue, in
msgrcv on its own thread, as a Swoole task worker does, with a thread that watches the rest),
and, on a node of a cluster serving queues, from Redis through its own consumer
(``pyswtask.cluster.consumer``, whose socket the loop watches); it runs each through the
executor and writes the result back. It delivers
nothing itself: waiting on another task from inside a task can deadlock the pool. The loop is
the core's; this role only sets it up (signals, queue reader thread, consumer, executor) and
reports.
Its asyncio loop (``slices``) exists once a timer is started here or with
``task_enable_coroutine``; it runs between tasks. ``Task.current()`` is answered here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from typing import Any

from .._core import Dispatcher, Mailbox, QueueReader, TaskLoop
from ..cluster.consumer import TaskWorkerConsumer
from ..cluster.entries import TaskEntry
from ..cluster.runner import CLUSTER_TASK
from ..context import TaskContext, context_from_wire
from ..envelope import TYPE_ASYNC
from ..errors import DeliveryError, NoTaskRunning
from ..events import Event, events
from ..executor import TaskExecutor, running_task
from ..transport import control
from ..transport.msgqueue import IpcMode, ReplySender
from ..transport.pipe import dispatch_messages
from .base import ChildRole, timer_interval
from .slices import Slices

__all__ = ["TaskWorker"]

log = logging.getLogger("pyswtask.task_worker")


class TaskWorker(ChildRole):
    kind = "task worker"

    slices: Slices | None = None
    consumer: TaskWorkerConsumer | None = None

    def setup(self, mailbox: Mailbox) -> None:
        server = self.server
        # The loop learns of SIGTERM through this pipe; the handler itself does nothing, so a
        # task in progress is never interrupted and the loop decides when to stop.
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGTERM, _ignore)
        signal.signal(signal.SIGUSR1, _ignore)
        signal.set_wakeup_fd(wfd)
        executor = self.executor = TaskExecutor(events)
        self.queue = self._queue_options()
        cluster = server.cluster
        if cluster is not None and cluster.queues:
            # cluster_prefetch is the node's: split among its task workers.
            count = server.settings["cluster_prefetch"] // max(1, server.task_worker_num)
            self.consumer = TaskWorkerConsumer(cluster.url, cluster.queues, cluster.name,
                                               self._run_cluster_task, count,
                                               server.settings["cluster_visibility_timeout"])
            self.queue["on_stopping"] = _both(self.queue.get("on_stopping"), self.consumer.stop)
        self.task_loop = TaskLoop(
            self.worker_id, self.index, self.ipc.task_fds, self.ipc.busy, rfd,
            execute=executor.execute, on_signal=_is_stop, on_protocol_error=log.error,
            inbox_fd=mailbox.fileno(), on_inbox=lambda: dispatch_messages(mailbox, server),
            state=self.ipc.tw_state, max_tasks=server.settings["task_max_request"],
            max_body=self.package_max_length, arenas=self.ipc.arenas, **self.queue)
        if server.stats_segment is not None:
            self.task_loop.count_into(*server.stats_segment.task_worker_counting(
                self.index, self.worker_id))
        if server.settings["task_enable_coroutine"]:
            executor.run_concurrently(self._slices().loop, self.task_loop,
                                      server.settings["task_max_concurrency"])
        if self.consumer is not None:
            self.consumer.attach(self.task_loop.watch, self.task_loop.watch_after)

    def _run_cluster_task(self, entry: TaskEntry) -> tuple[bool, Any]:
        """Runs a cluster task this task worker took from Redis (its consumer) the way the
        task loop runs the channels' tasks: same executor, Task.current(), counters."""
        envelope = (CLUSTER_TASK, "run", [entry.id, entry.queue, entry.deliveries, entry.body],
                    TYPE_ASYNC, "", 0)
        return self.task_loop.run_own(envelope, entry.deliveries)

    def _slices(self) -> Slices:
        """This task worker's asyncio loop, made and attached to the task loop on first use."""
        if self.slices is None:
            settings = self.server.settings
            self.slices = Slices()
            self.slices.attach(self.task_loop, settings["task_max_concurrency"]
                               if settings["task_enable_coroutine"] else 0)
            self.loop = self.slices.loop
            self.executor.use_loop(self.loop)
        return self.slices

    def run(self) -> int:
        server = self.server
        server._run_hook("task_worker_start", self.worker_id)
        events.trigger(Event.TASK_WORKER_START, server, self.worker_id)
        control.announce_ready(self.send_message, server.master_id, os.getpid())
        self.task_loop.run(server.settings["max_wait_time"])
        if self.consumer is not None:
            self.consumer.close()
        if self.slices is not None:
            for handle in self.timers.values():
                handle.cancel()
            self.timers.clear()
            # Coroutine tasks still running fail for their callers instead of vanishing.
            self.slices.close(1.0)
            self.task_loop.flush()
        reader = self.queue.get("reader")
        if reader is not None:
            if reader.error:
                log.error("task worker %d: its queue reader stopped: %s", self.worker_id,
                          os.strerror(reader.error))
            if reader.lost_parts:
                log.error("task worker %d: %d task(s) from the queue dropped: the rest of their "
                          "bodies never came", self.worker_id, reader.lost_parts)
        server._run_hook("task_worker_stop", self.worker_id)
        events.trigger(Event.TASK_WORKER_STOP, server, self.worker_id)
        return 0

    def _queue_options(self) -> dict[str, Any]:
        """The server's message queue. msgrcv cannot be polled: where tasks come from the
        queue only (task_ipc_mode 2 and 3), the task loop waits in msgrcv itself and a thread
        watches its other descriptors and timers (one wake-up per task); else a thread reads
        the queue and wakes the loop through an eventfd."""
        queue = self.server.queue
        if queue is None:
            return {}
        index, worker_id = self.index, self.worker_id
        direct = queue.mode != IpcMode.SOCKETS
        # Direct: the watch's own eventfd, which it blocks on between watches.
        wake_fd = os.eventfd(0, os.EFD_CLOEXEC if direct else os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        pid = os.getpid()
        reader = QueueReader(queue.msqid, queue.reader_type(index), queue.msgmax, wake_fd, pid,
                             hold=queue.holds[index], direct=direct)
        threading.Thread(target=_unsignalled, args=(reader.run,), name="pyswtask-queue",
                         daemon=True).start()
        replies = ReplySender(queue.msqid, worker_id)
        max_wait = self.server.settings["max_wait_time"]

        def on_stopping() -> None:
            if not queue.stop_reader(index, pid, max_wait):
                log.error("task worker %d could not queue its reader's stop: queue full",
                          worker_id)

        return {"reader": reader, "queue_fd": -1 if direct else wake_fd,
                "on_reply": replies.send, "queue_spin": self.server.settings["task_wait_spin"],
                "on_stopping": on_stopping}

    def timer_loop(self, api: str, ms: float) -> tuple[asyncio.AbstractEventLoop, float]:
        interval = timer_interval(api, ms)
        return self._slices().loop, interval

    def task_context(self) -> TaskContext:
        raw = running_task.get() or self.task_loop.current()
        if raw is None:
            raise NoTaskRunning("Task.current() works inside a task method: this task worker "
                                "runs none now (a hook, timer or listener runs between tasks)")
        return context_from_wire(raw[0], raw[1], raw[2], raw[3], raw[4], self.worker_id)

    def not_counted(self, seconds: float) -> None:
        """The running task waited this long on purpose: see TaskLoop.not_counted."""
        self.task_loop.not_counted(seconds)

    def task_dispatcher(self, api: str) -> Dispatcher:
        raise DeliveryError(f"{api} cannot be called from a task worker: task workers run one "
                            "task at a time, and waiting there on another task can deadlock; "
                            "return a value, or deliver from the worker that gets the result")


def _both(first: Any, second: Any) -> Any:
    if first is None:
        return second

    def both() -> None:
        first()
        second()
    return both


def _ignore(signum: int, frame: Any) -> None:
    pass


def _unsignalled(run: Any) -> None:
    # Signals go to the main thread, whose msgrcv or epoll_wait they must interrupt.
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    run()


# What on_signal tells the TaskLoop.
_GO_ON = 0
_STOP = 1           # SIGTERM: stop, running what the workers sent first
_HAND_OVER = 2      # SIGUSR1, a reload: leave the channels, and what waits in them, to a successor


def _is_stop(signums: bytes) -> int:
    if signal.SIGTERM in signums:
        return _STOP
    return _HAND_OVER if signal.SIGUSR1 in signums else _GO_ON
