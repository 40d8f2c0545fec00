"""HTTP benchmark: requests/s and latency under wrk, pyswtask's workers against plain uvicorn and
Swoole's HTTP server.

    python perf/bench_http.py [--quick] [--runs N] [--duration S] [--connections C] [--brokers]

Every side runs 2 workers (+ 2 task workers) on 127.0.0.1 and is loaded by
``wrk -t2 -c64 -d10s --latency`` after a one-second warm-up, side after side in interleaved
rounds (A B C, then C B A, ...), on two routes (perf/_http_apps.py, perf/swoole/http_task.php):

  http_hello   GET / answers "Hello, world!"
  http_task    each request has another process echo a 103-byte task payload: pyswtask
               ``await Task.co``; Swoole ``taskCo``; uvicorn ``loop.run_in_executor`` on a
               ``ProcessPoolExecutor(2)`` per worker; with ``--brokers``, uvicorn + Celery on
               Redis: ``echo.delay(...).get()`` in a thread, a Celery worker of 2 processes
               (perf/_brokers.py; http_task only, its hello world is plain uvicorn's)

pyswtask runs on uvloop with httptools when they are installed, as plain uvicorn does. Prints
one JSON line per (workload, system): requests/s (the median of the rounds) with p50_ms and
p99_ms, and the server's CPU per request (``cpu_us_per_req``: user + system time of every process
of the server while wrk ran, over the requests answered; for pyswtask also its workers' and
task workers' shares), less noisy than requests/s on a shared machine; then one per
pyswtask/peer ratio (> 1 favours pyswtask); then the task's cost on pyswtask's own throughput
(http_task / http_hello), with the workers' CPU a task adds to a request. wrk (Debian's
package ``wrk``) is needed: without it the script says so in one line and measures nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _procs  # noqa: E402
import _summary  # noqa: E402
import _swoole  # noqa: E402

WORKLOADS = (("http_hello", "/"), ("http_task", "/task"))
_wrk_checked: list[str | None] = []


def wrk_path() -> str | None:
    """wrk's path, or None (saying so once, in one line)."""
    if not _wrk_checked:
        _wrk_checked.append(shutil.which("wrk"))
        if _wrk_checked[0] is None:
            print("wrk: not installed (apt-get install wrk); HTTP workloads skipped",
                  file=sys.stderr, flush=True)
    return _wrk_checked[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _seconds(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def parse_wrk(out: str) -> dict[str, Any]:
    """Requests/s, p50/p99 latency and the error counts of a ``wrk --latency`` report."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    return {"value": float(rps[1]) if rps else None,
            "p50_ms": round(_seconds(p50[1]) * 1e3, 3) if p50 else None,
            "p99_ms": round(_seconds(p99[1]) * 1e3, 3) if p99 else None,
            "requests": int(total[1]) if total else None,
            "socket_errors": sum(map(int, errors.groups())) if errors else 0,
            "non_2xx": int(non2xx[1]) if non2xx else 0}


def wrk(url: str, duration: float, connections: int, threads: int = 2) -> dict[str, Any]:
    path = wrk_path()
    assert path is not None
    cmd = [path, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
           url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    return parse_wrk(out.stdout)


class Served:
    """A server in a process group of its own, stopped (the whole group) on exit."""

    def __init__(self, cmd: list[str], port: int, cwd: str = HERE,
                 env: dict[str, str] | None = None) -> None:
        self.port = port
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, env=env,
                                     stderr=subprocess.PIPE, text=True, preexec_fn=os.setpgrp)

    def __enter__(self) -> Served:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/task", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise RuntimeError(f"server did not answer: {err[-500:]}")
            time.sleep(0.1)

    def __exit__(self, *exc: Any) -> None:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                time.sleep(0.2)   # the group's last children
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.stderr:
            self.proc.stderr.close()


def has_uvloop() -> bool:
    return importlib.util.find_spec("uvloop") is not None


# Process titles of pyswtask's roles whose CPU per request is reported apart.
ROLE_TITLES = (("worker_cpu_us_per_req", "pyswtask: worker "),
               ("task_worker_cpu_us_per_req", "pyswtask: task worker "))


def cpu_per_request(procs: dict[int, str], before: dict[int, int],
                    requests: int | None) -> dict[str, float]:
    """Microseconds of CPU per request the server's processes used since ``before`` (their
    ticks then): all of them, and pyswtask's workers and task workers apart."""
    if not requests:
        return {}
    hz = os.sysconf("SC_CLK_TCK")
    used = {pid: _procs.cpu_ticks(pid) - ticks for pid, ticks in before.items()}
    out = {"cpu_us_per_req": round(sum(used.values()) / hz / requests * 1e6, 2)}
    for key, title in ROLE_TITLES:
        mine = [used[pid] for pid, t in procs.items() if t.startswith(title)]
        if mine:
            out[key] = round(sum(mine) / hz / requests * 1e6, 2)
    return out


def measure(system: str, served: Served, duration: float, connections: int,
            extras: dict[str, Any], ours: bool = False,
            workloads: tuple[tuple[str, str], ...] = WORKLOADS) -> list[dict[str, Any]]:
    rows = []
    with served:
        for workload, path in workloads:
            url = f"http://127.0.0.1:{served.port}{path}"
            wrk(url, 1.0, connections)      # warm-up: connections, caches, the executor's processes
            procs = _procs.group_procs(served.proc.pid)
            before = {pid: _procs.cpu_ticks(pid) for pid in procs}
            row = wrk(url, duration, connections)
            row.update(cpu_per_request(procs, before, row.get("requests")))
            rows.append({"workload": workload, "system": system, "unit": "req/s",
                         "connections": connections, "duration_s": duration, **extras, **row,
                         **({"ours": True} if ours else {})})
    return rows


def pyswtask_http(duration: float, connections: int) -> list[dict[str, Any]]:
    port = free_port()
    loop = "uvloop" if has_uvloop() else "asyncio"
    cmd = [sys.executable, "-m", "pyswtask", "serve", "_http_apps:app", "--bind",
           f"127.0.0.1:{port}", "--workers", "2", "--task-workers", "2", "--event-loop", loop,
           "--log-level", "WARNING"]
    return measure("pyswtask", Served(cmd, port), duration, connections, {"loop": loop}, ours=True)


def uvicorn_http(duration: float, connections: int) -> list[dict[str, Any]]:
    if importlib.util.find_spec("uvicorn") is None:
        print("uvicorn: not installed (pip install 'pyswtask[http]'); skipped", file=sys.stderr)
        return []
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "_http_apps:uvicorn_app", "--port", str(port),
           "--workers", "2", "--no-access-log", "--log-level", "warning"]
    rows = measure("uvicorn", Served(cmd, port), duration, connections,
                   {"loop": "uvloop" if has_uvloop() else "asyncio"})
    for row in rows:
        if row["workload"] == "http_task":
            row["system"] = "uvicorn + ProcessPoolExecutor"
    return rows


def swoole_http(duration: float, connections: int) -> list[dict[str, Any]]:
    if _swoole.version() is None:
        return []
    port = free_port()
    cmd = ["php", os.path.join(HERE, "swoole", "http_task.php"), "--port", str(port)]
    rows = measure("swoole", Served(cmd, port), duration, connections,
                   {"swoole": _swoole.version()})
    for row in rows:
        if row["workload"] == "http_task":
            row["system"] = "swoole taskCo"
    return rows


def celery_http(duration: float, connections: int, redis: Any) -> list[dict[str, Any]]:
    """uvicorn --workers 2 with Celery on ``redis`` (a perf/_brokers.py RedisServer): one task
    per request, ``result.get()`` in a thread; the Celery worker runs 2 processes."""
    import _brokers
    import _http_apps

    env = _brokers.broker_env("celery", redis)
    redis.flush()
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "_http_apps:celery_app", "--port", str(port),
           "--workers", "2", "--no-access-log", "--log-level", "warning"]
    with _brokers.Workers("celery", env):
        return measure("uvicorn + Celery", Served(cmd, port, env=env), duration, connections,
                       {"loop": "uvloop" if has_uvloop() else "asyncio",
                        "celery": _brokers.version("celery"), "redis": redis.version,
                        "threads_per_worker": _http_apps.CELERY_THREADS},
                       workloads=(("http_task", "/task"),))


RUNNERS: list[tuple[str, Callable[[float, int], list[dict[str, Any]]]]] = [
    ("pyswtask", pyswtask_http), ("uvicorn", uvicorn_http), ("swoole", swoole_http)]


def broker_runners() -> tuple[Any, list[tuple[str, Callable[[float, int], list[dict[str, Any]]]]]]:
    """With --brokers: a Redis server and the uvicorn + Celery runner, or (None, []) saying in
    one line what is missing."""
    import _brokers

    why = _brokers.missing()
    if why is None and "celery" not in _brokers.available():
        why = "celery is not installed (pip install 'pyswtask[brokers]'); uvicorn + Celery skipped"
    if why is not None:
        print(f"brokers: {why}", file=sys.stderr, flush=True)
        return None, []
    redis = _brokers.RedisServer()
    return redis, [("uvicorn + Celery", lambda d, c: celery_http(d, c, redis))]


def task_cost(rounds: list[list[dict[str, Any]]]) -> dict[str, Any] | None:
    """pyswtask's http_task throughput over its own http_hello one, within each round, and the
    CPU per request its workers spend on the task (http_task's minus http_hello's)."""
    per_round, extra_cpu = [], []
    for rnd in rounds:
        got = {r["workload"]: r for r in rnd if r["system"] == "pyswtask" and r.get("value")}
        if "http_task" in got and "http_hello" in got:
            task, hello = got["http_task"], got["http_hello"]
            per_round.append(task["value"] / hello["value"])
            if "worker_cpu_us_per_req" in task and "worker_cpu_us_per_req" in hello:
                extra_cpu.append(task["worker_cpu_us_per_req"] - hello["worker_cpu_us_per_req"])
    if not per_round:
        return None
    cost = {"ratio": "pyswtask http_task / http_hello", "workload": "http_task",
            "value": round(statistics.median(per_round), 3), "rounds": len(per_round),
            "unit": "req/s", "meaning": "the share of hello-world throughput left with one "
            "await Task.co per request (target: at least 0.75)"}
    if extra_cpu:
        cost["task_extra_worker_cpu_us"] = round(statistics.median(extra_cpu), 2)
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s runs, 2 rounds")
    parser.add_argument("--runs", type=int, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=float, help="seconds of each wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=64, help="wrk -c (default 64)")
    parser.add_argument("--brokers", action="store_true",
                        help="also uvicorn + Celery on a local Redis (perf/_brokers.py)")
    args = parser.parse_args()
    if wrk_path() is None:
        return
    runs = args.runs or (2 if args.quick else 3)
    duration = args.duration or (3.0 if args.quick else 10.0)
    rounds: list[list[dict[str, Any]]] = [[] for _ in range(runs)]
    redis, extra = broker_runners() if args.brokers else (None, [])
    runners = RUNNERS + extra
    try:
        for i in range(runs):
            order = runners if i % 2 == 0 else runners[::-1]
            for _label, runner in order:
                rows = runner(duration, args.connections)
                rounds[i].extend(rows)
                for r in rows:
                    print(f"[round {i + 1}/{runs}] {r['system']} {r['workload']}: {r['value']} "
                          f"req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, CPU "
                          f"{r.get('cpu_us_per_req')} us/req", file=sys.stderr, flush=True)
    finally:
        if redis is not None:
            redis.stop()
    rows = _summary.medians(rounds)
    for r in rows + _summary.ratios(rounds, rows):
        print(json.dumps(r), flush=True)
    cost = task_cost(rounds)
    if cost is not None:
        print(json.dumps(cost), flush=True)


if __name__ == "__main__":
    main()
