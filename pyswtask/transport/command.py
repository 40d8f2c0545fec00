"""Delivering from a separate program (a "command": a script, a cron(8) job) through a running
server's message queue, as Swoft's QueueTask did.

``Task.configure(message_queue_key=...)`` or the PYSWTASK_QUEUE_KEY environment variable names
the queue. ASYNC deliveries return a task id at once: they are packed many to a message and
written behind the caller (by a helper thread as the queue drains, and at exit), so a burst
costs one msgsnd per message, not per task. Results of ASYNC tasks go nowhere. CO deliveries
wait for their result on a reply socket of this process (an abstract unix datagram socket
named after the queue and the pid), after everything delivered before them has been written.
It runs in a program outside any server and must not assume a role: it knows only the queue's key
and the record the server published beside it.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
from typing import Any

import sysv_ipc  # type: ignore[import-not-found]

from .._core import QueueGone, QueueSender, ReplyAssembler
from ..envelope import TYPE_ASYNC
from ..errors import DeliveryError, QueueFull, ServerNotRunning, TaskError, TaskTimeout
from .msgqueue import QueueInfo, parse_key, read_info, reply_address
from .writebehind import WriteBehind

__all__ = ["configure", "client", "QueueClient", "ENV_KEY"]

log = logging.getLogger("pyswtask.command")

ENV_KEY = "PYSWTASK_QUEUE_KEY"
# ASYNC bytes a command may hold unsent before deliver waits for the queue to drain.
_BACKLOG_MAX = 1 << 20
# How long the write-behind thread lets a partial message fill before sending it.
_LINGER = 0.0005
# How long a CO delivery polls for its result before sleeping, by default: the same as the
# server's task_wait_spin (a test keeps them equal; settings sits above this layer).
WAIT_SPIN = 0.0002

_lock = threading.Lock()
_configured: dict[str, Any] = {}
_client: QueueClient | None = None


def configure(message_queue_key: int | str | None = None, exit_timeout: float = 3.0,
              wait_spin: float = WAIT_SPIN) -> None:
    """Sets the queue this program delivers through (instead of PYSWTASK_QUEUE_KEY), how
    long the exit waits to write ASYNC deliveries still held back, and how long a CO delivery
    polls for its result before sleeping (as the server's task_wait_spin)."""
    global _client
    if not isinstance(wait_spin, (int, float)) or not wait_spin >= 0:
        raise ValueError(f"wait_spin must be a non-negative number of seconds, not {wait_spin!r}")
    with _lock:
        if _client is not None:
            _client.close()
            _client = None
        _configured.clear()
        if message_queue_key is not None:
            _configured["key"] = parse_key(message_queue_key)
        _configured["exit_timeout"] = float(exit_timeout)
        _configured["wait_spin"] = float(wait_spin)


def configured_key() -> int | None:
    """The key set by configure, else from the environment, else None."""
    if "key" in _configured:
        return int(_configured["key"])
    env = os.environ.get(ENV_KEY)
    if env:
        return parse_key(env, ENV_KEY)
    return None


def client() -> QueueClient | None:
    """This process's client of the configured queue, attached on first use; None when no
    queue is configured. Raises ServerNotRunning when no server serves that queue."""
    global _client
    if _client is not None:
        return _client
    with _lock:
        if _client is not None:
            return _client
        key = configured_key()
        if key is None:
            return None
        _client = QueueClient(key, float(_configured.get("exit_timeout", 3.0)),
                              float(_configured.get("wait_spin", WAIT_SPIN)))
        return _client


def _forget_after_fork() -> None:
    # A forked child has its own pid, so its own reply socket and task ids.
    global _client
    _client = None


os.register_at_fork(after_in_child=_forget_after_fork)


class QueueClient:
    """One program's connection to the server on a queue key."""

    def __init__(self, key: int, exit_timeout: float = 3.0, wait_spin: float = WAIT_SPIN) -> None:
        self.key = key
        self.pid = os.getpid()
        self.exit_timeout = exit_timeout
        self.wait_spin = wait_spin
        self.rtt = 0.0      # CO round trips, averaged (seconds)
        try:
            mq = sysv_ipc.MessageQueue(key)
        except sysv_ipc.ExistentialError:
            raise ServerNotRunning(f"no server is running on message queue key 0x{key:x}: "
                                   "there is no such queue") from None
        except sysv_ipc.PermissionsError:
            raise DeliveryError(f"message queue 0x{key:x} belongs to another user") from None
        info = read_info(key)
        if info is None:
            raise ServerNotRunning(f"no pyswtask server is running on message queue key "
                                   f"0x{key:x}: the queue exists, but no server announced "
                                   "itself on it (see `pyswtask queue stat`)")
        if not info.alive():
            raise ServerNotRunning(f"no server is running on message queue key 0x{key:x}: "
                                   f"the queue was left by server pid {info.pid}, which is gone")
        self.info: QueueInfo = info
        self.msqid = mq.id
        self.sender = QueueSender(mq.id, info.worker_num + 1, info.task_worker_num, info.msgmax,
                                  info.worker_num, self.pid)
        # Sends the partial message a burst leaves behind, once deliveries pause: while they
        # keep coming, full messages go out from deliver itself and the thread stays away
        # from the lock.
        self.behind = WriteBehind("pyswtask-queue-flusher", self._flush_behind,
                                  lambda: time.sleep(0.001), linger=_LINGER,
                                  activity=lambda: int(self.sender.puts))
        self.lock = self.behind.lock
        self.reply: socket.socket | None = None
        # The reply assemblers, one per thread (each receives into a buffer of its own), kept
        # for the thread's life: a result whose call timed out may still be coming in
        # fragments, and completes there (then is skipped) rather than reading as strays.
        self.assemblers = threading.local()
        self.closed = False
        atexit.register(self.close)

    # -- sending ------------------------------------------------------------------------------

    def deliver(self, name: str, method: str, body: bytes, type: int, timeout: float,
                dst: int) -> Any:
        """Sends one packed task; ASYNC returns its id, CO its result."""
        if len(body) > self.info.package_max_length:
            raise ValueError(f"params of {name}.{method} pack to {len(body)} bytes, above the "
                             f"server's package_max_length ({self.info.package_max_length})")
        if type == TYPE_ASYNC:
            with self.lock:
                try:
                    task_id = self.sender.put(body, dst, async_=True, backlog_max=_BACKLOG_MAX)
                    if not task_id:
                        self._make_room(time.monotonic() + timeout, _BACKLOG_MAX, name, method)
                        task_id = self.sender.put(body, dst, async_=True)
                except QueueGone:
                    raise self._gone() from None
            self._wake_flusher()
            return task_id
        started = time.monotonic()
        deadline = started + timeout
        fd = self._reply_socket().fileno()
        with self.lock:
            # Everything delivered before this goes first, then this task alone.
            if self.sender.queued:
                self._make_room(deadline, 1, name, method)
            task_id = self.sender.put(body, dst)
            before = self.sender.queued
            if not self._flush_once():
                self._make_room(deadline, 1, name, method, taking_back=before)
        result = self._wait_reply(fd, task_id, name, method, deadline, timeout)
        self.rtt = self.rtt * 0.9 + (time.monotonic() - started) * 0.1
        return result

    def _flush_once(self) -> bool:
        try:
            return bool(self.sender.flush())
        except QueueGone:
            raise self._gone() from None

    def _gone(self) -> ServerNotRunning:
        return ServerNotRunning(f"the server on message queue key 0x{self.key:x} stopped "
                                "(its queue was removed)")

    def _make_room(self, deadline: float, below: int, name: str, method: str,
                   taking_back: int = 0) -> None:
        """Sends until fewer than below bytes are held back, or raises QueueFull at the
        deadline. taking_back: the size of the task just queued, which is then taken back
        when none of it was sent (so no part of it is left in the queue)."""
        pause = 0.00005
        while not self._flush_once() and self.sender.queued >= below:
            if time.monotonic() >= deadline:
                if taking_back and self.sender.queued == taking_back:
                    self.sender.discard()
                elif taking_back:
                    # Its first part is in the queue: the rest must follow.
                    self._drain(time.monotonic() + 10.0)
                    return
                raise QueueFull(f"message queue 0x{self.key:x} is full: task {name}.{method} "
                                f"was not sent within the timeout ({self.sender.queued} bytes "
                                "held back; are the task workers running?)")
            time.sleep(pause)
            pause = min(pause * 2, 0.002)

    def _drain(self, deadline: float) -> bool:
        pause = 0.00005
        while not self._flush_once():
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.002)
        return True

    def _wake_flusher(self) -> None:
        if self.sender.queued:
            self.behind.wake()

    def _flush_behind(self) -> bool:
        try:
            return self._flush_once()
        except ServerNotRunning as exc:
            log.error("%s: %d bytes of ASYNC tasks lost", exc, self.sender.queued)
            self.sender.discard()
            return True

    def flush(self, timeout: float) -> bool:
        """Writes out every ASYNC delivery held back, waiting up to timeout seconds."""
        with self.lock:
            return self._drain(time.monotonic() + timeout)

    def close(self) -> None:
        if self.closed or self.pid != os.getpid():
            return
        if not self.flush(self.exit_timeout):
            log.error("message queue 0x%x stayed full: %d bytes of ASYNC tasks not delivered",
                      self.key, self.sender.queued)
        self.closed = True
        self.behind.close()
        if self.reply is not None:
            self.reply.close()
            self.reply = None
        atexit.unregister(self.close)

    # -- results ------------------------------------------------------------------------------

    def _reply_socket(self) -> socket.socket:
        if self.reply is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(reply_address(self.msqid, self.pid))
            self.reply = sock
        return self.reply

    def _wait_reply(self, fd: int, task_id: int, name: str, method: str, deadline: float,
                    timeout: float) -> Any:
        # Polled first, while results usually come within twice the spin, as a worker's CO
        # caller does (task_wait_spin): a reply that finds this process running saves waking
        # it, the larger part of a round trip where wake-ups across CPUs are dear. The core
        # polls and waits without a Python call or exception per empty read.
        spin = self.wait_spin if self.wait_spin and self.rtt <= 2 * self.wait_spin else 0.0
        replies = getattr(self.assemblers, "replies", None)
        if replies is None:
            replies = self.assemblers.replies = ReplyAssembler(
                on_protocol_error=log.error, max_body=self.info.package_max_length)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TaskTimeout.after(f"task {name}.{method}", timeout)
            results = replies.receive(fd, spin, left)
            spin = 0.0
            for tid, ok, value in results or ():
                if tid != task_id:
                    continue        # the reply to an earlier call that timed out
                if not ok:
                    raise TaskError.from_wire(value)
                return value
