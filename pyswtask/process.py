"""User processes (Swoole's Process, Swoft's @Process): long-running helpers the server starts,
respawns when they die (with a back-off when they die at once) and stops.

A process is a function ``fn(server, process)`` or a class with ``run(self, server, process)``
(made in the child). An ``async def`` one runs on an event loop of its own, where pipe messages
fire ``Event.PIPE_MESSAGE`` as they arrive; a plain one reads them when it calls
``process.read_messages()`` or ``process.sleep()``. When the function returns, the process
exits and is respawned, as in Swoole.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from . import context
from ._core import Mailbox
from .events import Event, events
from .pipe import ProcessDelivery, dispatch_messages, send_message

if TYPE_CHECKING:
    from .ipc import ChildIpc
    from .server import Server

__all__ = ["process", "Process", "ProcessSpec"]

log = logging.getLogger("pyswtask.process")

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


class Process:
    """What a user process's function gets: who it is, and its pipe messages."""

    __slots__ = ("name", "id", "pid", "server", "mailbox", "delivery")

    def __init__(self, name: str, worker_id: int, server: Server, mailbox: Mailbox) -> None:
        self.name = name
        self.id = worker_id
        self.pid = os.getpid()
        self.server = server
        self.mailbox = mailbox
        self.delivery = ProcessDelivery(mailbox)

    def read_messages(self, timeout: float = 0.0) -> int:
        """Waits up to timeout seconds (None: for ever) for pipe messages, fires
        PIPE_MESSAGE for each (and runs deliver_by_process callbacks); returns how many."""
        count = self._drain_backlog()
        if count:
            return count
        if self.mailbox.wait(-1.0 if timeout is None else timeout):
            count += dispatch_messages(self.mailbox, self.delivery.take_reply)
        return count

    def sleep(self, seconds: float) -> None:
        """Sleeps, handling pipe messages as they come."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.read_messages(left)

    def send_message(self, data: Any, dst_worker_id: int, type: str = "message",
                     timeout: float = 3.0) -> None:
        """The same as ``server.send_message``."""
        send_message(data, dst_worker_id, type, timeout)

    def _drain_backlog(self) -> int:
        backlog, self.delivery.backlog = self.delivery.backlog, []
        for mtype, data, src in backlog:
            if not self.delivery.take_reply(mtype, data, src):
                events.trigger(Event.PIPE_MESSAGE, self.server, mtype, data, src)
        return len(backlog)

    def __repr__(self) -> str:
        return f"<Process {self.name!r} id={self.id} pid={self.pid}>"


def run_user_process(server: Server, spec: ProcessSpec, worker_id: int, ipc: ChildIpc) -> int:
    ctx = context.current
    ctx.enter(context.PROCESS, worker_id, server)
    try:
        mailbox = Mailbox(worker_id, ipc.inbox_fd, ipc.out_fds, epoch=os.getpid(),
                          on_protocol_error=log.error)
        ctx.mailbox = mailbox
        ctx.load = ipc.load
        proc = ctx.process = Process(spec.name, worker_id, server, mailbox)
        target = spec.callable()
    except Exception:
        log.exception("process %s could not start", spec.name)
        return context.EXIT_BOOT_ERROR
    events.trigger(Event.PROCESS_START, server, spec.name, worker_id)
    try:
        if inspect.iscoroutinefunction(target):
            _run_async(target, server, proc)
        else:
            signal.signal(signal.SIGTERM, _exit_on_term)
            target(server, proc)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    finally:
        proc.delivery.flush(server.settings["max_wait_time"])
        events.trigger(Event.PROCESS_STOP, server, spec.name, worker_id)
    return 0


def _exit_on_term(signum: int, frame: Any) -> None:
    # Unwinds the process's function (its finally blocks run) and ends the process with 0.
    raise SystemExit(0)


def _run_async(target: Callable[..., Any], server: Server, proc: Process) -> None:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    context.current.loop = loop
    main = loop.create_task(target(server, proc))
    loop.add_signal_handler(signal.SIGTERM, main.cancel)
    loop.add_reader(proc.mailbox.fileno(), lambda: dispatch_messages(proc.mailbox,
                                                                     proc.delivery.take_reply))
    try:
        loop.run_until_complete(main)
    except asyncio.CancelledError:
        pass
    finally:
        loop.close()
