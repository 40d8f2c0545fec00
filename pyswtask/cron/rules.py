"""Cron rules: parsing and checking them, the ``@scheduled`` decorator, the jobs it declares, and
the due seconds of a rule in a zone.

Rules are croniter's: six fields with seconds first, or five fields meaning second 0; names (MON,
JAN), ranges, steps and lists; day-of-month and day-of-week OR-ed as in Vixie cron; times in the
``timezone`` setting (IANA name, DST by croniter's rules; None means the machine's local time).

Pure computation over the task registry: no shared memory, no processes, no delivery.
"""

from __future__ import annotations

import inspect
import time
from datetime import datetime, tzinfo
from typing import Any, Callable, NamedTuple, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter  # type: ignore[import-untyped]

from .. import registry

__all__ = ["CronRuleError", "Job", "normalize_rule", "scheduled", "collect_jobs", "zone",
           "due_seconds", "next_times", "minute_start"]

F = TypeVar("F", bound=Callable[..., Any])


class CronRuleError(ValueError):
    """A cron rule that cannot be parsed, or a value out of range."""


class Job(NamedTuple):
    """One scheduled method; its index in the crontab's job list is its origin-table row."""

    task: str
    method: str
    rule: str           # as written
    expr: str           # six fields, seconds first
    overlap: bool
    cluster: bool = False   # once per cluster: raced for through a lease in Redis

    @property
    def name(self) -> str:
        """``task.method``: how logs and the cluster's lease keys name the job."""
        return f"{self.task}.{self.method}"


_declared: list[tuple[Callable[..., Any], str, str, bool, bool]] = []


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


def scheduled(cron: str, *, overlap: bool = True,
              once_per_cluster: bool = False) -> Callable[[F], F]:
    """Runs a method of a ``@task`` class on a cron rule: ``@scheduled(cron="*/5 * * * * *")``.

    The method is called with no arguments. ``overlap=False`` skips a run while the previous
    one is still in flight on the node that runs it. ``once_per_cluster=True`` runs each due
    second on one node of the cluster only (the ``cluster`` setting; see ``cron.lease``). A bad
    rule raises CronRuleError here, naming the rule and the method.
    """
    if not isinstance(once_per_cluster, bool):
        raise TypeError(f"once_per_cluster must be True or False, not {once_per_cluster!r}")

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
        _declared.append((fn, cron, expr, overlap, once_per_cluster))
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
                for fn, rule, expr, overlap, cluster in _declared:
                    if value is fn and attr in spec.methods:
                        jobs.append(Job(name, attr, rule, expr, overlap, cluster))
                        found.add(id(fn))
    for fn, rule, *_ in _declared:
        if id(fn) not in found:
            raise TypeError(f"@scheduled(cron={rule!r}) is on {fn.__qualname__}, which is not a "
                            "public method of a @task class")
    return jobs


def zone(name: str | None) -> tzinfo:
    """The time zone of the ``timezone`` setting: an IANA name, or None for local time."""
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
    """The unix second at which the minute holding ts began."""
    return int(ts // 60 * 60)
