"""A task worker's asyncio loop, run in slices between tasks: the timers a task worker starts
(``server.tick`` / ``server.after``) and, with ``task_enable_coroutine``, the coroutines of its
``async def`` task methods, many at once.

The core's TaskLoop stays in charge and keeps its per-task path: it waits in its own epoll on
the channels, and also on this loop's selector (an epoll descriptor, nested in its own) and
until this loop's next timer. When one of them is due, or when something was scheduled on this
loop from a task, it calls ``tick()``, which runs the loop until the loop would block, and
says when its next timer is due. The slice ends through the loop's own selector: asyncio asks
it to wait only when nothing is ready, and that wait is where the slice stops. Only public
asyncio API is used (a selector given to ``SelectorEventLoop``, ``stop()``).

The trade-off against making asyncio the outer loop (the epoll descriptor of the channels
added with ``add_reader``): a task worker without timers or coroutines pays nothing, the
synchronous per-task path is the core's as before, and a slice costs one ``run_forever()``
(some microseconds) only when the loop has something to do.

This module owns the loop and its slices; what runs on it is the executor's and the role's.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any

from .._core import TaskLoop

__all__ = ["Slices"]


class _SliceSelector(selectors.EpollSelector):
    """Ends a slice where the loop would start to wait, and remembers how long it would."""

    def __init__(self, slices: Slices) -> None:
        super().__init__()
        self.slices = slices

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        slices = self.slices
        if not slices.running or (timeout is not None and timeout <= 0):
            return super().select(timeout)
        ready = super().select(0)
        if not ready:
            # Nothing ready: the loop would wait. This iteration finishes (its due timers
            # run), then run_forever returns; the task loop comes back after `timeout`.
            slices.wait = -1.0 if timeout is None else timeout
            slices.loop.stop()
        return ready


class _SliceLoop(asyncio.SelectorEventLoop):
    """Tells the task loop when a callback or timer is scheduled between slices (by a task, a
    hook or a listener): it then runs a slice before it waits again."""

    def __init__(self, slices: Slices, selector: selectors.BaseSelector) -> None:
        super().__init__(selector)
        self._slices = slices

    def call_soon(self, callback: Any, *args: Any,  # type: ignore[override]
                  context: Any = None) -> asyncio.Handle:
        handle = super().call_soon(callback, *args, context=context)
        self._slices.poke()
        return handle

    def call_at(self, when: float, callback: Any, *args: Any,  # type: ignore[override]
                context: Any = None) -> asyncio.TimerHandle:
        handle = super().call_at(when, callback, *args, context=context)
        self._slices.poke()
        return handle


class Slices:
    """The asyncio loop of one task worker and the ticker its TaskLoop runs."""

    def __init__(self) -> None:
        self.running = False
        self.wait = 0.0
        self.task_loop: TaskLoop | None = None
        self.selector = _SliceSelector(self)
        self.loop = _SliceLoop(self, self.selector)
        asyncio.set_event_loop(self.loop)

    def attach(self, task_loop: TaskLoop, max_pending: int = 0) -> None:
        """Makes task_loop run this loop's slices between its tasks (see TaskLoop.set_ticker)."""
        self.task_loop = task_loop
        task_loop.set_ticker(self.tick, self.selector.fileno(), max_pending)

    def poke(self) -> None:
        """Something was scheduled: outside a slice, the task loop must run one soon."""
        if not self.running and self.task_loop is not None:
            self.task_loop.tick_due = True

    def tick(self) -> float:
        """One slice: runs the loop until it would wait; returns the seconds until its next
        timer (< 0: none)."""
        if self.loop.is_closed():
            return -1.0
        self.running = True
        self.wait = 0.0         # stopped by someone else: come back at once
        try:
            self.loop.run_forever()
        finally:
            self.running = False
        return self.wait

    def close(self, timeout: float) -> None:
        """Cancels the coroutines still running (their callers get an error), lets them
        finish for at most timeout seconds, and closes the loop."""
        loop = self.loop
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.wait(tasks, timeout=timeout))
        loop.close()
