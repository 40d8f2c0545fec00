"""Burst benchmark: 1,000,000 ASYNC tasks delivered in one go keep the worker's RSS bounded.

    python perf/bench_burst.py [--n N]

Worker 0 of a server (1 worker + 2 task workers echoing their params [1, 'abc', 3.5]) delivers
N ASYNC tasks (default 1,000,000) in one loop turn, one callback counting the finishes. The
worker samples its own VmRSS and VmHWM (/proc/self/status) before the burst, when the delivery
loop returns, and after the last finish; the peak is VmHWM. Delivery waits (reading results)
once ``task_queue_size`` tasks wait for their result, so the peak is bounded by that setting:
run with the default (65536) and with task_queue_size=1000.

Baseline in the same run: multiprocessing.Pool(2).apply_async of the same count from a fresh
parent process, whose RSS is sampled the same way (before, after the submit loop, after the last
result). Prints one JSON line per result, then the Pool/pyswtask ratios of the peak growth
(above 1 favours pyswtask).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dispatch import run_script  # noqa: E402

STATUS = textwrap.dedent('''
    def status():
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1])
        return out
''')

SERVER = STATUS + textwrap.dedent('''
    import gc, json, os, sys, time
    from pyswtask import Server, Task, task

    N, QSIZE = int(os.environ["BENCH_N"]), int(os.environ["BENCH_QSIZE"])
    PARAMS = [1, "abc", 3.5]

    @task("demo")
    class Demo:
        def echo(self, *params):
            return params

    def report(**fields):
        os.write(1, (json.dumps(fields) + "\\n").encode())

    def start(server, wid):
        for _ in range(1000):
            Task.deliver("demo", "echo", PARAMS)
        gc.collect()
        state = {"done": 0, "bad": 0}
        before = status()

        def finished(task_id, result):
            state["done"] += 1
            if result != PARAMS:
                state["bad"] += 1
            if state["done"] == N:
                end = time.monotonic()
                peak = status()
                gc.collect()
                report(before=before, delivered=delivered, peak=peak, after=status(),
                       send_s=sent - t0, elapsed_s=end - t0, bad=state["bad"])

        t0 = time.monotonic()
        deliver, ASYNC = Task.deliver, Task.TYPE_ASYNC
        for _ in range(N):
            deliver("demo", "echo", PARAMS, ASYNC, callback=finished)
        sent = time.monotonic()
        delivered = status()

    server = Server(worker_num=1, task_worker_num=2, task_queue_size=QSIZE)
    server.on("worker_start", start)
    sys.exit(server.start())
''')

POOL = STATUS + textwrap.dedent('''
    import gc, json, multiprocessing, sys, time

    def echo(*params):
        return params

    if __name__ == "__main__":
        N = int(sys.argv[1])
        PARAMS = [1, "abc", 3.5]
        with multiprocessing.Pool(2) as pool:
            for _ in range(1000):
                pool.apply(echo, PARAMS)
            gc.collect()
            before = status()
            t0 = time.monotonic()
            results = [pool.apply_async(echo, PARAMS) for _ in range(N)]
            sent = time.monotonic()
            delivered = status()
            bad = sum(r.get(600) != tuple(PARAMS) for r in results)
            end = time.monotonic()
            peak = status()
            del results
            gc.collect()
            print(json.dumps(dict(before=before, delivered=delivered, peak=peak, after=status(),
                                  send_s=sent - t0, elapsed_s=end - t0, bad=bad)))
''')


def _row(system: str, n: int, r: dict[str, Any], **extra: Any) -> dict[str, Any]:
    base = r["before"]["VmRSS"]
    # VmHWM is updated lazily by the kernel: the peak is the highest of it and every VmRSS seen.
    peak = max(r["peak"]["VmHWM"], r["peak"]["VmRSS"], r["delivered"]["VmRSS"], r["after"]["VmRSS"])
    growth = peak - base
    return {"workload": "burst_async_rss", "system": system, "value": growth,
            "unit": "KiB peak RSS growth", "n": n, **extra,
            "rss_before_kib": base, "rss_after_send_kib": r["delivered"]["VmRSS"],
            "hwm_kib": r["peak"]["VmHWM"], "peak_kib": peak, "rss_after_kib": r["after"]["VmRSS"],
            "peak_growth_mib": round(growth / 1024, 1),
            "after_growth_mib": round((r["after"]["VmRSS"] - base) / 1024, 1),
            "send_s": round(r["send_s"], 3), "elapsed_s": round(r["elapsed_s"], 3),
            "tasks_per_s": round(n / r["elapsed_s"]), "bad_results": r["bad"]}


def pyswtask_burst(n: int, qsize: int) -> dict[str, Any]:
    reports = run_script(SERVER, {"BENCH_N": str(n), "BENCH_QSIZE": str(qsize)}, 1, timeout=600)
    return _row("pyswtask", n, reports[0], task_queue_size=qsize)


def pool_burst(n: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", POOL, str(n)], capture_output=True, text=True,
                         timeout=900, preexec_fn=os.setpgrp)
    if out.returncode != 0:
        raise RuntimeError(f"the Pool run failed: {out.stderr[-2000:]}")
    return _row("multiprocessing.Pool", n, json.loads(out.stdout.splitlines()[-1]), procs=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="tasks in the burst")
    args = parser.parse_args()
    rows = [pyswtask_burst(args.n, 65536), pyswtask_burst(args.n, 1000), pool_burst(args.n)]
    for row in rows:
        print(json.dumps(row), flush=True)
    pool = rows[-1]
    for ours in rows[:-1]:
        print(json.dumps({"ratio": "multiprocessing.Pool vs pyswtask", "workload": "burst_async_rss",
                          "task_queue_size": ours["task_queue_size"],
                          "value": round(pool["value"] / max(ours["value"], 1), 3),
                          "meaning": "peak RSS growth of the delivering process; > 1 favours "
                                     "pyswtask"}), flush=True)
    if any(r["bad_results"] for r in rows):
        sys.exit("some results were wrong")


if __name__ == "__main__":
    main()
