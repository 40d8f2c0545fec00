"""The ``clusterBridge`` user process: a node's link to the cluster's Redis for what is
node-wide; the tasks of the queues the node serves are read and run by its task workers
themselves (``consumer``).

The workers never call Redis: a worker's delivery of a cluster task is a pipe message to this
process, and its results come back as pipe messages, so a stalled Redis can never block a
worker's event loop. Three threads, each with its own connection:

- the main thread reads its inbox: the workers' cluster deliveries (``XADD`` to the queue's
  stream, many per call: ``scripts``) and the results of the claimed tasks it had run locally
  (``XADD`` to the delivering node's reply stream and ``XACK``, a batch in one ``MULTI``: a
  task is acknowledged only once its result is written). Every second it renews the node's
  heartbeat key and trims what was acknowledged and read (``XTRIM MINID``). Every third of
  ``cluster_visibility_timeout`` (at most every 10 s) it re-claims the tasks in flight on this
  node (``XCLAIM ... JUSTID``): its own and those pending on the consumers of its live task
  workers, so that a long task is not taken away from a node that is alive; and it deletes the
  consumers of its task workers that are gone once nothing is pending on them.
- the claim thread, every quarter of ``cluster_visibility_timeout`` (at most every 5 s),
  claims tasks left pending longer than that by a consumer that stopped answering (a node, a
  task worker that died: ``XAUTOCLAIM``, at most ``cluster_prefetch`` in flight); a task
  claimed past ``cluster_max_deliveries`` goes to the dead-letter stream instead, and its CO
  caller gets ``TaskWorkerLost``. The main thread hands each claimed task to the local task
  workers through a worker (the relay, as any user process delivers), wrapped in the built-in
  ``pyswtask.cluster`` task (``runner``).
- the reply thread reads this node's reply stream (``XREADGROUP ... NOACK`` in a group of
  its own, so a respawned bridge goes on where its predecessor stopped) and passes each
  result to the worker that delivered the task, once (task ids seen are remembered, up to
  ``SEEN_MAX``).

Redis down (a call fails or times out): the workers are told, so that CO deliveries raise
``ClusterUnavailable`` at once; ASYNC ones are held here (up to ``cluster_hold_max`` for
``cluster_hold_timeout``, then they finish with ``ClusterUnavailable``) and sent when a PING
answers again; results not yet written are kept, unacknowledged, and written then. A consumer
group that Redis lost (a restart without persistence) is created again.

Stopping (SIGTERM, before the workers, as every user process): the bridge takes no more tasks,
waits for the results of those it took, and goes on passing the results of its own workers'
deliveries back to them until none is outstanding, within ``max_wait_time``; the workers, still
running, get them before they are stopped in turn.

It must not run tasks (the task workers do, through ``runner``) nor know a worker's event loop.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import select
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from .._core import brief_repr
from ..envelope import TYPE_ASYNC
from ..errors import ClusterUnavailable, TaskError, TaskWorkerLost
from ..transport.pipe import dispatch_messages, pack_message
from ..transport.relay import PIPE_TASK_RESULT
from . import keys
from .connection import connect, describe_url, require_redis
from .entries import TaskEntry, pack_value, parse_result, result_fields, task_fields
from .messages import MSG_RESULT, MSG_STATE, MSG_TASK
from .runner import CLUSTER_TASK
from .scripts import APPEND, TaskAppender, append_args

if TYPE_CHECKING:
    from ..roles import Process, ServerHandle

__all__ = ["Bridge"]

log = logging.getLogger("pyswtask.cluster")



class Bridge:
    """What the clusterBridge process runs; built in the master, run after the fork."""

    def __init__(self, url: str, queues: list[str], settings: dict[str, Any]) -> None:
        self.url = url
        self.queues = queues
        self.node = ""                       # set by the master's ClusterNode.open
        self.visibility = float(settings["cluster_visibility_timeout"])
        self.max_deliveries = int(settings["cluster_max_deliveries"])
        self.prefetch = int(settings["cluster_prefetch"])
        self.max_wait = float(settings["max_wait_time"])
        self.hold_max = int(settings["cluster_hold_max"])
        self.hold_timeout = float(settings["cluster_hold_timeout"])

    # -- the process ----------------------------------------------------------------------------

    def main(self, server: ServerHandle, proc: Process) -> None:
        """The process body: serves until SIGTERM, then waits (up to max_wait_time) for the
        results of the tasks it took, so that they are acknowledged rather than claimed again."""
        _Run(self, server, proc).serve()


class _Run:
    """The state of one bridge process."""

    def __init__(self, bridge: Bridge, server: ServerHandle, proc: Process) -> None:
        self.b = bridge
        self.server = server
        self.proc = proc
        self.relay = proc.delivery
        self.lib = require_redis()
        self.consumer = f"{bridge.node}:{os.getpid()}"
        self.stopping = threading.Event()      # SIGTERM: take no more tasks
        self.done = threading.Event()          # the last results passed on: threads end
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Any: redis-py's stubs type every reply as a union of everything a reply can be.
        # Not checked here: a bridge respawned while Redis is down starts down, and waits.
        self.r: Any = connect(bridge.url, timeout=keys.TIMEOUT, check=False)
        self.health: Any = connect(bridge.url, timeout=0.5, check=False)
        self.appender = TaskAppender(self.r)
        self.up = True
        self.failed_at = 0.0                 # a thread's last Redis failure (monotonic)
        # Worker deliveries waiting to be written, and ASYNC ones held while Redis is down.
        self.outgoing: list[tuple[int, list[Any]]] = []
        self.held: collections.deque[tuple[float, int, list[Any]]] = collections.deque()
        # Tasks taken from Redis: handed over by the consumer thread, running, done.
        self.lock = threading.Condition()
        self.taken = 0                       # in flight, counted from the read to the XACK
        self.incoming: collections.deque[TaskEntry] = collections.deque()
        self.running: dict[tuple[str, bytes], TaskEntry] = {}
        self.results: list[tuple[TaskEntry, bool, Any]] = []
        self.lost_errors: list[tuple[TaskEntry, str]] = []
        self.seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.reply_last = b"0-0"
        # This node's workers' deliveries whose result has not come back: their deadline
        # (time.time(); CO) or 0 (ASYNC, whose result is awaited as long as the node runs).
        self.outstanding: dict[str, float] = {}
        self.started = time.time()

    def serve(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        try:
            self._ensure_groups(self.r)
        except self.lib.RedisError as exc:
            self._went_down(exc)
        else:
            # The workers may have been told "down" by this bridge's predecessor.
            self._broadcast_state(True)
            self._heartbeat()
        threads = [threading.Thread(target=self._guard, args=(self._claim_loop,), daemon=True,
                                    name="pyswtask-cluster-claim"),
                   threading.Thread(target=self._guard, args=(self._read_replies,), daemon=True,
                                    name="pyswtask-cluster-replies")]
        for t in threads:
            t.start()
        log.info("node %s joined the cluster at %s%s", self.b.node, describe_url(self.b.url),
                 f", serving queue(s) {', '.join(self.b.queues)}" if self.b.queues else "")
        mailbox = self.proc.mailbox
        next_beat = next_touch = time.monotonic()
        stop_by: float | None = None
        while True:
            ready, _, _ = select.select([mailbox.fileno(), self.wake_fd], [], [], 0.1)
            if mailbox.fileno() in ready:
                dispatch_messages(mailbox, self.server, self._intercept)
            if self.wake_fd in ready:
                try:
                    os.eventfd_read(self.wake_fd)
                except BlockingIOError:
                    pass
            self._run_incoming()
            self._flush()
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + keys.HEARTBEAT_INTERVAL
                self._maintain()
            if now >= next_touch and self.up:
                next_touch = now + min(self.b.visibility / 3, 10.0)
                self._touch_running()
            if self.stopping.is_set():
                if stop_by is None:
                    stop_by = now + self.b.max_wait
                with self.lock:
                    busy = self.taken or self.outgoing or self._awaited()
                if not busy or now >= stop_by:
                    break
        self.done.set()
        self._leave()

    def _awaited(self) -> int:
        """Results this node's workers still wait for; those whose CO caller gave up are
        forgotten (their result, if it comes, is dropped by the worker anyway)."""
        if self.outstanding and self.up:
            now = time.time()
            for task_id, deadline in list(self.outstanding.items()):
                if deadline and deadline < now:
                    self.outstanding.pop(task_id, None)
            return len(self.outstanding)
        return 0

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stopping.set()
        with self.lock:
            self.lock.notify_all()
        os.eventfd_write(self.wake_fd, 1)

    def _guard(self, fn: Any) -> None:
        # A thread that dies silently would stop the node's consumption for ever: log and
        # end the process, which the master respawns.
        try:
            fn()
        except Exception:
            log.exception("cluster bridge thread %s failed", threading.current_thread().name)
            os.kill(os.getpid(), signal.SIGKILL)

    def _leave(self) -> None:
        """A node that stops cleanly: its heartbeat and reply stream go (nobody waits for a
        result there any more), and so does its consumer of each queue when nothing is
        pending on it (a consumer deleted with pending tasks would lose them)."""
        try:
            self.r.delete(keys.node_key(self.b.node), keys.reply_stream(self.b.node))
            for queue in self.b.queues:
                stream = keys.queue_stream(queue)
                if not self.r.xpending_range(stream, keys.GROUP, "-", "+", 1,
                                             consumername=self.consumer):
                    self.r.xgroup_delconsumer(stream, keys.GROUP, self.consumer)
        except self.lib.RedisError as exc:
            log.warning("cluster: node %s left without cleaning up: %s", self.b.node, exc)
        with self.lock:
            left = self.taken
        if left:
            log.warning("node %s stopped with %d cluster task(s) unacknowledged: another node "
                        "claims them after %s s", self.b.node, left, self.b.visibility)

    # -- the inbox ------------------------------------------------------------------------------

    def _intercept(self, mtype: str, data: Any, src: int) -> bool:
        if mtype == MSG_TASK:
            self.outgoing.append((src, data))
            return True
        if mtype == PIPE_TASK_RESULT:
            return self.relay.take_reply(mtype, data, src)
        return False

    def _reply_worker(self, worker: int, data: list[Any], error: BaseException) -> None:
        """Fails a worker's delivery that never reached Redis."""
        try:
            pid, seq = int(data[0]), int(data[1])
            body = pack_message(MSG_RESULT, [seq, pid, False, pack_value(
                [type(error).__name__, str(error), ""])])
            self.relay.send(worker, body, 3.0)
        except Exception as exc:
            log.error("cluster: could not tell worker %d of a failed delivery: %s", worker, exc)

    def _broadcast_state(self, up: bool) -> None:
        body = pack_message(MSG_STATE, [up])
        for worker in range(self.server.worker_num):
            try:
                self.relay.send(worker, body, 1.0)
            except Exception as exc:
                log.error("cluster: could not tell worker %d that Redis is %s: %s", worker,
                          "back" if up else "down", exc)

    def _unavailable(self, exc: BaseException | None = None) -> ClusterUnavailable:
        why = f": {exc}" if exc is not None else " (it stopped answering)"
        return ClusterUnavailable(f"the cluster's Redis at {describe_url(self.b.url)} is "
                                  f"unreachable{why}")

    # -- delivering: the workers' tasks to Redis -------------------------------------------------

    def _flush(self) -> None:
        if self.outgoing:
            going, self.outgoing = self.outgoing, []
            if self.up:
                self._write_tasks(going)
            else:
                self._hold_or_fail(going, self._unavailable())
        if (self.results or self.lost_errors) and self.up:
            self._write_results()

    def _write_tasks(self, going: list[tuple[int, list[Any]]]) -> None:
        """Appends the workers' deliveries, one call per queue; a queue's batch is appended
        whole or not at all, and what was not is held (ASYNC) or failed (CO)."""
        node = self.b.node
        by_stream: dict[str, list[tuple[int, list[Any], dict[bytes, Any]]]] = {}
        for src, data in going:
            try:
                pid, seq, queue, name, method, body, type_, deadline = data
                fields = task_fields(f"{node}/{pid}/{seq}", name, method, body, type_, node, src,
                                     pid, seq, deadline)
            except (TypeError, ValueError) as exc:
                log.error("malformed cluster delivery from worker %d dropped: %s (%s)", src,
                          brief_repr(data), exc)
                continue
            by_stream.setdefault(keys.queue_stream(queue), []).append((src, data, fields))
        failed: list[tuple[int, list[Any]]] = []
        error: BaseException | None = None
        for stream, batch in by_stream.items():
            if error is None:
                try:
                    self.appender.append(stream, [fields for _, _, fields in batch])
                    self._await_results(batch)
                    continue
                except self.lib.RedisError as exc:
                    error = exc
                    self._went_down(exc)
            failed += [(src, data) for src, data, _ in batch]
        if failed:
            self._hold_or_fail(failed, self._unavailable(error))

    def _await_results(self, batch: list[tuple[int, list[Any], dict[bytes, Any]]]) -> None:
        for _src, data, fields in batch:
            self.outstanding[fields[b"id"]] = float(data[7] or 0.0)
        # Bounded as the ids seen: a result that never comes (its reply stream trimmed while
        # Redis was away) must not hold memory for ever.
        while len(self.outstanding) > keys.SEEN_MAX:
            self.outstanding.pop(next(iter(self.outstanding)), None)

    def _hold_or_fail(self, going: list[tuple[int, list[Any]]], error: ClusterUnavailable) -> None:
        now = time.monotonic()
        for src, data in going:
            is_async = len(data) == 8 and data[6] == TYPE_ASYNC
            if is_async and len(self.held) < self.b.hold_max:
                self.held.append((now, src, data))
            else:
                if is_async:
                    log.error("cluster: ASYNC task %s.%s of worker %d not delivered: %d held "
                              "already (%s)", data[3], data[4], src, self.b.hold_max, error)
                self._reply_worker(src, data, error)

    def _release_held(self) -> None:
        """Redis answers again: the held ASYNC deliveries go first, in their order."""
        if self.held:
            log.info("cluster: Redis is back, sending %d held ASYNC deliveries", len(self.held))
            self.outgoing[:0] = [(src, data) for _, src, data in self.held]
            self.held.clear()

    def _expire_held(self) -> None:
        limit = time.monotonic() - self.b.hold_timeout
        while self.held and self.held[0][0] < limit:
            _, src, data = self.held.popleft()
            log.error("cluster: ASYNC task %s.%s of worker %d not delivered: Redis unreachable "
                      "for %s s", data[3], data[4], src, self.b.hold_timeout)
            self._reply_worker(src, data, self._unavailable())

    # -- running: tasks from Redis on this node's task workers ---------------------------------

    def _run_incoming(self) -> None:
        while True:
            with self.lock:
                if not self.incoming:
                    return
                entry = self.incoming.popleft()
            self.running[(entry.queue, entry.entry_id)] = entry
            try:
                self.relay.deliver(CLUSTER_TASK, "run",
                                   [entry.id, entry.queue, entry.deliveries, entry.body], 3.0,
                                   -1, TYPE_ASYNC, self._on_done(entry))
            except Exception as exc:
                # Not handed over: the result says why, and the task is acknowledged (it
                # would fail the same way on the next delivery).
                self._done(entry, False, TaskError(type(exc).__name__, str(exc)))

    def _on_done(self, entry: TaskEntry) -> Any:
        def done(_request_id: int, result: Any) -> None:
            if isinstance(result, TaskWorkerLost):
                self._lost(entry, str(result))
            elif isinstance(result, TaskError):
                self._done(entry, False, result)
            else:
                self._done(entry, True, result)
        return done

    def _done(self, entry: TaskEntry, ok: bool, value: Any) -> None:
        self.results.append((entry, ok, value))

    def _lost(self, entry: TaskEntry, error: str) -> None:
        """The task worker died running it: the task stays pending, unacknowledged, for a
        later delivery (by whichever node claims it first), and its error is kept for the
        dead-letter stream."""
        log.warning("%s lost on node %s (%s): it runs again after %s s", entry.describe(),
                    self.b.node, error, self.b.visibility)
        self.running.pop((entry.queue, entry.entry_id), None)
        self.lost_errors.append((entry, error))

    def _write_results(self) -> None:
        results, self.results = self.results, []
        lost, self.lost_errors = self.lost_errors, []
        # A few commands per batch, whatever its size: the results per reply stream in one
        # script call, the acknowledgements per queue in one XACK.
        replies: dict[str, list[dict[bytes, Any]]] = {}
        acks: dict[str, list[bytes]] = {}
        cleared: dict[str, list[str]] = {}
        for entry, ok, value in results:
            if entry.reply:
                replies.setdefault(keys.reply_stream(entry.reply), []).append(
                    result_fields(entry, ok, value))
            acks.setdefault(keys.queue_stream(entry.queue), []).append(entry.entry_id)
            if entry.deliveries > 1:
                cleared.setdefault(keys.error_hash(entry.queue), []).append(entry.id)
        pipe = self.r.pipeline(transaction=True)
        for stream, fields in replies.items():
            pipe.eval(APPEND, 1, stream, *append_args(keys.REPLY_MAXLEN, fields))
        for stream, ids in acks.items():
            pipe.xack(stream, keys.GROUP, *ids)
        for name, task_ids in cleared.items():
            pipe.hdel(name, *task_ids)
        for entry, error in lost:
            pipe.hset(keys.error_hash(entry.queue), entry.id, error)
        try:
            pipe.execute()
        except self.lib.ResponseError as exc:
            # EXEC ran, and one command failed (NOGROUP: a restarted Redis lost the group, and
            # with it the pending entry): what could be written was; nothing to retry.
            log.warning("cluster: writing %d result(s): %s", len(results), exc)
        except self.lib.RedisError as exc:
            # Nothing of a MULTI was applied: all of it waits, unacknowledged, for Redis.
            self._went_down(exc)
            self.results[:0] = results
            self.lost_errors[:0] = lost
            return
        for entry, _ok, _value in results:
            self.running.pop((entry.queue, entry.entry_id), None)
        with self.lock:
            self.taken -= len(results) + len(lost)
            self.lock.notify_all()

    def _touch_running(self) -> None:
        """Resets the idle time of the tasks this node holds (those the bridge runs, and
        those pending on a live task worker's consumer), so that only a node that stopped
        answering, or a task worker that died, has its tasks claimed. The consumers of this
        node's task workers that are gone are deleted once nothing is pending on them."""
        by_queue: dict[str, list[bytes]] = {}
        for entry in self.running.values():
            by_queue.setdefault(entry.queue, []).append(entry.entry_id)
        try:
            pipe = self.r.pipeline(transaction=False)
            for queue, ids in by_queue.items():
                pipe.xclaim(keys.queue_stream(queue), keys.GROUP, self.consumer, 0, ids,
                            justid=True)
            for queue in self.b.queues:
                self._touch_task_workers(pipe, keys.queue_stream(queue))
            pipe.execute()
        except self.lib.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                log.warning("cluster: touching the running tasks failed: %s", exc)
        except self.lib.RedisError as exc:
            self._went_down(exc)

    def _touch_task_workers(self, pipe: Any, stream: str) -> None:
        prefix = f"{self.b.node}:"
        for consumer in self.r.xinfo_consumers(stream, keys.GROUP):
            name = _text(consumer["name"])
            pid = name[len(prefix):]
            if not name.startswith(prefix) or name == self.consumer or not pid.isdigit():
                continue
            alive = _child_of(int(pid), self.server.master_pid)
            if consumer["pending"] and alive:
                ids = [p["message_id"] for p in self.r.xpending_range(
                    stream, keys.GROUP, "-", "+", int(consumer["pending"]), consumername=name)]
                if ids:
                    pipe.xclaim(stream, keys.GROUP, name, 0, ids, justid=True)
            elif not consumer["pending"] and not alive:
                pipe.xgroup_delconsumer(stream, keys.GROUP, name)

    # -- health, heartbeat, trimming -------------------------------------------------------------

    def _went_down(self, exc: BaseException) -> None:
        if self.up:
            log.error("cluster: %s", self._unavailable(exc))
            self.up = False
            self._broadcast_state(False)

    def _maintain(self) -> None:
        if not self.up or self.failed_at > time.monotonic() - 2 * keys.HEARTBEAT_INTERVAL:
            try:
                self.health.ping()
            except self.lib.RedisError as exc:
                self._went_down(exc)
            else:
                if not self.up:
                    try:
                        self._ensure_groups(self.r)
                    except self.lib.RedisError as exc:
                        log.warning("cluster: Redis answers, but not yet to all: %s", exc)
                        return
                    log.info("cluster: the Redis at %s answers again", describe_url(self.b.url))
                    self.up = True
                    self._broadcast_state(True)
                    self._release_held()
        self._expire_held()
        if self.up:
            self._heartbeat()
            self._trim()

    def _heartbeat(self) -> None:
        info = {"node": self.b.node, "host": socket.gethostname(),
                "master_pid": self.server.master_pid, "bridge_pid": os.getpid(),
                "queues": self.b.queues, "workers": self.server.worker_num,
                "task_workers": self.server.task_worker_num, "started": self.started}
        try:
            self.r.set(keys.node_key(self.b.node), json.dumps(info),
                       px=int(keys.HEARTBEAT_TTL * 1000))
        except self.lib.RedisError as exc:
            self._went_down(exc)

    def _trim(self) -> None:
        """Drops what no consumer needs any more: a task stream below its oldest pending
        or unread entry, this node's reply stream below what the reply thread read."""
        try:
            for queue in self.b.queues:
                stream = keys.queue_stream(queue)
                groups = self.r.xinfo_groups(stream)
                floor = _min_needed(self.r.xpending(stream, keys.GROUP), groups)
                if floor is not None:
                    self.r.xtrim(stream, minid=floor, approximate=True)
            if self.reply_last != b"0-0":
                self.r.xtrim(keys.reply_stream(self.b.node), minid=self.reply_last,
                             approximate=True)
        except self.lib.ResponseError as exc:
            if "NOGROUP" not in str(exc) and "no such key" not in str(exc):
                log.warning("cluster: trimming failed: %s", exc)
        except self.lib.RedisError as exc:
            self._went_down(exc)

    def _ensure_groups(self, r: Any) -> None:
        for queue in self.b.queues:
            try:
                r.xgroup_create(keys.queue_stream(queue), keys.GROUP, id="0", mkstream=True)
            except self.lib.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    # -- the consumer thread ---------------------------------------------------------------------

    def _claim_loop(self) -> None:
        """Claims, every quarter of the visibility timeout (at most every 5 s), what stayed
        pending too long; the task workers read the new tasks themselves (``consumer``)."""
        if not self.b.queues:
            return
        r: Any = connect(self.b.url, timeout=keys.TIMEOUT, check=False)
        every = min(self.b.visibility / 4, 5.0)
        while not self.stopping.wait(every):
            with self.lock:
                room = self.b.prefetch - self.taken
            if room <= 0:
                continue
            try:
                got = self._claim(r, room)
            except self.lib.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    log.error("cluster: claiming tasks failed: %s", exc)
                self._thread_failed()
                continue
            except self.lib.RedisError:
                self._thread_failed()
                continue
            if got:
                self._hand_over(got)

    def _hand_over(self, got: list[TaskEntry]) -> None:
        with self.lock:
            self.taken += len(got)
            self.incoming.extend(got)
        os.eventfd_write(self.wake_fd, 1)

    def _thread_failed(self) -> None:
        self.failed_at = time.monotonic()
        self.done.wait(0.5)

    def _claim(self, r: Any, room: int) -> list[TaskEntry]:
        """Tasks idle for more than the visibility timeout, claimed for this node; those
        past cluster_max_deliveries go to the dead-letter stream instead."""
        claimed: list[TaskEntry] = []
        idle = int(self.b.visibility * 1000)
        for queue in self.b.queues:
            stream = keys.queue_stream(queue)
            reply = r.xautoclaim(stream, keys.GROUP, self.consumer, idle, "0-0", count=room)
            entries = reply[1] if len(reply) > 1 else []
            entries = [(eid, fields) for eid, fields in entries if fields]
            if not entries:
                continue
            counts = {p["message_id"]: int(p["times_delivered"])
                      for p in r.xpending_range(stream, keys.GROUP, entries[0][0],
                                                entries[-1][0], len(entries) * 4 + 16,
                                                consumername=self.consumer)}
            for eid, fields in entries:
                entry = TaskEntry(queue, eid, fields, counts.get(eid, 2))
                if entry.deliveries > self.b.max_deliveries:
                    self._dead_letter(r, entry)
                else:
                    log.warning("%s claimed by node %s (delivery %d)", entry.describe(),
                                self.b.node, entry.deliveries)
                    claimed.append(entry)
        return claimed

    def _dead_letter(self, r: Any, entry: TaskEntry) -> None:
        runs = entry.deliveries - 1
        error = r.hget(keys.error_hash(entry.queue), entry.id)
        why = error.decode() if error else (
            f"not acknowledged within {self.b.visibility} s of its delivery")
        text = f"delivered {runs} time(s) without a result; last error: {why}"
        log.error("%s goes to the dead-letter stream: %s", entry.describe(), text)
        pipe = r.pipeline(transaction=True)
        pipe.xadd(keys.dead_stream(entry.queue),
                  {**entry.fields, b"error": text, b"deliveries": runs,
                   b"dead_at": f"{time.time():.3f}"}, maxlen=keys.DEAD_MAXLEN, approximate=True)
        if entry.reply:
            lost = TaskWorkerLost.lost(f"{entry.describe()} {text}")
            pipe.xadd(keys.reply_stream(entry.reply), result_fields(entry, False, lost),
                      maxlen=keys.REPLY_MAXLEN, approximate=True)
        pipe.xack(keys.queue_stream(entry.queue), keys.GROUP, entry.entry_id)
        pipe.hdel(keys.error_hash(entry.queue), entry.id)
        pipe.execute()

    # -- the reply thread ------------------------------------------------------------------------

    def _read_replies(self) -> None:
        """Reads the node's reply stream through a consumer group of its own (NOACK), so a
        bridge that is respawned goes on from the last result its predecessor read."""
        r: Any = connect(self.b.url, timeout=keys.TIMEOUT + keys.BLOCK_MS / 1000, check=False)
        stream = keys.reply_stream(self.b.node)
        self._reply_group(r, stream)
        while not self.done.is_set():
            try:
                reply = r.xreadgroup(keys.GROUP, self.b.node, {stream: ">"}, count=1000,
                                     block=keys.BLOCK_MS, noack=True)
            except self.lib.ResponseError as exc:
                if self.done.is_set():
                    return      # the stream was removed as the node left
                if "NOGROUP" not in str(exc):
                    log.error("cluster: reading the replies failed: %s", exc)
                    self._thread_failed()
                    continue
                self._reply_group(r, stream)
                continue
            except self.lib.RedisError:
                self._thread_failed()
                continue
            for _stream, entries in reply or ():
                for eid, fields in entries:
                    self.reply_last = eid
                    self._route(fields)

    def _reply_group(self, r: Any, stream: str) -> None:
        # From the stream's start: results of a predecessor's workers are dropped by pid.
        try:
            r.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
        except self.lib.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                log.error("cluster: creating the reply group failed: %s", exc)
                self._thread_failed()
        except self.lib.RedisError:
            self._thread_failed()

    def _route(self, fields: dict[bytes, bytes]) -> None:
        try:
            task_id, worker, pid, seq, ok, value = parse_result(fields)
        except ValueError as exc:
            log.error("cluster: %s dropped", exc)
            return
        self.outstanding.pop(task_id, None)
        if task_id in self.seen:
            log.info("cluster: second result of task %s dropped", task_id)
            return
        self.seen[task_id] = None
        if len(self.seen) > keys.SEEN_MAX:
            self.seen.popitem(last=False)
        if not 0 <= worker < self.server.worker_num:
            log.error("cluster: result of task %s for unknown worker %d dropped", task_id, worker)
            return
        try:
            self.relay.send(worker, pack_message(MSG_RESULT, [seq, pid, ok, value]), 3.0)
        except Exception as exc:
            log.error("cluster: result of task %s not passed to worker %d: %s", task_id,
                      worker, exc)


def _min_needed(pending: dict[str, Any], groups: list[dict[str, Any]]) -> bytes | None:
    """The lowest entry id a consumer group still needs: its oldest pending entry, or, with
    none pending, its last delivered one (everything after it is unread)."""
    floor: bytes | None = None
    for group in groups:
        if _text(group.get("name")) != keys.GROUP:
            continue
        last = group.get("last-delivered-id")
        floor = last if isinstance(last, bytes) else (last.encode() if last else None)
    low = pending.get("min") if pending and pending.get("pending") else None
    if low is not None:
        low = low if isinstance(low, bytes) else str(low).encode()
        floor = low if floor is None or _id_key(low) < _id_key(floor) else floor
    if floor is None or floor == b"0-0":
        return None
    return floor


def _child_of(pid: int, parent: int | None) -> bool:
    """Whether process pid lives and is a child of parent (a task worker of this node)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat[stat.rindex(b")") + 2:].split()
    return len(fields) > 1 and fields[0] != b"Z" and int(fields[1]) == parent


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)
