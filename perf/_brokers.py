"""Broker peers for the queue workloads (command -> queue -> task): Celery, Dramatiq, Huey and
arq on a Redis server that the suite starts on 127.0.0.1 on a free port and stops.

Each measurement starts the broker's own worker program with 2 worker processes (the 2 task
workers of the pyswtask and Swoole runs; arq, one asyncio process per worker program, gets two
programs) and, beside it, a separate producer program, as perf/bench_queue.py does for pyswtask:

- queue_oneway: N tasks ``hit(1, "x" * k, 3.5)`` sent without a result; tasks/s from the first
  send until the workers have run all N (they count into SysV shared memory, as the pyswtask
  and Swoole task workers do);
- queue_reply: sequential calls of ``echo(1, "x" * k, 3.5)`` waiting for the result through the
  broker's Redis result store; p50/p99/mean in microseconds.

Settings are each library's defaults, except: results in Redis (Celery's backend, Dramatiq's
Results middleware, Huey's result store with ``notify_result=True``, its documented
low-latency option; arq keeps results in Redis anyway), JSON serialization for Celery and
Dramatiq (their default), pickle for Huey and arq (theirs), and arq's two polling delays (the
worker's queue poll and ``Job.result``'s, both 0.5 s by default) set to ``ARQ_POLL`` = 1 ms,
without which every arq round trip would take about half a second.

This module is also what the workers import: with ``BENCH_BROKER`` set it defines that
broker's app and tasks (``app`` for Celery, the global broker for Dramatiq, ``huey`` for Huey,
``WorkerSettings`` for arq). Its produce() is the producer program; ``Workers`` starts and
stops the worker programs for perf/bench_http.py and perf/bench_cluster.py too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
BROKERS = ("celery", "dramatiq", "huey", "arq")
SLOTS = 32
ARQ_POLL = 0.001

# ---- the counter the workers' hit() increments: one int64 slot per worker process ----

_counts: Any = None


def _count() -> None:
    global _counts
    if _counts is None:
        import sysv_ipc

        slot_dir = os.environ["BENCH_SLOT_DIR"]
        for slot in range(SLOTS):
            try:   # O_EXCL: each worker process claims a slot of its own
                os.close(os.open(os.path.join(slot_dir, str(slot)), os.O_CREAT | os.O_EXCL))
                break
            except FileExistsError:
                continue
        else:
            raise RuntimeError("no free counter slot")
        shm = sysv_ipc.SharedMemory(int(os.environ["BENCH_COUNT_KEY"]))
        _counts = (memoryview(shm).cast("q"), slot, shm)
    view, slot, _ = _counts
    view[slot] += 1


# ---- the apps, defined when a worker or the producer imports this module ----

BROKER = os.environ.get("BENCH_BROKER")
URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

if BROKER == "celery":
    from celery import Celery

    app = Celery("bench", broker=URL, backend=URL)
    app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
                    task_serializer="json", result_serializer="json", accept_content=["json"])

    @app.task(name="bench.hit", ignore_result=True)
    def hit(*params: Any) -> None:
        _count()

    @app.task(name="bench.echo")
    def echo(*params: Any) -> Any:
        return params

elif BROKER == "dramatiq":
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.results import Results
    from dramatiq.results.backends.redis import RedisBackend

    broker = RedisBroker(url=URL)
    broker.add_middleware(Results(backend=RedisBackend(url=URL)))
    dramatiq.set_broker(broker)

    @dramatiq.actor(queue_name="bench", max_retries=0)
    def hit(*params: Any) -> None:
        _count()

    @dramatiq.actor(queue_name="bench", max_retries=0, store_results=True)
    def echo(*params: Any) -> Any:
        return params

elif BROKER == "huey":
    from huey import RedisHuey

    huey = RedisHuey("bench", url=URL, notify_result=True)

    @huey.task()
    def hit(*params: Any) -> None:
        _count()

    @huey.task()
    def echo(*params: Any) -> Any:
        return params

elif BROKER == "arq":
    import asyncio

    from arq import create_pool
    from arq.connections import RedisSettings

    async def arq_hit(ctx: dict[str, Any], *params: Any) -> None:
        _count()

    async def arq_echo(ctx: dict[str, Any], *params: Any) -> Any:
        return params

    class WorkerSettings:
        functions = [arq_hit, arq_echo]
        redis_settings = RedisSettings.from_dsn(URL)
        poll_delay = ARQ_POLL
        max_jobs = 10       # arq's default: jobs run at once by one worker program
        handle_signals = True

    _arq_loop: Any = None
    _arq_pool: Any = None

    def _arq(coro: Any) -> Any:
        """Runs one call of arq's asyncio client on this producer's own loop."""
        global _arq_loop, _arq_pool
        if _arq_loop is None:
            _arq_loop = asyncio.new_event_loop()
            _arq_pool = _arq_loop.run_until_complete(create_pool(RedisSettings.from_dsn(URL)))
        return _arq_loop.run_until_complete(coro(_arq_pool))


def _send_oneway(params: list[Any]) -> None:
    if BROKER == "celery":
        hit.delay(*params)
    elif BROKER == "dramatiq":
        hit.send(*params)
    elif BROKER == "arq":
        _arq(lambda pool: pool.enqueue_job("arq_hit", *params))
    else:
        hit(*params)


def _send_many_oneway(params: list[Any], n: int) -> None:
    if BROKER == "arq":
        # One loop turn per task would time the loop's start-up, not arq: the enqueues go
        # out one after another on one running loop, as an asyncio producer sends them.
        async def send_all(pool: Any) -> None:
            for _ in range(n):
                await pool.enqueue_job("arq_hit", *params)
        _arq(send_all)
        return
    for _ in range(n):
        _send_oneway(params)


def _call(params: list[Any], timeout: float) -> Any:
    if BROKER == "celery":
        return echo.delay(*params).get(timeout=timeout)
    if BROKER == "dramatiq":
        return echo.send(*params).get_result(block=True, timeout=int(timeout * 1000))
    if BROKER == "arq":
        async def call(pool: Any) -> Any:
            job = await pool.enqueue_job("arq_echo", *params)
            return await job.result(timeout=timeout, poll_delay=ARQ_POLL)
        return _arq(call)
    return echo(*params).get(blocking=True, timeout=timeout)


def produce() -> None:
    """The separate program: warm-up calls (which also wait for the workers to come up), N
    one-way tasks until all have run, then the sequential round trips. One JSON line each."""
    import sysv_ipc

    n, n_co = int(os.environ["BENCH_N"]), int(os.environ["BENCH_N_CO"])
    params = [1, "x" * int(os.environ["BENCH_STRLEN"]), 3.5]
    counts = memoryview(sysv_ipc.SharedMemory(int(os.environ["BENCH_COUNT_KEY"]))).cast("q")
    if list(_call(params, 60.0)) != params:
        raise RuntimeError(f"{BROKER}: echo returned something else")
    for _ in range(20):
        _call(params, 10.0)
    before = sum(counts)
    t0 = time.perf_counter()
    _send_many_oneway(params, n)
    sent = time.perf_counter()
    deadline = time.monotonic() + 120 + n / 100
    while sum(counts) - before < n and time.monotonic() < deadline:
        time.sleep(0.0005)
    ran = sum(counts) - before
    t1 = time.perf_counter()
    print(json.dumps({"kind": "oneway", "n": n, "ran": ran, "elapsed_s": t1 - t0,
                      "send_s": sent - t0}), flush=True)
    clock = time.perf_counter_ns
    samples = []
    for _ in range(n_co):
        t = clock()
        _call(params, 10.0)
        samples.append(clock() - t)
    samples.sort()
    print(json.dumps({"kind": "reply", "n": n_co, "p50": samples[n_co // 2] / 1e3,
                      "p99": samples[int(n_co * 0.99)] / 1e3,
                      "mean": sum(samples) / n_co / 1e3}), flush=True)


# ---- the driver side, used by perf/run.py ----

ROOT = os.path.dirname(HERE)


def install_missing() -> None:
    """What --brokers needs and lacks is installed, saying so in one line each: redis-server
    and redis-benchmark through scripts/services (Debian's packages, as root), the libraries
    of the ``[brokers]`` extra through pip (its requirements alone, read from pyproject.toml,
    so that pyswtask itself is not rebuilt). A failure leaves the peers it would have brought
    to be skipped, in one line, as before."""
    import importlib

    if shutil.which("redis-server") is None or shutil.which("redis-benchmark") is None:
        print("brokers: installing redis-server and redis-tools (scripts/services)",
              file=sys.stderr, flush=True)
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "services")], timeout=900,
                       check=False)
    absent = [b for b in BROKERS if b not in available()]
    if absent:
        import tomllib

        with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
            wanted = tomllib.load(f)["project"]["optional-dependencies"]["brokers"]
        print(f"brokers: installing {', '.join(absent)} (pip install {' '.join(wanted)})",
              file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *wanted], timeout=1800,
                       check=False)
        importlib.invalidate_caches()


def missing() -> str | None:
    """Why the broker peers cannot run, or None."""
    if shutil.which("redis-server") is None:
        return ("redis-server is not installed (Debian: apt-get install -y redis-server); "
                "Celery, Dramatiq and Huey skipped")
    return None


def available() -> list[str]:
    """The broker libraries that import (pip install 'pyswtask[brokers]')."""
    import importlib.util

    names = {"celery": "celery", "dramatiq": "dramatiq", "huey": "huey", "arq": "arq"}
    return [b for b in BROKERS if importlib.util.find_spec(names[b]) is not None
            and importlib.util.find_spec("redis") is not None]


def version(name: str) -> str:
    from importlib.metadata import version as v

    return v(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, wait: float = 15.0) -> None:
    """Stops a process started with preexec_fn=os.setpgrp and everything it forked."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(wait)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


class RedisServer:
    """redis-server on 127.0.0.1 on a free port, no persistence, in a temporary directory;
    stopped (with its process group) by stop()."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="pyswtask-redis-")
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=os.setpgrp)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
        self.version = next((w.split("=")[1] for w in out.stdout.split() if w.startswith("v=")), "?")

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"FLUSHALL\r\n")
            s.recv(64)

    def stop(self) -> None:
        _stop_group(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def _worker_cmd(name: str, index: int = 0) -> list[str]:
    bindir = os.path.dirname(sys.executable)
    if name == "celery":
        # A node name of its own for each worker program (two nodes in the cluster rows).
        return [os.path.join(bindir, "celery"), "-A", "_brokers", "worker", "--concurrency", "2",
                "--hostname", f"bench{index}@%h",
                "--pool", "prefork", "--loglevel", "WARNING", "--without-gossip",
                "--without-mingle", "--without-heartbeat"]
    if name == "dramatiq":
        return [os.path.join(bindir, "dramatiq"), "_brokers", "--processes", "2", "--threads", "1",
                "--queues", "bench"]
    if name == "arq":
        return [os.path.join(bindir, "arq"), "_brokers.WorkerSettings"]
    return [os.path.join(bindir, "huey_consumer"), "_brokers.huey", "--workers", "2",
            "--worker-type", "process", "--quiet"]


def programs_per_node(name: str) -> int:
    """Worker programs that make up one node of 2 worker processes: arq's worker is a
    single asyncio process, the others fork 2."""
    return 2 if name == "arq" else 1


def broker_env(name: str, redis: RedisServer, **extra: str) -> dict[str, str]:
    """The environment of a worker or producer program of ``name`` on ``redis``."""
    return dict(os.environ, BENCH_BROKER=name, BENCH_REDIS_URL=redis.url,
                PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])),
                **extra)


class Workers:
    """The worker programs of one broker (``nodes`` nodes of 2 worker processes each), each
    in a process group of its own, their output in one log; stopped, groups and all, on exit."""

    def __init__(self, name: str, env: dict[str, str], nodes: int = 1) -> None:
        self.name = name
        self.log = tempfile.TemporaryFile("w+")
        self.procs: list[subprocess.Popen[Any]] = []
        try:
            for index in range(nodes * programs_per_node(name)):
                self.procs.append(subprocess.Popen(
                    _worker_cmd(name, index), env=env, cwd=HERE, stdin=subprocess.DEVNULL,
                    stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=os.setpgrp))
        except BaseException:
            self.stop()
            raise

    def tail(self, n: int = 1000) -> str:
        self.log.seek(0)
        return self.log.read()[-n:]

    def stop(self) -> None:
        for proc in self.procs:
            _stop_group(proc)
        self.procs = []
        self.log.close()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def run(name: str, redis: RedisServer, n: int, n_co: int, strlen: int, payload: int,
        timeout: float = 600.0, nodes: int = 1,
        workloads: tuple[str, str] = ("queue_oneway", "queue_reply")) -> list[dict[str, Any]]:
    """One round of both workloads for one broker: its workers (``nodes`` nodes of 2 worker
    processes) and the producer are started, measured and stopped; the counter segment is
    removed. ``workloads`` names the one-way and the reply rows."""
    import sysv_ipc

    redis.flush()
    count = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, mode=0o600, size=8 * SLOTS)  # zeroed
    slot_dir = tempfile.mkdtemp(prefix="pyswtask-slots-")
    env = broker_env(name, redis, BENCH_COUNT_KEY=str(count.key), BENCH_SLOT_DIR=slot_dir,
                     BENCH_N=str(n), BENCH_N_CO=str(n_co), BENCH_STRLEN=str(strlen))
    workers = Workers(name, env, nodes)
    try:
        # Imported, not run as __main__, so that the tasks' names are the workers'.
        producer = subprocess.Popen([sys.executable, "-c", "import _brokers; _brokers.produce()"],
                                    env=env, cwd=HERE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, preexec_fn=os.setpgrp)
        try:
            out, err = producer.communicate(timeout=timeout)
        finally:
            _stop_group(producer, signal.SIGKILL, 5)
        if producer.returncode != 0:
            raise RuntimeError(f"{name}: the producer failed: {err.strip()[-1000:]}\n"
                               f"worker log: {workers.tail()}")
    finally:
        workers.stop()
        count.detach()
        count.remove()
        shutil.rmtree(slot_dir, ignore_errors=True)
    rows = {r["kind"]: r for r in map(json.loads, out.splitlines())}
    one, reply = rows["oneway"], rows["reply"]
    if one["ran"] != n:
        raise RuntimeError(f"{name}: {n - one['ran']} of {n} tasks did not run")
    extra = {"payload": payload, "version": version(name), "worker_processes": 2 * nodes}
    return [
        {"workload": workloads[0], "system": name, "value": round(n / one["elapsed_s"], 3),
         "unit": "tasks/s", "n": n, "elapsed_s": round(one["elapsed_s"], 3),
         "send_s": round(one["send_s"], 3), **extra},
        {"workload": workloads[1], "system": name, "value": round(reply["p50"], 3), "unit": "us",
         "n": n_co, "p50_us": round(reply["p50"], 3), "p99_us": round(reply["p99"], 3),
         "mean_us": round(reply["mean"], 3), **extra},
    ]

