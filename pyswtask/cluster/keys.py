"""Every name pyswtask uses in Redis, and the bounds that keep Redis's memory bounded.

One place, so that the nodes, a separate program and ``pyswtask cluster`` agree on them:

- ``pyswtask:q:<queue>``: a queue's task stream, read by the consumer group ``pyswtask`` (one
  group per stream: every task worker of a node serving the queue is a consumer in it, and so
  is the node's bridge for the tasks it claims, each named ``<node>:<pid>``);
- ``pyswtask:r:<node>``: a delivering node's (or separate program's) reply stream;
- ``pyswtask:dead:<queue>``: tasks that were delivered ``cluster_max_deliveries`` times
  without an acknowledged result, with their last error;
- ``pyswtask:err:<queue>``: a hash, task id -> the last error of a task left pending;
- ``pyswtask:node:<node>``: a node's heartbeat, a key that expires unless renewed.

It must not talk to Redis: names and numbers only.
"""

from __future__ import annotations

__all__ = ["PREFIX", "GROUP", "queue_stream", "reply_stream", "dead_stream", "error_hash",
           "node_key", "NODE_PATTERN", "QUEUE_PATTERN", "DEAD_PATTERN", "QUEUE_MAXLEN",
           "REPLY_MAXLEN", "DEAD_MAXLEN", "HEARTBEAT_INTERVAL", "HEARTBEAT_TTL",
           "HOLD_MAX", "TIMEOUT", "BLOCK_MS", "SEEN_MAX", "queue_of_stream"]

PREFIX = "pyswtask"
GROUP = "pyswtask"

NODE_PATTERN = f"{PREFIX}:node:*"
QUEUE_PATTERN = f"{PREFIX}:q:*"
DEAD_PATTERN = f"{PREFIX}:dead:*"

# Fuses, not the normal trim: acknowledged tasks and read replies are trimmed as they go (by
# MINID, see bridge), so a stream reaches these only when nobody consumes it. Beyond them
# XADD ... MAXLEN ~ drops the oldest entries, read or not.
QUEUE_MAXLEN = 1_000_000
REPLY_MAXLEN = 100_000
DEAD_MAXLEN = 100_000

HEARTBEAT_INTERVAL = 1.0        # seconds between a node's heartbeats
HEARTBEAT_TTL = 5.0             # a node whose key is gone for this long is not alive

# ASYNC deliveries a separate program holds while Redis is unreachable; one more raises
# ClusterUnavailable (a node's bound is its cluster_hold_max setting).
HOLD_MAX = 100_000

TIMEOUT = 2.0                   # socket timeout of every Redis call of a node
BLOCK_MS = 500                  # XREAD(GROUP) BLOCK, below TIMEOUT
SEEN_MAX = 65_536               # task ids a node remembers to drop a result that comes twice


def queue_stream(queue: str) -> str:
    return f"{PREFIX}:q:{queue}"


def queue_of_stream(stream: str | bytes) -> str:
    """The queue name of a task stream's key (``pyswtask:q:reports`` -> ``reports``)."""
    text = stream.decode() if isinstance(stream, bytes) else stream
    return text.split(":", 2)[2]


def reply_stream(node: str) -> str:
    return f"{PREFIX}:r:{node}"


def dead_stream(queue: str) -> str:
    return f"{PREFIX}:dead:{queue}"


def error_hash(queue: str) -> str:
    return f"{PREFIX}:err:{queue}"


def node_key(node: str) -> str:
    return f"{PREFIX}:node:{node}"
