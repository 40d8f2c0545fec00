"""Queue benchmark: tasks from a separate program through the server's SysV message queue.

    python perf/bench_queue.py [--quick] [--runs N] [--mode 1|2|3]

A server (2 workers + 2 task workers, message_queue_key set, task_ipc_mode 3 as in Swoole's
run, or --mode) and, beside it, a separate program (started by this script, not by the server)
that calls ``Task.deliver``:

- queue_oneway: 200,000 ASYNC tasks of params [1, 'abc', 3.5]; tasks/s from the first delivery
  until the task workers have run all of them (they count into shared memory);
- queue_reply: 20,000 sequential CO tasks; p50/p99/mean round trip in microseconds.

When PHP and the swoole extension are installed, perf/swoole/queue.php runs the same two
workloads on Swoole (a plain PHP producer msg_send-ing into task_ipc_mode 3) in the same rounds,
interleaved. Prints one JSON line per result (medians over the runs), then one per ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _swoole  # noqa: E402
from bench_dispatch import payload_strlen  # noqa: E402

SERVER = textwrap.dedent('''
    import os, sys
    import sysv_ipc
    from pyswtask import Server, task

    KEY, MODE, COUNT_KEY = (int(os.environ[k]) for k in ("BENCH_KEY", "BENCH_MODE", "BENCH_COUNT_KEY"))
    counts = None

    @task("bench")
    class Bench:
        def hit(self, *params):
            counts[0] += 1

        def echo(self, *params):
            return params

    def attach(server, wid):
        global counts
        shm = sysv_ipc.SharedMemory(COUNT_KEY)
        counts = memoryview(shm).cast("q")[wid - server.worker_num:]

    server = Server(worker_num=2, task_worker_num=2, task_ipc_mode=MODE, message_queue_key=KEY)
    server.on("task_worker_start", attach)
    sys.exit(server.start())
''')

COMMAND = textwrap.dedent('''
    import json, os, sys, time
    import sysv_ipc
    from pyswtask import Task

    KEY, COUNT_KEY = int(os.environ["BENCH_KEY"]), int(os.environ["BENCH_COUNT_KEY"])
    N, N_CO = int(os.environ["BENCH_N"]), int(os.environ["BENCH_N_CO"])
    STRLEN = os.environ.get("BENCH_STRLEN")   # params sized by the driver; unset: [1, "abc", 3.5]
    PARAMS = [1, "abc" if STRLEN is None else "x" * int(STRLEN), 3.5]
    counts = memoryview(sysv_ipc.SharedMemory(COUNT_KEY)).cast("q")
    Task.configure(message_queue_key=KEY)
    for _ in range(1000):
        Task.deliver("bench", "echo", PARAMS)
    before = counts[0] + counts[1]
    t0 = time.perf_counter()
    for _ in range(N):
        Task.deliver("bench", "hit", PARAMS, Task.TYPE_ASYNC)
    Task.flush(30)
    sent = time.perf_counter()
    deadline = time.monotonic() + 60
    while counts[0] + counts[1] - before < N and time.monotonic() < deadline:
        time.sleep(0.0002)
    ran = counts[0] + counts[1] - before
    t1 = time.perf_counter()
    print(json.dumps({"kind": "oneway", "n": N, "ran": ran, "elapsed_s": t1 - t0,
                      "send_s": sent - t0}), flush=True)
    clock = time.perf_counter_ns
    samples = []
    for _ in range(N_CO):
        t = clock()
        Task.deliver("bench", "echo", PARAMS)
        samples.append(clock() - t)
    samples.sort()
    print(json.dumps({"kind": "reply", "n": N_CO, "p50": samples[N_CO // 2] / 1e3,
                      "p99": samples[int(N_CO * 0.99)] / 1e3,
                      "mean": sum(samples) / N_CO / 1e3}), flush=True)
''')


def _result(workload: str, system: str, value: float, unit: str, n: int,
            **extra: Any) -> dict[str, Any]:
    return {"workload": workload, "system": system, "value": round(value, 3), "unit": unit,
            "n": n, **extra}


def pyswtask_queue(n: int, n_co: int, mode: int, payload: int | None = None) -> list[dict[str, Any]]:
    """One server and one separate command process; both results. ``payload``: the task
    envelope's size in bytes (None: params [1, "abc", 3.5])."""
    import sysv_ipc

    from pyswtask.transport.msgqueue import read_info

    key = 0x7B000000 + (os.getpid() & 0xFFFF) * 4
    count = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, mode=0o600, size=16)
    memoryview(count).cast("q")[:2] = memoryview(bytes(16)).cast("q")
    env = dict(os.environ, BENCH_KEY=str(key), BENCH_MODE=str(mode), BENCH_COUNT_KEY=str(count.key),
               BENCH_N=str(n), BENCH_N_CO=str(n_co))
    if payload is not None:
        env["BENCH_STRLEN"] = str(payload_strlen(payload, "bench", "echo"))
    extra = {} if payload is None else {"payload": payload}
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in (("server.py", SERVER), ("command.py", COMMAND)):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        server = subprocess.Popen([sys.executable, os.path.join(tmp, "server.py")], env=env,
                                  preexec_fn=os.setpgrp, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while (info := read_info(key)) is None or not info.alive():
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the benchmark server did not start")
                time.sleep(0.05)
            time.sleep(0.5)
            out = subprocess.run([sys.executable, os.path.join(tmp, "command.py")], env=env,
                                 capture_output=True, text=True, timeout=300)
            if out.returncode != 0:
                raise RuntimeError(f"the command failed: {out.stderr[-2000:]}")
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            finally:
                try:
                    os.killpg(server.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                count.detach()
                count.remove()
    rows = {r["kind"]: r for r in map(json.loads, out.stdout.splitlines())}
    one, reply = rows["oneway"], rows["reply"]
    if one["ran"] != n:
        raise RuntimeError(f"{n - one['ran']} of {n} tasks did not run")
    return [
        _result("queue_oneway", "pyswtask", n / one["elapsed_s"], "tasks/s", n,
                elapsed_s=round(one["elapsed_s"], 3), send_s=round(one["send_s"], 3),
                task_ipc_mode=mode, **extra),
        _result("queue_reply", "pyswtask", reply["p50"], "us", n_co,
                p50_us=round(reply["p50"], 3), p99_us=round(reply["p99"], 3),
                mean_us=round(reply["mean"], 3), task_ipc_mode=mode, **extra),
    ]


def swoole_queue(n: int, n_co: int, payload: int = 103) -> list[dict[str, Any]]:
    rows = _swoole.run("queue.php", "--n", str(n), "--reply-n", str(n_co), "--payload", str(payload),
                       "--key", str(0x7C000000 + (os.getpid() & 0xFFFF) * 4))
    for r in rows:
        if r["unit"] == "us":
            r.update(p50_us=r["value"], p99_us=r.get("p99"), mean_us=r.get("mean"))
    return rows


def one_round(quick: bool, mode: int) -> list[dict[str, Any]]:
    scale = 10 if quick else 1
    n, n_co = 200_000 // scale, 20_000 // scale
    return pyswtask_queue(n, n_co, mode) + swoole_queue(n, n_co)


def summarize(rounds: list[list[dict[str, Any]]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Medians per (workload, system) over the rounds, printed as JSON lines, then ratios."""
    medians: dict[tuple[str, str], dict[str, Any]] = {}
    keys = dict.fromkeys((r["workload"], r["system"]) for rnd in rounds for r in rnd)
    for key in keys:
        samples = [r for rnd in rounds for r in rnd if (r["workload"], r["system"]) == key]
        values = sorted(r["value"] for r in samples)
        row = dict(samples[0], value=round(statistics.median(values), 3), runs=len(values),
                   min=round(values[0], 3), max=round(values[-1], 3))
        medians[key] = row
        print(json.dumps(row), flush=True)
    for (workload, system), row in medians.items():
        ours = medians.get((workload, "pyswtask"))
        if system == "pyswtask" or ours is None:
            continue
        higher_is_better = row["unit"].endswith("/s")
        ratio = ours["value"] / row["value"] if higher_is_better else row["value"] / ours["value"]
        print(json.dumps({"ratio": f"pyswtask vs {system}", "workload": workload,
                          "value": round(ratio, 3), "meaning": "> 1 favours pyswtask"}),
              flush=True)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10x smaller runs")
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds (median kept)")
    parser.add_argument("--mode", type=int, default=3, choices=(1, 2, 3),
                        help="pyswtask's task_ipc_mode (default 3, as Swoole's run)")
    args = parser.parse_args()
    summarize([one_round(args.quick, args.mode) for _ in range(args.runs)])


if __name__ == "__main__":
    main()
