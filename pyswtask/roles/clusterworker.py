"""The worker of a node in a cluster: a ``Worker`` that also delivers cluster tasks.

A task declared with ``@task(queue=...)`` leaves this worker as a pipe message to the node's
``clusterBridge`` process, which writes it to the queue's Redis stream; its result comes back
from the bridge as another pipe message. So the worker's loop never waits on Redis: CO blocks
on this worker's inbox (as it blocks on its task channels for a local task), ``await Task.co``
awaits a future, ASYNC fires FINISH_TASK and the callback when the result comes. Tasks without
a queue take the plain ``Worker``'s path unchanged; a server without a cluster has no
``ClusterWorker`` at all.

While the bridge reports Redis down, a CO delivery raises ``ClusterUnavailable`` at once, and a
CO that times out then raises it instead of ``TaskTimeout``; ASYNC ones are held by the bridge.
It must not talk to Redis (that is the bridge's, ``pyswtask.cluster``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from typing import Any, Iterable, Sequence

from .. import registry
from .._core import Mailbox
from ..cluster.connection import describe_url
from ..cluster.entries import error_from_wire, unpack_value
from ..cluster.messages import BRIDGE_PROCESS, MSG_RESULT, MSG_STATE, MSG_TASK
from ..envelope import TYPE_ASYNC, TYPE_CO, check_timeout, check_type, pack_call, pack_task
from ..errors import ClusterUnavailable, TaskTimeout
from ..events import Event, events
from ..transport import relay
from ..transport.pipe import dispatch_messages, pack_message
from .base import FinishCallback
from .worker import Worker, _refuse_in_coroutine

__all__ = ["ClusterWorker"]

# ASYNC ids of cluster tasks: apart from the dispatcher's (pid << 32 | counter).
_ID_BASE = 1 << 62


class _Waiting:
    """One cluster task of this worker without its result yet."""

    __slots__ = ("kind", "what", "callback", "future", "outcome", "task_id")

    def __init__(self, kind: int, what: str, task_id: int) -> None:
        self.kind = kind                 # TYPE_CO (blocking or a future) or TYPE_ASYNC
        self.what = what                 # "task Reports.build", for the errors
        self.task_id = task_id
        self.callback: FinishCallback | None = None
        self.future: asyncio.Future[Any] | None = None
        self.outcome: list[Any] = []     # [value or error] once it came, for a blocking CO


class ClusterWorker(Worker):
    kind = "worker"

    def setup(self, mailbox: Mailbox) -> None:
        super().setup(mailbox)
        cluster = self.server.cluster
        bridge = self.server.process_id(BRIDGE_PROCESS)
        if cluster is None or bridge is None:
            raise RuntimeError("a cluster worker started without its node's bridge process")
        self.bridge = bridge
        self.url = cluster.url
        self.pid = os.getpid()
        self.seqs = itertools.count(1)
        self.waiting: dict[int, _Waiting] = {}
        self.redis_up = True
        self.backlog: list[tuple[str, Any, int]] = []

    # -- delivering -----------------------------------------------------------------------------

    def deliver(self, name: str, method: str, params: Sequence[Any], type: int, timeout: float,
                callback: FinishCallback | None, dst_worker_id: int) -> Any:
        queue = registry.queue_of(name)
        if queue is None:
            return super().deliver(name, method, params, type, timeout, callback, dst_worker_id)
        self._check_thread("Task.deliver")
        body = pack_task(name, method, params, type, self.package_max_length)
        check_type(type)
        if type == TYPE_ASYNC:
            return self._send_async(queue, name, method, body, callback)
        _refuse_in_coroutine("Task.deliver (CO)", "await Task.co(...)")
        timeout = check_timeout(timeout)
        self._refuse_if_down()
        seq, waiting = self._send_co(queue, name, method, body, timeout)
        return _raise_or_return(self._wait_blocking({seq: waiting}, timeout)[0])

    def _deliver_for(self, name: str, method: str, envelope: bytes,
                     relayed: relay.Relayed, burst: relay.Burst | None = None) -> Any:
        """A user process's (or the crontab's) delivery of a cluster task goes to the cluster
        like this worker's own ASYNC ones, its envelope as the process packed it; the relay
        waits for its result as for a local one."""
        queue = registry.queue_of(name)
        if queue is None:
            return super()._deliver_for(name, method, envelope, relayed, burst)
        self._check_thread("Task.deliver")
        return self._send_async(queue, name, method, envelope, relayed)

    async def co(self, name: str, method: str, params: Sequence[Any], timeout: float,
                 dst_worker_id: int) -> Any:
        queue = registry.queue_of(name)
        if queue is None:
            return await super().co(name, method, params, timeout, dst_worker_id)
        self._check_thread("Task.co")
        body = pack_task(name, method, params, TYPE_CO, self.package_max_length)
        timeout = check_timeout(timeout)
        self._refuse_if_down()
        seq, waiting = self._send_co(queue, name, method, body, timeout)
        future = waiting.future = asyncio.get_running_loop().create_future()
        expiry = asyncio.get_running_loop().call_later(timeout, self._expire, seq, timeout)
        try:
            return await future
        finally:
            expiry.cancel()
            self.waiting.pop(seq, None)

    def deliver_batch(self, calls: Iterable[Sequence[Any]], timeout: float,
                      dst_worker_id: int) -> list[Any]:
        calls = list(calls)
        remote = self._cluster_items(calls)
        if not remote:
            return super().deliver_batch(calls, timeout, dst_worker_id)
        self._check_thread("Task.deliver_batch")
        _refuse_in_coroutine("Task.deliver_batch", "await Task.co_batch(...)")
        timeout = check_timeout(timeout)
        deadline = time.monotonic() + timeout
        sent = self._send_batch(calls, remote, timeout)
        local = [i for i in range(len(calls)) if i not in remote]
        outcomes: list[Any] = [None] * len(calls)
        if local:
            for i, outcome in zip(local, super().deliver_batch([calls[i] for i in local],
                                                                timeout, dst_worker_id)):
                outcomes[i] = outcome
        waiting = {seq: w for seq, w in sent.values() if w is not None}
        got = self._wait_blocking(waiting, max(0.0, deadline - time.monotonic()))
        done = dict(zip(waiting, got))
        for i, (seq, w) in sent.items():
            outcomes[i] = done[seq] if w is not None else seq
        return outcomes

    async def co_batch(self, calls: Iterable[Sequence[Any]], timeout: float,
                       dst_worker_id: int) -> list[Any]:
        calls = list(calls)
        remote = self._cluster_items(calls)
        if not remote:
            return await super().co_batch(calls, timeout, dst_worker_id)
        self._check_thread("Task.co_batch")
        timeout = check_timeout(timeout)
        loop = asyncio.get_running_loop()
        sent = self._send_batch(calls, remote, timeout)
        futures: dict[int, asyncio.Future[Any]] = {}
        for i, (_seq, w) in sent.items():
            if w is not None:
                futures[i] = w.future = loop.create_future()
        local = [i for i in range(len(calls)) if i not in remote]
        outcomes: list[Any] = [None] * len(calls)
        try:
            if local:
                local_outcomes = super().co_batch([calls[i] for i in local], timeout,
                                                  dst_worker_id)
                remote_wait = asyncio.wait(list(futures.values()), timeout=timeout)
                got, _ = await asyncio.gather(local_outcomes, remote_wait)
                for i, outcome in zip(local, got):
                    outcomes[i] = outcome
            elif futures:
                await asyncio.wait(list(futures.values()), timeout=timeout)
        finally:
            for seq, _w in sent.values():
                self.waiting.pop(seq, None)
        for i, (seq, w) in sent.items():
            if w is None:
                outcomes[i] = seq
                continue
            fut = futures[i]
            if not fut.done():
                fut.cancel()
                outcomes[i] = self._timeout_error(f"batch item {i}", timeout)
            else:
                outcomes[i] = fut.exception() or fut.result()
        return outcomes

    def _cluster_items(self, calls: list[Sequence[Any]]) -> dict[int, str]:
        """index -> queue of the batch items that are cluster tasks."""
        out: dict[int, str] = {}
        for i, call in enumerate(calls):
            if not isinstance(call, (str, bytes)) and len(call) >= 2 and isinstance(call[0], str):
                queue = registry.queue_of(call[0])
                if queue is not None:
                    out[i] = queue
        return out

    def _send_batch(self, calls: list[Sequence[Any]], remote: dict[int, str],
                    timeout: float) -> dict[int, tuple[int, _Waiting | None]]:
        """Sends the cluster items of a batch; index -> (seq, waiting), or (error, None) for
        one refused before it left."""
        bodies = {i: pack_call(calls[i], i, self.package_max_length) for i in remote}
        sent: dict[int, tuple[Any, _Waiting | None]] = {}
        for i, queue in remote.items():
            if not self.redis_up:
                sent[i] = (self._unavailable(), None)
                continue
            sent[i] = self._send_co(queue, calls[i][0], calls[i][1], bodies[i], timeout)
        return sent

    def _check_thread(self, api: str) -> None:
        if threading.get_ident() != self.thread:
            self.task_dispatcher(api)   # raises the worker's own error for another thread

    def _refuse_if_down(self) -> None:
        if not self.redis_up:
            raise self._unavailable()

    def _unavailable(self) -> ClusterUnavailable:
        return ClusterUnavailable(f"the cluster's Redis at {describe_url(self.url)} is "
                                  "unreachable: cluster tasks cannot be delivered now (local "
                                  "tasks can)")

    def _timeout_error(self, what: str, timeout: float) -> Exception:
        if not self.redis_up:
            return self._unavailable()
        return TaskTimeout.after(what, timeout)

    def _send_task(self, queue: str, name: str, method: str, body: bytes, type: int,
                   deadline: float) -> tuple[int, _Waiting]:
        seq = next(self.seqs)
        waiting = _Waiting(type, f"task {name}.{method}", _ID_BASE | (self.pid << 32) | seq)
        self.waiting[seq] = waiting
        message = pack_message(MSG_TASK, [self.pid, seq, queue, name, method, body, type,
                                          deadline])
        self._send(self.checked_mailbox("Task.deliver"), self.bridge, message, 0.0)
        return seq, waiting

    def _send_async(self, queue: str, name: str, method: str, body: bytes,
                    callback: FinishCallback | None) -> int:
        """Sends an ASYNC cluster task whose finish goes to callback; returns its id."""
        _seq, waiting = self._send_task(queue, name, method, body, TYPE_ASYNC, 0.0)
        waiting.callback = callback
        return waiting.task_id

    def _send_co(self, queue: str, name: str, method: str, body: bytes,
                 timeout: float) -> tuple[int, _Waiting]:
        return self._send_task(queue, name, method, body, TYPE_CO, time.time() + timeout)

    # -- results --------------------------------------------------------------------------------

    def _wait_blocking(self, waiting: dict[int, _Waiting], timeout: float) -> list[Any]:
        """Reads this worker's inbox until every one of ``waiting`` has its outcome or the
        timeout passed; other messages wait for the loop (a FINISH_TASK included)."""
        deadline = time.monotonic() + timeout
        mailbox = self.mailbox
        assert mailbox is not None and self.loop is not None

        def intercept(mtype: str, data: Any, src: int) -> bool:
            if mtype == MSG_RESULT and isinstance(data, list) and len(data) == 4 \
                    and data[0] in waiting:
                self._on_result(data)
            elif mtype == MSG_STATE:
                self._on_state(data)
            else:
                self.backlog.append((mtype, data, src))
            return True

        try:
            while any(not w.outcome for w in waiting.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if mailbox.wait(left):
                    dispatch_messages(mailbox, self.server, intercept)
        finally:
            for seq in waiting:
                self.waiting.pop(seq, None)
            if self.backlog:
                self.loop.call_soon(self._drain_backlog)
        return [w.outcome[0] if w.outcome else self._timeout_error(w.what, timeout)
                for w in waiting.values()]

    def _drain_backlog(self) -> None:
        backlog, self.backlog = self.backlog, []
        for mtype, data, src in backlog:
            if not self._relay(mtype, data, src):
                events.trigger(Event.PIPE_MESSAGE, self.server, mtype, data, src)

    def _relay(self, mtype: str, data: Any, src: int) -> bool:
        if mtype == MSG_RESULT:
            self._on_result(data)
            return True
        if mtype == MSG_STATE:
            self._on_state(data)
            return True
        return super()._relay(mtype, data, src)

    def _on_state(self, data: Any) -> None:
        if isinstance(data, list) and data:
            self.redis_up = bool(data[0])

    def _on_result(self, data: Any) -> None:
        try:
            seq, pid, ok, packed = data
            value = unpack_value(packed)
        except Exception:
            return
        if pid != self.pid:
            return  # delivered by this worker's predecessor: nobody waits for it here
        waiting = self.waiting.pop(seq, None)
        if waiting is None:
            return  # timed out already, or a result that came twice
        outcome = value if ok else error_from_wire(value)
        if waiting.kind == TYPE_ASYNC:
            self._finish(waiting.task_id, outcome, waiting.callback)
        elif waiting.future is not None:
            if not waiting.future.done():
                if ok:
                    waiting.future.set_result(value)
                else:
                    waiting.future.set_exception(outcome)
        else:
            waiting.outcome.append(outcome)

    def _expire(self, seq: int, timeout: float) -> None:
        waiting = self.waiting.pop(seq, None)
        if waiting is not None and waiting.future is not None and not waiting.future.done():
            waiting.future.set_exception(self._timeout_error(waiting.what, timeout))


def _raise_or_return(outcome: Any) -> Any:
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome

