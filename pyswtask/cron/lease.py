"""Once-per-cluster cron runs, the Redis side: a lease per (scheduled method, due second), so
that of all the nodes whose crontab finds a run due, exactly one runs it.

Two keys per run, ``<name>`` being the method's ``task.method`` and ``<sec>`` the due second::

    pyswtask:cron:<name>:<sec>        the lease: "<node>#<token>", SET NX PX by the exec processes
    pyswtask:cron:<name>:<sec>:run    the run: a hash written when it starts (lease, node,
                                      state=running, started_at) and when it ends (state
                                      done / failed / skipped, duration, error)

The race (``race``): every node's exec process sends ``SET lease value NX PX`` for the runs it
found due, in one MULTI with a ``GET`` of the lease and of the run's node, so it learns who holds
each run and whether it started. The winner delivers the run to a task worker; everyone else
keeps looking (``race.py``) until the run started.

The lease lasts ``lease_seconds(cron_grace)``: between 1 and 5 s, a third of the grace. It only
has to cover the hop from the exec process to a task worker (well under a millisecond when the
node is healthy), and it must end well inside ``cron_grace``: if the winner dies before the run
started, the lease expires and another node, which was still looking, takes the run, late but
within the grace period.

The start (``start``, one Lua script, so atomic): a task worker runs the method only if the lease
is still the one its delivery won, or expired with nobody else holding it; it marks the run
started and extends both keys past ``sec + cron_grace + KEEP``. From then on no node can take
the run, however long it lasts, so a run that started is never run twice. The token in the value
tells this node's attempts apart: a delivery whose lease expired before it started, and that the
node (or another) won again, finds a different value and does not run.

Every command has a bounded socket timeout (``TIMEOUT``) and no retries, so a stalled Redis
costs the caller at most that. Failures raise ``ClusterUnavailable`` naming the URL.

Must not know the crontab's tables or processes: ``race`` and ``runner`` do the bookkeeping.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from ..cluster.connection import connect, describe_url, require_redis
from ..errors import ClusterUnavailable

if TYPE_CHECKING:
    import redis

__all__ = ["ClusterLeases", "RaceResult", "KEY_PREFIX", "KEEP", "TIMEOUT", "lease_seconds",
           "holder_node", "recent_runs"]

log = logging.getLogger("pyswtask.cron")

KEY_PREFIX = "pyswtask:cron:"
# Seconds a started run's keys outlive its grace period: what `pyswtask cron show --cluster`
# can still show, and a margin for clocks of nodes that differ by that much.
KEEP = 300
# Socket timeout of every command: the exec process loops every half second, and a stalled
# Redis must not hold it (nor local rules) for longer than this per loop.
TIMEOUT = 1.0
LEASE_MIN = 1.0
LEASE_MAX = 5.0

# KEYS: lease, run. ARGV: our lease value, node, keys' ttl in ms, started_at, state.
# Returns "started" (also when our own earlier call did it and its reply was lost), else
# "ran:<lease value>" or "held:<lease value>" of whoever has the run.
_START = """
local by = redis.call('HGET', KEYS[2], 'lease')
if by then
  if by == ARGV[1] then return 'started' end
  return 'ran:' .. by
end
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 'held:' .. holder end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('HSET', KEYS[2], 'lease', ARGV[1], 'node', ARGV[2], 'state', ARGV[5],
           'started_at', ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 'started'
"""


def lease_seconds(grace: float) -> float:
    """How long a won lease lasts before the run started: a third of ``cron_grace``, between
    1 and 5 seconds."""
    return min(LEASE_MAX, max(LEASE_MIN, grace / 3))


def holder_node(value: str | bytes | None) -> str | None:
    """The node name in a lease value ``"<node>#<token>"``."""
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else value
    return text.rpartition("#")[0] or text


def lease_key(name: str, sec: int) -> str:
    return f"{KEY_PREFIX}{name}:{sec}"


def run_key(name: str, sec: int) -> str:
    return f"{KEY_PREFIX}{name}:{sec}:run"


class RaceResult(NamedTuple):
    """What one run's race told: the lease value that holds it now (ours if we won) and the
    lease value of the attempt that started it, if one did."""

    holder: str | None
    started: str | None


class ClusterLeases:
    """One node's access to the leases; each process makes its own connection on first use,
    so an instance built in the master is safe to use after the fork."""

    def __init__(self, url: str, node: str, grace: float) -> None:
        self.url = url
        self.node = node
        self.grace = grace
        self.lease_ms = int(lease_seconds(grace) * 1000)
        self._client: redis.Redis | None = None
        self._pid = 0
        self._start: Any = None

    def check(self) -> None:
        """Proves that Redis answers (in the master, at start); ``ClusterUnavailable`` naming
        the URL if it does not. Leaves no connection behind for the children to inherit."""
        connect(self.url, timeout=TIMEOUT * 3).close()

    def new_value(self) -> str:
        """A lease value for a new attempt: this node's name and a fresh token."""
        return f"{self.node}#{secrets.token_hex(4)}"

    def race(self, runs: list[tuple[str, int, str]]) -> list[RaceResult]:
        """For each (name, sec, value): ``SET lease value NX PX lease_ms`` and what holds the
        run then, in one atomic MULTI. We won a run when its holder is our value."""
        client = self._connection()
        pipe = client.pipeline(transaction=True)
        for name, sec, value in runs:
            lease = lease_key(name, sec)
            pipe.set(lease, value, nx=True, px=self.lease_ms)
            pipe.get(lease)
            pipe.hget(run_key(name, sec), "lease")
        replies = self._call(pipe.execute)
        return [RaceResult(_text(replies[i + 1]), _text(replies[i + 2]))
                for i in range(0, len(replies), 3)]

    def start(self, name: str, sec: int, value: str, state: str = "running") -> str | None:
        """Marks the run started under ``value`` (or ``state`` "skipped": settled without
        running). None if it did; else the lease value of whoever holds or ran it."""
        self._connection()
        ttl = self._ttl_ms(sec)
        verdict = _text(self._call(self._start, keys=[lease_key(name, sec), run_key(name, sec)],
                                   args=[value, self.node, ttl, f"{time.time():.6f}", state]))
        if verdict == "started":
            return None
        return (verdict or ":").partition(":")[2]

    def finish(self, name: str, sec: int, state: str, duration: float,
               error: str = "") -> None:
        """Records the outcome of a run this node started, and keeps both keys ``KEEP``
        seconds for inspection."""
        client = self._connection()
        ttl = self._ttl_ms(sec)
        pipe = client.pipeline(transaction=True)
        pipe.hset(run_key(name, sec), mapping={
            "state": state, "duration": f"{duration:.6f}", "finished_at": f"{time.time():.6f}",
            "error": error[:500]})
        pipe.pexpire(run_key(name, sec), ttl)
        pipe.pexpire(lease_key(name, sec), ttl)
        self._call(pipe.execute)

    def close(self) -> None:
        if self._client is not None and self._pid == os.getpid():
            self._client.close()
        self._client = None

    def _ttl_ms(self, sec: int) -> int:
        # Past the grace period, when no node will take the run any more, plus KEEP.
        return int((max(sec + self.grace, time.time()) + KEEP - time.time()) * 1000)

    def _connection(self) -> redis.Redis:
        if self._client is None or self._pid != os.getpid():
            lib = require_redis()
            # No retries: a stalled Redis costs one TIMEOUT per call, not several with backoff.
            self._client = connect(self.url, timeout=TIMEOUT, check=False,
                                   retry=lib.retry.Retry(lib.backoff.NoBackoff(), 0))
            self._pid = os.getpid()
            self._start = self._client.register_script(_START)
        return self._client

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        lib = require_redis()
        try:
            return fn(*args, **kwargs)
        except (lib.ConnectionError, lib.TimeoutError, OSError) as exc:
            raise ClusterUnavailable(f"the cluster's Redis at {describe_url(self.url)} did not "
                                     f"answer: {exc}") from exc
        except lib.RedisError as exc:
            raise ClusterUnavailable(f"the cluster's Redis at {describe_url(self.url)} failed: "
                                     f"{exc}") from exc


def recent_runs(client: redis.Redis, limit: int = 50) -> list[dict[str, Any]]:
    """The last ``limit`` runs (by due second) whose keys are in Redis, for ``pyswtask cron
    show --cluster``: name, sec, lease holder, and the run's fields when it started."""
    found: set[tuple[str, int]] = set()
    for raw in client.scan_iter(match=f"{KEY_PREFIX}*", count=1000):
        key = _text(raw) or ""
        name, _, sec = key[len(KEY_PREFIX):].removesuffix(":run").rpartition(":")
        if not sec.isdigit():
            continue
        found.add((name, int(sec)))
    chosen = sorted(found, key=lambda item: (item[1], item[0]))[-limit:]
    pipe = client.pipeline(transaction=False)
    for name, due in chosen:
        pipe.get(lease_key(name, due))
        pipe.hgetall(run_key(name, due))
    replies = pipe.execute()
    out = []
    for i, (name, due) in enumerate(chosen):
        holder = _text(replies[2 * i])
        fields = {_text(k): _text(v) for k, v in replies[2 * i + 1].items()}
        out.append({"name": name, "sec": due, "holder": holder_node(holder),
                    "node": fields.get("node"), "state": fields.get("state", "leased"),
                    "started_at": float(fields.get("started_at") or 0.0),
                    "duration": float(fields.get("duration") or 0.0),
                    "error": fields.get("error") or ""})
    return out


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
