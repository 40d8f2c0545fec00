"""Cron jitter: pyswtask's crontab against APScheduler 3 and a plain croniter + sleep loop.

    python perf/bench_cron.py [--seconds N] [--rules R] [--quick]

pyswtask: R rules "* * * * * *" for N seconds on an idle server, then N seconds under a steady
background load: each worker delivers 20 ASYNC tasks (a sum over 2,000 ints, about 40 us) every
10 ms, 4,000 tasks/s in all, about a sixth of the two cores. Each run records its due
second (pyswtask.cron.due_second) and the time it started in the task worker, in memory (a
timer of the task worker writes the records out every 200 ms, as the peers' jobs append to a
list); jitter is start - due second, across three processes (cronExec -> worker -> task worker).
In the same run: APScheduler 3 (CronTrigger(second='*'), R jobs, in-process thread pool) and a
croniter + time.sleep loop, N seconds each, idle. Reports p50/p99/max jitter in ms, missed and
duplicated runs, one JSON line each, then the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dispatch import run_script  # noqa: E402

SERVER = textwrap.dedent('''
    import json, os, sys, time
    from pyswtask import Server, Task, scheduled, task
    from pyswtask.cron import due_second

    RULES, SECONDS = int(os.environ["BENCH_RULES"]), float(os.environ["BENCH_SECONDS"])
    LOAD = os.environ["BENCH_LOAD"] == "1"

    def report(**fields):
        os.write(1, (json.dumps(fields) + "\\n").encode())

    # A run records its start in memory, as the peers' jobs do; a timer of its task worker
    # writes the records out between runs, so that no run waits for another's report.
    done = []

    def write_out(_tid=None):
        if done:
            os.write(1, "".join(json.dumps(dict(rule=i, due=d, t=t)) + "\\n"
                                for i, d, t in done).encode())
            done.clear()

    def make(i):
        @scheduled(cron="* * * * * *")
        def run(self):
            done.append((i, due_second.get(), time.time()))
        run.__name__ = run.__qualname__ = f"rule{i}"
        return run

    Rules = task("rules")(type("Rules", (), {f"rule{i}": make(i) for i in range(RULES)}))

    @task("load")
    class Load:
        def work(self, n):
            return sum(range(n))

    def start(server, wid):
        t0 = time.time()
        if wid == 0:
            report(window_start=t0)
            server.after(int(SECONDS * 1000), lambda: report(window_end=time.time()))
        if LOAD:
            server.tick(10, lambda t: [Task.deliver("load", "work", [2000], Task.TYPE_ASYNC)
                                       for _ in range(20)])

    server = Server(worker_num=2, task_worker_num=2, cron=True)
    server.on("worker_start", start)
    server.on("task_worker_start", lambda server, wid: server.tick(200, write_out))
    sys.exit(server.start())
''')


def summarize(system: str, records: list[tuple[int, int, float]], start: float, end: float,
              rules: int) -> dict[str, Any]:
    """records: (rule, due second, started). Counts only due seconds fully inside the window."""
    first, last = int(start) + 2, int(end) - 2
    inside = [r for r in records if first <= r[1] <= last]
    seen: dict[tuple[int, int], int] = {}
    for rule, due, _ in inside:
        seen[(rule, due)] = seen.get((rule, due), 0) + 1
    expected = rules * (last - first + 1)
    jitter = sorted((t - due) * 1000 for _, due, t in inside)
    pct = lambda q: round(jitter[min(len(jitter) - 1, int(q * len(jitter)))], 3)  # noqa: E731
    return {"workload": "cron_jitter", "system": system, "value": pct(0.99), "unit": "ms p99",
            "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": round(jitter[-1], 3),
            "runs": len(inside), "expected": expected, "missed": expected - len(seen),
            "duplicated": sum(n - 1 for n in seen.values() if n > 1)}


def bench_pyswtask(seconds: float, rules: int, load: bool) -> dict[str, Any]:
    expected = 2 + rules * int(seconds - 1)
    reports = run_script(SERVER, {"BENCH_RULES": str(rules), "BENCH_SECONDS": str(seconds),
                                  "BENCH_LOAD": "1" if load else "0"}, expected,
                         timeout=seconds + 60, until=lambda r: "window_end" in r)
    start = next(r["window_start"] for r in reports if "window_start" in r)
    end = next(r["window_end"] for r in reports if "window_end" in r)
    records = [(r["rule"], r["due"], r["t"]) for r in reports if "rule" in r]
    return summarize("pyswtask" + (" (task load)" if load else ""), records, start, end, rules)


def bench_apscheduler(seconds: float, rules: int) -> dict[str, Any] | None:
    try:
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.cron import CronTrigger
    except ImportError:
        print(json.dumps({"skipped": "APScheduler 3 is not installed (pip install "
                          "'pyswtask[perf]')"}), flush=True)
        return None
    records: list[tuple[int, int, float]] = []
    lock = threading.Lock()

    def job(i: int) -> None:
        t = time.time()
        with lock:
            records.append((i, round(t), t))

    sched = BackgroundScheduler()
    for i in range(rules):
        sched.add_job(job, CronTrigger(second="*"), args=[i], misfire_grace_time=60,
                      max_instances=5)
    start = time.time()
    sched.start()
    time.sleep(seconds)
    end = time.time()
    sched.shutdown(wait=True)
    # APScheduler runs at the second or just after: the due second is the one it started in.
    return summarize("APScheduler 3", [(i, int(t), t) for i, _, t in records], start, end, rules)


def bench_croniter_loop(seconds: float, rules: int) -> dict[str, Any]:
    from croniter import croniter

    its = [croniter("* * * * * *", time.time(), second_at_beginning=True) for _ in range(rules)]
    due = [it.get_next(float) for it in its]
    records: list[tuple[int, int, float]] = []
    start = time.time()
    while time.time() < start + seconds:
        nxt = min(due)
        left = nxt - time.time()
        if left > 0:
            time.sleep(left)
        now = time.time()
        for i, d in enumerate(due):
            if d <= now:
                records.append((i, int(d), time.time()))
                due[i] = its[i].get_next(float)
    return summarize("croniter + sleep loop", records, start, time.time(), rules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="per measurement")
    parser.add_argument("--rules", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="20 s per measurement")
    args = parser.parse_args()
    seconds = 20.0 if args.quick else args.seconds
    rows = [bench_pyswtask(seconds, args.rules, load=False),
            bench_pyswtask(seconds, args.rules, load=True),
            bench_apscheduler(seconds, args.rules), bench_croniter_loop(seconds, args.rules)]
    for row in rows:
        if row is not None:
            print(json.dumps(row), flush=True)
    ours = rows[0]
    for row in rows[2:]:
        if row is not None:
            print(json.dumps({"ratio": f"pyswtask p99 jitter vs {row['system']}",
                              "value": round(row["p99_ms"] / ours["p99_ms"], 3),
                              "meaning": "> 1 favours pyswtask"}))


if __name__ == "__main__":
    main()
