"""The crontab: ``@scheduled`` task methods run at one-second precision (Swoft's crontab, fixed).

Design, as in Swoft: two shared-memory tables created by the master before it forks (the
origin table, a row per scheduled method; the run-time table, a row per due execution), and two
user processes that share them without messages:

- ``cronTimer`` writes each minute's due rows one second before the minute starts, aligned to
  the wall clock (and at start-up, the rest of the current minute), and frees finished rows;
- ``cronExec`` sleeps until the next due second, claims the due rows and delivers each through
  ``Task.deliver_by_process``. A row whose second passed while it was late is still delivered
  within ``cron_grace`` seconds, else marked skipped and logged; a row is claimed once, so it
  is never delivered twice.

The task runs in a task worker inside a small wrapper that writes running / done / failed and
the duration back into both tables. Rules are croniter's: six fields with seconds first, or
five fields meaning second 0; names (MON, JAN), ranges, steps and lists; day-of-month and
day-of-week OR-ed as in Vixie cron; times in the ``timezone`` setting (IANA name, DST by
croniter's rules; None means the machine's local time).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sysv_ipc  # type: ignore[import-not-found]
from croniter import CroniterError, croniter  # type: ignore[import-untyped]

from . import registry, roles
from ._core import OriginTable, RunStatus, RunTable, TableFull
from .process import ProcessSpec

if TYPE_CHECKING:
    from .roles import Process, ServerHandle

__all__ = ["scheduled", "CronRuleError", "normalize_rule", "next_times", "Crontab"]

log = logging.getLogger("pyswtask.cron")

F = TypeVar("F", bound=Callable[..., Any])

CRON_TASK = "pyswtask.cron"
TIMER_PROCESS = "cronTimer"
EXEC_PROCESS = "cronExec"
# Finished rows stay this long for inspection; unfinished ones this long before they count as
# lost (their task worker died, say).
KEEP_FINISHED = 120
STALE_AFTER = 3600
DEFAULT_KEY_BASE = 0x70030000


due_second: contextvars.ContextVar[int | None] = contextvars.ContextVar("pyswtask_cron_due",
                                                                     default=None)
"""In a scheduled method: the unix second this run was due (None outside a crontab run)."""


class CronRuleError(ValueError):
    """A cron rule that cannot be parsed, or a value out of range."""


class Job(NamedTuple):
    task: str
    method: str
    rule: str           # as written
    expr: str           # six fields, seconds first
    overlap: bool


_declared: list[tuple[Callable[..., Any], str, str, bool]] = []


def normalize_rule(rule: str, where: str = "") -> str:
    """The six-field form (seconds first) of a rule; CronRuleError naming the rule and where."""
    at = f" on {where}" if where else ""
    if not isinstance(rule, str):
        raise CronRuleError(f"cron rule{at} must be a string, not {rule!r}")
    fields = rule.split()
    if len(fields) == 5:
        fields.insert(0, "0")
    if len(fields) != 6:
        raise CronRuleError(f"cron rule {rule!r}{at} has {len(rule.split())} fields; it needs 6 "
                            "(second minute hour day month weekday) or 5 (second 0)")
    expr = " ".join(fields)
    try:
        croniter(expr, 0.0, second_at_beginning=True)
    except (CroniterError, ValueError, KeyError) as exc:
        raise CronRuleError(f"cron rule {rule!r}{at} is invalid: {exc}") from None
    return expr


def scheduled(cron: str, *, overlap: bool = True) -> Callable[[F], F]:
    """Runs a method of a ``@task`` class on a cron rule: ``@scheduled(cron="*/5 * * * * *")``.

    The method is called with no arguments. ``overlap=False`` skips a run while the previous
    one is still in flight. A bad rule raises CronRuleError here, naming the rule and the method.
    """

    def decorate(fn: F) -> F:
        where = getattr(fn, "__qualname__", repr(fn))
        expr = normalize_rule(cron, where)
        if not inspect.isfunction(fn):
            raise TypeError(f"@scheduled decorates methods, not {fn!r}")
        try:
            inspect.signature(fn).bind(None)
        except TypeError:
            raise TypeError(f"@scheduled method {where} must be callable without arguments "
                            "(besides self): the crontab passes none") from None
        _declared.append((fn, cron, expr, overlap))
        return fn

    return decorate


def collect_jobs() -> list[Job]:
    """The scheduled methods of the registered task classes; TypeError for one that is not on
    a @task class."""
    jobs: list[Job] = []
    found: set[int] = set()
    for name in registry.registered():
        spec = registry.get_spec(name)
        for klass in spec.cls.__mro__[:-1]:
            for attr, value in vars(klass).items():
                for fn, rule, expr, overlap in _declared:
                    if value is fn and attr in spec.methods:
                        jobs.append(Job(name, attr, rule, expr, overlap))
                        found.add(id(fn))
    for fn, rule, _, _ in _declared:
        if id(fn) not in found:
            raise TypeError(f"@scheduled(cron={rule!r}) is on {fn.__qualname__}, which is not a "
                            "public method of a @task class")
    return jobs


def zone(name: str | None) -> tzinfo:
    if name is None:
        local = datetime.now().astimezone().tzinfo
        assert local is not None
        return local
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"timezone {name!r} is not an IANA time zone name: {exc}") from None


def due_seconds(expr: str, minute_start: int, tz: tzinfo) -> list[int]:
    """The unix seconds within [minute_start, minute_start + 60) at which expr is due."""
    it = croniter(expr, datetime.fromtimestamp(minute_start - 1, tz), second_at_beginning=True)
    out: list[int] = []
    while True:
        sec = int(it.get_next(float))
        if sec >= minute_start + 60:
            return out
        out.append(sec)


def next_times(rule: str, n: int = 5, tz: str | None = None,
               start: float | None = None) -> list[datetime]:
    """The next n due times of a rule, in the zone tz, after start (default: now)."""
    expr = normalize_rule(rule)
    zone_ = zone(tz)
    it = croniter(expr, datetime.fromtimestamp(time.time() if start is None else start, zone_),
                  second_at_beginning=True)
    return [it.get_next(datetime) for _ in range(n)]


def minute_start(ts: float) -> int:
    return int(ts // 60 * 60)


class Crontab:
    """The master's handle: jobs, the two tables in SysV shared memory, the two processes."""

    def __init__(self, server: ServerHandle) -> None:
        settings = server.settings
        self.server = server
        self.tz = zone(settings["timezone"])
        self.grace = int(settings["cron_grace"])
        self.jobs = collect_jobs()
        self.task_capacity = settings["cron_task_capacity"]
        self.run_capacity = settings["cron_run_capacity"]
        if len(self.jobs) > self.task_capacity:
            raise TableFull(f"{len(self.jobs)} scheduled methods do not fit the origin table: "
                            f"raise the cron_task_capacity setting (now {self.task_capacity})")
        self.key_base = settings["cron_shm_key"]
        self.segments: list[Any] = []
        self._tables: tuple[OriginTable, RunTable] | None = None

    # -- the master -----------------------------------------------------------------------------

    def open(self, master_pid: int) -> None:
        """Creates both tables (mode 0600) before the fork and fills the origin table."""
        base = self.key_base if self.key_base is not None else default_key(master_pid)
        origin_shm = _create_segment(base, OriginTable.nbytes(self.task_capacity))
        self.segments.append(origin_shm)
        run_shm = _create_segment(base + 1, RunTable.nbytes(self.run_capacity))
        self.segments.append(run_shm)
        origin = OriginTable(memoryview(origin_shm), create=True, capacity=self.task_capacity)
        runs = RunTable(memoryview(run_shm), create=True, capacity=self.run_capacity)
        now = int(time.time())
        for job in self.jobs:
            origin.add(job.rule, job.task, job.method, now, job.overlap)
        self._tables = (origin, runs)
        log.info("crontab: %d scheduled method(s), tables at SysV keys 0x%x and 0x%x",
                 len(self.jobs), base, base + 1)

    def close(self) -> None:
        self._tables = None
        for shm in self.segments:
            try:
                shm.detach()
                shm.remove()
            except sysv_ipc.Error:
                pass
        self.segments = []

    def processes(self) -> list[ProcessSpec]:
        return [ProcessSpec(self._timer_main, TIMER_PROCESS),
                ProcessSpec(self._exec_main, EXEC_PROCESS)]

    def tables(self) -> tuple[OriginTable, RunTable]:
        if self._tables is None:
            raise RuntimeError("the crontab is not on in this server (Server(cron=True))")
        return self._tables

    # -- cronTimer ------------------------------------------------------------------------------

    def _timer_main(self, server: ServerHandle, proc: Process) -> None:
        now = time.time()
        # A fresh server starts with what is still to come this minute. A respawned timer (the
        # table has rows) also writes the seconds it missed, within the grace period: they are
        # delivered late, once (rows are unique per job and second).
        _, runs = self.tables()
        since = int(now) if runs.used == 0 else int(now) - self.grace
        self.fill(minute_start(now), max(since, minute_start(now)))
        next_minute = minute_start(now) + 60
        while True:
            # One second ahead, so the rows of second 0 are there before it comes.
            self._sleep_until(proc, next_minute - 1)
            now = time.time()
            if now >= next_minute + 60:
                # The clock jumped forward (or we were stopped): catch up from the current
                # minute; what lies between is past the grace period anyway.
                next_minute = minute_start(now)
            self.fill(next_minute, next_minute)
            self.clean(now)
            next_minute += 60

    def fill(self, minute: int, from_sec: int) -> int:
        """Writes the due rows of one minute, from from_sec on; returns how many were new."""
        _, runs = self.tables()
        stamp = datetime.fromtimestamp(minute, self.tz).strftime("%Y%m%d%H%M")
        added = full = 0
        for job_id, job in enumerate(self.jobs):
            for sec in due_seconds(job.expr, minute, self.tz):
                if sec < from_sec:
                    continue
                row = runs.insert(job_id, job.task, job.method, stamp, sec)
                if row >= 0:
                    added += 1
                elif row == -1:
                    full += 1
        if full:
            log.error("crontab: run-time table full: %d due run(s) of minute %s not recorded "
                      "(%d dropped in all); raise the cron_run_capacity setting (now %d)",
                      full, stamp, runs.dropped, runs.capacity)
        if added:
            self._wake_exec()
        return added

    def clean(self, now: float) -> None:
        _, runs = self.tables()
        for _row, job, sec, status in runs.clean(int(now) - KEEP_FINISHED, int(now) - STALE_AFTER):
            log.error("crontab: run of %s.%s due at %d never finished (last status %s); "
                      "dropped", self.jobs[job].task, self.jobs[job].method, sec,
                      RunStatus(status).name)
            self.tables()[0].finish(job, sec, RunStatus.FAILED, 0.0)

    def _wake_exec(self) -> None:
        server = roles.current().server
        if server is not None:
            exec_id = server.process_id(EXEC_PROCESS)
            if exec_id is not None:
                try:
                    server.send_message(None, exec_id, type="cron.rows", timeout=0.5)
                except Exception as exc:  # the exec process wakes every 0.5 s anyway
                    log.debug("crontab: could not wake the exec process: %s", exc)

    @staticmethod
    def _sleep_until(proc: Process, wall: float) -> None:
        while (left := wall - time.time()) > 0:
            proc.read_messages(min(left, 1.0))

    # -- cronExec -------------------------------------------------------------------------------

    def _exec_main(self, server: ServerHandle, proc: Process) -> None:
        origin, runs = self.tables()
        while True:
            now = time.time()
            due, skipped = runs.claim_due(int(now), self.grace)
            for _row, job, sec in skipped:
                log.warning("crontab: run of %s.%s due at %d skipped: more than %d s late",
                            self.jobs[job].task, self.jobs[job].method, sec, self.grace)
            if due:
                self._deliver(origin, runs, due)
            self._sleep_to_next(proc, runs)

    def _deliver(self, origin: OriginTable, runs: RunTable,
                 due: list[tuple[int, int, int]]) -> None:
        """Delivers the runs due together in one pipe message, so that they leave the worker
        together and the last of them does not wait for a hop per run before it."""
        going = []
        for row, job, sec in due:
            if origin.begin(job):
                going.append((row, job, sec))
            else:
                runs.set_status(row, RunStatus.SKIPPED)
                log.info("crontab: run of %s.%s due at %d skipped: the previous one is still "
                         "running (overlap=False)", self.jobs[job].task, self.jobs[job].method, sec)
        if not going:
            return
        try:
            roles.current().deliver_many_by_process([(CRON_TASK, "run", [row, job, sec])
                                                     for row, job, sec in going])
        except Exception as exc:
            for row, job, sec in going:
                log.error("crontab: run of %s.%s due at %d not delivered: %s",
                          self.jobs[job].task, self.jobs[job].method, sec, exc)
                runs.set_status(row, RunStatus.FAILED)
                origin.finish(job, sec, RunStatus.FAILED, 0.0)
            return
        now = time.time()
        for row, _job, _sec in going:
            runs.set_status(row, RunStatus.DELIVERED, now)

    @staticmethod
    def _sleep_to_next(proc: Process, runs: RunTable) -> None:
        """Until the next due second, or 0.5 s at most; a 'rows written' message wakes it."""
        now = time.time()
        nxt = runs.next_due()
        wake = now + 0.5 if nxt is None else min(float(nxt), now + 0.5)
        left = wake - now
        if left > 0.003:
            # poll() counts in whole milliseconds: sleep the last stretch with nanosleep.
            proc.read_messages(left - 0.002)
            left = wake - time.time()
        if left > 0:
            time.sleep(left)


def default_key(master_pid: int) -> int:
    """The SysV key of a server's origin table (the run-time table's is one more)."""
    return DEFAULT_KEY_BASE + 2 * (master_pid % 0x8000)


def _create_segment(key: int, size: int) -> Any:
    try:
        return sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, mode=0o600, size=size)
    except sysv_ipc.ExistentialError:
        old = sysv_ipc.SharedMemory(key)
        old.detach()
        if old.number_attached > 0:
            raise RuntimeError(f"SysV shared memory key 0x{key:x} is in use by a running "
                               f"process (pid {old.creator_pid}): set cron_shm_key to another "
                               "key") from None
        log.warning("crontab: removed shared memory 0x%x left by a server that is gone "
                    "(pid %d)", key, old.creator_pid)
        old.remove()
        return sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, mode=0o600, size=size)


def attach(key: int) -> tuple[OriginTable, RunTable, list[Any]]:
    """The tables of a running server, for inspection (``pyswtask cron show``)."""
    try:
        segments = [sysv_ipc.SharedMemory(key), sysv_ipc.SharedMemory(key + 1)]
    except sysv_ipc.ExistentialError:
        raise LookupError(f"no crontab tables at SysV keys 0x{key:x}/0x{key + 1:x}: is the "
                          "server running with cron=True?") from None
    return OriginTable(memoryview(segments[0])), RunTable(memoryview(segments[1])), segments


@registry.task(CRON_TASK)
class CronRunner:
    """The built-in task the exec process delivers: runs a scheduled method in a task worker
    and writes its outcome into both tables."""

    def run(self, row: int, job: int, sec: int) -> Any:
        server = roles.current().server
        crontab = getattr(server, "crontab", None)
        if crontab is None:
            raise RuntimeError("the crontab is not on in this server (Server(cron=True))")
        origin, runs = crontab.tables()
        spec = crontab.jobs[job]
        runs.set_status(row, RunStatus.RUNNING, time.time())
        started = time.monotonic()
        token = due_second.set(sec)
        try:
            fn, on_loop = registry.resolve(spec.task, spec.method)
            result = fn()
            if on_loop and inspect.iscoroutine(result):
                result = asyncio.run(result)
        except BaseException:
            took = time.monotonic() - started
            runs.set_status(row, RunStatus.FAILED, duration=took)
            origin.finish(job, sec, RunStatus.FAILED, took)
            raise
        finally:
            due_second.reset(token)
        took = time.monotonic() - started
        runs.set_status(row, RunStatus.DONE, duration=took)
        origin.finish(job, sec, RunStatus.DONE, took)
        return result

