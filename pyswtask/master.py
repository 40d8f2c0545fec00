"""The master: forks and supervises the children, and stops them in order.

Signal handlers only queue the signal; the loop below dispatches it (gunicorn's arbiter). The
wake-up comes through ``signal.set_wakeup_fd``, so the master sleeps in one ``select`` between
events and never does work inside a handler.

The master owns the slots (``Child``): which role each runs, when it is respawned or reloaded,
and the pre-fork resources it hands down (IPC, the message queue, the crontab's tables). What a
child does once forked is its role's (``pyswtask.roles``): the master never runs a child's code.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import signal
import sys
import time
from typing import Any

from . import roles, sysv
from ._core import Mailbox
from .cluster.node import ClusterNode
from .counters import StatsSegment
from .cron import Crontab
from .http import HttpService
from .roles import (
    EXIT_BOOT_ERROR,
    ChildRole,
    ClusterWorker,
    ServerHandle,
    TaskWorker,
    UserProcess,
    Worker,
)
from .titles import set_title
from .transport import control
from .transport.ipc import ServerIpc
from .transport.msgqueue import ServerQueue

log = logging.getLogger("pyswtask.master")

WORKER = Worker.kind
TASK_WORKER = TaskWorker.kind
PROCESS = UserProcess.kind

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, signal.SIGUSR1,
            signal.SIGUSR2)


class Child:
    """One supervised slot: the process in it changes on respawn, the slot does not."""

    __slots__ = ("role", "kind", "worker_id", "index", "name", "pid", "started", "failures",
                 "respawn_at")

    def __init__(self, role: type[ChildRole], worker_id: int, index: int, name: str = "") -> None:
        self.role = role            # chosen once: what every process in this slot becomes
        self.kind = role.kind
        self.worker_id = worker_id
        self.index = index          # index among its kind
        self.name = name
        self.pid = 0
        self.started = 0.0
        self.failures = 0
        self.respawn_at: float | None = None

    def __str__(self) -> str:
        what = f"process {self.name}" if self.kind == PROCESS else f"{self.kind} {self.worker_id}"
        return f"{what} (pid {self.pid})"


class Master:
    def __init__(self, server: ServerHandle) -> None:
        self.server = server
        self.settings = server.settings
        # With a cluster, a worker also sends the cluster tasks to the node's bridge; without
        # one, the plain Worker, so that a local delivery makes no cluster check at all.
        self.cluster = ClusterNode(server) if server.settings["cluster"] else None
        worker: type[ChildRole] = ClusterWorker if self.cluster is not None else Worker
        self.children = [Child(worker, i, i) for i in range(server.worker_num)]
        self.children += [Child(TaskWorker, server.worker_num + i, i)
                          for i in range(server.task_worker_num)]
        first = server.worker_num + server.task_worker_num
        self.processes = server.user_processes()
        self.crontab: Crontab | None = None
        if server.settings["cron"]:
            self.crontab = Crontab(server)
            self.processes += self.crontab.processes()
        if self.cluster is not None:
            self.processes += self.cluster.processes()
        self.children += [Child(UserProcess, first + i, i, spec.name)
                          for i, spec in enumerate(self.processes)]
        self.by_pid: dict[int, Child] = {}
        self.signals: collections.deque[int] = collections.deque(maxlen=32)
        self.stopping = False
        self.exit_code = 0
        self.ipc: ServerIpc | None = None
        self.wakeup: tuple[int, int] | None = None
        self.queue: ServerQueue | None = None
        self.http: HttpService | None = None
        self.reloads: collections.deque[Child] = collections.deque()
        self.reloading: tuple[Child, int] | None = None
        self.ready_pids: set[int] = set()
        self.stats: StatsSegment | None = None
        self.metrics: Any = None

    # -- life cycle -----------------------------------------------------------------------------

    def run(self) -> int:
        server = self.server
        # First: the IPC keeps its busy flags and loads in it. A leftover on the key from a
        # dead server is replaced; sysv.sweep leaves this one alone (it is attached).
        key = self.settings["stats_shm_key"] or sysv.stats_key(os.getpid())
        stats = self.stats = server.stats_segment = StatsSegment.create(
            key, worker_num=server.worker_num, task_worker_num=server.task_worker_num,
            process_names=[spec.name for spec in self.processes], master_pid=os.getpid())
        stats.describe(task_ipc_mode=self.settings["task_ipc_mode"])
        self.ipc = ServerIpc(server.worker_num, server.task_worker_num, len(self.processes),
                             busy=stats.busy, load=stats.load_bytes,
                             arena_size=self.settings["task_arena_size"])
        server.process_ids = {c.name: c.worker_id for c in self.children if c.kind == PROCESS}
        server.master_id = self.ipc.master_id
        inbox_fd, out_fds = self.ipc.master_inbox()
        self.inbox = Mailbox(self.ipc.master_id, inbox_fd, out_fds, epoch=os.getpid(),
                             on_protocol_error=log.error,
                             max_body=self.settings["package_max_length"])
        set_title("master")
        old_handlers = self._install_signals()
        server.master_pid = os.getpid()
        roles.enter(roles.MasterRole(server, self.inbox))
        pid_file = self.settings["pid_file"]
        try:
            _check_pid_file(pid_file)
            sysv.sweep()
            if pid_file:
                with open(pid_file, "w") as f:
                    f.write(f"{os.getpid()}\n")
            if self.cluster is not None:
                # Before anything forks: Redis unreachable fails the start, naming the URL.
                self.cluster.open(os.getpid())
                server.cluster = self.cluster
            self._create_tables()
            if self.crontab is not None:
                self.crontab.open(os.getpid())
                server.crontab = self.crontab
                stats.describe(cron_key=self.crontab.key, timezone=self.settings["timezone"])
            if server.uses_queue():
                self.queue = ServerQueue(
                    self.settings["message_queue_key"], self.settings["task_ipc_mode"],
                    server.worker_num, server.task_worker_num,
                    self.settings["package_max_length"])
                self.queue.open(os.getpid())
                server.queue = self.queue
                stats.describe(queue_msqid=self.queue.msqid)
            if self.settings["app"] is not None:
                # Before the fork: the workers inherit the sockets, and the port stays open in
                # this process while any of them stops, dies or is reloaded.
                self.http = server.http = HttpService.prepare(self.settings)
                log.info("master %d listening on %s", os.getpid(),
                         ", ".join(self.http.listeners.urls()))
            if self.settings["metrics_bind"] is not None:
                from .stats.metrics import MetricsServer

                self.metrics = MetricsServer.start(self.settings["metrics_bind"], stats)
                server.metrics_address = self.metrics.address
                log.info("master %d serving metrics on http://%s/metrics", os.getpid(),
                         self.metrics.address)
            for child in self.children:
                if child.kind != PROCESS or self.processes[child.index].boot:
                    self._spawn(child)
            log.info("master %d started %d worker(s) and %d task worker(s)", os.getpid(),
                     server.worker_num, server.task_worker_num)
            server._run_hook("start")
            while not self.stopping:
                self._sleep(self._next_respawn_delay())
                self._handle_signals()
                self._handle_control()
                self._respawn_due()
                self._reload_step()
                if self.queue is not None and self.queue.backlog:
                    self.queue.send_backlog()
        finally:
            self._stop_children()
            if self.metrics is not None:
                self.metrics.stop()
                self.metrics = server.metrics_address = None
            if self.http is not None:
                self.http.close()
                server.http = self.http = None
            if self.queue is not None:
                self.queue.remove()
                server.queue = self.queue = None
            server._run_hook("shutdown")
            self._restore_signals(old_handlers)
            self.ipc.close()
            self.ipc = None
            if self.crontab is not None:
                self.crontab.close()
                server.crontab = None
            server.stats_segment = self.stats = None
            stats.close()
            for table in server.tables.values():
                table.destroy()
            if pid_file:
                try:
                    os.unlink(pid_file)
                except FileNotFoundError:
                    pass
            server.cluster = None
            server.master_pid = None
            roles.leave()
        log.info("master %d stopped", os.getpid())
        return self.exit_code

    def _create_tables(self) -> None:
        """The server's Tables, in shared memory before the fork: every child inherits them."""
        for index, table in enumerate(self.server.tables.values()):
            key = table.server_key
            table._create_segment(key if key is not None else sysv.table_key(os.getpid(), index),
                                  setting=f"Server.table({table.name!r}, ..., key=)", logger=log)
            log.info("table %r: %d rows, %d bytes at SysV key 0x%x", table.name, table.size,
                     table.memory_size, table.key)

    # -- signals --------------------------------------------------------------------------------

    def _install_signals(self) -> tuple[int, dict[int, Any]]:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wakeup = (rfd, wfd)
        old: dict[int, Any] = {sig: signal.signal(sig, self._queue_signal) for sig in _SIGNALS}
        return signal.set_wakeup_fd(wfd), old

    def _restore_signals(self, old: tuple[int, dict[int, Any]]) -> None:
        signal.set_wakeup_fd(old[0])
        for sig, handler in old[1].items():
            signal.signal(sig, handler)
        if self.wakeup:
            for fd in self.wakeup:
                os.close(fd)
            self.wakeup = None

    def _queue_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    def _sleep(self, timeout: float) -> None:
        assert self.wakeup is not None
        try:
            ready, _, _ = select.select([self.wakeup[0], self.inbox.fileno()], [], [], timeout)
        except InterruptedError:
            return
        if self.wakeup[0] in ready:
            try:
                while os.read(self.wakeup[0], 64):
                    pass
            except BlockingIOError:
                pass

    def _handle_control(self) -> None:
        """Control messages from the children: requests to start a boot=False process, and
        the ready notices of respawned children that a reload waits for."""
        names, ready = control.read_control(self.inbox)
        self.ready_pids.update(ready)
        for name in names:
            child = next((c for c in self.children
                          if c.kind == PROCESS and c.name == name), None)
            if child is None:
                log.error("start of unknown process %r refused", name)
            elif child.pid or child.respawn_at is not None:
                log.info("process %s runs already", name)
            else:
                log.info("starting process %s on request", name)
                self._spawn(child)

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.popleft()
            if signum == signal.SIGCHLD:
                # A child says it is ready before it can exit: read that first, so that its
                # death is judged knowing whether it served.
                self._handle_control()
                self._reap()
            elif signum in (signal.SIGUSR1, signal.SIGUSR2):
                kind = WORKER if signum == signal.SIGUSR1 else TASK_WORKER
                log.info("master got %s: reloading the %ss one at a time",
                         signal.Signals(signum).name, kind)
                self.reloads.extend(c for c in self.children
                                    if c.kind == kind and c not in self.reloads)
            elif not self.stopping:
                log.info("master got %s: stopping", signal.Signals(signum).name)
                self.stopping = True

    # -- children -------------------------------------------------------------------------------

    def _spawn(self, child: Child) -> None:
        child.respawn_at = None
        pid = os.fork()
        if pid:
            child.pid = pid
            child.started = time.monotonic()
            self.by_pid[pid] = child
            if self.stats is not None:
                self.stats.spawned(child.worker_id, pid)
            return
        child.pid = os.getpid()
        code = 1
        try:
            code = self._child_main(child)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            log.exception("%s crashed", child)
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code)

    def _child_main(self, child: Child) -> int:
        # Leave the master's state behind before anything else: default signal handling (the
        # terminal's Ctrl-C reaches every process of the group, and only the master decides the
        # stopping order), none of its wake-up pipe, only this child's ends of the IPC.
        signal.set_wakeup_fd(-1)
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        assert self.wakeup is not None
        for fd in self.wakeup:
            os.close(fd)
        if self.http is not None and child.kind != WORKER:
            self.http.close_copies()
        if self.metrics is not None:
            self.metrics.close_in_child()
        assert self.ipc is not None
        ipc = self.ipc.for_child(child.kind, child.worker_id, child.index)
        role: ChildRole
        if child.role is UserProcess:
            role = UserProcess(self.server, child.worker_id, child.index, ipc,
                               self.processes[child.index])
        else:
            role = child.role(self.server, child.worker_id, child.index, ipc)
        return role.init_process()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.by_pid.pop(pid, None)
            served = pid in self.ready_pids
            self.ready_pids.discard(pid)
            if child is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if self.stats is not None:
                self.stats.exited(child.worker_id)
            if not self.stopping:
                self._handle_death(child, code, served)
            child.pid = 0

    def _handle_death(self, child: Child, code: int, served: bool) -> None:
        """Schedules the child's successor: at once, unless the slot's processes keep dying
        within a second of their start; then after a back-off doubling from 0.1 s up to
        respawn_backoff_max, so that a child that cannot run does not fork in a loop."""
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        if code == EXIT_BOOT_ERROR:
            log.error("%s could not start (%s): stopping the server", child, how)
            self.exit_code = EXIT_BOOT_ERROR
            self.stopping = True
            return
        # A worker or task worker that served and then exited 0 recycled itself (max_request,
        # task_max_request) or was stopped on purpose: however short its life, that is no
        # crash, and its channel must not wait out a back-off. A user process whose function
        # returns at once is not exempt: nothing tells that apart from a process that cannot run.
        planned = code == 0 and served and child.kind != PROCESS
        lived = time.monotonic() - child.started
        child.failures = child.failures + 1 if lived < 1.0 and not planned else 0
        delay = 0.0 if child.failures == 0 else min(
            0.1 * 2 ** (child.failures - 1), self.settings["respawn_backoff_max"])
        child.respawn_at = time.monotonic() + delay
        if self.stats is not None:
            self.stats.respawning(child.worker_id, *self._cause(child, code, served))
        if planned:
            log.info("%s recycled itself; respawning", child)
        else:
            log.warning("%s died with %s; respawning in %.1f s", child, how, delay)
        if child.kind == TASK_WORKER and self.ipc is not None:
            reason = f"task worker {child.worker_id} (pid {child.pid}) died with {how}"
            self.ipc.report_lost(child.index, reason)
            if self.queue is not None:
                ipc, index = self.ipc, child.index
                self.queue.take_back(index, child.worker_id, reason,
                                     lambda w, frame: ipc.send_lost(w, index, frame))

    def _cause(self, child: Child, code: int, served: bool) -> tuple[str, str | None]:
        """Why the child is respawned (counters.CAUSES), and which recycling setting it
        reached, if any."""
        if code < 0:
            return "signal", None
        if code != 0:
            return "exit_code", None
        if self.reloading is not None and self.reloading[0] is child:
            return "reload", None
        if served and child.kind == WORKER:
            return "recycled", "max_request"
        if served and child.kind == TASK_WORKER:
            return "recycled", "task_max_request"
        return "exited", None

    def _reload_step(self) -> None:
        """Restarts the children queued by SIGUSR1/SIGUSR2 one at a time: the next is asked
        to stop only once the previous one's successor is running."""
        current = self.reloading
        if current is not None:
            child, old_pid = current
            if child.pid == old_pid or not child.pid:
                return
            # The successor serves once its start hooks ran (it says so), or surely after 10 s.
            if child.pid not in self.ready_pids and time.monotonic() - child.started < 10.0:
                return
            self.reloading = None
        while self.reloads and self.reloading is None:
            child = self.reloads.popleft()
            if child.pid:
                self.reloading = (child, child.pid)
                # A task worker hands its channels over to its successor (SIGUSR1); a worker
                # waits for the results of what it delivered (SIGTERM).
                os.kill(child.pid, signal.SIGUSR1 if child.kind == TASK_WORKER else signal.SIGTERM)

    def _next_respawn_delay(self) -> float:
        due = [c.respawn_at for c in self.children if c.respawn_at is not None]
        if self.queue is not None and self.queue.backlog:
            # Messages taken back from a dead task worker wait for room in the queue.
            due.append(time.monotonic() + 0.002)
        if not due:
            return 1.0
        return max(0.0, min(due) - time.monotonic())

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.respawn_at is not None and child.respawn_at <= now and not self.stopping:
                self._spawn(child)

    def _stop_children(self) -> None:
        """User processes first (they stop producing work), then workers (they wait for their
        in-flight results), then task workers (they run what is already queued), within
        max_wait_time; whatever is left then is killed."""
        self.stopping = True
        deadline = time.monotonic() + self.settings["max_wait_time"]
        # Requests in flight get the whole max_wait_time; the app's lifespan shutdown and the
        # worker_stop hooks run after it.
        serving = 1.0 if self.http is not None else 0.0
        for kind, until in ((PROCESS, deadline), (WORKER, deadline + serving),
                            (TASK_WORKER, deadline + serving + 1.0)):
            self._signal(kind, signal.SIGTERM)
            self._wait_for(kind, until)
        for child in self.children:
            if child.pid:
                log.warning("%s did not stop in time: killing it", child)
        self._signal(None, signal.SIGKILL)
        self._wait_for(None, time.monotonic() + 5.0)

    def _signal(self, kind: str | None, signum: int) -> None:
        for child in self.children:
            if child.pid and (kind is None or child.kind == kind):
                try:
                    os.kill(child.pid, signum)
                except ProcessLookupError:
                    pass

    def _wait_for(self, kind: str | None, deadline: float) -> None:
        while any(c.pid and (kind is None or c.kind == kind) for c in self.children):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._reap()
            self._sleep(min(left, 0.05))
        self._reap()


def _check_pid_file(path: str | None) -> None:
    """Refuses to start over a running master named by the pid file; a stale one is replaced
    (what its server left in shared memory is swept by sysv.sweep)."""
    if not path:
        return
    try:
        with open(path) as f:
            pid = int(f.read().split()[0])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read()
    except (OSError, ValueError, IndexError):
        return
    if pid != os.getpid() and title.startswith(b"pyswtask: master"):
        raise RuntimeError(f"a server is already running with pid file {path} (master pid {pid})")
    log.info("pid file %s names pid %d, which is not a running master: replacing it", path, pid)
