"""Declaring user processes (Swoole's Process, Swoft's @Process): long-running helpers the
server starts, respawns when they die (with a back-off when they die at once) and stops.

This module holds the declarations only (``@process``, ``ProcessSpec``); what a user process
does once forked is its role's (``pyswtask.roles.userprocess``), and the handle its function
gets is ``pyswtask.Process``.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

__all__ = ["process", "ProcessSpec", "declared"]

T = TypeVar("T")


class ProcessSpec:
    """A user process as declared: its name, what it runs, whether it starts with the server."""

    __slots__ = ("name", "target", "boot")

    def __init__(self, target: Any, name: str | None = None, boot: bool = True) -> None:
        if isinstance(target, type):
            if not callable(getattr(target, "run", None)):
                raise TypeError(f"process class {target.__name__} has no run(self, server, "
                                "process) method")
        elif not callable(target):
            raise TypeError(f"a process is a function or a class with run(), not {target!r}")
        name = name or getattr(target, "__name__", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a process needs a non-empty name, not {name!r}")
        self.name = name
        self.target = target
        self.boot = bool(boot)

    def callable(self) -> Callable[..., Any]:
        fn: Callable[..., Any] = self.target().run if isinstance(self.target, type) else self.target
        return fn


_declared: list[ProcessSpec] = []


def process(name: str | None = None, *, boot: bool = True) -> Callable[[T], T]:
    """Declares a user process that every server started in this program runs:
    ``@process(name="cronTimer", boot=True)`` on ``fn(server, process)`` or on a class with
    ``run(self, server, process)``."""

    def register(target: T) -> T:
        spec = ProcessSpec(target, name, boot)
        if any(p.name == spec.name for p in _declared):
            raise ValueError(f"a process named {spec.name!r} is already declared")
        _declared.append(spec)
        return target

    return register


def declared() -> list[ProcessSpec]:
    return list(_declared)
