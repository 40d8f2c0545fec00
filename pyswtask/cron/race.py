"""Once-per-cluster cron runs, the exec process's side: the runs this node races for, looked at
again on every loop of the exec process until one node started them.

A run claimed from the run-time table (DELIVERING) joins the race. On each loop (at most half a
second apart) every run in it gets one answer from Redis (``ClusterLeases.race``):

- started by some node: it leaves the race; if by another node, its row becomes ELSEWHERE;
- its lease holds our value: we won; it is handed back to be delivered, and stays in the race
  until it started, so that if its lease expires first (the task workers stuck, the node
  dying), the next loop races again with a new token;
- held by another node: we keep looking; when that lease expires unstarted, we race again.

A run still unstarted ``cron_grace`` seconds after it was due leaves the race: ELSEWHERE if
another node holds it, SKIPPED (logged) if Redis did not answer at all meanwhile; a run we
delivered is left to its runner. While Redis does not answer, the runs simply wait in the race:
the outage is logged once, and when Redis answers again within the grace period they are raced
for and run, late, once.

Must not deliver (``exec`` does) nor run anything (``runner``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .._core import RunStatus, RunTable
from ..cluster.connection import describe_url
from ..errors import ClusterUnavailable
from .lease import ClusterLeases, holder_node
from .rules import Job

__all__ = ["ClusterRace", "Won"]

log = logging.getLogger("pyswtask.cron")

Won = tuple[int, int, int, str]     # row, job, sec, the lease value to start under


@dataclass
class _Entry:
    row: int
    job: int
    sec: int
    value: str                  # our latest attempt's lease value
    delivered: bool = False     # value was won and handed to exec for delivery
    holder: str | None = None   # the lease value holding the run, as Redis last said
    answered: bool = False      # Redis answered about this run at least once


class ClusterRace:
    """The runs one exec process races for; built after the fork."""

    def __init__(self, leases: ClusterLeases, jobs: list[Job], runs: RunTable,
                 grace: int) -> None:
        self.leases = leases
        self.jobs = jobs
        self.runs = runs
        self.grace = grace
        self.entries: dict[int, _Entry] = {}
        self.down = False

    def __bool__(self) -> bool:
        return bool(self.entries)

    def join(self, due: list[tuple[int, int, int]]) -> None:
        """Adds claimed rows (row, job, sec) to the race."""
        for row, job, sec in due:
            self.entries[row] = _Entry(row, job, sec, self.leases.new_value())

    def drop(self, row: int) -> None:
        """Takes a run out of the race (its delivery failed: the lease expires, and another
        node takes it)."""
        self.entries.pop(row, None)

    def step(self, now: float) -> list[Won]:
        """One round with Redis; returns the runs this node won, to deliver now."""
        self._expire_before(int(now) - self.grace)
        entries = list(self.entries.values())
        if not entries:
            return []
        # A run we delivered races with a new token: that attempt wins only if the lease
        # expired before the delivered one started, which then cannot start any more.
        attempts = [self.leases.new_value() if e.delivered else e.value for e in entries]
        try:
            results = self.leases.race([(self.jobs[e.job].name, e.sec, a)
                                        for e, a in zip(entries, attempts)])
        except ClusterUnavailable as exc:
            if not self.down:
                log.warning("crontab: once-per-cluster runs wait (delivered late, once, if Redis "
                            "answers within cron_grace = %s s): %s", self.grace, exc)
                self.down = True
            results = []
        else:
            if self.down:
                log.warning("crontab: the cluster's Redis at %s answers again",
                            describe_url(self.leases.url))
                self.down = False
        won: list[Won] = []
        # Redis may have answered only now, after a stall: the grace period counts till now.
        late = int(time.time()) - self.grace
        for entry, attempt, result in zip(entries, attempts, results):
            entry.answered = True
            entry.holder = result.holder
            if result.started is not None:
                self._settle(entry, result.started)
            elif result.holder == attempt and entry.sec < late:
                del self.entries[entry.row]
                self.runs.set_status(entry.row, RunStatus.SKIPPED)
                log.warning("crontab: run of %s due at %d skipped: won only after cron_grace "
                            "(%s s)", self.jobs[entry.job].name, entry.sec, self.grace)
            elif result.holder == attempt:
                if entry.delivered:
                    log.warning("crontab: run of %s due at %d had not started when its lease "
                                "expired; delivered again", self.jobs[entry.job].name, entry.sec)
                entry.value, entry.delivered = attempt, True
                won.append((entry.row, entry.job, entry.sec, attempt))
            elif result.holder != entry.value:
                entry.delivered = False     # ours expired and another node has it now
        return won

    def _expire_before(self, cutoff: int) -> None:
        for entry in list(self.entries.values()):
            if entry.sec < cutoff:
                self._expire(entry)

    def _settle(self, entry: _Entry, started: str) -> None:
        del self.entries[entry.row]
        if holder_node(started) != self.leases.node:
            self.runs.set_status(entry.row, RunStatus.ELSEWHERE)

    def _expire(self, entry: _Entry) -> None:
        del self.entries[entry.row]
        name = self.jobs[entry.job].name
        if not entry.answered:
            self.runs.set_status(entry.row, RunStatus.SKIPPED)
            log.warning("crontab: run of %s due at %d skipped: the cluster's Redis did not answer "
                        "within cron_grace (%s s)", name, entry.sec, self.grace)
        elif entry.delivered and entry.holder == entry.value:
            return      # ours, still in the queue of a task worker: its runner settles it
        else:
            self.runs.set_status(entry.row, RunStatus.ELSEWHERE)
            log.info("crontab: run of %s due at %d left to node %s, which had not started it "
                     "within cron_grace", name, entry.sec, holder_node(entry.holder))
