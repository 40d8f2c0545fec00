"""The built-in task that runs each cluster task in a task worker (``pyswtask.cluster.run``):
a task worker runs it for each task its consumer takes from Redis, a node's bridge delivers it
to its task workers for each task it claimed. It unpacks the task's envelope, makes its
cluster id visible to the method (``current_task()``) and runs it as the task worker would run
a local task.

Cluster tasks run at least once (a node that dies before its result was written leaves the
task for another node), so a method that must not act twice checks ``current_task()``'s id.
It must not talk to Redis: the consumer and the bridge do, around it.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from typing import Any, NamedTuple

from .. import registry
from .._core import unpack_envelope
from ..envelope import trace_ids

__all__ = ["CLUSTER_TASK", "ClusterTask", "current_task", "ClusterRunner"]

CLUSTER_TASK = "pyswtask.cluster"


class ClusterTask(NamedTuple):
    """What a cluster task's method can know of itself."""

    id: str             # cluster-wide, the same on every delivery of this task
    queue: str
    deliveries: int     # 1 on the first delivery; more when another node's run was lost


_current: contextvars.ContextVar[ClusterTask | None] = contextvars.ContextVar(
    "pyswtask_cluster_task", default=None)


def current_task() -> ClusterTask | None:
    """In a method run as a cluster task: its id, queue and delivery count; else None."""
    return _current.get()


_loop: asyncio.AbstractEventLoop | None = None


@registry.task(CLUSTER_TASK)
class ClusterRunner:
    """Runs one cluster task in a task worker."""

    def run(self, task_id: str, queue: str, deliveries: int, body: bytes) -> Any:
        global _loop
        # A user process's envelope goes on to name its deadline and origin: fields of the node
        # it was delivered on, which the cluster's own (ids, delivery count) stand in for here.
        name, method, params, _type, logid, spanid = unpack_envelope(body)[:6]
        fn, on_loop = registry.resolve(name, method)
        token = _current.set(ClusterTask(task_id, queue, deliveries))
        trace = trace_ids.set((logid, spanid))
        try:
            result = fn(*params)
            if on_loop and inspect.isawaitable(result):
                if _loop is None:
                    _loop = asyncio.new_event_loop()
                result = _loop.run_until_complete(result)
            return result
        finally:
            trace_ids.reset(trace)
            _current.reset(token)
