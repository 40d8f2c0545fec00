"""The role object of the current process, and the roles that run no loop of their own.

Every process holds exactly one role object, ``current()``: ``Outside`` until it joins a server,
``MasterRole`` in the master, and in a child the ``Worker``, ``TaskWorker`` or ``UserProcess``
the master chose for it at fork (``ChildRole.init_process``, after gunicorn's
``Worker.init_process``). Code that behaves differently by role asks this object (deliver,
send a message, start a timer) and the role answers for itself: there is no "which role am I"
test anywhere else.

This module must not import the concrete child roles, the master's supervisor or the server.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Iterable, Protocol, Sequence

from .. import registry
from .._core import Dispatcher, Mailbox, keep_freed_memory
from ..cluster import client as cluster_client
from ..context import TaskContext
from ..envelope import ORIGIN_USER_PROCESS, TYPE_CO, check_timeout, check_type, deadline_after, pack_task
from ..errors import DeliveryError, NoTaskRunning, ServerNotRunning
from ..titles import set_title
from ..transport import command
from ..transport.pipe import describe_ids, pack_message

if TYPE_CHECKING:
    from ..counters import StatsSegment
    from ..http import HttpService
    from ..process import ProcessSpec
    from ..transport.ipc import ChildIpc
    from ..transport.msgqueue import ServerQueue

__all__ = ["Role", "Outside", "MasterRole", "ChildRole", "ServerHandle", "current", "enter",
           "leave", "timer_interval", "EXIT_BOOT_ERROR"]

log = logging.getLogger("pyswtask.master")

# A child exits with this when it could not even set itself up; the master then stops instead of
# respawning it in a loop (gunicorn's WORKER_BOOT_ERROR).
EXIT_BOOT_ERROR = 3

FinishCallback = Callable[[int, Any], Any]


class ServerHandle(Protocol):
    """What the roles, the master and the crontab ask of the server object: the part of
    ``pyswtask.Server`` below which they sit. Declared here, so that they depend on this
    question and not on the module above them; ``Server`` is the one implementation."""

    settings: dict[str, Any]
    worker_num: int
    task_worker_num: int
    master_pid: int | None
    master_id: int | None           # the master's inbox, for control messages
    process_ids: dict[str, int]
    queue: ServerQueue | None
    crontab: Any
    http: HttpService | None        # the app and the listening sockets, when it serves HTTP
    stats_segment: StatsSegment | None  # the counters every process raises (pyswtask.counters)
    metrics_address: str | None
    tables: dict[str, Any]          # name -> pyswtask.Table, created by the master
    cluster: Any                    # the cluster node (pyswtask.cluster.node), when in one

    @property
    def worker_id(self) -> int: ...
    def _run_hook(self, hook: str, *args: Any) -> None: ...
    def user_processes(self) -> list[ProcessSpec]: ...
    def uses_queue(self) -> bool: ...
    def process_id(self, name: str) -> int | None: ...
    def send_message(self, data: Any, dst_worker_id: int, type: str = "message",
                     timeout: float = 3.0) -> None: ...
    def start_process(self, name: str) -> None: ...
    def shutdown(self) -> None: ...
    def tick(self, ms: int, fn: Callable[[int], Any]) -> int: ...
    def after(self, ms: int, fn: Callable[[], Any]) -> int: ...
    def clear_timer(self, timer_id: int) -> bool: ...


class Role:
    """What a process can do in (or outside) a server. The base answers as a process that has
    no way to deliver: each role overrides what it can do."""

    kind = "outside"
    in_server = False

    def __init__(self, server: ServerHandle | None = None, worker_id: int = -1) -> None:
        self.server = server
        self.worker_id = worker_id          # the global id: workers, task workers, processes
        self.package_max_length = int(server.settings["package_max_length"]) if server else 0
        self.mailbox: Mailbox | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timers: dict[int, asyncio.TimerHandle] = {}

    # -- delivering -----------------------------------------------------------------------------

    def task_dispatcher(self, api: str) -> Dispatcher:
        """The channels to the task workers, or the error saying why this process has none."""
        raise ServerNotRunning(
            f"{api} works inside a worker of a running pyswtask server (a worker_start hook, a "
            "timer, a listener, or code they call); this process is not one. A separate program "
            "delivers through a server's message queue: Task.configure(message_queue_key=...) or "
            "PYSWTASK_QUEUE_KEY, then Task.deliver")

    def deliver(self, name: str, method: str, params: Sequence[Any], type: int, timeout: float,
                callback: FinishCallback | None, dst_worker_id: int) -> Any:
        """Task.deliver in this process."""
        self.task_dispatcher("Task.deliver")
        raise AssertionError("unreachable")  # pragma: no cover

    def deliver_batch(self, calls: Iterable[Sequence[Any]], timeout: float,
                      dst_worker_id: int) -> list[Any]:
        """Task.deliver_batch in this process."""
        self.task_dispatcher("Task.deliver_batch")
        raise AssertionError("unreachable")  # pragma: no cover

    async def co(self, name: str, method: str, params: Sequence[Any], timeout: float,
                 dst_worker_id: int) -> Any:
        """Task.co in this process."""
        self.task_dispatcher("Task.co")

    async def co_batch(self, calls: Iterable[Sequence[Any]], timeout: float,
                       dst_worker_id: int) -> list[Any]:
        """Task.co_batch in this process."""
        self.task_dispatcher("Task.co_batch")
        return []  # pragma: no cover

    def deliver_by_process(self, name: str, method: str, params: Sequence[Any], timeout: float,
                           worker_id: int, type: int, callback: FinishCallback | None) -> Any:
        """Task.deliver_by_process in this process."""
        raise DeliveryError("Task.deliver_by_process works in the user processes of a running "
                            "server (server.add_process or @process)")

    def deliver_many_by_process(self, calls: list[tuple[str, str, Sequence[Any]]],
                                worker_id: int = -1, timeout: float = 3.0,
                                origin_role: int = ORIGIN_USER_PROCESS,
                                piles: Sequence[int] = ()) -> None:
        """ASYNC delivery of many tasks in one pipe message (a user process's, the crontab's:
        ``origin_role`` is what the tasks see as their origin's role, an ORIGIN_* value). They
        leave the worker together; the first come in piles of the sizes in ``piles``, each
        to one task worker, which runs them one after another (for tasks known to be quick),
        and the rest are spread."""
        raise DeliveryError("deliver_many_by_process works in the user processes of a server")

    def task_context(self) -> TaskContext:
        """Task.current() in this process: only a task worker running a task has one."""
        what = {"outside": "a program outside any server", "master": "the master",
                "process": "a user process"}.get(self.kind, f"a {self.kind}")
        raise NoTaskRunning(f"Task.current() works inside a task method, in a task worker; "
                            f"this process is {what}")

    # -- pipe messages --------------------------------------------------------------------------

    def checked_mailbox(self, api: str) -> Mailbox:
        """This process's mailbox, or ServerNotRunning when it has none (any more)."""
        if self.mailbox is None:
            raise ServerNotRunning(f"{api} works inside the processes of a running pyswtask "
                                   "server")
        return self.mailbox

    def send_message(self, data: Any, dst_worker_id: int, type: str = "message",
                     timeout: float = 3.0) -> None:
        """server.send_message from this process: checks, packs, then sends the role's way."""
        mailbox = self.checked_mailbox("send_message")
        if not isinstance(dst_worker_id, int) or not 0 <= dst_worker_id < mailbox.size:
            assert self.server is not None
            raise ValueError(f"dst_worker_id {dst_worker_id!r} is out of range: "
                             + describe_ids(self.server.worker_num, self.server.task_worker_num,
                                            mailbox.size))
        self._send(mailbox, dst_worker_id, pack_message(type, data, self.package_max_length),
                   timeout)

    def _send(self, mailbox: Mailbox, dst: int, body: bytes, timeout: float) -> None:
        # Blocks until written: fine where no loop of other work waits on this process.
        mailbox.send(dst, body, timeout)

    # -- timers and coroutines ------------------------------------------------------------------

    def timer_loop(self, api: str, ms: float) -> tuple[asyncio.AbstractEventLoop, float]:
        """The loop a timer of ``ms`` milliseconds runs on, and its interval in seconds."""
        timer_interval(api, ms)
        raise RuntimeError(f"{api}() works in workers and task workers: call it from a "
                           "worker_start or task_worker_start hook, or from code running there")

    def spawn_coroutine(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Runs a coroutine a hook or a timer returned on this process's loop."""
        if self.loop is None:
            coro.close()
            raise RuntimeError("coroutine hooks and timers run in workers and task workers only")
        task = self.loop.create_task(coro)
        task.add_done_callback(_log_task_failure)


class Outside(Role):
    """A program that is no process of a server: it delivers through a server's message queue
    when one is configured (``Task.configure`` / PYSWTASK_QUEUE_KEY), and cluster tasks to the
    cluster's Redis when one is configured (``Task.configure(cluster=...)``)."""

    def deliver(self, name: str, method: str, params: Sequence[Any], type: int, timeout: float,
                callback: FinishCallback | None, dst_worker_id: int) -> Any:
        cluster = cluster_client.client()
        if cluster is not None and registry.queue_of(name) is not None:
            return cluster.deliver(name, method, params, type, timeout)
        queue = command.client()
        if queue is None:
            if cluster is not None:
                return cluster.deliver(name, method, params, type, timeout)  # says why not
            return super().deliver(name, method, params, type, timeout, callback, dst_worker_id)
        check_type(type)
        body = pack_task(name, method, params, type, 0,
                         deadline_after(timeout) if type == TYPE_CO else None)
        return queue.deliver(name, method, body, type, check_timeout(timeout), dst_worker_id)


class MasterRole(Role):
    """The master: it supervises; it sends control and pipe messages, and delivers nothing."""

    kind = "master"
    in_server = True

    def __init__(self, server: ServerHandle, mailbox: Mailbox) -> None:
        super().__init__(server, -1)
        self.mailbox = mailbox

    def task_dispatcher(self, api: str) -> Dispatcher:
        raise DeliveryError(f"{api} cannot be called from the master process: deliver from a "
                            "worker (a worker_start hook, a timer or a listener)")


class ChildRole(Role):
    """A process the master forked: the shared start-up, then the role's own ``setup`` and
    ``run``. Subclasses set ``kind`` and implement both."""

    in_server = True

    def __init__(self, server: ServerHandle, worker_id: int, index: int, ipc: ChildIpc) -> None:
        super().__init__(server, worker_id)
        self.server: ServerHandle = server
        self.index = index                  # among the processes of its kind
        self.ipc = ipc
        self.load: memoryview = ipc.load    # uint32 per worker: tasks without a result
        self._master_checked = 0.0

    def title(self) -> str:
        return f"{self.kind} {self.worker_id}"

    def __str__(self) -> str:
        return f"{self.kind} {self.worker_id}"

    def init_process(self) -> int:
        """Becomes this role in a freshly forked child; returns the exit code. A failure
        before the role could serve exits with EXIT_BOOT_ERROR, which stops the master."""
        # A master that is killed outright cannot stop its children: have the kernel send them
        # SIGTERM then, so they stop as they would on a normal stop instead of living on.
        _terminate_with_parent()
        if os.getppid() != self.server.master_pid:
            return 0  # the master died before the line above took effect
        set_title(self.title())
        # Everything inherited from the master lives as long as the child: keep the collector
        # from walking it again and again on the per-task path.
        gc.freeze()
        if self.ipc.arenas is not None:
            # Processes that pass large bodies: see keep_freed_memory.
            keep_freed_memory()
        enter(self)
        try:
            self.mailbox = Mailbox(self.worker_id, self.ipc.inbox_fd, self.ipc.out_fds,
                                   epoch=os.getpid(), on_protocol_error=log.error,
                                   max_body=self.package_max_length)
            self.setup(self.mailbox)
        except Exception:
            logging.getLogger(f"pyswtask.{self.kind.replace(' ', '_')}").exception(
                "%s could not start", self)
            return EXIT_BOOT_ERROR
        return self.run()

    def setup(self, mailbox: Mailbox) -> None:
        """The role's own start-up: its loop, its channels, how it reads its messages."""

    def run(self) -> int:
        """Serves until the role stops; returns the exit code."""
        raise NotImplementedError

    def checked_mailbox(self, api: str) -> Mailbox:
        mailbox = self.mailbox
        if mailbox is None:
            return super().checked_mailbox(api)     # raises ServerNotRunning
        # An orphan's messages would still be accepted by the surviving children's inboxes, so
        # look at the master, but at most every 10 ms: getppid() per message costs a syscall.
        now = time.monotonic()
        if now - self._master_checked > 0.01:
            if os.getppid() != self.server.master_pid:
                raise ServerNotRunning(f"{api}: the server this process belonged to has stopped")
            self._master_checked = now
        return mailbox


def timer_interval(api: str, ms: float) -> float:
    """A timer's interval in seconds, or ValueError when ``ms`` is not a positive number."""
    if not isinstance(ms, (int, float)) or ms <= 0:
        raise ValueError(f"{api}() needs a positive number of milliseconds, not {ms!r}")
    return ms / 1000.0


_current: Role = Outside()


def current() -> Role:
    """The role of this process."""
    return _current


def enter(role: Role) -> None:
    """Makes ``role`` this process's role (once per process: at fork, or as the master)."""
    global _current
    _current = role


def leave() -> None:
    """Back to a process outside any server (the master, once its server stopped)."""
    global _current
    _current = Outside()


def _log_task_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logging.getLogger("pyswtask.server").error("coroutine %r failed", task.get_coro(),
                                                   exc_info=task.exception())


_PR_SET_PDEATHSIG = 1


def _terminate_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
