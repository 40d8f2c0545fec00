"""The user process role (Swoole's Process, Swoft's @Process) and the handle its function gets.

A process is a function ``fn(server, process)`` or a class with ``run(self, server, process)``
(made in the child). An ``async def`` one runs on an event loop of its own, where pipe messages
fire ``Event.PIPE_MESSAGE`` as they arrive; a plain one reads them when it calls
``process.read_messages()`` or ``process.sleep()``. When the function returns, the process
exits and is respawned, as in Swoole. It delivers tasks through a worker (the relay), never to
a task worker directly: it has no task channel.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any, Sequence

from .._core import Mailbox
from ..envelope import ORIGIN_USER_PROCESS
from ..events import Event, events
from ..process import ProcessSpec
from ..transport.pipe import dispatch_messages
from ..transport.relay import PIPE_TASKS, RelayClient, pack_tasks
from .base import ChildRole, FinishCallback, ServerHandle

if TYPE_CHECKING:
    from ..transport.ipc import ChildIpc

__all__ = ["Process", "UserProcess"]

log = logging.getLogger("pyswtask.process")


class Process:
    """What a user process's function gets: who it is, and its pipe messages."""

    __slots__ = ("name", "id", "pid", "server", "mailbox", "delivery")

    def __init__(self, name: str, worker_id: int, server: ServerHandle, mailbox: Mailbox,
                 delivery: RelayClient) -> None:
        self.name = name
        self.id = worker_id
        self.pid = os.getpid()
        self.server = server
        self.mailbox = mailbox
        self.delivery = delivery

    def read_messages(self, timeout: float | None = 0.0) -> int:
        """Waits up to timeout seconds (None: for ever) for pipe messages, fires
        PIPE_MESSAGE for each (and runs deliver_by_process callbacks); returns how many."""
        count = self._drain_backlog()
        if count:
            return count
        if self.mailbox.wait(-1.0 if timeout is None else timeout):
            count += dispatch_messages(self.mailbox, self.server, self.delivery.take_reply)
        return count

    def sleep(self, seconds: float) -> None:
        """Sleeps, handling pipe messages as they come."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.read_messages(left)

    def send_message(self, data: Any, dst_worker_id: int, type: str = "message",
                     timeout: float = 3.0) -> None:
        """The same as ``server.send_message``."""
        self.server.send_message(data, dst_worker_id, type, timeout)

    def _drain_backlog(self) -> int:
        backlog, self.delivery.backlog = self.delivery.backlog, []
        for mtype, data, src in backlog:
            if not self.delivery.take_reply(mtype, data, src):
                events.trigger(Event.PIPE_MESSAGE, self.server, mtype, data, src)
        return len(backlog)

    def __repr__(self) -> str:
        return f"<Process {self.name!r} id={self.id} pid={self.pid}>"


class UserProcess(ChildRole):
    kind = "process"

    def __init__(self, server: ServerHandle, worker_id: int, index: int, ipc: ChildIpc,
                 spec: ProcessSpec) -> None:
        super().__init__(server, worker_id, index, ipc)
        self.spec = spec

    def title(self) -> str:
        return f"process {self.spec.name}"

    def __str__(self) -> str:
        return f"process {self.spec.name}"

    def setup(self, mailbox: Mailbox) -> None:
        self.relay = RelayClient(mailbox, self.server.worker_num, self.load,
                                 self.package_max_length, self.server)
        self.process = Process(self.spec.name, self.worker_id, self.server, mailbox, self.relay)
        self.target = self.spec.callable()

    def run(self) -> int:
        server, spec, proc = self.server, self.spec, self.process
        events.trigger(Event.PROCESS_START, server, spec.name, self.worker_id)
        try:
            if inspect.iscoroutinefunction(self.target):
                self._run_async()
            else:
                signal.signal(signal.SIGTERM, _exit_on_term)
                self.target(server, proc)
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise
        finally:
            self.relay.flush(server.settings["max_wait_time"])
            events.trigger(Event.PROCESS_STOP, server, spec.name, self.worker_id)
        return 0

    def _run_async(self) -> None:
        loop = self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        main = loop.create_task(self.target(self.server, self.process))
        loop.add_signal_handler(signal.SIGTERM, main.cancel)
        loop.add_reader(self.process.mailbox.fileno(), dispatch_messages, self.process.mailbox,
                        self.server, self.relay.take_reply)
        try:
            loop.run_until_complete(main)
        except asyncio.CancelledError:
            pass
        finally:
            loop.close()

    # -- delivering through a worker ------------------------------------------------------------

    def deliver_by_process(self, name: str, method: str, params: Sequence[Any], timeout: float,
                           worker_id: int, type: int, callback: FinishCallback | None) -> Any:
        self.checked_mailbox("Task.deliver_by_process")
        return self.relay.deliver(name, method, params, timeout, worker_id, type, callback)

    def deliver_many_by_process(self, calls: list[tuple[str, str, Sequence[Any]]],
                                worker_id: int = -1, timeout: float = 3.0,
                                origin_role: int = ORIGIN_USER_PROCESS,
                                piles: Sequence[int] = ()) -> None:
        self.checked_mailbox("deliver_many_by_process")
        if worker_id == -1:
            worker_id = self.relay.least_loaded()
        self.send_message(pack_tasks(calls, origin_role, piles), worker_id, PIPE_TASKS, timeout)

    def _send(self, mailbox: Mailbox, dst: int, body: bytes, timeout: float) -> None:
        # Behind whatever ASYNC deliveries are queued, held in a burst as they are, and never
        # beside the flusher thread.
        self.relay.send_message(dst, body, timeout)


def _exit_on_term(signum: int, frame: Any) -> None:
    # Unwinds the process's function (its finally blocks run) and ends the process with 0.
    raise SystemExit(0)

