"""The worker role: an asyncio loop that also drives the dispatcher's epoll descriptor.

The dispatcher's epoll fd is registered as a reader of the asyncio loop, so results of ASYNC
tasks and of ``await Task.co`` arrive while coroutines run, and a synchronous ``Task.deliver``
(CO) simply blocks the loop until its result, as Swoole's taskwait blocks its worker; inside a
coroutine it is refused, since it would stall every other coroutine (and every HTTP request) of
the worker. Workers are the only processes with channels to the task workers: every delivery, a
user process's included (the relay), leaves from here. Timers, coroutine hooks and, when the
server has an ``app``, its HTTP server (``pyswtask.http``) run on this loop. It drives the
core's ``Dispatcher`` and must not build or parse frames itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from asyncio.events import _get_running_loop
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from .._core import TIMEOUT, Dispatcher, Mailbox, QueueChannel
from ..context import TaskOrigin
from ..envelope import (
    TYPE_ASYNC,
    TYPE_CO,
    check_timeout,
    check_type,
    deadline_after,
    pack_call,
    pack_task,
    task_to_submit,
)
from ..errors import DeliveryError, TaskError, TaskTimeout, TaskWorkerLost
from ..events import Event, events
from ..transport import control, relay
from ..transport.msgqueue import IpcMode
from ..transport.pipe import dispatch_messages
from .base import EXIT_BOOT_ERROR, ChildRole, FinishCallback, timer_interval

if TYPE_CHECKING:
    from ..http.embed import WorkerHttp

__all__ = ["Worker"]

log = logging.getLogger("pyswtask.worker")
task_log = logging.getLogger("pyswtask.task")


class Worker(ChildRole):
    kind = "worker"

    dispatcher: Dispatcher | None = None
    http: WorkerHttp | None = None
    origin: TaskOrigin

    def setup(self, mailbox: Mailbox) -> None:
        settings = self.server.settings
        self.thread = threading.get_ident()    # the loop's: the dispatcher is not thread-safe
        loop = self.loop = _new_event_loop(settings["event_loop"])
        asyncio.set_event_loop(loop)
        if self.ipc.task_fds:
            # FINISH_TASK's origin for this worker's own deliveries (a relayed one names its own).
            self.origin = TaskOrigin(os.getpid(), "worker")
            dispatcher = Dispatcher(
                self.worker_id, self.ipc.task_fds, self.ipc.busy, on_finish=self._finish,
                make_error=TaskError.from_wire, make_lost=self._lost,
                on_protocol_error=log.error, epoch=os.getpid(),
                spin=settings["task_wait_spin"], load=self.ipc.load, outs=self._queue_outs(),
                max_pending=settings["task_queue_size"], max_body=self.package_max_length,
                arenas=self.ipc.arenas)
            dispatcher.set_scheduler(loop.call_soon,
                                     lambda callback: loop.call_later(0.0005, callback),
                                     loop.call_later)
            loop.add_reader(dispatcher.fileno(), dispatcher.on_readable)
            self.dispatcher = dispatcher
            if self.server.stats_segment is not None:
                seg = self.server.stats_segment
                dispatcher.count_into(seg.worker_row(self.index, "sent"),
                                      seg.worker_row(self.index, "lost"),
                                      seg.worker_row(self.index, "timed_out"))
        self.writers: set[int] = set()      # inboxes this worker waits to finish writing to
        loop.add_reader(mailbox.fileno(), dispatch_messages, mailbox, self.server, self._relay)
        self.stopping: asyncio.Future[None] = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, _set_once, self.stopping)
        if settings["max_request"] and self.dispatcher is not None:
            self._recycle_after(settings["max_request"])
        if self.server.http is not None:
            self.http = self.server.http.for_worker(lambda: _set_once(self.stopping))

    def run(self) -> int:
        server, loop = self.server, self.loop
        assert loop is not None
        try:
            server._run_hook("worker_start", self.worker_id)
            events.trigger(Event.WORKER_START, server, self.worker_id)
            if self.http is not None and not self._start_http(loop, self.http):
                return EXIT_BOOT_ERROR
            control.announce_ready(self.send_message, server.master_id, os.getpid())
            loop.run_until_complete(self.stopping)
            if self.http is not None:
                loop.run_until_complete(self.http.stop())
            server._run_hook("worker_stop", self.worker_id)
            events.trigger(Event.WORKER_STOP, server, self.worker_id)
            self._finish_in_flight(server.settings["max_wait_time"])
        finally:
            for handle in self.timers.values():
                handle.cancel()
            self.timers.clear()
            _cancel_tasks(loop)
            loop.close()
        return 0

    def _start_http(self, loop: asyncio.AbstractEventLoop, http: WorkerHttp) -> bool:
        """The app's lifespan startup, then accepting: a reload moves on to the next worker
        only once this one serves. A startup that fails stops the server (EXIT_BOOT_ERROR)
        rather than respawning a worker that cannot serve."""
        from ..http.embed import StartupFailed

        try:
            loop.run_until_complete(http.start())
        except StartupFailed as exc:
            log.error("worker %d could not serve HTTP: %s", self.worker_id, exc)
            return False
        return True

    def _queue_outs(self) -> list[QueueChannel] | None:
        """In task_ipc_mode 2, one queue channel per task worker (by message type); in mode 3,
        one for all (the task workers take turns); in mode 1, none: the unix socket channels."""
        queue = self.server.queue
        if queue is None or queue.mode == IpcMode.SOCKETS:
            return None
        count = self.server.task_worker_num if queue.mode == IpcMode.QUEUE else 1
        return [QueueChannel(-1, i, queue.msqid, queue.task_type(i), queue.msgmax)
                for i in range(count)]

    def _recycle_after(self, limit: int) -> None:
        """max_request: once this worker delivered limit tasks, it stops as on SIGTERM (its
        in-flight results still come back) and the master starts a fresh one."""
        loop, dispatcher = self.loop, self.dispatcher
        assert loop is not None and dispatcher is not None

        def check() -> None:
            if dispatcher.delivered >= limit:
                log.info("worker %d delivered %d tasks (max_request): recycling",
                         self.worker_id, dispatcher.delivered)
                _set_once(self.stopping)
            else:
                loop.call_later(0.05, check)
        loop.call_later(0.05, check)

    def _finish_in_flight(self, max_wait: float) -> None:
        """Lets results of tasks already delivered come back, for at most max_wait seconds."""
        dispatcher, loop = self.dispatcher, self.loop
        if dispatcher is None or loop is None:
            return
        dispatcher.flush()
        deadline = time.monotonic() + max_wait
        while dispatcher.pending_count and time.monotonic() < deadline:
            loop.run_until_complete(asyncio.sleep(0.005))
        if dispatcher.pending_count:
            log.warning("worker %d stopped with %d task(s) still without a result",
                        self.worker_id, dispatcher.pending_count)

    # -- delivering -----------------------------------------------------------------------------

    def task_dispatcher(self, api: str) -> Dispatcher:
        if self.dispatcher is None:
            raise DeliveryError(f"{api}: this server has no task workers (task_worker_num=0)")
        if threading.get_ident() != self.thread:
            raise DeliveryError(
                f"{api} works in the thread of the worker's event loop only, not in another "
                "thread (a plain def endpoint of FastAPI or Starlette runs in a thread pool): "
                "deliver from an async def handler, with `await Task.co(...)`")
        return self.dispatcher

    def deliver(self, name: str, method: str, params: Sequence[Any], type: int, timeout: float,
                callback: FinishCallback | None, dst_worker_id: int) -> Any:
        dispatcher = self.task_dispatcher("Task.deliver")
        if type == TYPE_ASYNC:
            body = task_to_submit(name, method, params, type, self.package_max_length)
            return dispatcher.submit(body, dst_worker_id, callback)
        check_type(type)
        _refuse_in_coroutine("Task.deliver (CO)", "await Task.co(...)")
        seconds = check_timeout(timeout)
        body = pack_task(name, method, params, type, self.package_max_length,
                         time.time() + seconds)
        result = dispatcher.call(body, dst_worker_id, seconds)
        if result is TIMEOUT:
            self._count("timed_out")
            raise TaskTimeout.after(f"task {name}.{method}", timeout)
        if isinstance(result, TaskError):
            raise result
        return result

    def deliver_batch(self, calls: Iterable[Sequence[Any]], timeout: float,
                      dst_worker_id: int) -> list[Any]:
        dispatcher = self.task_dispatcher("Task.deliver_batch")
        _refuse_in_coroutine("Task.deliver_batch", "await Task.co_batch(...)")
        bodies = self._pack_calls(calls, timeout)
        results = dispatcher.call_many(bodies, dst_worker_id, check_timeout(timeout))
        for i, result in enumerate(results):
            if result is TIMEOUT:
                self._count("timed_out")
                results[i] = TaskTimeout.after(f"batch item {i}", timeout)
        return results

    async def co(self, name: str, method: str, params: Sequence[Any], timeout: float,
                 dst_worker_id: int) -> Any:
        # The per-request path of an HTTP handler: no timer per call (the dispatcher keeps the
        # deadlines, one timer for the earliest), no lookup of the running loop.
        dispatcher = self.dispatcher
        if dispatcher is None or threading.get_ident() != self.thread:
            dispatcher = self.task_dispatcher("Task.co")
        seconds = check_timeout(timeout)
        body = pack_task(name, method, params, TYPE_CO, self.package_max_length,
                         time.time() + seconds)
        assert self.loop is not None
        future = self.loop.create_future()
        task_id = dispatcher.submit_future(body, dst_worker_id, future, seconds)
        try:
            result = await future
        except asyncio.CancelledError:
            dispatcher.forget(task_id)
            raise
        if result is TIMEOUT:
            self._count("timed_out")
            raise TaskTimeout.after(f"task {name}.{method}", timeout)
        return result

    async def co_batch(self, calls: Iterable[Sequence[Any]], timeout: float,
                       dst_worker_id: int) -> list[Any]:
        dispatcher = self.task_dispatcher("Task.co_batch")
        bodies = self._pack_calls(calls, timeout)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in bodies]
        ids = [dispatcher.submit_future(body, dst_worker_id, fut, batch=True)
               for body, fut in zip(bodies, futures)]
        if futures:
            await asyncio.wait(futures, timeout=check_timeout(timeout))
        outcomes: list[Any] = []
        for i, (task_id, fut) in enumerate(zip(ids, futures)):
            if not fut.done():
                self._count("timed_out")
                dispatcher.forget(task_id, True)
                fut.cancel()
                outcomes.append(TaskTimeout.after(f"batch item {i}", timeout))
            elif fut.exception() is not None:
                outcomes.append(fut.exception())
            else:
                outcomes.append(fut.result())
        return outcomes

    def _count(self, field: str) -> None:
        # Off the per-task path: only timeouts and lost tasks are counted here.
        if self.server.stats_segment is not None:
            self.server.stats_segment.add(self.worker_id, field)

    def _lost(self, message: str) -> TaskWorkerLost:
        self._count("lost")
        return TaskWorkerLost.lost(message)

    def _pack_calls(self, calls: Iterable[Sequence[Any]], timeout: float) -> list[bytes]:
        limit = self.package_max_length
        deadline = deadline_after(timeout)
        return [pack_call(call, i, limit, deadline) for i, call in enumerate(calls)]

    def deliver_by_process(self, name: str, method: str, params: Sequence[Any], timeout: float,
                           worker_id: int, type: int, callback: FinishCallback | None) -> Any:
        raise DeliveryError("Task.deliver_by_process is for user processes: in a worker, "
                            "call Task.deliver")

    def _relay(self, mtype: str, data: Any, src: int) -> bool:
        """Delivers what a user process sent through this worker; the message still fires
        PIPE_MESSAGE for the application's listeners afterwards."""
        if mtype in (relay.PIPE_TASK, relay.PIPE_TASKS):
            relay.handle_message(mtype, data, src, self._deliver_for, self.send_message,
                                 self.package_max_length)
        return False

    def _deliver_for(self, name: str, method: str, envelope: bytes,
                     relayed: relay.Relayed, burst: relay.Burst | None = None) -> Any:
        """ASYNC on a user process's (or the crontab's) behalf: its envelope names it as the
        origin, with its CO deadline, and FINISH_TASK gets its origin from ``relayed``. The
        tasks of one "tasks" message (``burst``) leave together (see relay.Burst)."""
        # On the loop's thread (its mailbox reader), so only the dispatcher itself is checked.
        dispatcher = self.dispatcher
        if dispatcher is None:
            dispatcher = self.task_dispatcher("Task.deliver")   # raises: no task workers
        if burst is None:
            return dispatcher.submit(envelope, -1, relayed)
        return dispatcher.submit(envelope, burst.dst(dispatcher.pick_for_burst), relayed, True)

    def _finish(self, task_id: int, result: Any, callback: FinishCallback | None) -> None:
        """The dispatcher's on_finish: the FINISH_TASK event, then the delivery's own callback."""
        if events.has_listeners(Event.FINISH_TASK):
            origin = callback.origin if type(callback) is relay.Relayed else self.origin
            events.trigger(Event.FINISH_TASK, None, task_id, result, origin=origin)
        if callback is not None:
            try:
                callback(task_id, result)
            except Exception:
                task_log.exception("finish callback %r of task %d failed", callback, task_id)

    # -- pipe messages and timers ---------------------------------------------------------------

    def _send(self, mailbox: Mailbox, dst: int, body: bytes, timeout: float) -> None:
        # Never blocks the loop: what the inbox does not take now is sent as it drains.
        if not mailbox.send(dst, body, -1.0):
            self._watch_writable(mailbox, dst)

    def _watch_writable(self, mailbox: Mailbox, dst: int) -> None:
        loop = self.loop
        assert loop is not None
        if dst in self.writers:
            return
        self.writers.add(dst)
        fd = mailbox.out_fileno(dst)

        def writable() -> None:
            if dst not in mailbox.flush():
                loop.remove_writer(fd)
                self.writers.discard(dst)

        loop.add_writer(fd, writable)

    def timer_loop(self, api: str, ms: float) -> tuple[asyncio.AbstractEventLoop, float]:
        interval = timer_interval(api, ms)
        assert self.loop is not None
        return self.loop, interval


def _refuse_in_coroutine(api: str, instead: str) -> None:
    """A blocking delivery inside a coroutine of the worker's loop would stall every other
    coroutine, timer and request of the worker until its result: refused. Hooks, timers and
    listeners run outside any task, where blocking is the caller's choice, as in Swoole."""
    loop = _get_running_loop()
    if loop is not None and asyncio.current_task(loop) is not None:
        raise DeliveryError(
            f"{api} blocks this worker's event loop until the result, and every other "
            f"coroutine and request of the worker with it: in a coroutine (an async def "
            f"request handler), use `{instead}`, or Task.TYPE_ASYNC with a callback")


def _new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _cancel_tasks(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    for t in tasks:
        t.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
