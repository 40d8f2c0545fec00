"""Server: the user-facing handle of a pyswtask server (Swoole\\Server's task side).

``Server(...)`` only records the configuration; ``start()`` hands it to the master, which forks
the workers and task workers and blocks until the server stops. The same object is inherited by
every child, where ``tick``/``after``/``clear_timer`` and ``shutdown`` act on that process.

It is a facade: it validates (``settings``) and delegates to the current process's role or to
the master; it holds no per-process state and no transport of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
from typing import TYPE_CHECKING, Any, Callable, Mapping

from . import roles
from .process import ProcessSpec, declared
from .settings import DEFAULTS
from .settings import validate as validate_settings
from .sysv import MAX_SERVER_TABLES
from .table import ColumnSpec, Table
from .transport import control
from .transport.msgqueue import IpcMode, ServerQueue

if TYPE_CHECKING:
    from .cluster.node import ClusterNode
    from .counters import StatsSegment
    from .cron import Crontab
    from .http import HttpService

__all__ = ["Server", "DEFAULT_SETTINGS", "HOOKS"]

log = logging.getLogger("pyswtask.server")

# Under its old name too: code written against earlier releases imports it from here.
DEFAULT_SETTINGS: dict[str, Any] = DEFAULTS

HOOKS = ("start", "shutdown", "worker_start", "worker_stop", "task_worker_start",
         "task_worker_stop")

_timer_ids = itertools.count(1)


class Server:
    """A master, ``worker_num`` workers and ``task_worker_num`` task workers.

    Worker ids are 0..worker_num-1; task worker ids follow them, as in Swoole
    (worker_num..worker_num+task_worker_num-1). ``dst_worker_id`` in ``Task.deliver`` is the
    task worker's index, 0..task_worker_num-1.

    With the ``app`` setting (an ASGI app, or ``"module:attribute"``), every worker also serves
    it over HTTP on the ``bind`` addresses, which the master opens before it forks
    (``addresses`` tells where, once started); see ``pyswtask.http``.
    """

    def __init__(self, worker_num: int = 2, task_worker_num: int = 2, **settings: Any) -> None:
        for label, value in (("worker_num", worker_num), ("task_worker_num", task_worker_num)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{label} must be a non-negative int, not {value!r}")
        if worker_num < 1:
            raise ValueError("worker_num must be at least 1: tasks are delivered from workers")
        self.worker_num = worker_num
        self.task_worker_num = task_worker_num
        self.settings: dict[str, Any] = validate_settings(settings)
        self._hooks: dict[str, list[Callable[..., Any]]] = {}
        self._processes: list[ProcessSpec] = []
        self.master_pid: int | None = None
        # Set by the master before it forks, so that every child inherits them.
        self.crontab: Crontab | None = None
        self.process_ids: dict[str, int] = {}
        self.master_id: int | None = None       # the master's inbox, for control messages
        self.queue: ServerQueue | None = None
        self.http: HttpService | None = None
        self.stats_segment: StatsSegment | None = None
        self.metrics_address: str | None = None
        # Created in shared memory by the master before it forks, removed when it stops.
        self.tables: dict[str, Table] = {}
        self.cluster: ClusterNode | None = None     # the node, while it runs in a cluster

    def uses_queue(self) -> bool:
        """Whether the server has a message queue: a key, or an ipc mode that needs one."""
        return self.task_worker_num > 0 and (
            self.settings["message_queue_key"] is not None
            or self.settings["task_ipc_mode"] != IpcMode.SOCKETS)

    def process_id(self, name: str) -> int | None:
        """The id (for send_message) of the user process of that name, once started."""
        return self.process_ids.get(name)

    # -- configuration ------------------------------------------------------------------------

    def on(self, hook: str, fn: Callable[..., Any]) -> None:
        """Adds a hook: ``fn(server, worker_id)`` for worker_start / worker_stop /
        task_worker_start / task_worker_stop (run in that process), ``fn(server)`` for start
        and shutdown (run in the master)."""
        if hook not in HOOKS:
            raise ValueError(f"unknown hook {hook!r} (hooks: {', '.join(HOOKS)})")
        if not callable(fn):
            raise TypeError(f"hook {hook!r} needs a callable, not {fn!r}")
        self._hooks.setdefault(hook, []).append(fn)

    def add_process(self, target: Any, name: str | None = None, boot: bool = True) -> None:
        """Adds a user process: ``fn(server, process)`` or a class with
        ``run(self, server, process)``; see pyswtask.process. ``boot=False`` declares it
        without starting it with the server: ``start_process(name)`` starts it later."""
        spec = target if isinstance(target, ProcessSpec) else ProcessSpec(target, name, boot)
        if any(p.name == spec.name for p in self._processes):
            raise ValueError(f"this server already has a process named {spec.name!r}")
        self._processes.append(spec)

    def table(self, name: str, size: int, columns: Mapping[str, ColumnSpec] | None = None, *,
              key_width: int = 64, key: int | None = None) -> Table:
        """Declares a shared-memory Table (see ``pyswtask.Table``) that the master creates
        before it forks, so that every process of the server uses the same rows, and removes
        when it stops; returns it (keep it in a module-level name, or find it in
        ``server.tables[name]``). Declared before start(). Its SysV key (for ``Table.attach``
        from a separate program) is ``key``, or one derived from the master's pid."""
        return self.add_table(Table(size, columns, key_width=key_width, name=name), key=key)

    def add_table(self, table: Table, key: int | None = None) -> Table:
        """Adds a Table declared on its own (``Table(size, columns, name=...)``) to the ones
        the master creates before it forks; returns it."""
        if key is not None and (not isinstance(key, int) or isinstance(key, bool)
                                or not 0 < key < 2**31):
            raise ValueError(f"a table's key is a positive SysV key below 2**31, not {key!r}")
        if not isinstance(table, Table):
            raise TypeError(f"add_table() takes a pyswtask.Table, not {type(table).__name__}")
        if self.master_pid is not None:
            raise RuntimeError("tables are declared before start()")
        if table.created:
            raise ValueError(f"table {table.name!r} is created already: the server creates "
                             "its tables itself")
        if table.name in self.tables:
            raise ValueError(f"this server already has a table named {table.name!r}")
        if len(self.tables) >= MAX_SERVER_TABLES:
            raise ValueError(f"a server has at most {MAX_SERVER_TABLES} tables")
        table.server_key = key
        self.tables[table.name] = table
        return table

    def user_processes(self) -> list[ProcessSpec]:
        """The user processes of this server: added here, then declared with @process (a name
        added here wins), in that order; those with boot=False wait for start_process()."""
        names = {p.name for p in self._processes}
        return self._processes + [p for p in declared() if p.name not in names]

    def start_process(self, name: str) -> None:
        """Starts a user process declared with ``boot=False`` (Swoft's on-demand processes),
        from any process of the running server; from then on it is supervised like the others.
        Starting one that runs already does nothing."""
        role = roles.current()
        control.request_start(role.send_message,
                              self.master_id if self.master_pid is not None else None,
                              self.process_ids, name)

    def send_message(self, data: Any, dst_worker_id: int, type: str = "message",
                     timeout: float = 3.0) -> None:
        """Sends a pipe message to another process of this server (ids: workers, then task
        workers, then user processes), where Event.PIPE_MESSAGE fires with
        ``(type, data, src_id)``. Never blocks a worker's loop; elsewhere blocks until written
        (TimeoutError after ``timeout``)."""
        roles.current().send_message(data, dst_worker_id, type, timeout)

    def _run_hook(self, hook: str, *args: Any) -> None:
        for fn in self._hooks.get(hook, ()):
            try:
                result = fn(self, *args)
                if asyncio.iscoroutine(result):
                    roles.current().spawn_coroutine(result)
            except Exception:
                log.exception("%s hook %r failed", hook, fn)

    # -- running --------------------------------------------------------------------------------

    def start(self) -> int:
        """Forks the children and blocks in the master until the server stops (SIGTERM,
        SIGINT or ``shutdown()``); returns the master's exit code (0 on a clean stop)."""
        if roles.current().in_server:
            raise RuntimeError("start() was called inside a server process")
        from .master import Master
        return Master(self).run()

    def shutdown(self) -> None:
        """Stops the whole server: from any of its processes, asks the master to stop."""
        if self.master_pid is None:
            raise RuntimeError("the server is not running")
        os.kill(self.master_pid, signal.SIGTERM)

    def stats(self) -> dict[str, Any]:
        """The server's counters and state, from any of its processes (the master from the
        ``start`` hook on), read from shared memory: a plain dict whose keys
        ``pyswtask.stats`` documents. ServerNotRunning when the server is not running."""
        from .errors import ServerNotRunning
        from .stats.snapshot import snapshot

        if self.stats_segment is None:
            raise ServerNotRunning("server.stats() works while the server runs, in its "
                                   "processes; from elsewhere: pyswtask.stats.read(pid=...)")
        return snapshot(self.stats_segment)

    @property
    def addresses(self) -> list[str]:
        """Where the workers accept HTTP while the server runs (in the master from the
        ``start`` hook on, and in every child): ``"127.0.0.1:54321"`` with the port the kernel
        picked for a ``bind`` port of 0, ``"[::1]:8000"``, ``"unix:/path"``. Empty when the
        server has no ``app`` or is not running."""
        return self.http.addresses if self.http is not None else []

    @property
    def worker_id(self) -> int:
        """This process's worker id; -1 in the master or outside the server."""
        return roles.current().worker_id

    # -- timers (worker processes) ----------------------------------------------------------

    def tick(self, ms: int, fn: Callable[[int], Any]) -> int:
        """Calls ``fn(timer_id)`` every ``ms`` milliseconds in this worker or task worker (there,
        between tasks); returns the id.

        Due times are kept on a fixed grid from the first one, so the tick does not drift."""
        loop, interval = self._timer_loop("tick", ms)
        timer_id = next(_timer_ids)
        timers = roles.current().timers
        when = loop.time() + interval

        def fire() -> None:
            nonlocal when
            if timer_id not in timers:
                return
            when += interval
            timers[timer_id] = loop.call_at(when, fire)
            _call_timer(fn, timer_id)

        timers[timer_id] = loop.call_at(when, fire)
        return timer_id

    def after(self, ms: int, fn: Callable[[], Any]) -> int:
        """Calls ``fn()`` once after ``ms`` milliseconds in this worker or task worker (there,
        between tasks); returns the id."""
        loop, interval = self._timer_loop("after", ms)
        timer_id = next(_timer_ids)
        timers = roles.current().timers

        def fire() -> None:
            if timers.pop(timer_id, None) is not None:
                _call_timer(fn)

        timers[timer_id] = loop.call_later(interval, fire)
        return timer_id

    def clear_timer(self, timer_id: int) -> bool:
        """Cancels a timer of this worker or task worker; returns whether it existed."""
        handle = roles.current().timers.pop(timer_id, None)
        if handle is None:
            return False
        handle.cancel()
        return True

    @staticmethod
    def _timer_loop(api: str, ms: int) -> tuple[asyncio.AbstractEventLoop, float]:
        return roles.current().timer_loop(api, ms)


def _call_timer(fn: Callable[..., Any], *args: Any) -> None:
    try:
        result = fn(*args)
        if asyncio.iscoroutine(result):
            roles.current().spawn_coroutine(result)
    except Exception:
        log.exception("timer callback %r failed", fn)
