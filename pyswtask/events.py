"""The event bus: named events, listeners registered per name, triggered in each process.

Listeners are functions ``fn(event)`` or classes with ``handle(self, event)`` (instantiated once
at registration). They run in priority order (higher first), then in registration order. An
exception in one listener is logged and the others still run. The bus knows no roles and no
transports: processes trigger their own events, and nothing crosses between processes here.

Where each built-in event fires:

==================  ==============  =====================================================
event               process         params
==================  ==============  =====================================================
WORKER_START        worker          (worker_id,)
WORKER_STOP         worker          (worker_id,)
TASK_WORKER_START   task worker     (worker_id,)
TASK_WORKER_STOP    task worker     (worker_id,)
BEFORE_TASK         task worker     (task_name, method, params, task_id)
AFTER_TASK          task worker     (task_name, method, task_id, ok)
RESOURCE_RELEASE    task worker     (task_name, method, task_id)
FINISH_TASK         worker          (task_id, result); result is a TaskError on failure;
                                    ``event.origin``: the delivering process (TaskOrigin)
PIPE_MESSAGE        any child       (type, data, src_id); target: the server
PROCESS_START       user process    (name, id)
PROCESS_STOP        user process    (name, id)
==================  ==============  =====================================================

Application events work the same way: any string names an event.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, TypeVar

__all__ = ["Event", "EventObject", "EventManager", "events", "listener"]

log = logging.getLogger("pyswtask.events")

T = TypeVar("T")


class Event:
    """Names of the built-in events."""

    WORKER_START = "worker.start"
    WORKER_STOP = "worker.stop"
    TASK_WORKER_START = "task_worker.start"
    TASK_WORKER_STOP = "task_worker.stop"
    BEFORE_TASK = "task.before"
    AFTER_TASK = "task.after"
    RESOURCE_RELEASE = "resource.release"
    FINISH_TASK = "task.finish"
    PIPE_MESSAGE = "pipe.message"
    PROCESS_START = "process.start"
    PROCESS_STOP = "process.stop"


class EventObject:
    """What a listener receives: the event's name, its target and its params; ``origin``, for
    FINISH_TASK, the process the task was delivered for (else None)."""

    __slots__ = ("name", "target", "params", "origin")

    def __init__(self, name: str, target: Any, params: tuple[Any, ...], origin: Any = None) -> None:
        self.name = name
        self.target = target
        self.params = params
        self.origin = origin

    def __repr__(self) -> str:
        return f"EventObject({self.name!r}, target={self.target!r}, params={self.params!r})"


class EventManager:
    """Listeners by event name, kept sorted by (-priority, registration order)."""

    __slots__ = ("_listeners", "_seq", "version")

    def __init__(self) -> None:
        self._listeners: dict[str, list[tuple[int, int, Callable[[EventObject], Any]]]] = {}
        self._seq = itertools.count()
        # Bumped on every change, so hot paths can cache "has listeners" answers.
        self.version = 0

    def listen(self, name: str, fn: Callable[[EventObject], Any], priority: int = 0) -> None:
        """Registers fn for the event name."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"an event name must be a non-empty string, not {name!r}")
        if not callable(fn):
            raise TypeError(f"listener for {name!r} is not callable: {fn!r}")
        entries = self._listeners.setdefault(name, [])
        entries.append((-priority, next(self._seq), fn))
        entries.sort(key=lambda e: (e[0], e[1]))
        self.version += 1

    def remove(self, name: str, fn: Callable[[EventObject], Any]) -> bool:
        """Unregisters fn; returns whether it was registered."""
        entries = self._listeners.get(name, [])
        for i, entry in enumerate(entries):
            if entry[2] == fn:
                del entries[i]
                self.version += 1
                return True
        return False

    def has_listeners(self, name: str) -> bool:
        return bool(self._listeners.get(name))

    def trigger(self, name: str, target: Any = None, *params: Any, origin: Any = None
                ) -> EventObject:
        """Runs every listener of name with one EventObject; returns that object."""
        event = EventObject(name, target, params, origin)
        for _, _, fn in tuple(self._listeners.get(name, ())):
            try:
                fn(event)
            except Exception:
                log.exception("listener %r of event %r failed", fn, name)
        return event


events = EventManager()
"""The bus of this process. Listeners registered before the server starts exist in every child."""


def listener(name: str, priority: int = 0) -> Callable[[T], T]:
    """Registers a function ``fn(event)`` or a class with ``handle(self, event)`` for an event."""

    def register(obj: T) -> T:
        if isinstance(obj, type):
            handle = getattr(obj(), "handle", None)
            if not callable(handle):
                raise TypeError(f"listener class {obj.__name__} has no handle(self, event) method")
            events.listen(name, handle, priority)
        else:
            events.listen(name, obj, priority)  # type: ignore[arg-type]
        return obj

    return register
