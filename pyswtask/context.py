"""Which role the current process plays in a server, and the handles that role works with.

Set once in each child right after fork; read by the facade (Task, timers) to find its loop,
its dispatcher and its server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from ._core import Dispatcher
    from .server import Server

MASTER = "master"
WORKER = "worker"
TASK_WORKER = "task worker"

# A child exits with this when it could not even set itself up; the master then stops instead of
# respawning it in a loop (gunicorn's WORKER_BOOT_ERROR).
EXIT_BOOT_ERROR = 3


class ProcessContext:
    __slots__ = ("role", "worker_id", "server", "dispatcher", "loop", "timers")

    def __init__(self) -> None:
        self.role: str | None = None
        self.worker_id: int = -1
        self.server: Server | None = None
        self.dispatcher: Dispatcher | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timers: dict[int, Any] = {}

    def enter(self, role: str, worker_id: int, server: Server) -> None:
        self.role = role
        self.worker_id = worker_id
        self.server = server
        self.dispatcher = None
        self.loop = None
        self.timers = {}


current = ProcessContext()
