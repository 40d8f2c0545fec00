"""The task collector: classes declared with @task, and the lookup task workers run them by.

Only names registered here can be run, and only a task class's public methods (no leading
underscore) defined by the class or its bases below ``object``: a task name or method that
arrives over the wire never reaches ``getattr`` on anything else. It must import nothing above
the errors: every process reads it, the master included, before any role exists.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar, overload

from .errors import UnknownMethod, UnknownTask

__all__ = ["task", "TaskSpec", "resolve", "registered", "get_spec", "queue_of", "queues"]

C = TypeVar("C", bound=type)


class TaskSpec:
    """One registered task class."""

    __slots__ = ("name", "cls", "coroutine", "queue", "methods", "_instance")

    def __init__(self, name: str, cls: type, coroutine: bool, queue: str | None = None) -> None:
        self.name = name
        self.cls = cls
        self.coroutine = coroutine
        self.queue = queue          # the cluster queue its deliveries go to; None: local
        # method name -> is it a coroutine function
        self.methods: dict[str, bool] = {}
        for klass in reversed(cls.__mro__[:-1]):
            for attr, value in vars(klass).items():
                if attr.startswith("_"):
                    continue
                if isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                if inspect.isfunction(value):
                    self.methods[attr] = inspect.iscoroutinefunction(value)
        self._instance: Any = None

    def instance(self) -> Any:
        # One instance per process, made on first use (Swoft's task beans), so a class whose
        # constructor opens resources does so in the task worker, not in the master.
        if self._instance is None:
            self._instance = self.cls()
        return self._instance


_tasks: dict[str, TaskSpec] = {}


@overload
def task(name: C, /) -> C: ...
@overload
def task(name: str | None = None, *, coroutine: bool = False,
         queue: str | None = None) -> Callable[[C], C]: ...


def task(name: Any = None, *, coroutine: bool = False, queue: str | None = None) -> Any:
    """Registers a class as a task: ``@task``, ``@task()``, ``@task("name")`` or
    ``@task(name="name", coroutine=False, queue=None)``. The name defaults to the class name.

    ``coroutine=True`` (or any ``async def`` method) runs the method's coroutine to completion
    on the task worker's own event loop; the task worker still runs one task at a time.

    ``queue="reports"`` makes it a cluster task: in a server with a ``cluster`` (or a program
    that configured one), its deliveries go to that queue's Redis stream and run on any node
    serving the queue (``pyswtask.cluster``); without a cluster they stay local.
    """
    if queue is not None and (not isinstance(queue, str) or not queue or not queue.isprintable()
                              or " " in queue):
        raise TypeError(f"@task queue must be a non-empty string without spaces, not {queue!r}")
    if isinstance(name, type):
        return _register(name, name.__name__, coroutine, queue)
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"@task name must be a non-empty string, not {name!r}")

    def decorate(cls: C) -> C:
        if not isinstance(cls, type):
            raise TypeError(f"@task decorates classes, not {cls!r}")
        return _register(cls, name or cls.__name__, coroutine, queue)

    return decorate


def _register(cls: C, name: str, coroutine: bool, queue: str | None = None) -> C:
    old = _tasks.get(name)
    if old is not None and old.cls.__qualname__ != cls.__qualname__:
        raise ValueError(f"task name {name!r} is taken by {old.cls.__module__}.{old.cls.__qualname__}")
    spec = TaskSpec(name, cls, coroutine, queue)
    if not spec.methods:
        raise ValueError(f"task {name!r} ({cls.__qualname__}) has no public methods to call")
    _tasks[name] = spec
    cls.__pyswtask_task__ = spec  # type: ignore[attr-defined]
    return cls


def get_spec(name: str) -> TaskSpec:
    spec = _tasks.get(name)
    if spec is None:
        known = ", ".join(sorted(_tasks)) or "none"
        raise UnknownTask(f"task {name!r} is not registered (registered: {known})")
    return spec


def resolve(name: str, method: str) -> tuple[Callable[..., Any], bool]:
    """The bound method to run and whether it must run on an event loop."""
    spec = get_spec(name)
    is_async = spec.methods.get(method)
    if is_async is None:
        raise UnknownMethod(f"task {name!r} has no public method {method!r} "
                            f"(methods: {', '.join(sorted(spec.methods))})")
    return getattr(spec.instance(), method), is_async or spec.coroutine


def queue_of(name: str) -> str | None:
    """The cluster queue of a registered task, None for a local one (or an unknown name)."""
    spec = _tasks.get(name)
    return None if spec is None else spec.queue


def queues() -> list[str]:
    """Every cluster queue named by a registered task."""
    return sorted({spec.queue for spec in _tasks.values() if spec.queue is not None})


def registered() -> list[str]:
    """The names of every registered task."""
    return sorted(_tasks)
