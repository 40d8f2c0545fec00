"""The cluster on Redis: task workers on several hosts share the tasks of named queues through
Redis Streams with consumer groups, and cron runs marked once-per-cluster are leased with
expiring keys, so that each fires on one node only.

Imported only when a ``cluster`` URL is set (or a separate program configures one): redis-py
comes with the ``[cluster]`` extra and the core install does not need it.

Must not import the roles: the roles call into this package, not the other way round.
"""

from __future__ import annotations

from .connection import connect, describe_url, require_redis
from .runner import ClusterTask, current_task

__all__ = ["connect", "describe_url", "require_redis", "current_task", "ClusterTask"]
