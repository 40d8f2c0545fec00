"""A task worker's own consumer of the cluster's queues: it takes cluster tasks from Redis and
runs them itself, so no other process of the node stands between Redis and the task.

Each task worker of a node that serves queues is a consumer in each queue's group, named
``<node>:<pid>``. It keeps one ``XREADGROUP BLOCK`` outstanding on a connection of its own,
whose socket the task worker's loop watches beside its channels (``TaskLoop.watch``), as
Swoole's task workers wait in ``msgrcv``. The tasks that come run between the channels' tasks,
one per turn of the loop, synchronously, through the task worker's executor (the built-in
``pyswtask.cluster`` task, ``runner``). Once a read's tasks have run (or after ``FLUSH_AFTER``
seconds of them), their results are appended to the delivering nodes' reply streams and the
tasks acknowledged in one script (``scripts.DONE``, atomic: acknowledged only with the result
written), sent in one write with the next ``XREADGROUP``.

``cluster_prefetch``: a read takes at most ``count`` tasks (the node's ``cluster_prefetch``
split among its task workers, at least one each) and the next read goes out only once they
ran, so a node's task workers hold at most about ``cluster_prefetch`` unacknowledged tasks;
its bridge holds at most as many more, those it claimed.

Redis down or stalled (an error, or no reply within the block time and ``keys.TIMEOUT``): the
connection is dropped and made again later, backing off from ``BACKOFF_MIN`` to
``BACKOFF_MAX`` seconds. A connection attempt is the one call that makes the channels wait on
Redis, at most ``keys.TIMEOUT``. Tasks taken and results not yet written are kept and written
then; the first read on a new connection, and one every third of the visibility timeout (at
most every 10 s), is of this consumer's own pending tasks (``ID 0``), so a read whose reply
was lost with a connection is not left pending for ever. A consumer
group that Redis lost is created again.

A stopping task worker unblocks its read (``CLIENT UNBLOCK``), runs what that read still
brought, writes the results, and deletes its consumer when nothing is pending on it. One that
dies leaves its tasks pending on its consumer: the bridges' ``XAUTOCLAIM`` takes them after the
visibility timeout, and the node's bridge deletes the dead consumer once nothing is pending.

It must not know the roles nor the task worker's loop beyond ``watch``: it is given a
function that runs a task.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import ssl
import time
from typing import Any, Callable

from ..errors import TaskError
from . import keys
from .connection import connect, describe_url, require_redis
from .entries import TaskEntry, result_fields
from .scripts import DONE, done_args

__all__ = ["TaskWorkerConsumer", "BACKOFF_MIN", "BACKOFF_MAX", "FLUSH_AFTER"]

log = logging.getLogger("pyswtask.cluster")

BACKOFF_MIN = 0.25      # seconds before the first new connection after a failure
BACKOFF_MAX = 5.0
FLUSH_AFTER = 0.05      # results of a read still running are written after this many seconds

# What each reply on the connection answers, in order.
_READ = 0
_DONE = 1

RunTask = Callable[[TaskEntry], tuple[bool, Any]]
# A task's result to write: (queue, reply stream or "", entry id, result fields).
Result = tuple[str, str, bytes, dict[bytes, Any]]


class TaskWorkerConsumer:
    """The consumer of one task worker; ``on_ready`` is what its loop calls (see
    ``TaskLoop.watch``): when the socket is readable and when the time it returned is up."""

    def __init__(self, url: str, queues: list[str], node: str, run: RunTask,
                 count: int = 1, visibility: float = 30.0) -> None:
        self.lib = require_redis()
        self.hiredis = require_hiredis()
        self.url = url
        self.name = f"{node}:{os.getpid()}"
        self.run = run
        self.count = max(1, count)
        self.streams = [keys.queue_stream(q) for q in queues]
        self.conn: Any = None           # redis-py's: it connects (TLS, credentials) and packs
        self.sock: Any = None           # its socket, non-blocking, read into self.reader
        self.reader: Any = None
        self.pool: Any = None
        self.client_id = 0
        self.watch: Callable[[int, Any], None] | None = None
        # What each reply to come answers, in order: a read, or the write of these results.
        self.expect: collections.deque[tuple[int, list[Result]]] = collections.deque()
        self.batch: collections.deque[TaskEntry] = collections.deque()
        self.results: list[Result] = []
        self.first_result = 0.0
        self.history = True             # the next read is of this consumer's pending tasks
        # ... and again every so often, while the node's bridge keeps them from being claimed.
        self.history_every = min(visibility / 3, 10.0)
        self.history_at = 0.0
        self.sent_at = 0.0
        self.retry_at = 0.0
        self.backoff = BACKOFF_MIN
        self.up = True
        self.stopping = False

    # -- the loop's side ------------------------------------------------------------------------

    def attach(self, watch: Callable[[int, Any], None],
               watch_after: Callable[[float], None]) -> None:
        """Starts consuming through the loop's ``TaskLoop.watch`` and ``watch_after``: the
        connection is made on the loop's first turn."""
        self.watch = watch
        watch(-1, self.on_ready)
        watch_after(0.0)

    def on_ready(self) -> float:
        """Reads what came, runs one task taken, writes results, asks for more; returns the
        seconds until it must be called again even if nothing comes (< 0: never)."""
        if self.conn is None:
            if self.stopping and not self.batch:
                return -1.0
            left = self.retry_at - time.monotonic()
            if left > 0:
                return left
            if not self._open():
                return max(0.0, self.retry_at - time.monotonic())
        try:
            self._turn()
        except (self.lib.RedisError, self.hiredis.HiredisError, OSError) as exc:
            self._down(exc)
        if self.conn is None:
            return max(0.0, self.retry_at - time.monotonic())
        if self.batch:
            return 0.0              # the next task after the loop looked at its channels
        if self.expect and time.monotonic() - self.sent_at > keys.BLOCK_MS / 1000 + keys.TIMEOUT:
            self._down(None)
            return self.retry_at - time.monotonic()
        return self._due()

    def stop(self) -> None:
        """The task worker stops: no read from now on."""
        self.stopping = True

    def close(self) -> None:
        """After the task worker's loop ended: ends the outstanding read, runs what it
        brought, writes the results, and leaves the group when nothing is pending on this
        consumer."""
        self.stopping = True
        if self.conn is None and (self.batch or self.results) and not self._open():
            log.warning("cluster: consumer %s stopped with %d task(s) unacknowledged: they "
                        "are claimed after the visibility timeout", self.name,
                        len(self.batch) + len(self.results))
            return
        conn = self.conn
        if conn is None:
            return
        try:
            if self._reading() and self.client_id:
                other = connect(self.url, timeout=keys.TIMEOUT, check=False)
                try:
                    other.client_unblock(self.client_id)
                finally:
                    other.close()
            while (self.expect or self.batch or self.results) and self.conn is not None:
                if self.expect:
                    self._read_one(self._reply(keys.TIMEOUT))
                self._turn()
            if self.conn is None:
                return
            pending = any(self._call("XPENDING", stream, keys.GROUP, "-", "+", 1, self.name)
                          for stream in self.streams)
            if not pending:
                for stream in self.streams:
                    self._call("XGROUP", "DELCONSUMER", stream, keys.GROUP, self.name)
        except (self.lib.RedisError, self.hiredis.HiredisError, OSError) as exc:
            log.warning("cluster: consumer %s left without cleaning up: %s", self.name, exc)
        finally:
            self._drop()

    # -- reading, running, writing ----------------------------------------------------------------

    def _turn(self) -> None:
        if self.expect:
            self._receive()
            while self.expect:
                reply = self.reader.gets()
                if reply is False:
                    break
                self._read_one(reply)
        if self.batch:
            self._run_one()
        if self.batch and not (self.results and
                               time.monotonic() - self.first_result > FLUSH_AFTER):
            return
        commands: list[tuple[list[Any], list[Result]]] = []
        if self.results:
            commands += self._done_commands()
        if not self.batch and not self._reading() and not self.stopping:
            if time.monotonic() >= self.history_at:
                self.history = True
            commands.append((self._read_command(), []))
        if commands:
            self._send(commands)

    def _reading(self) -> bool:
        return any(kind == _READ for kind, _ in self.expect)

    def _read_one(self, reply: Any) -> None:
        kind = self.expect.popleft()[0]
        if isinstance(reply, self.hiredis.ReplyError):
            if kind == _READ:
                self._read_failed(reply)
            else:
                # The script ran and one command failed (NOGROUP: a restarted Redis lost the
                # group, and the pending entries with it): nothing to retry.
                log.warning("cluster: consumer %s writing results: %s", self.name, reply)
            return
        if kind == _DONE:
            return
        if not self.up:
            self.up = True
            log.info("cluster: consumer %s reads the Redis at %s again", self.name,
                     describe_url(self.url))
        if self.history:
            self.history = False
            self.history_at = time.monotonic() + self.history_every
            self._take_history(reply)
        else:
            self.batch.extend(_entries(reply))

    def _take_history(self, reply: Any) -> None:
        """This consumer's pending tasks, read on a new connection and every
        ``history_every`` seconds when it holds none: those it does not hold run (again: the
        result of a run may be lost), those deleted meanwhile are acknowledged. A read's tasks
        can be pending here without this consumer knowing them: Redis may have served a read
        of a connection that was dropped; the bridge keeps them from being claimed, so this
        consumer must find them itself."""
        held = {(e.queue, e.entry_id) for e in self.batch}
        held.update((queue, entry_id) for queue, _, entry_id, _ in self.results)
        for stream, entries in reply or ():
            queue = keys.queue_of_stream(stream)
            for entry_id, flat in entries:
                if (queue, entry_id) in held:
                    continue
                if not flat:
                    self._add_result((queue, "", entry_id, {}))
                    continue
                it = iter(flat)
                self.batch.append(TaskEntry(queue, entry_id, dict(zip(it, it))))

    def _run_one(self) -> None:
        entry = self.batch.popleft()
        ok, value = self.run(entry)
        if not entry.reply:
            self._add_result((entry.queue, "", entry.entry_id, {}))
            return
        fields = result_fields(entry, ok, value if ok else TaskError.from_wire(value))
        self._add_result((entry.queue, keys.reply_stream(entry.reply), entry.entry_id, fields))

    def _add_result(self, result: Result) -> None:
        if not self.results:
            self.first_result = time.monotonic()
        self.results.append(result)

    def _done_commands(self) -> list[tuple[list[Any], list[Result]]]:
        by_queue: dict[str, list[Result]] = {}
        for result in self.results:
            by_queue.setdefault(result[0], []).append(result)
        self.results = []
        return [(["EVAL", DONE, 1, keys.queue_stream(queue),
                  *done_args((r[1], r[2], r[3]) for r in results)], results)
                for queue, results in by_queue.items()]

    def _read_command(self) -> list[Any]:
        if self.history:
            return ["XREADGROUP", "GROUP", keys.GROUP, self.name, "COUNT", 1000, "STREAMS",
                    *self.streams, *("0" for _ in self.streams)]
        return ["XREADGROUP", "GROUP", keys.GROUP, self.name, "COUNT", self.count, "BLOCK",
                keys.BLOCK_MS, "STREAMS", *self.streams, *(">" for _ in self.streams)]

    def _send(self, commands: list[tuple[list[Any], list[Result]]]) -> None:
        """Sends the commands in one write. Results written just before a read go without a
        reply (CLIENT REPLY SKIP): the read's reply says they were, as Redis runs a
        connection's commands in order; until it came they count as not written."""
        wire: list[list[Any]] = []
        if commands[-1][0][0] == "XREADGROUP" and len(commands) > 1:
            skipped = [r for _, results in commands[:-1] for r in results]
            for command, _ in commands[:-1]:
                wire += (["CLIENT", "REPLY", "SKIP"], command)
            wire.append(commands[-1][0])
            self.expect.append((_READ, skipped))
        else:
            for command, results in commands:
                wire.append(command)
                self.expect.append((_READ if command[0] == "XREADGROUP" else _DONE, results))
        self._write(b"".join(self.conn.pack_commands(wire)))
        self.sent_at = time.monotonic()

    # -- the socket -------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        """Writes all of data; a peer that takes none of it for keys.TIMEOUT is down."""
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view):]
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                if not _wait_for(self.sock, select.POLLOUT, keys.TIMEOUT):
                    raise self.lib.TimeoutError("Redis took no data for "
                                                f"{keys.TIMEOUT} s") from None

    def _receive(self) -> None:
        """Feeds the reader all the socket holds now, without waiting."""
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            if not data:
                raise self.lib.ConnectionError("Redis closed the connection")
            self.reader.feed(data)
            if len(data) < 65536 and not (isinstance(self.sock, ssl.SSLSocket)
                                          and self.sock.pending()):
                return

    def _reply(self, timeout: float) -> Any:
        """The next reply, waiting for it up to timeout seconds (TimeoutError)."""
        deadline = time.monotonic() + timeout
        while True:
            reply = self.reader.gets()
            if reply is not False:
                return reply
            left = deadline - time.monotonic()
            if left <= 0 or not _wait_for(self.sock, select.POLLIN, left):
                raise self.lib.TimeoutError(f"Redis did not answer within {timeout} s")
            self._receive()

    def _call(self, *command: Any) -> Any:
        """One command and its reply, waiting (only where nothing else is outstanding)."""
        self._write(b"".join(self.conn.pack_command(*command)))
        reply = self._reply(keys.TIMEOUT)
        if isinstance(reply, self.hiredis.ReplyError):
            raise self.lib.ResponseError(str(reply))
        return reply

    def _read_failed(self, exc: Any) -> None:
        if "NOGROUP" not in str(exc):
            raise self.lib.ResponseError(str(exc))
        log.warning("cluster: the consumer group is gone (Redis restarted?): creating it again")
        self._ensure_groups()

    def _ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                self._call("XGROUP", "CREATE", stream, keys.GROUP, "0", "MKSTREAM")
            except self.lib.ResponseError as err:
                if "BUSYGROUP" not in str(err):
                    raise

    # -- the connection ----------------------------------------------------------------------------

    def _open(self) -> bool:
        if self.pool is None:
            self.pool = connect(self.url, timeout=keys.TIMEOUT, check=False).connection_pool
        conn = self.pool.make_connection()
        try:
            conn.connect()
            conn.send_command("CLIENT", "ID")
            self.client_id = int(conn.read_response())
            self.conn = conn
            self.sock = conn._sock
            self.sock.setblocking(False)
            self.reader = self.hiredis.Reader()
            self._ensure_groups()
        except (self.lib.RedisError, OSError) as exc:
            self.conn = None
            conn.disconnect()
            self._down(exc)
            return False
        self.backoff = BACKOFF_MIN
        self.history = True
        assert self.watch is not None
        self.watch(self.sock.fileno(), self.on_ready)
        return True

    def _down(self, exc: BaseException | None) -> None:
        if self.up:
            why = exc if exc is not None else "it stopped answering"
            log.error("cluster: consumer %s cannot reach the Redis at %s (%s): retrying",
                      self.name, describe_url(self.url), why)
            self.up = False
        self._drop()
        self.retry_at = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def _drop(self) -> None:
        conn, self.conn, self.sock = self.conn, None, None
        # Results whose write went with the connection: written again on the next one (a
        # second acknowledgement does nothing, a second result is dropped by its reader).
        unconfirmed = [r for _, results in self.expect for r in results]
        if unconfirmed:
            self.results[:0] = unconfirmed
            self.first_result = time.monotonic()
        self.expect.clear()
        if self.watch is not None:
            self.watch(-1, None if self.stopping and not self.batch else self.on_ready)
        if conn is not None:
            conn.disconnect()

    def _due(self) -> float:
        if not self.expect:
            return -1.0
        return max(0.0, self.sent_at + keys.BLOCK_MS / 1000 + keys.TIMEOUT - time.monotonic())


def require_hiredis() -> Any:
    """The hiredis module, or ImportError naming the extra that installs it."""
    try:
        import hiredis
    except ImportError:
        raise ImportError("the cluster's task workers need hiredis: pip install "
                          "'pyswtask[cluster]'") from None
    return hiredis


def _wait_for(sock: Any, events: int, timeout: float) -> bool:
    poll = select.poll()
    poll.register(sock.fileno(), events)
    return bool(poll.poll(max(0.0, timeout) * 1000))


def _entries(reply: Any) -> list[TaskEntry]:
    """The tasks of an XREADGROUP reply (RESP2, unparsed)."""
    out: list[TaskEntry] = []
    for stream, entries in reply or ():
        queue = keys.queue_of_stream(stream)
        for entry_id, flat in entries:
            if flat:
                it = iter(flat)
                out.append(TaskEntry(queue, entry_id, dict(zip(it, it))))
    return out
