"""Delivering cluster tasks from a separate program: ``Task.configure(cluster="redis://...")``.

No server runs in the program: it writes its tasks to the queues' streams itself (the task's
queue comes from its ``@task(queue=...)`` declaration, so the program imports the module that
declares it). ASYNC deliveries return an id at once and are written behind, many per
call (``scripts``; by a helper thread once deliveries pause, and at exit); nobody reads their results.
CO deliveries write everything held before them, then wait for their result on the program's
own reply stream (``pyswtask:r:<host>:<pid>:program``, deleted at exit).

It must not assume a role: it knows Redis and the envelope checks only.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import socket
import threading
import time
from typing import Any, Sequence

from .. import registry
from ..envelope import TYPE_ASYNC, TYPE_CO, check_timeout, check_type, pack_task
from ..errors import ClusterUnavailable, DeliveryError, TaskTimeout
from ..transport.writebehind import WriteBehind
from . import keys
from .connection import check_url, connect, describe_url, require_redis
from .entries import error_from_wire, parse_result, task_fields, unpack_value
from .scripts import APPEND, TaskAppender, append_args

__all__ = ["configure", "client", "ClusterClient"]

log = logging.getLogger("pyswtask.cluster")

_BATCH = 512                 # ASYNC deliveries written by the deliverer itself at this many
_LINGER = 0.0005             # the flusher lets a burst go on this long before writing

_lock = threading.Lock()
_url: str | None = None
_exit_timeout = 3.0
_client: ClusterClient | None = None


def configure(url: str | None, exit_timeout: float = 3.0) -> None:
    """Sets (or, with None, clears) the cluster this program delivers cluster tasks to."""
    global _url, _client, _exit_timeout
    checked = None if url is None else check_url(url, "Task.configure(cluster=...)")
    with _lock:
        if _client is not None:
            _client.close()
            _client = None
        _url = checked
        _exit_timeout = float(exit_timeout)


def client() -> ClusterClient | None:
    """This program's client of the configured cluster, connected on first use; None when
    none is configured. ClusterUnavailable when its Redis does not answer."""
    global _client
    if _client is not None or _url is None:
        return _client
    with _lock:
        if _client is None and _url is not None:
            _client = ClusterClient(_url, _exit_timeout)
        return _client


def _forget_after_fork() -> None:
    global _client
    _client = None


os.register_at_fork(after_in_child=_forget_after_fork)


class ClusterClient:
    """One program's connection to the cluster."""

    def __init__(self, url: str, exit_timeout: float = 3.0) -> None:
        self.url = url
        self.lib = require_redis()
        self.r: Any = connect(url, timeout=keys.TIMEOUT)
        self.appender = TaskAppender(self.r)
        self.co_conn: Any = None        # CO deliveries' writes and first reads (the lock held)
        self.pid = os.getpid()
        self.node = f"{socket.gethostname()}:{self.pid}:program"
        self.reply = keys.reply_stream(self.node)
        self.seqs = itertools.count(1)
        self.exit_timeout = exit_timeout
        self.held: list[tuple[str, dict[bytes, Any]]] = []
        self.puts = 0
        self.results: dict[int, tuple[bool, Any]] = {}
        self.last = f"{int(time.time() * 1000)}-0".encode()
        self.behind = WriteBehind("pyswtask-cluster-flusher", self._flush_behind,
                                  lambda: time.sleep(0.1), linger=_LINGER,
                                  activity=lambda: self.puts)
        self.lock = self.behind.lock
        self.closed = False
        atexit.register(self.close)

    def deliver(self, name: str, method: str, params: Sequence[Any], type: int,
                timeout: float) -> Any:
        """One cluster task: ASYNC returns its id, CO its result."""
        queue = registry.queue_of(name)
        if queue is None:
            raise DeliveryError(f"task {name!r} is not a cluster task in this program: import "
                                "the module that declares it with @task(queue=...)")
        check_type(type)
        timeout = check_timeout(timeout)
        body = pack_task(name, method, params, type, 0)
        seq = next(self.seqs)
        reply = self.node if type == TYPE_CO else ""
        deadline = time.time() + timeout if type == TYPE_CO else 0.0
        fields = task_fields(f"{self.node}/{self.pid}/{seq}", name, method, body, type, reply,
                             -1, self.pid, seq, deadline)
        with self.lock:
            if len(self.held) >= keys.HOLD_MAX:
                raise ClusterUnavailable(f"{len(self.held)} ASYNC deliveries wait for the "
                                         f"cluster's Redis at {describe_url(self.url)}")
            self.held.append((keys.queue_stream(queue), fields))
            self.puts += 1
            if type == TYPE_ASYNC:
                if len(self.held) >= _BATCH:
                    self._write()
                else:
                    self.behind.wake()
                return seq
            try:
                first = self._write_and_read(timeout)
            except ClusterUnavailable:
                self.held = [h for h in self.held if h[1] is not fields]
                raise
        self._take(first, seq)
        return self._wait(seq, name, method, timeout)

    def flush(self, timeout: float) -> bool:
        """Writes the ASYNC deliveries held back, retrying for up to timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                try:
                    self._write()
                    return True
                except ClusterUnavailable:
                    pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def close(self) -> None:
        """At exit: writes what is held (within exit_timeout), deletes the reply stream."""
        if self.closed:
            return
        self.closed = True
        self.behind.close()
        if self.held and not self.flush(self.exit_timeout):
            log.error("%d ASYNC cluster deliveries lost: the cluster's Redis at %s did not "
                      "answer", len(self.held), describe_url(self.url))
        try:
            if self.co_conn is not None:
                self.co_conn.disconnect()
            self.r.delete(self.reply)
            self.r.close()
        except self.lib.RedisError:
            pass

    def _flush_behind(self) -> bool:
        try:
            self._write()
        except ClusterUnavailable as exc:
            log.warning("%s; retrying", exc)
            return False
        return True

    def _write(self) -> None:
        """Writes every held delivery, one call per stream (the lock held); what was written
        leaves the hold even when a later stream's call fails."""
        while self.held:
            self._write_stream()

    def _write_stream(self) -> None:
        stream = self.held[0][0]
        batch = [fields for s, fields in self.held if s == stream]
        try:
            self.appender.append(stream, batch)
        except self.lib.RedisError as exc:
            raise ClusterUnavailable(f"the cluster's Redis at {describe_url(self.url)} is "
                                     f"unreachable: {exc}") from exc
        self.held = [h for h in self.held if h[0] != stream]

    def _write_and_read(self, timeout: float) -> Any:
        """Writes every held delivery (the lock held) and, in the same round trip, reads the
        reply stream, blocking briefly: the CO delivery's result may come with it. The
        XREAD's reply, for ``_take``."""
        while len({stream for stream, _ in self.held}) > 1:
            self._write_stream()
        stream = self.held[0][0]
        entries = [fields for _, fields in self.held]
        if len(entries) == 1:
            # The CO call alone, as a rule: a plain XADD, which costs Redis (on the call's path)
            # a fraction of a script call.
            append = ["XADD", stream, "MAXLEN", "~", keys.QUEUE_MAXLEN, "*",
                      *itertools.chain.from_iterable(entries[0].items())]
        else:
            append = ["EVAL", APPEND, 1, stream, *append_args(keys.QUEUE_MAXLEN, entries)]
        block = max(1, int(min(timeout, keys.BLOCK_MS / 1000) * 1000))
        if self.co_conn is None:
            # Its own: the pool's check of a connection it hands out costs system calls.
            self.co_conn = self.r.connection_pool.make_connection()
        conn = self.co_conn
        try:
            conn.send_packed_command(conn.pack_commands([
                append, ["XREAD", "COUNT", 100, "BLOCK", block, "STREAMS", self.reply, self.last]]))
            error: BaseException | None = None
            try:
                conn.read_response()
            except self.lib.ResponseError as exc:
                error = exc
            else:
                self.held = []
            reply = conn.read_response()
        except (self.lib.RedisError, OSError) as exc:
            conn.disconnect()       # made again by the next call
            error = exc
            reply = None
        if error is not None:
            raise ClusterUnavailable(f"the cluster's Redis at {describe_url(self.url)} is "
                                     f"unreachable: {error}") from error
        return reply

    def _take(self, reply: Any, seq: int) -> None:
        """Keeps the result of seq from an XREAD reply of the reply stream (raw or parsed)."""
        for _stream, entries in reply or ():
            for eid, fields in entries:
                self.last = eid
                if isinstance(fields, list):
                    it = iter(fields)
                    fields = dict(zip(it, it))
                try:
                    _id, _worker, _pid, got, ok, value = parse_result(fields)
                except ValueError as exc:
                    log.error("cluster: %s dropped", exc)
                    continue
                if got == seq:      # a result nobody waits for any more is dropped
                    self.results[got] = (ok, value)

    def _wait(self, seq: int, name: str, method: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while seq not in self.results:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TaskTimeout.after(f"task {name}.{method}", timeout)
            try:
                reply = self.r.xread({self.reply: self.last}, count=100,
                                     block=max(1, int(min(left, keys.BLOCK_MS / 1000) * 1000)))
            except self.lib.RedisError as exc:
                raise ClusterUnavailable(f"the cluster's Redis at {describe_url(self.url)} is "
                                         f"unreachable: {exc}") from exc
            self._take(reply, seq)
        ok, value = self.results.pop(seq)
        if not ok:
            raise error_from_wire(unpack_value(value))
        return unpack_value(value)
