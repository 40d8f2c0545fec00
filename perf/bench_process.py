"""User process -> worker -> task worker: Task.deliver_by_process throughput.

    python perf/bench_process.py [--quick] [--runs N]

One user process delivers 200,000 ASYNC tasks through deliver_by_process (alternating between
the 2 workers), 2 task workers echo them; throughput from the first delivery to the last finish
event in the workers. In the same run, two baselines on the same server shape: the workers
delivering the same number of tasks themselves (Task.deliver ASYNC, the path without the
pipe hop), and the bare pipe (the process sending the same number of pipe messages to the
workers, no task). Prints one JSON line per result, then the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import textwrap
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dispatch import payload_strlen, run_script  # noqa: E402

SERVER = textwrap.dedent('''
    import json, os, sys, time
    from pyswtask import Event, Server, Task, listener, process, task

    WORKLOAD, N = os.environ["BENCH_WORKLOAD"], int(os.environ["BENCH_N"])
    STRLEN = os.environ.get("BENCH_STRLEN")   # params sized by the driver; unset: [1, "abc", 3.5]
    PARAMS = [1, "abc" if STRLEN is None else "x" * int(STRLEN), 3.5]

    @task("demo")
    class Demo:
        def echo(self, *params):
            return params

    def report(**fields):
        os.write(1, (json.dumps(fields) + "\\n").encode())

    seen = 0

    @listener(Event.FINISH_TASK if WORKLOAD != "pipe" else Event.PIPE_MESSAGE)
    def count(ev):
        global seen
        seen += 1
        if seen == N // 2:
            report(wid=server.worker_id, end=time.monotonic(), n=seen)

    @process(name="producer")
    def producer(server, proc):
        if WORKLOAD == "worker":
            proc.sleep(3600)
        time.sleep(0.5)   # let the workers come up
        report(start=time.monotonic())
        if WORKLOAD == "process":
            for i in range(N):
                Task.deliver_by_process("demo", "echo", PARAMS, worker_id=i & 1)
        else:
            for i in range(N):
                server.send_message(PARAMS, i & 1)
        proc.sleep(3600)

    def direct(server, wid):
        if WORKLOAD != "worker":
            return
        def go():
            report(start=time.monotonic())
            for _ in range(N // 2):
                Task.deliver("demo", "echo", PARAMS, Task.TYPE_ASYNC)
        server.after(500, go)

    server = Server(worker_num=2, task_worker_num=2)
    server.on("worker_start", direct)
    sys.exit(server.start())
''')

SYSTEMS = {"process": "pyswtask deliver_by_process", "worker": "pyswtask Task.deliver (in worker)",
           "pipe": "pyswtask send_message (pipe only)"}


def one(workload: str, n: int, payload: int | None = None) -> dict[str, Any]:
    """One server, one measurement. ``payload``: the task envelope's size in bytes (None:
    params [1, "abc", 3.5])."""
    expected = 3 if workload != "worker" else 4
    env = {"BENCH_WORKLOAD": workload, "BENCH_N": str(n)}
    if payload is not None:
        env["BENCH_STRLEN"] = str(payload_strlen(payload))
    reports = run_script(SERVER, env, expected)
    start = min(r["start"] for r in reports if "start" in r)
    end = max(r["end"] for r in reports if "end" in r)
    extra = {} if payload is None else {"payload": payload}
    return {"workload": "process_to_task" if workload != "pipe" else "process_pipe_message",
            "system": SYSTEMS[workload], "value": n / (end - start), "unit": "tasks/s", "n": n,
            **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10x fewer tasks")
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds (median kept)")
    args = parser.parse_args()
    n = 20_000 if args.quick else 200_000
    rounds = [[one(w, n) for w in SYSTEMS] for _ in range(args.runs)]
    rows = {}
    for i, workload in enumerate(SYSTEMS):
        values = sorted(r[i]["value"] for r in rounds)
        rows[workload] = dict(rounds[0][i], value=round(statistics.median(values), 1),
                              runs=len(values), min=round(values[0], 1), max=round(values[-1], 1))
        print(json.dumps(rows[workload]), flush=True)
    for base in ("worker", "pipe"):
        print(json.dumps({"ratio": f"{SYSTEMS['process']} vs {SYSTEMS[base]}",
                          "value": round(rows["process"]["value"] / rows[base]["value"], 3)}))


if __name__ == "__main__":
    main()
