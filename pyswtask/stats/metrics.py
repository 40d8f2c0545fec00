"""Prometheus metrics: the master serves ``/metrics`` (the ``metrics_bind`` setting) from a
thread, and each scrape reads the stats segment (``pyswtask.stats.snapshot``): no metric lives
in a process's memory and no multiprocess directory is needed.

Metric names (all prefixed ``pyswtask_``): ``tasks_total{task,status}`` (status ``ok`` or
``failed``), ``task_duration_seconds{task}`` (histogram), ``task_worker_tasks_total
{task_worker,status}``, ``task_worker_tasks_waiting{task_worker}``,
``task_worker_tasks_lost_total{task_worker}``, ``task_worker_tasks_timed_out_total
{task_worker}`` (these three not in task_ipc_mode 3), ``task_workers_idle``,
``tasks_waiting{worker}``, ``deliveries_total{worker}``, ``tasks_lost_total{worker}``,
``tasks_timed_out_total{worker}``, ``respawns_total{cause}``, ``recycles_total{setting}``,
``queue_messages``, ``queue_bytes``, ``cron_runs_total{outcome}`` (``due``, ``run``, ``late``,
``skipped``, ``failed``), ``process_up{role,id}``, ``process_resident_memory_bytes{role,id}``,
``start_time_seconds``.

Needs prometheus-client (``pip install 'pyswtask[metrics]'``). It reads the segment and
serves; it must not write to it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (  # type: ignore[import-not-found,unused-ignore]
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import start_http_server  # type: ignore[import-not-found,unused-ignore]

from ..counters import StatsSegment
from .snapshot import snapshot

__all__ = ["MetricsServer", "StatsCollector"]


class StatsCollector:
    """A prometheus-client collector over one server's stats segment."""

    def __init__(self, segment: StatsSegment) -> None:
        self.segment = segment

    def collect(self) -> Iterator[Any]:
        snap = snapshot(self.segment)
        tasks = CounterMetricFamily("pyswtask_tasks", "Tasks run, by task method and outcome",
                                    labels=["task", "status"])
        hist = HistogramMetricFamily("pyswtask_task_duration_seconds",
                                     "Run time of the tasks, by task method", labels=["task"])
        bounds = [repr(b) for b in snap["duration_buckets"]] + ["+Inf"]
        for name, m in sorted(snap["task_methods"].items()):
            tasks.add_metric([name, "ok"], m["ok"])
            tasks.add_metric([name, "failed"], m["failed"])
            hist.add_metric([name], list(zip(bounds, m["buckets"])), m["seconds"])
        yield tasks
        yield hist
        per_tw = CounterMetricFamily("pyswtask_task_worker_tasks",
                                     "Tasks run by each task worker, by outcome",
                                     labels=["task_worker", "status"])
        for tw in snap["task_workers"]:
            per_tw.add_metric([str(tw["id"]), "ok"], tw["run"] - tw["failed"])
            per_tw.add_metric([str(tw["id"]), "failed"], tw["failed"])
        yield per_tw
        waiting = GaugeMetricFamily("pyswtask_task_worker_tasks_waiting",
                                    "Tasks sent to each task worker and not started yet",
                                    labels=["task_worker"])
        for tw in snap["task_workers"]:
            if tw["waiting"] is not None:
                waiting.add_metric([str(tw["id"])], tw["waiting"])
        yield waiting
        for metric, key, text in (
                ("pyswtask_task_worker_tasks_lost", "lost",
                 "Tasks lost with each task worker"),
                ("pyswtask_task_worker_tasks_timed_out", "timed_out",
                 "Tasks sent to each task worker whose caller stopped waiting")):
            per_key = CounterMetricFamily(metric, text, labels=["task_worker"])
            for tw in snap["task_workers"]:
                if tw[key] is not None:
                    per_key.add_metric([str(tw["id"])], tw[key])
            yield per_key
        yield GaugeMetricFamily("pyswtask_task_workers_idle", "Task workers waiting for a task",
                                value=snap["idle_task_workers"])
        for metric, key, text in (
                ("pyswtask_tasks_waiting", "waiting", "Tasks of each worker without a result"),
                ("pyswtask_deliveries", "delivered", "Tasks delivered by each worker"),
                ("pyswtask_tasks_lost", "lost", "Tasks lost with a task worker, by worker"),
                ("pyswtask_tasks_timed_out", "timed_out",
                 "Tasks whose caller stopped waiting, by worker")):
            family = GaugeMetricFamily if key == "waiting" else CounterMetricFamily
            fam = family(metric, text, labels=["worker"])
            for w in snap["workers"]:
                fam.add_metric([str(w["id"])], w[key])
            yield fam
        respawns = CounterMetricFamily("pyswtask_respawns", "Child processes respawned, by cause",
                                       labels=["cause"])
        for cause, n in snap["respawns"].items():
            respawns.add_metric([cause], n)
        yield respawns
        recycles = CounterMetricFamily("pyswtask_recycles",
                                       "Processes recycled on reaching a request limit",
                                       labels=["setting"])
        recycles.add_metric(["max_request"], snap["max_request_recycles"])
        recycles.add_metric(["task_max_request"], snap["task_max_request_recycles"])
        yield recycles
        if snap["queue"] is not None:
            yield GaugeMetricFamily("pyswtask_queue_messages", "Messages in the message queue",
                                    value=snap["queue"]["messages"])
            yield GaugeMetricFamily("pyswtask_queue_bytes", "Bytes in the message queue",
                                    value=snap["queue"]["bytes"])
        if snap["cron"] is not None:
            cron = CounterMetricFamily("pyswtask_cron_runs", "Crontab runs, by outcome",
                                       labels=["outcome"])
            for outcome in ("due", "run", "late", "skipped", "failed"):
                cron.add_metric([outcome], snap["cron"][outcome])
            yield cron
        up = GaugeMetricFamily("pyswtask_process_up", "1 while the slot's process runs",
                               labels=["role", "id"])
        rss = GaugeMetricFamily("pyswtask_process_resident_memory_bytes",
                                "Resident memory of each process", labels=["role", "id"])
        for role, procs in (("worker", snap["workers"]), ("task_worker", snap["task_workers"]),
                            ("process", snap["processes"])):
            for p in procs:
                up.add_metric([role, str(p["id"])], 1 if p["state"] == "up" else 0)
                if p["rss"] is not None:
                    rss.add_metric([role, str(p["id"])], p["rss"])
        yield up
        yield rss
        yield GaugeMetricFamily("pyswtask_start_time_seconds", "When the server started, Unix "
                                "time", value=snap["started"])


class MetricsServer:
    """The master's /metrics endpoint: a daemon thread serving one registry."""

    def __init__(self, httpd: Any, thread: threading.Thread) -> None:
        self.httpd = httpd
        self.thread = thread
        host, port = httpd.server_address[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @classmethod
    def start(cls, bind: str, segment: StatsSegment) -> MetricsServer:
        """Listens on bind ("host:port"; port 0: the kernel picks) and serves from a thread."""
        host, _, port = bind.rpartition(":")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StatsCollector(segment))     # type: ignore[arg-type,unused-ignore]
        try:
            httpd, thread = start_http_server(int(port), host.strip("[]"), registry)
        except OSError as exc:
            raise RuntimeError(f"setting metrics_bind: cannot listen on {bind}: {exc}") from None
        return cls(httpd, thread)

    def close_in_child(self) -> None:
        """In a forked child: closes its copy of the listening socket (the thread is not
        there), so the port closes with the master."""
        self.httpd.socket.close()

    def stop(self) -> None:
        """Stops serving and closes the socket (the master, at stop)."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5.0)
