"""Many tasks appended to a queue's stream in one call: a Lua script, the cluster's
per-task write from a delivering node's bridge and from a separate program.

One script call per batch instead of one XADD per task: the client packs one command (in C,
hiredis) and reads one reply, where a pipeline packs and parses one per task in Python, which
costs more than Redis's own work. The script runs atomically: a batch is appended whole or
not at all.

It must not decide what to write: the bridge and the client give it the fields.
"""

from __future__ import annotations

from typing import Any, Iterable

from . import keys

__all__ = ["TaskAppender"]

# KEYS[1]: the stream. ARGV: MAXLEN, then the fields of each entry, each entry's field count
# first: n, f1, v1, ..., n, f1, v1, ...
_ADD = """
local i, added = 2, 0
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, i + 1, i + n))
  i = i + n + 1
  added = added + 1
end
return added
"""


class TaskAppender:
    """The script, registered on one client (redis-py loads it on first use, and again after
    a restarted Redis forgot it)."""

    def __init__(self, r: Any) -> None:
        self._add = r.register_script(_ADD)

    def append(self, stream: str, entries: Iterable[dict[bytes, Any]]) -> None:
        """Appends every entry to ``stream``, in order, in one call (MAXLEN ~ the queue
        bound); a RedisError when Redis did not take them, and then none was appended."""
        args: list[Any] = [keys.QUEUE_MAXLEN]
        for fields in entries:
            args.append(len(fields) * 2)
            for name, value in fields.items():
                args.append(name)
                args.append(value)
        self._add(keys=[stream], args=args)
