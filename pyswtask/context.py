"""Which role the current process plays in a server, and the handles that role works with.

Set once in each child right after fork; read by the facade (Task, timers) to find its loop,
its dispatcher and its server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from ._core import Dispatcher, Mailbox
    from .process import Process
    from .server import Server

MASTER = "master"
WORKER = "worker"
TASK_WORKER = "task worker"
PROCESS = "process"

# A child exits with this when it could not even set itself up; the master then stops instead of
# respawning it in a loop (gunicorn's WORKER_BOOT_ERROR).
EXIT_BOOT_ERROR = 3


class ProcessContext:
    __slots__ = ("role", "worker_id", "server", "dispatcher", "loop", "timers", "mailbox",
                 "process", "load", "writers", "package_max_length")

    def __init__(self) -> None:
        self.role: str | None = None
        self.worker_id: int = -1
        self.server: Server | None = None
        self.dispatcher: Dispatcher | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timers: dict[int, Any] = {}
        self.mailbox: Mailbox | None = None
        self.process: Process | None = None
        self.load: memoryview | None = None     # uint32 per worker: tasks without a result
        self.writers: set[int] = set()          # inboxes a worker waits to finish writing to
        self.package_max_length = 0             # 0: no limit (outside a server)

    def enter(self, role: str, worker_id: int, server: Server) -> None:
        self.__init__()  # type: ignore[misc]
        self.role = role
        self.worker_id = worker_id
        self.server = server
        self.package_max_length = int(server.settings["package_max_length"])


current = ProcessContext()
