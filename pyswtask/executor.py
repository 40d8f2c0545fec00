"""Runs one task in a task worker, as Swoft's TaskExecutor did, but with the failure sent back.

Around each task: BEFORE_TASK, then the method, then AFTER_TASK and RESOURCE_RELEASE (also when
it raised). An exception is logged with its type, message, file and line, and becomes the
caller's TaskError; the task worker goes on serving. It runs a task and nothing more: reading
it off a channel and writing its result back are the task worker's loop's (the core's).

With concurrency on (``task_enable_coroutine``), an ``async def`` method becomes a coroutine
task of the task worker's loop, at most ``task_max_concurrency`` running at once: ``execute``
returns DEFERRED at once, and the result goes back through ``TaskLoop.finish`` when the
coroutine ends. Around it, AFTER_TASK and RESOURCE_RELEASE fire when it ends.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import traceback
from typing import Any

from . import registry
from ._core import DEFERRED, TaskLoop
from .envelope import trace_ids
from .events import Event, EventManager

log = logging.getLogger("pyswtask.task")

_TASK_EVENTS = (Event.BEFORE_TASK, Event.AFTER_TASK, Event.RESOURCE_RELEASE)

running_task: contextvars.ContextVar[tuple[Any, ...] | None] = contextvars.ContextVar(
    "pyswtask_running_task", default=None)
"""In a coroutine task run concurrently: TaskLoop.current() as it was when the task came."""


class TaskExecutor:
    __slots__ = ("events", "_loop", "_resolved", "_version", "_hooked", "_task_loop", "_limit")

    def __init__(self, events: EventManager) -> None:
        self.events = events
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task_loop: TaskLoop | None = None     # set: async methods run concurrently
        self._limit: asyncio.Semaphore | None = None
        # (name, method) -> (bound method, runs on a loop); only registered names get here.
        self._resolved: dict[tuple[str, str], tuple[Any, bool]] = {}
        self._version = -1
        self._hooked = False

    def use_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Runs async methods on loop (the task worker's, when it has one) from now on."""
        self._loop = loop

    def run_concurrently(self, loop: asyncio.AbstractEventLoop, task_loop: TaskLoop,
                         limit: int) -> None:
        """Async methods become coroutine tasks of loop, at most limit at once; their results
        go back through task_loop.finish. (A task from the message queue stays marked running
        in the task worker's hold until it finishes.)"""
        self._loop = loop
        self._task_loop = task_loop
        self._limit = asyncio.Semaphore(limit)

    def execute(self, envelope: tuple[Any, ...], task_id: int, src_worker: int) -> tuple[bool, Any]:
        """Runs one task (the envelope's six fields of the call); returns (True, result) or
        (False, [type, message, traceback]), or (True, DEFERRED) for a coroutine task whose
        result goes back later."""
        name, method, params, _type, logid, spanid = envelope
        resolved = self._resolved.get((name, method))
        if resolved is None:
            try:
                resolved = self._resolved[name, method] = registry.resolve(name, method)
            except LookupError as exc:
                log.warning("task %d from worker %d refused: %s", task_id, src_worker, exc)
                return False, [type(exc).__name__, str(exc), ""]
        fn, on_loop = resolved
        if on_loop and self._task_loop is not None:
            raw = self._task_loop.current()
            if raw is not None:
                self._event_loop().create_task(
                    self._run_coroutine(fn, raw, name, method, params, logid, spanid, task_id))
                return True, DEFERRED
        if self._version != self.events.version:
            self._version = self.events.version
            self._hooked = any(self.events.has_listeners(e) for e in _TASK_EVENTS)
        if self._hooked or logid or spanid or on_loop:
            return self._execute_fully(fn, on_loop, name, method, params, logid, spanid, task_id)
        # The common case, kept lean: no listeners, no trace ids, a plain method.
        try:
            return True, fn(*params)
        except Exception as exc:
            return False, self._failure(exc, name, method, task_id)

    def _execute_fully(self, fn: Any, on_loop: bool, name: str, method: str, params: list[Any],
                       logid: str, spanid: int, task_id: int) -> tuple[bool, Any]:
        events = self.events
        token = trace_ids.set((logid, spanid))
        ok = False
        try:
            if events.has_listeners(Event.BEFORE_TASK):
                events.trigger(Event.BEFORE_TASK, None, name, method, params, task_id)
            result = fn(*params)
            if on_loop and inspect.isawaitable(result):
                result = self._event_loop().run_until_complete(result)
            ok = True
            return True, result
        except Exception as exc:
            return False, self._failure(exc, name, method, task_id)
        finally:
            if events.has_listeners(Event.AFTER_TASK):
                events.trigger(Event.AFTER_TASK, None, name, method, task_id, ok)
            if events.has_listeners(Event.RESOURCE_RELEASE):
                events.trigger(Event.RESOURCE_RELEASE, None, name, method, task_id)
            trace_ids.reset(token)

    async def _run_coroutine(self, fn: Any, raw: tuple[Any, ...], name: str, method: str,
                             params: list[Any], logid: str, spanid: int, task_id: int) -> None:
        # In the coroutine task's own context: its trace ids and Task.current() stay its own.
        assert self._limit is not None and self._task_loop is not None
        running_task.set(raw)
        trace_ids.set((logid, spanid))
        limit = self._limit
        try:
            await limit.acquire()
        except asyncio.CancelledError:
            self._task_loop.finish(raw[5], task_id, False, _cancelled(name, method, task_id),
                                   raw[0], raw[6])
            return
        events = self.events
        if self._version != events.version:
            self._version = events.version
            self._hooked = any(events.has_listeners(e) for e in _TASK_EVENTS)
        hooked = self._hooked
        ok = False
        value: Any = None
        try:
            if hooked and events.has_listeners(Event.BEFORE_TASK):
                events.trigger(Event.BEFORE_TASK, None, name, method, params, task_id)
            value = fn(*params)
            if inspect.isawaitable(value):
                value = await value
            ok = True
        except asyncio.CancelledError:
            value = _cancelled(name, method, task_id)
        except Exception as exc:
            value = self._failure(exc, name, method, task_id)
        finally:
            limit.release()
            if hooked and events.has_listeners(Event.AFTER_TASK):
                events.trigger(Event.AFTER_TASK, None, name, method, task_id, ok)
            if hooked and events.has_listeners(Event.RESOURCE_RELEASE):
                events.trigger(Event.RESOURCE_RELEASE, None, name, method, task_id)
        self._task_loop.finish(raw[5], task_id, ok, value, raw[0], raw[6])

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop

    @staticmethod
    def _failure(exc: Exception, name: str, method: str, task_id: int) -> list[str]:
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        log.error("task %s.%s (id %d) raised %s: %s at %s:%s", name, method, task_id,
                  type(exc).__name__, exc, where.filename if where else "?",
                  where.lineno if where else "?")
        text = "".join(traceback.format_exception(exc))
        return [type(exc).__name__, str(exc), text]


def _cancelled(name: str, method: str, task_id: int) -> list[str]:
    return ["TaskCancelled", f"task {name}.{method} (id {task_id}) was cancelled: its task "
            "worker stopped before it finished", ""]
