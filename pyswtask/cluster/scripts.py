"""The cluster's per-task writes as Lua scripts: many entries appended to a stream in one call
(tasks to a queue's stream, from a delivering node's bridge and from a separate program;
results to a reply stream, inside the bridge's MULTI), and a task worker's result written and
its task acknowledged in one call (``DONE``).

One script call per batch instead of one XADD per task: the client packs one command (in C,
hiredis) and reads one reply, where a pipeline packs and parses one per task in Python, which
costs more than Redis's own work. The script runs atomically: a batch is appended whole or
not at all.

It must not decide what to write: the bridge, the client and the consumer give it the fields.
"""

from __future__ import annotations

from typing import Any, Iterable

from . import keys

__all__ = ["APPEND", "append_args", "TaskAppender", "DONE", "done_args"]

# KEYS[1]: the stream. ARGV: MAXLEN, then the fields of each entry, each entry's field count
# first: n, f1, v1, ..., n, f1, v1, ...
APPEND = """
local i, added = 2, 0
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, i + 1, i + n))
  i = i + n + 1
  added = added + 1
end
return added
"""


# A task worker's results (consumer): KEYS[1] the queue's stream. ARGV: the group, the reply
# streams' MAXLEN, then per task its reply stream ("": nobody reads its result), its entry id
# and its result's fields, their count first. Atomic: the tasks are acknowledged only with
# their results written.
DONE = """
local i, ids = 3, {}
while i <= #ARGV do
  local n = tonumber(ARGV[i + 2])
  if ARGV[i] ~= '' then
    redis.call('XADD', ARGV[i], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, i + 3, i + 2 + n))
  end
  ids[#ids + 1] = ARGV[i + 1]
  i = i + 3 + n
end
return redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
"""


def done_args(results: Iterable[tuple[str, bytes, dict[bytes, Any]]]) -> list[Any]:
    """The ARGV of DONE for (reply stream or "", entry id, result fields) of each task."""
    args: list[Any] = [keys.GROUP, keys.REPLY_MAXLEN]
    for stream, entry_id, fields in results:
        args += (stream, entry_id, len(fields) * 2)
        for name, value in fields.items():
            args.append(name)
            args.append(value)
    return args


def append_args(maxlen: int, entries: Iterable[dict[bytes, Any]]) -> list[Any]:
    """The ARGV of APPEND: MAXLEN, then each entry's field count and fields."""
    args: list[Any] = [maxlen]
    for fields in entries:
        args.append(len(fields) * 2)
        for name, value in fields.items():
            args.append(name)
            args.append(value)
    return args


class TaskAppender:
    """The script, registered on one client (redis-py loads it on first use, and again after
    a restarted Redis forgot it)."""

    def __init__(self, r: Any) -> None:
        self._add = r.register_script(APPEND)

    def append(self, stream: str, entries: Iterable[dict[bytes, Any]]) -> None:
        """Appends every entry to ``stream``, in order, in one call (MAXLEN ~ the queue
        bound); a RedisError when Redis did not take them, and then none was appended."""
        self._add(keys=[stream], args=append_args(keys.QUEUE_MAXLEN, entries))
