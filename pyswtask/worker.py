"""A worker process: an asyncio loop that also drives the dispatcher's epoll descriptor.

The dispatcher's epoll fd is registered as a reader of the asyncio loop, so results of ASYNC
tasks and of ``await Task.co`` arrive while coroutines run, and a synchronous ``Task.deliver``
(CO) simply blocks the loop until its result, as Swoole's taskwait blocks its worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import TYPE_CHECKING

from . import context, control
from ._core import Dispatcher, Mailbox, QueueChannel
from .delivery import fire_finish
from .errors import TaskError, TaskWorkerLost
from .events import Event, events
from .pipe import dispatch_messages

if TYPE_CHECKING:
    from .ipc import ChildIpc
    from .server import Server

log = logging.getLogger("pyswtask.worker")


def run_worker(server: Server, worker_id: int, ipc: ChildIpc) -> int:
    ctx = context.current
    ctx.enter(context.WORKER, worker_id, server)
    settings = server.settings
    try:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        ctx.loop = loop
        if ipc.task_fds:
            dispatcher = Dispatcher(
                worker_id, ipc.task_fds, ipc.busy, on_finish=fire_finish,
                make_error=TaskError.from_wire, make_lost=TaskWorkerLost.lost,
                on_protocol_error=log.error, epoch=os.getpid(),
                spin=settings["task_wait_spin"], load=ipc.load, outs=_queue_outs(server),
                max_pending=settings["task_queue_size"])
            dispatcher.set_scheduler(loop.call_soon,
                                     lambda callback: loop.call_later(0.0005, callback))
            loop.add_reader(dispatcher.fileno(), dispatcher.on_readable)
            ctx.dispatcher = dispatcher
        mailbox = ctx.mailbox = Mailbox(worker_id, ipc.inbox_fd, ipc.out_fds, epoch=os.getpid(),
                                        on_protocol_error=log.error)
        ctx.load = ipc.load
        loop.add_reader(mailbox.fileno(), dispatch_messages, mailbox)
        stopping = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, _set_once, stopping)
        if settings["max_request"] and ctx.dispatcher is not None:
            _recycle_after(loop, ctx.dispatcher, settings["max_request"], stopping)
    except Exception:
        log.exception("worker %d could not start", worker_id)
        return context.EXIT_BOOT_ERROR
    try:
        server._run_hook("worker_start", worker_id)
        events.trigger(Event.WORKER_START, server, worker_id)
        control.announce_ready(server, os.getpid())
        loop.run_until_complete(stopping)
        server._run_hook("worker_stop", worker_id)
        events.trigger(Event.WORKER_STOP, server, worker_id)
        _finish_in_flight(loop, ctx.dispatcher, settings["max_wait_time"])
    finally:
        for handle in ctx.timers.values():
            handle.cancel()
        ctx.timers.clear()
        _cancel_tasks(loop)
        loop.close()
    return 0


def _queue_outs(server: Server) -> list[QueueChannel] | None:
    """In task_ipc_mode 2, one queue channel per task worker (by message type); in mode 3,
    one for all (the task workers take turns); in mode 1, none: the unix socket channels."""
    queue = server.queue
    if queue is None or queue.mode == 1:
        return None
    count = server.task_worker_num if queue.mode == 2 else 1
    return [QueueChannel(-1, i, queue.msqid, queue.task_type(i), queue.msgmax)
            for i in range(count)]


def _recycle_after(loop: asyncio.AbstractEventLoop, dispatcher: Dispatcher, limit: int,
                   stopping: asyncio.Future[None]) -> None:
    """max_request: once this worker delivered limit tasks, it stops as on SIGTERM (its
    in-flight results still come back) and the master starts a fresh one."""
    def check() -> None:
        if dispatcher.delivered >= limit:
            log.info("worker %d delivered %d tasks (max_request): recycling",
                     context.current.worker_id, dispatcher.delivered)
            _set_once(stopping)
        else:
            loop.call_later(0.05, check)
    loop.call_later(0.05, check)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _finish_in_flight(loop: asyncio.AbstractEventLoop, dispatcher: Dispatcher | None,
                      max_wait: float) -> None:
    """Lets results of tasks already delivered come back, for at most max_wait seconds."""
    if dispatcher is None:
        return
    dispatcher.flush()
    deadline = time.monotonic() + max_wait
    while dispatcher.pending_count and time.monotonic() < deadline:
        loop.run_until_complete(asyncio.sleep(0.005))
    if dispatcher.pending_count:
        log.warning("worker %d stopped with %d task(s) still without a result",
                    context.current.worker_id, dispatcher.pending_count)


def _cancel_tasks(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    for t in tasks:
        t.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
