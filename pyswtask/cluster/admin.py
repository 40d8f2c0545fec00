"""What ``pyswtask cluster`` reads and does: the cluster's state as Redis holds it, and the
dead-letter streams (list them, put their tasks back on their queues).

Read-only except ``requeue``, which moves dead letters back to their queue's stream (the same
task id, a delivery count starting again) and deletes them from the dead-letter stream.
It must not print: the CLI formats what these functions return.
"""

from __future__ import annotations

import json
import time
from typing import Any

from . import keys
from .connection import connect

__all__ = ["cluster_stat", "dead_letters", "requeue"]


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _id_ms(entry_id: Any) -> int:
    return int(_text(entry_id).split("-", 1)[0])


def _scan(r: Any, pattern: str) -> list[str]:
    return sorted(_text(k) for k in r.scan_iter(match=pattern, count=1000))


def cluster_stat(url: str) -> dict[str, Any]:
    """Nodes alive (their heartbeat keys), and per queue: the stream's length, the tasks
    pending per consumer, the oldest pending task's age, the dead letters."""
    r: Any = connect(url)
    try:
        nodes = []
        for key in _scan(r, keys.NODE_PATTERN):
            raw = r.get(key)
            if raw is None:
                continue            # expired between the scan and the read
            try:
                info = json.loads(raw)
            except ValueError:
                info = {"node": key.split(":", 2)[2], "raw": _text(raw)}
            info["expires_in_ms"] = r.pttl(key)
            nodes.append(info)
        names = {k.split(":", 2)[2] for k in _scan(r, keys.QUEUE_PATTERN)}
        names |= {k.split(":", 2)[2] for k in _scan(r, keys.DEAD_PATTERN)}
        now_ms = int(time.time() * 1000)
        queues = []
        for queue in sorted(names):
            stream = keys.queue_stream(queue)
            row: dict[str, Any] = {"queue": queue, "length": r.xlen(stream), "pending": 0,
                                    "consumers": {}, "oldest_pending_age": None,
                                    "dead_letters": r.xlen(keys.dead_stream(queue))}
            try:
                pending = r.xpending(stream, keys.GROUP)
            except Exception:
                pending = None      # no group yet: nobody served the queue
            if pending and pending.get("pending"):
                row["pending"] = int(pending["pending"])
                row["consumers"] = {_text(c["name"]): int(c["pending"])
                                     for c in pending.get("consumers", [])}
                oldest = r.xpending_range(stream, keys.GROUP, "-", "+", 1)
                if oldest:
                    row["oldest_pending_age"] = round(
                        int(oldest[0]["time_since_delivered"]) / 1000, 3)
                    row["oldest_pending_since_enqueued"] = round(
                        (now_ms - _id_ms(oldest[0]["message_id"])) / 1000, 3)
            queues.append(row)
        return {"nodes": nodes, "queues": queues}
    finally:
        r.close()


def _queues(r: Any, queue: str | None) -> list[str]:
    if queue is not None:
        return [queue]
    return [k.split(":", 2)[2] for k in _scan(r, keys.DEAD_PATTERN)]


def dead_letters(url: str, queue: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """The dead letters of one queue (or every queue), oldest first, at most ``limit`` each."""
    r: Any = connect(url)
    try:
        out = []
        for name in _queues(r, queue):
            for entry_id, fields in r.xrange(keys.dead_stream(name), count=limit):
                out.append({"queue": name, "entry": _text(entry_id),
                            **{_text(k): _text(v) for k, v in fields.items() if k != b"body"}})
        return out
    finally:
        r.close()


def requeue(url: str, queue: str | None = None) -> int:
    """Moves every dead letter of one queue (or of every queue) back to its queue's stream;
    returns how many. Each move is one MULTI: the task is on exactly one of the two streams."""
    r: Any = connect(url)
    moved = 0
    try:
        for name in _queues(r, queue):
            dead = keys.dead_stream(name)
            for entry_id, fields in r.xrange(dead):
                task = {k: v for k, v in fields.items()
                        if k not in (b"error", b"deliveries", b"dead_at")}
                pipe = r.pipeline(transaction=True)
                pipe.xadd(keys.queue_stream(name), task, maxlen=keys.QUEUE_MAXLEN,
                          approximate=True)
                pipe.xdel(dead, entry_id)
                pipe.execute()
                moved += 1
        return moved
    finally:
        r.close()
