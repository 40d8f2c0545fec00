"""Operating a server: its counters in shared memory and what reads them.

The segment's layout and the counting every process does are ``pyswtask.counters``, below the
roles that count. Here: ``snapshot`` turns the segment into the plain dict of ``server.stats()``
and ``read()`` (from any program of the same user); ``metrics`` serves it to Prometheus from the
master (``metrics_bind``); ``view`` draws ``pyswtask status`` with rich.
"""

from __future__ import annotations

from ..counters import StatsUnreadable
from .snapshot import read, resolve_key, rss_bytes, snapshot

__all__ = ["read", "snapshot", "StatsUnreadable", "resolve_key", "rss_bytes"]
