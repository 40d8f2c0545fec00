"""The relay: tasks a user process delivers through a worker (Swoft's deliverByProcess).

A user process has no channel to the task workers. It sends a pipe message of type ``"task"``
(``[request id, name, method, envelope, wants reply, pid, origin role]``: the task's envelope
packed by the process itself, naming it as the origin, with a CO delivery's deadline) or
``"tasks"`` (many fire-and-forget calls, the crontab's:
``[pid, origin role, [[name, method, params], ...], [pile size, ...]]``: the first calls
come in piles, see ``Burst``) to a worker; the worker delivers each
task ASYNC on the process's behalf (a "task" message's envelope as it came: the worker never
unpacks and packs its params again), and, when asked,
sends the outcome back as a ``"task.result"`` message
(``[request id, ok, value or [type, message, traceback]]``). These messages never leave one
server, whose processes all run the same code: their form has no version.

Both ends live here: ``RelayClient`` in the user process, ``handle_message`` in the worker.
This module knows pipe messages and the envelope checks; it does not know roles: the worker
passes in how it delivers and how it sends.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Any, Callable, Sequence

from .._core import Mailbox, brief_repr
from ..context import TaskOrigin
from ..envelope import (
    ORIGIN_NAMES,
    ORIGIN_USER_PROCESS,
    TYPE_ASYNC,
    TYPE_CO,
    check_type,
    deadline_after,
    pack_task,
)
from ..errors import TaskError, TaskTimeout
from .pipe import dispatch_messages, pack_raw
from .writebehind import WriteBehind

__all__ = ["PIPE_TASK", "PIPE_TASKS", "PIPE_TASK_RESULT", "Burst", "RelayClient", "Relayed",
           "handle_message", "pack_tasks"]

log = logging.getLogger("pyswtask.pipe")

PIPE_TASK = "task"
PIPE_TASKS = "tasks"        # many fire-and-forget tasks in one message (the crontab's)
PIPE_TASK_RESULT = "task.result"

# A fire-and-forget delivery (or pipe message) this soon after the previous one is part of a
# burst: it is held to leave with the ones after it. The flusher sends what a burst left once
# they have paused for LINGER.
BURST_GAP = 0.0005
LINGER = 0.0005
# Bytes queued for one inbox past which a send waits for it to drain.
HIGH_WATER = 1 << 20

Callback = Callable[[int, Any], Any]


class RelayClient:
    """The user-process side: request ids, waiting replies, backlog, and the write-behind of
    ASYNC deliveries.

    A fire-and-forget ASYNC delivery (no callback) and a pipe message (send_message) return
    once their message is written or queued behind earlier ones. The first of a burst is
    written at once, as Swoole's are; those that follow it within ``BURST_GAP`` are held and
    leave together, many per record, instead of one syscall and one wake-up of the worker
    each: from the sending call once a record is full, else from a helper thread once the
    sends pause for ``LINGER`` (plus a GIL switch interval, 5 ms, under CPU-bound Python code).
    The same thread writes the queue as a full inbox drains, so nothing waits on this
    process's next call; a send blocks only while more than ``HIGH_WATER`` bytes wait for one
    inbox (a pipe message: for its timeout, then TimeoutError). A delivery that expects an
    answer (CO, a callback) waits until written, after everything queued before it. At exit
    the queue is written out (within the timeout).
    """

    __slots__ = ("mailbox", "worker_num", "load", "limit", "target", "ids", "callbacks",
                 "backlog", "behind", "_left", "pid", "_last", "_puts")

    def __init__(self, mailbox: Mailbox, worker_num: int = 0, load: memoryview | None = None,
                 limit: int = 0, target: Any = None) -> None:
        self.mailbox = mailbox
        self.worker_num = worker_num
        self.load = load                        # uint32 per worker: its tasks without a result
        self.limit = limit                      # package_max_length
        self.target = target                    # the server, for PIPE_MESSAGE
        self.pid = os.getpid()                  # the origin of what it delivers
        self.ids = itertools.count(1)
        self.callbacks: dict[int, Callback | None] = {}
        # Messages that arrived while a CO delivery waited; dispatched by the next read.
        self.backlog: list[tuple[str, Any, int]] = []
        self._left: list[int] = []
        self._last = 0.0                        # when the last ASYNC delivery was queued
        self._puts = 0                          # ASYNC deliveries queued: the flusher's clock
        self.behind = WriteBehind("pyswtask-flusher", self._flush_some, self._wait_room,
                                  linger=LINGER, activity=lambda: self._puts)

    # -- sending --------------------------------------------------------------------------------

    def send(self, dst: int, body: bytes, timeout: float) -> None:
        """Writes one message, behind whatever ASYNC deliveries are queued, never beside the
        flusher thread; blocks until written (TimeoutError after timeout)."""
        with self.behind.lock:
            self.mailbox.send(dst, body, timeout)

    def send_message(self, dst: int, body: bytes, timeout: float = -1.0) -> None:
        """A pipe message: written at once, or held in a burst as fire-and-forget deliveries
        are; TimeoutError when the inbox stays full (more than HIGH_WATER waiting) for timeout
        seconds (< 0: no limit)."""
        now = time.monotonic()
        at_once = now - self._last >= BURST_GAP
        self._last = now
        with self.behind.lock:
            self._puts += 1
            if self.mailbox.send_behind(dst, body, HIGH_WATER, at_once, timeout):
                self.behind.wake()

    def _flush_some(self) -> bool:
        self._left = self.mailbox.flush()
        return not self._left

    def _wait_room(self) -> None:
        self.mailbox.wait_writable(self._left, 0.1)

    def flush(self, timeout: float) -> None:
        """Writes out whatever is queued, waiting up to timeout seconds."""
        deadline = time.monotonic() + timeout
        with self.behind.lock:
            while (left := self.mailbox.flush()) and time.monotonic() < deadline:
                self.mailbox.wait_writable(left, min(0.1, deadline - time.monotonic()))
            if left:
                log.error("%d inbox(es) still full at exit: queued deliveries lost", len(left))

    def least_loaded(self) -> int:
        """The worker with the fewest tasks waiting for a result (ties: the lowest id)."""
        assert self.load is not None
        loads = self.load[: self.worker_num].tolist()
        return loads.index(min(loads))

    def deliver(self, name: str, method: str, params: Sequence[Any], timeout: float,
                worker_id: int, type: int, callback: Callback | None) -> Any:
        """One call through worker ``worker_id`` (-1: the least loaded): ASYNC returns the
        request id, CO the result."""
        if worker_id == -1:
            worker_id = self.least_loaded()
        elif not isinstance(worker_id, int) or not 0 <= worker_id < self.worker_num:
            raise ValueError(f"worker_id {worker_id!r} is out of range: tasks are delivered "
                             f"through workers 0..{self.worker_num - 1}, or -1 for the least "
                             "loaded one")
        check_type(type)
        if not isinstance(params, (list, tuple)):
            raise TypeError(f"params must be a list or tuple, not {params.__class__.__name__}")
        wants_reply = type == TYPE_CO or callback is not None
        req_id = next(self.ids)
        envelope = pack_task(name, method, params, type, self.limit,
                             deadline_after(timeout) if type == TYPE_CO else None,
                             (self.pid, ORIGIN_USER_PROCESS))
        body = pack_raw(PIPE_TASK, (req_id, name, method, envelope, wants_reply, self.pid,
                                    ORIGIN_USER_PROCESS))
        if not wants_reply:
            self.send_message(worker_id, body)
            return req_id
        self.callbacks[req_id] = callback
        try:
            self.send(worker_id, body, timeout)
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
                raise TaskTimeout.after(f"task {name}.{method}", timeout)
            if self.mailbox.wait(left):
                dispatch_messages(self.mailbox, self.target, intercept)
        self.callbacks.pop(req_id, None)
        _, ok, value = done[0]
        if not ok:
            raise TaskError.from_wire(value)
        return value

    # -- receiving ------------------------------------------------------------------------------

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


def pack_tasks(calls: Sequence[Sequence[Any]], role: int,
               piles: Sequence[int] = ()) -> list[Any]:
    """The data of a "tasks" message from this process, whose role is ``role`` (ORIGIN_*);
    piles: the sizes of the piles the first calls come in (see Burst)."""
    return [os.getpid(), role, [list(c) for c in calls], list(piles)]


# -- the worker's side ------------------------------------------------------------------------


class Burst:
    """The tasks of one "tasks" message, in the worker: they leave it together, in one record
    per task worker. The first ones may come in piles (the crontab's quick runs of a second):
    each pile goes to one task worker, which runs its tasks one after another with no wake-up
    between them; the others are spread. ``pile`` is the pile of the task being delivered
    (-1: none)."""

    __slots__ = ("pile", "_dsts")

    def __init__(self) -> None:
        self.pile = -1
        self._dsts: dict[int, int] = {}

    def dst(self, pick: Callable[[], int]) -> int:
        """The task worker for the task being delivered: -1 (spread) outside a pile; in one,
        the task worker ``pick`` chose for the pile's first task."""
        if self.pile < 0:
            return -1
        dst = self._dsts.get(self.pile)
        if dst is None:
            dst = self._dsts[self.pile] = pick()
        return dst


class Relayed:
    """The finish callback of a task a worker delivers for a process: the origin FINISH_TASK
    listeners see, and the reply the process asked for, if it did."""

    __slots__ = ("origin", "wire", "reply")

    def __init__(self, pid: int, role: int, reply: Callback | None = None) -> None:
        self.origin = TaskOrigin(pid, ORIGIN_NAMES.get(role, "user_process"))
        self.wire = (pid, role)                 # the envelope's origin fields
        self.reply = reply

    def __call__(self, task_id: int, result: Any) -> None:
        if self.reply is not None:
            self.reply(task_id, result)


# The Relayed of fire-and-forget deliveries, one per (pid, role): a burst of them from one
# process shares it. Bounded, as pids come and go with respawns.
_silent: dict[tuple[int, int], Relayed] = {}
_SILENT_MAX = 256


def _silent_relayed(pid: int, role: int) -> Relayed:
    relayed = _silent.get((pid, role))
    if relayed is None:
        if len(_silent) >= _SILENT_MAX:
            _silent.clear()
        relayed = _silent[(pid, role)] = Relayed(pid, role)
    return relayed


# deliver(name, method, envelope, relayed, burst): the packed task, ASYNC on the process's
# behalf; burst: None for a "task" message's, the message's Burst for a "tasks" message's.
Deliver = Callable[[str, str, bytes, Relayed, "Burst | None"], Any]
Send = Callable[[Any, int, str], None]


def handle_message(mtype: str, data: Any, src: int, deliver: Deliver, send: Send,
                   limit: int = 0) -> None:
    """In a worker: delivers the task(s) of a "task" / "tasks" message from process ``src``
    with ``deliver(name, method, envelope, relayed)`` (ASYNC), and sends outcomes back with
    ``send(data, dst, type)`` when the process asked for them. ``limit``: the server's
    package_max_length, for the envelopes of a "tasks" message, packed here. Other types are
    not its."""
    if mtype == PIPE_TASKS:
        _deliver_many(data, src, deliver, limit)
        return
    if mtype != PIPE_TASK:
        return
    try:
        req_id, name, method, envelope, reply, pid, role = data
        if (type(envelope) is not bytes or type(pid) is not int or type(role) is not int
                or type(name) is not str or type(method) is not str):
            raise ValueError
    except (TypeError, ValueError):
        log.error("malformed task message from process %d dropped: %s", src, brief_repr(data))
        return
    if reply:
        def answer(task_id: int, result: Any) -> None:
            _reply(send, src, req_id, result)
        relayed = Relayed(pid, role, answer)
    else:
        relayed = _silent_relayed(pid, role)
    try:
        deliver(name, method, envelope, relayed, None)
    except Exception as exc:
        log.error("task %s.%s for process %d not delivered: %s", name, method, src, exc)
        if reply:
            _reply(send, src, req_id, TaskError(type(exc).__name__, str(exc)))


def _deliver_many(data: Any, src: int, deliver: Deliver, limit: int) -> None:
    if not (isinstance(data, list) and len(data) == 4 and type(data[0]) is int
            and type(data[1]) is int and isinstance(data[2], list) and isinstance(data[3], list)
            and all(type(n) is int and n > 0 for n in data[3])):
        log.error("malformed tasks message from process %d dropped: %s", src, brief_repr(data))
        return
    relayed = _silent_relayed(data[0], data[1])
    burst = Burst()
    piles = [k for k, n in enumerate(data[3]) for _ in range(n)]
    for i, call in enumerate(data[2]):
        burst.pile = piles[i] if i < len(piles) else -1
        try:
            name, method, params = call
            deliver(name, method, pack_task(name, method, params, TYPE_ASYNC, limit, None,
                                            relayed.wire), relayed, burst)
        except Exception as exc:
            log.error("task %s for process %d not delivered: %s", brief_repr(call), src, exc)


def _reply(send: Send, dst: int, req_id: int, result: Any) -> None:
    if isinstance(result, TaskError):
        payload = [req_id, False, [result.remote_type, result.remote_message,
                                   result.remote_traceback]]
    else:
        payload = [req_id, True, result]
    try:
        send(payload, dst, PIPE_TASK_RESULT)
    except Exception as exc:
        log.error("result of a task for process %d not sent back: %s", dst, exc)
