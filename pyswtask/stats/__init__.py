"""Operating a server: its counters in shared memory and what reads them.

``segment`` lays out the stats segment the master makes before it forks and does the counting
every process does into its own slot; ``snapshot`` turns it into the plain dict of
``server.stats()`` and ``read()`` (from any program of the same user); ``metrics`` serves it to
Prometheus from the master (``metrics_bind``); ``view`` draws ``pyswtask status`` with rich.
"""

from __future__ import annotations

from .segment import StatsUnreadable
from .snapshot import read, resolve_key, rss_bytes, snapshot

__all__ = ["read", "snapshot", "StatsUnreadable", "resolve_key", "rss_bytes"]
