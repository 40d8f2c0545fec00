"""Baseline ("peer") measurements for the pyswtask dispatch benchmark.

Every workload dispatches the same task: ``echo(PAYLOAD)``, a module-level
function that returns its argument, so what is measured is pure dispatch cost
(pickling, IPC, wake-ups, result handling), not work.

Measured here:

* ``multiprocessing.Pool`` and ``concurrent.futures.ProcessPoolExecutor``:
  - ``async_throughput``: n fire-and-forget submissions with a completion
    callback; tasks/s from the first submit until the last callback ran.
  - ``co_roundtrip``: n sequential submit-and-wait calls; per-call latency
    (value = p50 in microseconds, plus p99 and mean).
  - ``batch_co_100``: submit 100, wait for all 100, repeat; tasks/s.
* ``socketpair`` ping-pong of a 100-byte message between two forked processes
  (``pingpong_100B``): the floor that any cross-process dispatch pays, with
  both processes on the same CPU, on different CPUs, or unpinned.

Each function returns a list of dicts
``{"workload", "system", "value", "unit", "n", ...extras}``.
Importing this module has no side effects; run it as a script to print one
JSON line per result (``--quick`` for ~10x smaller runs).
"""

import concurrent.futures
import math
import multiprocessing
import os
import socket
import threading
import time

PAYLOAD = {'name': 'demo', 'method': 'echo', 'params': [1, 'abc', 3.5]}

POOL = "multiprocessing.Pool"
EXECUTOR = "ProcessPoolExecutor"

# Enough calls to fork/start workers, fill caches and get past lazy imports,
# so the first timed sample is not paying for start-up.
_WARMUP = 500

_clock = time.perf_counter_ns


def echo(x):
    return x


def _pct(sorted_ns, q):
    """Nearest-rank percentile of an already sorted list, in microseconds."""
    i = min(len(sorted_ns) - 1, max(0, math.ceil(q / 100 * len(sorted_ns)) - 1))
    return sorted_ns[i] / 1000


def _latency(samples_ns, prefix=""):
    s = sorted(samples_ns)
    return {
        prefix + "p50_us": round(_pct(s, 50), 3),
        prefix + "p99_us": round(_pct(s, 99), 3),
        prefix + "mean_us": round(sum(s) / len(s) / 1000, 3),
    }


def _result(workload, system, value, unit, n, **extra):
    return {"workload": workload, "system": system, "value": round(value, 3),
            "unit": unit, "n": n, **extra}


class _Countdown:
    """Fires an Event when n completions have been seen.

    Locked because executor done-callbacks may run either in the executor's
    management thread or, for an already finished future, in the submitting
    thread.
    """

    def __init__(self, n):
        self.left = n
        self.lock = threading.Lock()
        self.event = threading.Event()
        self.t_end = None
        self.error = None

    def hit(self, _result=None):
        with self.lock:
            self.left -= 1
            if self.left:
                return
        # Stamped here, not after event.wait(), so the main thread's wake-up
        # latency is not counted.
        self.t_end = _clock()
        self.event.set()

    def fail(self, exc):
        self.error = exc
        self.event.set()

    def on_future(self, fut):
        exc = fut.exception()
        if exc is not None:
            self.fail(exc)
        else:
            self.hit()

    def wait(self, timeout):
        if not self.event.wait(timeout):
            raise TimeoutError(f"{self.left} completions still missing after {timeout}s")
        if self.error is not None:
            raise self.error


# --- generic drivers; `submit`/`call`/`run_batch` adapt a pool or executor ---

def _async_throughput(submit, n, system, workload="async_throughput", **extra):
    warm = _Countdown(_WARMUP)
    for _ in range(_WARMUP):
        submit(warm)
    warm.wait(60)

    done = _Countdown(n)
    t0 = _clock()
    for _ in range(n):
        submit(done)
    t_submitted = _clock()
    # Generous bound so a lost callback fails the run instead of hanging it.
    done.wait(120 + n / 1000)
    elapsed = done.t_end - t0
    return [_result(workload, system, n / (elapsed / 1e9), "tasks/s", n,
                    elapsed_s=round(elapsed / 1e9, 3),
                    submit_s=round((t_submitted - t0) / 1e9, 3), **extra)]


def _co_roundtrip(call, n, system, expect=PAYLOAD, **extra):
    for _ in range(_WARMUP):
        if call() != expect:
            raise RuntimeError(f"{system}: echo returned a different object")
    samples = [0] * n
    for i in range(n):
        t0 = _clock()
        call()
        samples[i] = _clock() - t0
    lat = _latency(samples)
    return [_result("co_roundtrip", system, lat["p50_us"], "us", n, **lat, **extra)]


def _batch(run_batch, n_batches, batch, system, **extra):
    for _ in range(max(1, _WARMUP // batch)):
        run_batch(batch)
    samples = [0] * n_batches
    t_start = _clock()
    for i in range(n_batches):
        t0 = _clock()
        run_batch(batch)
        samples[i] = _clock() - t0
    elapsed = _clock() - t_start
    n = n_batches * batch
    return [_result(f"batch_co_{batch}", system, n / (elapsed / 1e9), "tasks/s", n,
                    batches=n_batches, batch=batch, **_latency(samples, "batch_"), **extra)]


# --- multiprocessing.Pool ---

def pool_async(n=200_000, procs=2, payload=PAYLOAD, workload="async_throughput"):
    with multiprocessing.Pool(procs) as pool:
        def submit(cd):
            pool.apply_async(echo, (payload,), callback=cd.hit, error_callback=cd.fail)
        return _async_throughput(submit, n, POOL, workload, procs=procs)


def pool_co(n=20_000, procs=2, payload=PAYLOAD):
    with multiprocessing.Pool(procs) as pool:
        return _co_roundtrip(lambda: pool.apply(echo, (payload,)), n, POOL, payload, procs=procs)


def pool_batch(n_batches=1_000, batch=100, procs=2, payload=PAYLOAD):
    with multiprocessing.Pool(procs) as pool:
        def run_batch(k):
            for r in [pool.apply_async(echo, (payload,)) for _ in range(k)]:
                r.get()
        return _batch(run_batch, n_batches, batch, POOL, procs=procs)


# --- concurrent.futures.ProcessPoolExecutor ---

def executor_async(n=50_000, procs=2, payload=PAYLOAD, workload="async_throughput"):
    # Smaller default than the Pool: the executor manages ~11k tasks/s here.
    with concurrent.futures.ProcessPoolExecutor(max_workers=procs) as ex:
        def submit(cd):
            ex.submit(echo, payload).add_done_callback(cd.on_future)
        return _async_throughput(submit, n, EXECUTOR, workload, procs=procs)


def executor_co(n=20_000, procs=2, payload=PAYLOAD):
    with concurrent.futures.ProcessPoolExecutor(max_workers=procs) as ex:
        return _co_roundtrip(lambda: ex.submit(echo, payload).result(), n, EXECUTOR, payload,
                             procs=procs)


def executor_batch(n_batches=200, batch=100, procs=2, payload=PAYLOAD):
    with concurrent.futures.ProcessPoolExecutor(max_workers=procs) as ex:
        def run_batch(k):
            futs = [ex.submit(echo, payload) for _ in range(k)]
            _, pending = concurrent.futures.wait(futs)
            if pending:
                raise RuntimeError("concurrent.futures.wait returned with pending futures")
        return _batch(run_batch, n_batches, batch, EXECUTOR, procs=procs)


# --- socketpair ping-pong: the IPC floor ---

def _echo_child(sock, cpu, bufsize):
    """Runs in the forked child; never returns."""
    code = 1
    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        while True:
            msg = sock.recv(bufsize)
            if not msg:  # parent closed its end
                break
            sock.send(msg)
        code = 0
    finally:
        # _exit: the child must not run the parent's atexit/finally handlers.
        os._exit(code)


def socketpair_pingpong(n=20_000, same_cpu=None, size=100):
    allowed = sorted(os.sched_getaffinity(0))
    if same_cpu is None:
        suffix, parent_cpu, child_cpu = "unpinned", None, None
    elif same_cpu:
        suffix, parent_cpu, child_cpu = "same_cpu", allowed[0], allowed[0]
    else:
        suffix, parent_cpu, child_cpu = "cross_cpu", allowed[0], allowed[-1]
    system = f"socketpair:{suffix}"
    workload = f"pingpong_{size}B"
    if same_cpu is False and len(allowed) < 2:
        # value is None rather than NaN so the JSON line stays valid JSON.
        return [{"workload": workload, "system": system, "value": None, "unit": "us",
                 "n": 0, "skipped": True,
                 "note": f"cross_cpu needs 2 CPUs, only {len(allowed)} allowed"}]

    # SEQPACKET truncates a message larger than the receive buffer.
    bufsize = max(65536, size)
    original = os.sched_getaffinity(0)
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = None
    status = 0
    try:
        if parent_cpu is not None:
            os.sched_setaffinity(0, {parent_cpu})
        pid = os.fork()
        if pid == 0:
            parent_sock.close()
            _echo_child(child_sock, child_cpu, bufsize)
        child_sock.close()

        msg = b"x" * size
        send, recv = parent_sock.send, parent_sock.recv
        for _ in range(_WARMUP):
            send(msg)
            if recv(bufsize) != msg:
                raise RuntimeError("socketpair echo child returned a different message")
        samples = [0] * n
        for i in range(n):
            t0 = _clock()
            send(msg)
            reply = recv(bufsize)
            samples[i] = _clock() - t0
            if len(reply) != size:
                raise RuntimeError(f"short/empty reply ({len(reply)} bytes): child died?")
    finally:
        parent_sock.close()  # EOF tells the child to exit
        child_sock.close()
        if pid:
            status = os.waitpid(pid, 0)[1]
        os.sched_setaffinity(0, original)
    if status != 0:
        raise RuntimeError(f"echo child exited with wait status {status}")
    lat = _latency(samples)
    return [_result(workload, system, lat["p50_us"], "us", n, **lat,
                    parent_cpu=parent_cpu, child_cpu=child_cpu)]


def run_all(quick=False):
    d = 10 if quick else 1
    results = []
    for same_cpu in (True, False, None):
        results += socketpair_pingpong(n=20_000 // d, same_cpu=same_cpu)
    results += pool_async(n=200_000 // d)
    results += pool_co(n=20_000 // d)
    results += pool_batch(n_batches=1_000 // d)
    results += executor_async(n=50_000 // d)
    results += executor_co(n=20_000 // d)
    results += executor_batch(n_batches=200 // d)
    return results


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="~10x smaller n")
    args = ap.parse_args()
    for r in run_all(quick=args.quick):
        print(json.dumps(r), flush=True)
