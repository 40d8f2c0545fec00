"""Pipe messages between the processes of a server (Swoole's sendMessage / onPipeMessage).

A message is ``[type, data]`` (Swoft's ``PipeMessage::pack(type, data)``) in a PIPE frame, sent to
the inbox of a process by its global id: workers 0..N-1, task workers N..N+M-1, user processes
after them. Arriving messages fire ``Event.PIPE_MESSAGE`` with params ``(type, data, src_id)``.
Any msgpack-able data, any size: large bodies travel in fragments, never through temp files.

``deliver_by_process`` rides on this: a message of type ``"task"`` to a worker, whose built-in
listener delivers the task on the process's behalf and, when asked, sends the outcome back as a
``"task.result"`` message.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from typing import Any, Callable, Sequence

import msgpack  # type: ignore[import-untyped]

from . import context, delivery
from ._core import Mailbox, brief_repr
from .errors import DeliveryError, ServerNotRunning, TaskError, TaskTimeout
from .events import Event, events

log = logging.getLogger("pyswtask.pipe")

PIPE_TASK = "task"
PIPE_TASKS = "tasks"        # many fire-and-forget tasks in one message (the crontab's)
PIPE_TASK_RESULT = "task.result"
TYPE_CO = 1
TYPE_ASYNC = 2

_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def pack_message(type: str, data: Any) -> bytes:
    """A pipe message body; TypeError naming the value msgpack cannot pack."""
    if not isinstance(type, str) or not type:
        raise TypeError(f"a pipe message type must be a non-empty string, not {type!r}")
    try:
        body: bytes = _packb((type, data))
    except (TypeError, ValueError, OverflowError) as exc:
        what = delivery._describe_unpackable([data], exc).replace("params[0]", "data")
        raise TypeError(f"pipe message {type!r} cannot be packed: {what}") from None
    limit = context.current.package_max_length
    if limit and len(body) > limit:
        raise ValueError(f"pipe message {type!r} packs to {len(body)} bytes, above the "
                         f"server's package_max_length ({limit})")
    return body


def unpack_message(body: bytes) -> tuple[str, Any]:
    """(type, data) from a pipe message body; ValueError if it is not one."""
    try:
        obj = msgpack.unpackb(body, strict_map_key=False)
    except Exception as exc:
        raise ValueError(f"pipe message is not valid msgpack: {exc}") from None
    if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], str)):
        raise ValueError(f"pipe message is not [type, data]: {brief_repr(obj, 100)}")
    return obj[0], obj[1]


# -- sending --------------------------------------------------------------------------------


def send_message(data: Any, dst_worker_id: int, type: str = "message",
                 timeout: float = 3.0) -> None:
    """Sends a pipe message from this process to process ``dst_worker_id``.

    From a worker it never blocks the loop: what the inbox does not take now is sent as it
    drains. Elsewhere it blocks until written, up to ``timeout`` seconds (TimeoutError).
    """
    ctx = context.current
    mailbox = _mailbox("send_message")
    if not isinstance(dst_worker_id, int) or not 0 <= dst_worker_id < mailbox.size:
        raise ValueError(f"dst_worker_id {dst_worker_id!r} is out of range: "
                         f"{_describe_ids(ctx)}")
    body = pack_message(type, data)
    if ctx.role == context.WORKER and ctx.loop is not None:
        if not mailbox.send(dst_worker_id, body, -1.0):
            _watch_writable(ctx, dst_worker_id)
    elif ctx.process is not None:
        # Behind whatever ASYNC deliveries are queued, and never beside the flusher thread.
        with ctx.process.delivery.lock:
            mailbox.send(dst_worker_id, body, timeout)
    else:
        mailbox.send(dst_worker_id, body, timeout)


_master_checked = 0.0


def _mailbox(api: str) -> Mailbox:
    global _master_checked
    ctx = context.current
    if ctx.mailbox is None:
        raise ServerNotRunning(f"{api} works inside the processes of a running pyswtask server")
    # An orphan's messages would still be accepted by the surviving children's inboxes, so look
    # at the master, but at most every 10 ms: getppid() per message costs a syscall.
    now = time.monotonic()
    if ctx.role != context.MASTER and now - _master_checked > 0.01:
        assert ctx.server is not None
        if os.getppid() != ctx.server.master_pid:
            raise ServerNotRunning(f"{api}: the server this process belonged to has stopped")
        _master_checked = now
    return ctx.mailbox


def _describe_ids(ctx: context.ProcessContext) -> str:
    server = ctx.server
    assert server is not None
    n, m = server.worker_num, server.task_worker_num
    p = (ctx.mailbox.size - 1 if ctx.mailbox else n + m) - n - m   # the last inbox: the master's
    return (f"this server has {n} worker(s) (ids 0..{n - 1}), {m} task worker(s) "
            f"(ids {n}..{n + m - 1}) and {p} user process(es) (ids {n + m}..{n + m + p - 1})")


def _watch_writable(ctx: context.ProcessContext, dst: int) -> None:
    assert ctx.loop is not None and ctx.mailbox is not None
    if dst in ctx.writers:
        return
    ctx.writers.add(dst)
    fd = ctx.mailbox.out_fileno(dst)

    def writable() -> None:
        assert ctx.mailbox is not None and ctx.loop is not None
        if dst not in ctx.mailbox.flush():
            ctx.loop.remove_writer(fd)
            ctx.writers.discard(dst)

    ctx.loop.add_writer(fd, writable)


# -- receiving ------------------------------------------------------------------------------


def dispatch_messages(mailbox: Mailbox, intercept: Callable[[str, Any, int], bool] | None = None
                      ) -> int:
    """Fires PIPE_MESSAGE for every message waiting; returns how many there were. intercept,
    when given, sees each message first and returns True to take it out of the event."""
    server = context.current.server
    count = 0
    for src, _msg_id, body in mailbox.receive():
        try:
            mtype, data = unpack_message(body)
        except ValueError as exc:
            log.error("pipe message from process %d dropped: %s", src, exc)
            continue
        count += 1
        if intercept is not None and intercept(mtype, data, src):
            continue
        events.trigger(Event.PIPE_MESSAGE, server, mtype, data, src)
    return count


def _on_task_message(event: Any) -> None:
    """The built-in PIPE_MESSAGE listener of workers: delivers a task for a user process."""
    mtype, data, src = event.params
    if context.current.role != context.WORKER:
        return
    if mtype == PIPE_TASKS:
        _deliver_many(data, src)
        return
    if mtype != PIPE_TASK:
        return
    try:
        req_id, name, method, params, reply = data
    except (TypeError, ValueError):
        log.error("malformed task message from process %d dropped: %s", src, brief_repr(data))
        return
    callback = None
    if reply:
        def callback(task_id: int, result: Any) -> None:
            _reply(src, req_id, result)
    try:
        delivery.Task.deliver(name, method, params, TYPE_ASYNC, callback=callback)
    except Exception as exc:
        log.error("task %s.%s for process %d not delivered: %s", name, method, src, exc)
        if reply:
            _reply(src, req_id, TaskError(type(exc).__name__, str(exc)))


def _deliver_many(calls: Any, src: int) -> None:
    if not isinstance(calls, list):
        log.error("malformed tasks message from process %d dropped: %s", src, brief_repr(calls))
        return
    for call in calls:
        try:
            name, method, params = call
            delivery.Task.deliver(name, method, params, TYPE_ASYNC)
        except Exception as exc:
            log.error("task %s for process %d not delivered: %s", brief_repr(call), src, exc)


def _reply(dst: int, req_id: int, result: Any) -> None:
    if isinstance(result, TaskError):
        payload = [req_id, False, [result.remote_type, result.remote_message,
                                   result.remote_traceback]]
    else:
        payload = [req_id, True, result]
    try:
        send_message(payload, dst, PIPE_TASK_RESULT)
    except Exception as exc:
        log.error("result of a task for process %d not sent back: %s", dst, exc)


events.listen(Event.PIPE_MESSAGE, _on_task_message, priority=1_000_000)


# -- delivering from a user process ---------------------------------------------------------


class ProcessDelivery:
    """The user-process side of deliver_by_process: request ids, waiting replies, backlog, and
    the write-behind of ASYNC deliveries.

    An ASYNC delivery returns once its message is written or queued behind earlier ones: when a
    worker's inbox is full, later deliveries pile up in this process's queue and leave together,
    many per record, instead of one syscall and one wake-up each. A helper thread writes the
    queue as the inbox drains, so nothing waits on this process's next call; a delivery that
    expects an answer (CO, a callback) and send_message still wait until written, after
    everything queued before them. At exit the queue is written out (within the timeout).
    """

    __slots__ = ("mailbox", "ids", "callbacks", "backlog", "lock", "pending", "flusher")

    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox
        self.ids = itertools.count(1)
        self.callbacks: dict[int, Callable[[int, Any], Any] | None] = {}
        # Messages that arrived while a CO delivery waited; dispatched by the next read.
        self.backlog: list[tuple[str, Any, int]] = []
        self.lock = threading.Lock()
        self.pending = threading.Event()        # set while the queue holds unsent messages
        self.flusher: threading.Thread | None = None

    def _send_behind(self, dst: int, body: bytes) -> None:
        with self.lock:
            if self.mailbox.send_behind(dst, body) and not self.pending.is_set():
                self.pending.set()
                if self.flusher is None:
                    self.flusher = threading.Thread(target=self._flush_loop,
                                                    name="pyswtask-flusher", daemon=True)
                    self.flusher.start()

    def _flush_loop(self) -> None:
        while True:
            self.pending.wait()
            with self.lock:
                left = self.mailbox.flush()
                if not left:
                    self.pending.clear()
                    continue
            self.mailbox.wait_writable(left, 0.1)

    def flush(self, timeout: float) -> None:
        """Writes out whatever is queued, waiting up to timeout seconds."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while (left := self.mailbox.flush()) and time.monotonic() < deadline:
                self.mailbox.wait_writable(left, min(0.1, deadline - time.monotonic()))
            if left:
                log.error("%d inbox(es) still full at exit: queued deliveries lost", len(left))

    def deliver(self, name: str, method: str, params: Sequence[Any], timeout: float,
                worker_id: int, type: int, callback: Callable[[int, Any], Any] | None) -> Any:
        ctx = context.current
        server = ctx.server
        assert server is not None
        if worker_id == -1:
            worker_id = least_loaded(ctx)
        elif not isinstance(worker_id, int) or not 0 <= worker_id < server.worker_num:
            raise ValueError(f"worker_id {worker_id!r} is out of range: tasks are delivered "
                             f"through workers 0..{server.worker_num - 1}, or -1 for the least "
                             "loaded one")
        if type not in (TYPE_CO, TYPE_ASYNC):
            raise ValueError(f"type must be Task.TYPE_CO or Task.TYPE_ASYNC, not {type!r}")
        if not isinstance(params, (list, tuple)):
            raise TypeError(f"params must be a list or tuple, not {params.__class__.__name__}")
        wants_reply = type == TYPE_CO or callback is not None
        req_id = next(self.ids)
        try:
            body = _packb((PIPE_TASK, (req_id, name, method, params, wants_reply)))
        except (TypeError, ValueError, OverflowError) as exc:
            raise delivery.params_error(name, method, params, exc) from None
        if ctx.package_max_length and len(body) > ctx.package_max_length:
            raise ValueError(f"params of {name}.{method} pack to {len(body)} bytes, above the "
                             f"server's package_max_length ({ctx.package_max_length})")
        if not wants_reply:
            self._send_behind(worker_id, body)
            return req_id
        self.callbacks[req_id] = callback
        try:
            with self.lock:
                self.mailbox.send(worker_id, body, timeout)
        except BaseException:
            self.callbacks.pop(req_id, None)
            raise
        if type == TYPE_ASYNC:
            return req_id
        return self._wait(req_id, name, method, timeout)

    def _wait(self, req_id: int, name: str, method: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        done: list[Any] = []

        def intercept(mtype: str, data: Any, src: int) -> bool:
            reply = _task_reply(data) if mtype == PIPE_TASK_RESULT else None
            if reply is not None and reply[0] == req_id:
                done.append(reply)
            else:
                self.backlog.append((mtype, data, src))
            return True

        while not done:
            left = deadline - time.monotonic()
            if left <= 0:
                self.callbacks.pop(req_id, None)
                raise TaskTimeout(f"task {name}.{method} gave no result within {timeout} s")
            if self.mailbox.wait(left):
                dispatch_messages(self.mailbox, intercept)
        self.callbacks.pop(req_id, None)
        _, ok, value = done[0]
        if not ok:
            raise TaskError.from_wire(value)
        return value

    def take_reply(self, mtype: str, data: Any, src: int) -> bool:
        """intercept for reads outside a CO wait: replies go to their callbacks."""
        reply = _task_reply(data) if mtype == PIPE_TASK_RESULT else None
        if reply is None:
            return False
        req_id, ok, value = reply
        callback = self.callbacks.pop(req_id, None)
        if callback is not None:
            result = value if ok else TaskError.from_wire(value)
            try:
                callback(req_id, result)
            except Exception:
                log.exception("callback of task request %d failed", req_id)
        return True


def _task_reply(data: Any) -> tuple[int, bool, Any] | None:
    """(request id, ok, value) from the data of a "task.result" message; None when it is not
    one (any process can send that type: a malformed one must not break a waiting delivery)."""
    if (isinstance(data, list) and len(data) == 3 and type(data[0]) is int
            and type(data[1]) is bool):
        return data[0], data[1], data[2]
    return None


def deliver_many_by_process(calls: list[tuple[str, str, Sequence[Any]]], worker_id: int = -1,
                            timeout: float = 3.0) -> None:
    """ASYNC delivery of many tasks from a user process in one pipe message: one hop for all,
    and the worker sends them on together. No outcomes come back."""
    ctx = context.current
    if ctx.role != context.PROCESS:
        raise DeliveryError("deliver_many_by_process works in the user processes of a server")
    _mailbox("deliver_many_by_process")
    if worker_id == -1:
        worker_id = least_loaded(ctx)
    send_message([list(c) for c in calls], worker_id, PIPE_TASKS, timeout)


def least_loaded(ctx: context.ProcessContext) -> int:
    """The worker with the fewest tasks waiting for a result (ties: the lowest id)."""
    assert ctx.load is not None and ctx.server is not None
    loads = ctx.load[: ctx.server.worker_num].tolist()
    return loads.index(min(loads))


def deliver_by_process(name: str, method: str, params: Sequence[Any], timeout: float,
                       worker_id: int, type: int,
                       callback: Callable[[int, Any], Any] | None) -> Any:
    ctx = context.current
    if ctx.role != context.PROCESS or ctx.process is None:
        if ctx.role == context.WORKER:
            raise DeliveryError("Task.deliver_by_process is for user processes: in a worker, "
                                "call Task.deliver")
        raise DeliveryError("Task.deliver_by_process works in the user processes of a running "
                            "server (server.add_process or @process)")
    _mailbox("Task.deliver_by_process")
    return ctx.process.delivery.deliver(name, method, params, timeout, worker_id, type, callback)
