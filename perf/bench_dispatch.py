"""Dispatch benchmark: pyswtask against multiprocessing.Pool and ProcessPoolExecutor.

    python perf/bench_dispatch.py [--quick] [--runs N] [--spin SECONDS]

Workloads (2 workers + 2 task workers, a task returning its input, params [1, 'abc', 3.5]):

- async_throughput: 200,000 ASYNC tasks, 1,000 in flight per worker (a finish callback sends
  the next), tasks/s from the first delivery to the last finish, over both workers;
- co_roundtrip: 20,000 sequential CO calls from worker 0; p50/p99/mean in microseconds, with
  the worker and its task worker on the same CPU, on different CPUs, and unpinned, each next to
  a raw SOCK_SEQPACKET ping-pong with the same placement (the floor);
- batch_co_100: Task.deliver_batch of 100 tasks, repeated; tasks/s.

Runs are interleaved (pyswtask, peers, pyswtask, peers, ...) and the medians reported, since this
machine is shared and noisy. Prints one JSON line per result, then one per ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _peers  # noqa: E402

from pyswtask.settings import DEFAULTS  # noqa: E402

SERVER = textwrap.dedent('''
    import json, os, sys, time
    from pyswtask import Server, Task, task

    WORKLOAD, N, PIN = os.environ["BENCH_WORKLOAD"], int(os.environ["BENCH_N"]), os.environ["BENCH_PIN"]
    SPIN = float(os.environ["BENCH_SPIN"])
    # BENCH_STRLEN: params [1, "x" * STRLEN, 3.5] (sized by the driver to a packed envelope of
    # the payload's bytes); unset: [1, "abc", 3.5]. BENCH_INFLIGHT: ASYNC tasks in flight per worker.
    STRLEN = os.environ.get("BENCH_STRLEN")
    PARAMS = [1, "abc" if STRLEN is None else "x" * int(STRLEN), 3.5]
    INFLIGHT = int(os.environ.get("BENCH_INFLIGHT", "1000"))
    START_AFTER_MS = 300

    @task("demo")
    class Demo:
        def echo(self, *params):
            return params

    def report(**fields):
        os.write(1, (json.dumps(fields) + "\\n").encode())

    def pin_task_worker(server, wid):
        if PIN in ("same", "cross"):
            os.sched_setaffinity(0, {0 if PIN == "same" else 1})

    def run_async(server, wid):
        per = N // server.worker_num
        state = {"sent": 0, "done": 0, "t0": 0.0}

        def on_done(task_id, result):
            state["done"] += 1
            if state["sent"] < per:
                state["sent"] += 1
                Task.deliver("demo", "echo", PARAMS, Task.TYPE_ASYNC, callback=on_done)
            elif state["done"] == per:
                report(wid=wid, start=state["t0"], end=time.monotonic(), n=per,
                       ok=result == PARAMS)

        def start():
            state["t0"] = time.monotonic()
            for _ in range(min(INFLIGHT, per)):
                state["sent"] += 1
                Task.deliver("demo", "echo", PARAMS, Task.TYPE_ASYNC, callback=on_done)

        # Every process of the server comes up first, as in Swoole's async_throughput.php
        # (300 ms): the clock starts on a server that is up, not on one still starting.
        server.after(START_AFTER_MS, start)

    def run_co(server, wid):
        if wid != 0:
            return
        if PIN in ("same", "cross"):
            os.sched_setaffinity(0, {0})
        for _ in range(2000):
            Task.deliver("demo", "echo", PARAMS, dst_worker_id=0)
        samples = []
        clock = time.perf_counter_ns
        for _ in range(N):
            t = clock()
            Task.deliver("demo", "echo", PARAMS, dst_worker_id=0)
            samples.append(clock() - t)
        samples.sort()
        report(wid=wid, n=N, p50=samples[N // 2] / 1e3, p99=samples[int(N * 0.99)] / 1e3,
               mean=sum(samples) / N / 1e3)

    def run_batch(server, wid):
        if wid != 0:
            return
        calls = [("demo", "echo", PARAMS)] * 100
        for _ in range(20):
            Task.deliver_batch(calls)
        t0 = time.monotonic()
        for _ in range(N // 100):
            out = Task.deliver_batch(calls)
        report(wid=wid, n=N, start=t0, end=time.monotonic(), ok=out[0] == PARAMS)

    server = Server(worker_num=2, task_worker_num=2, task_wait_spin=SPIN)
    server.on("task_worker_start", pin_task_worker)
    server.on("worker_start", {"async": run_async, "co": run_co, "batch": run_batch}[WORKLOAD])
    sys.exit(server.start())
''')


def run_script(script: str, env: dict[str, str], expected: int, timeout: float = 300.0,
               until: Any = None) -> list[dict[str, Any]]:
    """Runs a server script until it has printed ``expected`` JSON reports (or one for which
    ``until(report)`` is true), then stops it. A server that has not reported within
    ``timeout`` seconds is an error; either way its whole process group is killed."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(script)
    proc = subprocess.Popen([sys.executable, f.name], stdout=subprocess.PIPE,
                            env=dict(os.environ, **env), preexec_fn=os.setpgrp)
    reports: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        fd, buf, eof = proc.stdout.fileno(), b"", False
        while (until is not None or len(reports) < expected) and not eof:
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise RuntimeError(f"the server gave {len(reports)} of {expected} reports "
                                       f"in {timeout:.0f} s ({env})")
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    eof = True
                    break
                buf += chunk
            if eof:
                break
            line, buf = buf.split(b"\n", 1)
            reports.append(json.loads(line))
            if until is not None and until(reports[-1]):
                break
        if until is None and len(reports) < expected:
            raise RuntimeError(f"the server gave {len(reports)} of {expected} reports ({env})")
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        proc.stdout.close()
        os.unlink(f.name)
    return reports


def payload_strlen(size: int, name: str = "demo", method: str = "echo") -> int:
    """The length k of the string in params [1, "x" * k, 3.5] whose packed task envelope
    (what crosses the socket after the 20-byte frame header) is ``size`` bytes, or the
    smallest k above it where msgpack's string header grows past it."""
    from pyswtask._core import pack_envelope

    k = max(0, size - len(pack_envelope(name, method, [1, "", 3.5])) - 6)
    while len(pack_envelope(name, method, [1, "x" * k, 3.5])) < size:
        k += 1
    return k


def payload_params(size: int | None, name: str = "demo", method: str = "echo") -> list[Any]:
    """params [1, "x" * k, 3.5] sized to a ``size``-byte envelope; None: [1, "abc", 3.5]."""
    return [1, "abc", 3.5] if size is None else [1, "x" * payload_strlen(size, name, method), 3.5]


def payload_label(size: int) -> str:
    """103 -> "103B", 8192 -> "8KiB", 1048576 -> "1MiB"."""
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B"


def run_server(workload: str, n: int, pin: str = "", spin: float = 0.0, payload: int | None = None,
               inflight: int = 1000) -> list[dict[str, Any]]:
    """Starts a dispatch server that runs one workload and collects its reports. ``payload``:
    the envelope's size in bytes (None: params [1, "abc", 3.5])."""
    env = {"BENCH_WORKLOAD": workload, "BENCH_N": str(n), "BENCH_PIN": pin,
           "BENCH_SPIN": str(spin), "BENCH_INFLIGHT": str(inflight)}
    if payload is not None:
        env["BENCH_STRLEN"] = str(payload_strlen(payload))
    return run_script(SERVER, env, 2 if workload == "async" else 1)


def pyswtask_async(n: int, payload: int | None = None, inflight: int = 1000,
                   workload: str = "async_throughput") -> dict[str, Any]:
    reports = run_server("async", n, payload=payload, inflight=inflight)
    if not all(r["ok"] for r in reports):
        raise RuntimeError("async results were wrong")
    elapsed = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    total = sum(r["n"] for r in reports)
    extra = {} if payload is None else {"payload": payload}
    return _peers._result(workload, "pyswtask", total / elapsed, "tasks/s", total,
                          elapsed_s=round(elapsed, 3), inflight=inflight, **extra)


def pyswtask_co(n: int, pin: str, spin: float, payload: int | None = None,
                workload: str | None = None) -> dict[str, Any]:
    r = run_server("co", n, pin=pin, spin=spin, payload=payload)[0]
    placement = {"same": "same_cpu", "cross": "cross_cpu", "": "unpinned"}[pin]
    extra = {} if payload is None else {"payload": payload}
    return _peers._result(workload or f"co_roundtrip:{placement}", "pyswtask", r["p50"], "us", n,
                          p50_us=r["p50"], p99_us=r["p99"], mean_us=r["mean"], spin_s=spin,
                          placement=placement, **extra)


def pyswtask_batch(n: int, payload: int | None = None) -> dict[str, Any]:
    r = run_server("batch", n, payload=payload)[0]
    if not r["ok"]:
        raise RuntimeError("batch results were wrong")
    extra = {} if payload is None else {"payload": payload}
    return _peers._result("batch_co_100", "pyswtask", n / (r["end"] - r["start"]), "tasks/s", n,
                          **extra)


def one_round(quick: bool, spin: float) -> list[dict[str, Any]]:
    scale = 10 if quick else 1
    n_async, n_co, n_batch = 200_000 // scale, 20_000 // scale, 100_000 // scale
    results = [pyswtask_async(n_async)]
    results += _peers.pool_async(n_async)
    results += _peers.executor_async(n_async // 4)
    for pin, same in (("same", True), ("cross", False), ("", None)):
        results.append(pyswtask_co(n_co, pin, spin))
        floor = _peers.socketpair_pingpong(n_co, same_cpu=same)[0]
        placement = {"same": "same_cpu", "cross": "cross_cpu", "": "unpinned"}[pin]
        floor["workload"] = f"co_roundtrip:{placement}"
        results.append(floor)
    for r in _peers.pool_co(n_co // 4) + _peers.executor_co(n_co // 4):
        r["workload"] = "co_roundtrip:unpinned"
        results.append(r)
    results.append(pyswtask_batch(n_batch))
    results += _peers.pool_batch(n_batch // 100 // 4)
    results += _peers.executor_batch(n_batch // 100 // 10)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10x smaller runs")
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds (median kept)")
    parser.add_argument("--spin", type=float, default=DEFAULTS["task_wait_spin"],
                        help="task_wait_spin for CO (default: the server's)")
    args = parser.parse_args()
    rounds = [one_round(args.quick, args.spin) for _ in range(args.runs)]
    medians: dict[tuple[str, str], dict[str, Any]] = {}
    for key in dict.fromkeys((r["workload"], r["system"]) for r in rounds[0]):
        samples = [r for rnd in rounds for r in rnd if (r["workload"], r["system"]) == key]
        values = sorted(r["value"] for r in samples)
        row = dict(samples[0], value=round(statistics.median(values), 3), runs=len(values),
                   min=round(values[0], 3), max=round(values[-1], 3))
        for extra in ("p50_us", "p99_us", "mean_us"):
            if extra in row:
                row[extra] = round(statistics.median(r[extra] for r in samples), 3)
        medians[key] = row
        print(json.dumps(row), flush=True)
    for (workload, system), row in medians.items():
        if system == "pyswtask":
            continue
        ours = medians.get((workload, "pyswtask"))
        if ours is None:
            continue
        # Throughput: higher is better; latency: lower is better. A ratio > 1 favours pyswtask.
        ratio = (ours["value"] / row["value"] if row["unit"] == "tasks/s"
                 else row["value"] / ours["value"])
        print(json.dumps({"ratio": f"pyswtask vs {system}", "workload": workload,
                          "value": round(ratio, 3), "meaning": "> 1 favours pyswtask"}))


if __name__ == "__main__":
    main()
