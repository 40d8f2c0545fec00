"""Cluster benchmark: tasks shared through Redis by two nodes, against Celery, Dramatiq, Huey
and arq on the same Redis in the same run, with Redis's own floor beside them.

    python perf/bench_cluster.py [--quick] [--runs N]

Every system gets two nodes of 2 worker processes each on one Redis (perf/_brokers.py starts
it on 127.0.0.1 on a free port, and stops it): pyswtask two servers with 2 task workers each,
Celery, Dramatiq and Huey two worker programs of 2 processes, arq four worker programs (each
one asyncio process). A separate program delivers:

  cluster_async      N tasks ``hit(1, "x" * k, 3.5)`` without waiting: tasks/s from the first
                     send until the workers have run all N (they count in shared memory)
  cluster_co         sequential calls of ``echo`` waiting for the result: p50 (us), p99 beside
  redis_xadd         the floor: ``redis-benchmark`` running ``XADD ... MAXLEN ~`` of a 103-byte
                     field, 50 clients (ops/s), and one client's p50 (us)
  redis_xreadgroup   the floor: redis-py reading one message per ``XREADGROUP COUNT 1`` and
                     acknowledging it (``XACK``), 100 pairs per pipeline (msgs/s)
  redis_roundtrip    the floor of a CO call through Redis: the hops of cluster_co with nothing
                     but hiredis around them, two processes on raw sockets; one appends a task
                     and reads a reply stream in one write (``XADD`` + ``XREAD BLOCK``), the
                     other takes it (``XREADGROUP BLOCK``) and answers (``XADD`` + ``XACK``,
                     replies skipped, in one write with its next ``XREADGROUP``):
                     p50 (us), p99 beside. No client can wait less on this machine, so the
                     targets row also gives this floor over the best peer's CO p50

The pyswtask rows need cluster delivery (``Task.configure(cluster=...)``, ``@task(queue=...)``);
on a pyswtask without it, ``pyswtask_cluster`` says so in one line and returns no rows, and
the peers and the floor still run. Prints one JSON line per (workload, system), the medians of
the rounds, then the pyswtask/peer ratios (> 1 favours pyswtask) and the issue's targets
(throughput at least 5x the best peer, CO p50 at most 0.2x the best peer's). Needs
redis-server and redis-benchmark (scripts/services) and the ``[brokers]`` extra; ``--brokers``
of perf/run.py installs what is missing, and so does this script.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _brokers  # noqa: E402
import _summary  # noqa: E402
import bench_dispatch  # noqa: E402

TASK_BYTES = 103
WORKLOADS = ("cluster_async", "cluster_co", "redis_xadd", "redis_xreadgroup", "redis_roundtrip")
NOT_AVAILABLE = ("pyswtask cluster rows: not available: needs cluster delivery "
                 "(Task.configure(cluster=...), @task(queue=...)), which this pyswtask lacks")
_said: set[str] = set()


def cluster_delivery() -> bool:
    """Whether this pyswtask delivers to a cluster: ``Task.configure`` takes ``cluster``."""
    from pyswtask import Task

    try:
        return "cluster" in inspect.signature(Task.configure).parameters
    except (TypeError, ValueError):
        return False


# The tasks, declared alike in the nodes and in the delivering program (the program learns
# the queue from the declaration). hit() counts into the slots perf/_brokers.py set up.
TASKS = """
import os, sys
sys.path.insert(0, os.environ["BENCH_HERE"])
import _brokers
from pyswtask import Server, Task, task

@task(queue="bench")
class Bench:
    def hit(self, *params):
        _brokers._count()

    def echo(self, *params):
        return list(params)
"""
NODE = TASKS + """
Server(worker_num=1, task_worker_num=2, cluster=os.environ["BENCH_REDIS_URL"],
       node=sys.argv[1]).start()
"""
PROGRAM = TASKS + """
import json, time
import sysv_ipc

n, n_co = int(os.environ["BENCH_N"]), int(os.environ["BENCH_N_CO"])
params = [1, "x" * int(os.environ["BENCH_STRLEN"]), 3.5]
counts = memoryview(sysv_ipc.SharedMemory(int(os.environ["BENCH_COUNT_KEY"]))).cast("q")
Task.configure(cluster=os.environ["BENCH_REDIS_URL"])
if list(Task.deliver("Bench", "echo", params, Task.TYPE_CO, 60)) != params:
    raise RuntimeError("echo returned something else")
for _ in range(20):
    Task.deliver("Bench", "echo", params, Task.TYPE_CO, 10)
before = sum(counts)
t0 = time.perf_counter()
for _ in range(n):
    Task.deliver("Bench", "hit", params, Task.TYPE_ASYNC)
if not Task.flush(120):
    raise RuntimeError("ASYNC deliveries not written within 120 s")
sent = time.perf_counter()
deadline = time.monotonic() + 120 + n / 100
while sum(counts) - before < n and time.monotonic() < deadline:
    time.sleep(0.0005)
ran = sum(counts) - before
t1 = time.perf_counter()
print(json.dumps({"kind": "oneway", "n": n, "ran": ran, "elapsed_s": t1 - t0,
                  "send_s": sent - t0}), flush=True)
samples = []
for _ in range(n_co):
    t = time.perf_counter_ns()
    Task.deliver("Bench", "echo", params, Task.TYPE_CO, 10)
    samples.append(time.perf_counter_ns() - t)
samples.sort()
print(json.dumps({"kind": "reply", "n": n_co, "p50": samples[n_co // 2] / 1e3,
                  "p99": samples[int(n_co * 0.99)] / 1e3,
                  "mean": sum(samples) / n_co / 1e3}), flush=True)
"""


def pyswtask_cluster(redis: _brokers.RedisServer, n: int, n_co: int) -> list[dict[str, Any]]:
    """pyswtask's cluster_async and cluster_co rows: two servers (nodes) with 2 task workers
    each serving the queue of a ``@task(queue="bench")`` class, and a separate program that
    delivers with ``Task.configure(cluster=redis.url)``, measured as the peers are. Without
    cluster delivery in this pyswtask, one line says so and no row is returned."""
    if not cluster_delivery():
        if "pyswtask" not in _said:
            _said.add("pyswtask")
            print(NOT_AVAILABLE, file=sys.stderr, flush=True)
        return []
    import signal
    import tempfile

    import sysv_ipc

    redis.flush()
    count = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, mode=0o600, size=8 * _brokers.SLOTS)
    tmp = tempfile.mkdtemp(prefix="pyswtask-cluster-")
    env = {k: v for k, v in os.environ.items() if k != "BENCH_BROKER"}
    env.update(BENCH_HERE=HERE, BENCH_REDIS_URL=redis.url, BENCH_COUNT_KEY=str(count.key),
               BENCH_SLOT_DIR=tmp, BENCH_N=str(n), BENCH_N_CO=str(n_co),
               BENCH_STRLEN=str(bench_dispatch.payload_strlen(TASK_BYTES)))
    for name, text in (("node.py", NODE), ("program.py", PROGRAM)):
        with open(os.path.join(tmp, name), "w") as f:
            f.write(text)
    log = open(os.path.join(tmp, "nodes.log"), "w+")
    nodes: list[subprocess.Popen[Any]] = []
    try:
        import redis as redis_py

        for name in ("bench-a", "bench-b"):
            nodes.append(subprocess.Popen(
                [sys.executable, os.path.join(tmp, "node.py"), name], env=env, cwd=tmp,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=os.setpgrp))
        client = redis_py.Redis.from_url(redis.url)
        deadline = time.monotonic() + 60
        while not all(client.exists(f"pyswtask:node:{m}") for m in ("bench-a", "bench-b")):
            if time.monotonic() > deadline or any(p.poll() is not None for p in nodes):
                log.seek(0)
                raise RuntimeError(f"pyswtask nodes did not come up: {log.read()[-1000:]}")
            time.sleep(0.05)
        client.close()
        program = subprocess.Popen([sys.executable, os.path.join(tmp, "program.py")], env=env,
                                   cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, preexec_fn=os.setpgrp)
        try:
            out, err = program.communicate(timeout=600)
        finally:
            _brokers._stop_group(program, signal.SIGKILL, 5)
        if program.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"pyswtask: the program failed: {err.strip()[-1000:]}\n"
                               f"nodes: {log.read()[-1000:]}")
    finally:
        for proc in nodes:
            _brokers._stop_group(proc)
        log.close()
        count.detach()
        count.remove()
        shutil.rmtree(tmp, ignore_errors=True)
    rows = {r["kind"]: r for r in map(json.loads, out.splitlines())}
    one, reply = rows["oneway"], rows["reply"]
    if one["ran"] != n:
        raise RuntimeError(f"pyswtask: {n - one['ran']} of {n} tasks did not run")
    extra = {"payload": TASK_BYTES, "task_workers": 4, "nodes": 2, "ours": True}
    return [
        {"workload": "cluster_async", "system": "pyswtask", "value": round(n / one["elapsed_s"], 3),
         "unit": "tasks/s", "n": n, "elapsed_s": round(one["elapsed_s"], 3),
         "send_s": round(one["send_s"], 3), **extra},
        {"workload": "cluster_co", "system": "pyswtask", "value": round(reply["p50"], 3),
         "unit": "us", "n": n_co, "p50_us": round(reply["p50"], 3),
         "p99_us": round(reply["p99"], 3), "mean_us": round(reply["mean"], 3), **extra},
    ]


def peer_cluster(name: str, redis: _brokers.RedisServer, n: int, n_co: int
                 ) -> list[dict[str, Any]]:
    """One broker's cluster_async and cluster_co rows: two nodes of its workers."""
    strlen = bench_dispatch.payload_strlen(TASK_BYTES)
    return _brokers.run(name, redis, n, n_co, strlen, TASK_BYTES, nodes=2,
                        workloads=("cluster_async", "cluster_co"))


def redis_floor(redis: _brokers.RedisServer, n: int) -> list[dict[str, Any]]:
    """Redis's own rates on this machine: XADD by redis-benchmark, XREADGROUP + XACK by a
    redis-py pipeline loop."""
    rows = []
    binary = shutil.which("redis-benchmark")
    if binary is None:
        if "redis-benchmark" not in _said:
            _said.add("redis-benchmark")
            print("redis-benchmark: not installed (scripts/services; Debian: redis-tools); the "
                  "XADD floor skipped", file=sys.stderr, flush=True)
    else:
        field = "x" * (TASK_BYTES - 3)
        many = _redis_benchmark(binary, redis, n, 50, field)
        one = _redis_benchmark(binary, redis, max(1000, n // 5), 1, field)
        rows.append({"workload": "redis_xadd", "system": "redis-benchmark",
                     "value": many["rps"], "unit": "ops/s", "n": n, "clients": 50,
                     "p50_us": round(one["p50_latency_ms"] * 1e3, 3),
                     "one_client_ops_s": one["rps"], "redis": redis.version})
    rows.append(_xreadgroup(redis, n))
    rows.append(_roundtrip(redis, max(300, n // 100)))
    return rows


def _redis_benchmark(binary: str, redis: _brokers.RedisServer, n: int, clients: int,
                     field: str) -> dict[str, float]:
    redis.flush()
    out = subprocess.run([binary, "-h", "127.0.0.1", "-p", str(redis.port), "-n", str(n),
                          "-c", str(clients), "--csv", "XADD", "floor", "MAXLEN", "~", "100000",
                          "*", "t", field], capture_output=True, text=True, timeout=300)
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    if out.returncode != 0 or not rows:
        raise RuntimeError(f"redis-benchmark failed: {out.stderr.strip()[-500:]}")
    return {k: float(v) for k, v in rows[-1].items() if k != "test"}


def _xreadgroup(redis: _brokers.RedisServer, n: int, per_pipeline: int = 100
                ) -> dict[str, Any]:
    import redis as redis_py

    redis.flush()
    client = redis_py.Redis.from_url(redis.url)
    try:
        field = b"x" * (TASK_BYTES - 3)
        pipe = client.pipeline(transaction=False)
        for i in range(n):
            pipe.xadd("floor", {"t": field})
            if i % 1000 == 999:
                pipe.execute()
        pipe.execute()
        client.xgroup_create("floor", "g", id="0")
        read = 0
        t0 = time.perf_counter()
        while read < n:
            pipe = client.pipeline(transaction=False)
            for _ in range(min(per_pipeline, n - read)):
                pipe.xreadgroup("g", "c", {"floor": ">"}, count=1)
            replies = pipe.execute()
            ids = [msg[0] for reply in replies for _stream, msgs in reply for msg in msgs]
            if not ids:
                raise RuntimeError("XREADGROUP returned nothing before the stream's end")
            client.xack("floor", "g", *ids)
            read += len(ids)
        elapsed = time.perf_counter() - t0
    finally:
        client.close()
    return {"workload": "redis_xreadgroup", "system": "redis-py", "value": round(n / elapsed, 3),
            "unit": "msgs/s", "n": n, "per_pipeline": per_pipeline,
            "redis_py": _brokers.version("redis"), "redis": redis.version}


class _Raw:
    """A raw socket to Redis with hiredis packing and parsing: nothing between the hops and the
    wire."""

    def __init__(self, port: int) -> None:
        import hiredis

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pack = hiredis.pack_command
        self.reader = hiredis.Reader()

    def replies(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Sends the commands in one write; their replies, in order (none for a command after
        CLIENT REPLY SKIP, nor for that one)."""
        self.sock.sendall(b"".join(self.pack(command) for command in commands))
        skipped = sum(2 for command in commands if command[:3] == ("CLIENT", "REPLY", "SKIP"))
        got: list[Any] = []
        while len(got) < len(commands) - skipped:
            reply = self.reader.gets()
            if reply is False:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise RuntimeError("Redis closed the connection")
                self.reader.feed(chunk)
            elif isinstance(reply, Exception):
                raise RuntimeError(f"Redis: {reply}")
            else:
                got.append(reply)
        return got


def _roundtrip(redis: _brokers.RedisServer, n: int) -> dict[str, Any]:
    """The redis_roundtrip floor: n sequential calls through two streams, p50/p99 (us)."""
    redis.flush()
    _Raw(redis.port).replies(("XGROUP", "CREATE", "rt", "g", "$", "MKSTREAM"))
    pid = os.fork()
    if pid == 0:        # the consumer: takes each task, answers it, until "stop"
        code = 1
        try:
            conn = _Raw(redis.port)
            read = ("XREADGROUP", "GROUP", "g", "c", "BLOCK", "5000", "COUNT", "1",
                    "STREAMS", "rt", ">")
            answer: tuple[tuple[Any, ...], ...] = ()
            while True:
                # The answer goes in one write with the next read, its replies skipped: one
                # wake-up of Redis and none of the consumer per task (as pyswtask's consumer).
                reply = conn.replies(*answer, read)[-1]
                answer = ()
                if reply is None:
                    continue
                entry_id, fields = reply[0][1][0]
                if fields[1] == b"stop":
                    code = 0
                    break
                answer = (("CLIENT", "REPLY", "SKIP"), ("XADD", "rtr", "*", "r", fields[1]),
                          ("CLIENT", "REPLY", "SKIP"), ("XACK", "rt", "g", entry_id))
        finally:
            os._exit(code)
    samples = []
    try:
        conn = _Raw(redis.port)
        body, last = b"x" * (TASK_BYTES - 3), b"0-0"
        for i in range(n + n // 10):
            t = time.perf_counter_ns()
            _added, read = conn.replies(
                ("XADD", "rt", "*", "t", body),
                ("XREAD", "BLOCK", "10000", "COUNT", "1", "STREAMS", "rtr", last))
            if read is None:
                raise RuntimeError("redis_roundtrip: no answer within 10 s")
            last = read[0][1][0][0]
            if i >= n // 10:      # the first tenth warms up
                samples.append(time.perf_counter_ns() - t)
        conn.replies(("XADD", "rt", "*", "t", "stop"))
    finally:
        deadline = time.monotonic() + 10
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                break
            time.sleep(0.01)
    samples.sort()
    return {"workload": "redis_roundtrip", "system": "hiredis", "value": round(
        samples[n // 2] / 1e3, 3), "unit": "us", "n": n,
        "p50_us": round(samples[n // 2] / 1e3, 3),
        "p99_us": round(samples[int(n * 0.99)] / 1e3, 3), "redis": redis.version}


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets against the best peer of each workload, where pyswtask has rows."""
    out = []
    for workload, better, bound in (("cluster_async", "higher", 5.0), ("cluster_co", "lower", 0.2)):
        ours = next((r for r in rows if r["workload"] == workload and r.get("ours")), None)
        peers = [r for r in rows if r["workload"] == workload and not r.get("ours")]
        if not peers:
            continue
        best = (max if better == "higher" else min)(peers, key=lambda r: r["median"])
        row: dict[str, Any] = {"target": workload, "best_peer": best["system"],
                               "best_peer_value": best["median"], "unit": best["unit"]}
        floor = next((r for r in rows if r["workload"] == "redis_roundtrip"), None)
        if workload == "cluster_co" and floor is not None:
            # Where the target lies against what Redis itself allows: a ratio below this
            # floor's is out of reach of any client on this machine.
            row.update(floor_us=floor["median"],
                       floor_over_best_peer=round(floor["median"] / best["median"], 3))
        if ours is None:
            row["pyswtask"] = "not available: needs cluster delivery"
        else:
            ratio = ours["median"] / best["median"]
            row.update(pyswtask=ours["median"], ratio=round(ratio, 3),
                       wanted=f"{'>=' if better == 'higher' else '<='} {bound}",
                       met=ratio >= bound if better == "higher" else ratio <= bound)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10x fewer tasks, 2 rounds")
    parser.add_argument("--runs", type=int, help="interleaved rounds (default 3)")
    args = parser.parse_args()
    _brokers.install_missing()
    why = _brokers.missing()
    if why is not None:
        print(f"brokers: {why}", file=sys.stderr)
        return
    q = 10 if args.quick else 1
    runs = args.runs or (2 if args.quick else 3)
    n, n_co, n_floor = 3000 // q, 300 // q, 100_000 // q
    redis = _brokers.RedisServer()
    runners: list[tuple[str, Any]] = [("pyswtask", lambda: pyswtask_cluster(redis, n, n_co))]
    runners += [(name, lambda name=name: peer_cluster(name, redis, n, n_co))
                for name in _brokers.available()]
    runners.append(("redis", lambda: redis_floor(redis, n_floor)))
    rounds: list[list[dict[str, Any]]] = [[] for _ in range(runs)]
    try:
        for i in range(runs):
            for label, runner in (runners if i % 2 == 0 else runners[::-1]):
                rows = runner()
                rounds[i].extend(rows)
                for r in rows:
                    print(f"[round {i + 1}/{runs}] {label} {r['workload']}: {r['value']:,.1f} "
                          f"{r['unit']}", file=sys.stderr, flush=True)
    finally:
        redis.stop()
    rows = _summary.medians(rounds)
    for r in rows + _summary.ratios(rounds, rows) + targets(rows):
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
