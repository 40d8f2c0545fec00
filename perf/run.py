"""The side-by-side benchmark suite: pyswtask against Swoole and the Python peers.

    python perf/run.py [--quick] [--only REGEX] [--runs N] [--brokers] [--out PATH]

Every workload runs for pyswtask and for each peer that is available, interleaved in the same
run: round 1 runs pyswtask, then each peer, workload by workload; round 2 the same in reverse
order; and so on (A B A B ..., so that the drift of a shared machine cancels). Then one JSON
line per (workload, system) on stdout: the median of the rounds with min, max, runs and unit;
then one line per pyswtask/peer ratio (the median of the ratios taken within each round; > 1
favours pyswtask). Everything, with a first line describing the machine and the versions,
goes to a new file in perf/results/local/, which git ignores (or to --out); ``python
perf/report.py --input FILE`` turns it into a report. perf/results/latest.jsonl is the committed
full run, behind perf/RESULTS.md and perf/results.png: only ``--out perf/results/latest.jsonl``
replaces it.

Workloads (2 workers + 2 task workers on every side, a task that returns its input, params
[1, "x" * k, 3.5] with the packed task 103 bytes unless the workload names a size):

  async_throughput:SIZE   ASYNC deliver -> finish, 103B 1KiB 8KiB 64KiB 1MiB (tasks/s); from 8 KiB
                          up also swoole_tmpfs: Swoole with task_tmpdir on a tmpfs (/dev/shm)
  co_roundtrip            sequential CO calls from worker 0, p50 (us); Swoole taskCo and taskwait
  batch_co_100            100 tasks waited on together, repeated (tasks/s)
  process_to_task         user process -> worker -> task worker (tasks/s); process_pipe_message:
                          the pipe hop alone
  queue_oneway            a separate program -> message queue -> task (tasks/s); queue_reply:
                          the same with a reply, p50 (us)
  table_set/get/incr      shared-memory table operations from each one's language (ops/s)
  envelope_pack/unpack    the task envelope against raw msgpack (ops/s)
  cron_jitter             20 every-second rules; p99 of start - due (ms), missed and duplicated
  http_hello, http_task   wrk -t2 -c64 against the workers' HTTP server: hello world, and one
                          task echo per request (req/s, p50/p99 ms); plain uvicorn (with a
                          ProcessPoolExecutor for the task) and Swoole's HTTP server beside it;
                          with --brokers also uvicorn + Celery (result.get() in a thread)
  cluster_async, cluster_co   (--brokers) two nodes on one Redis, a separate program
                          delivering: tasks/s until all ran, CO p50 (us); Celery, Dramatiq,
                          Huey, arq; redis_xadd, redis_xreadgroup, redis_roundtrip:
                          Redis's own floor

Peers: Swoole (perf/swoole/*.php, when php has the swoole extension), multiprocessing.Pool and
ProcessPoolExecutor, APScheduler 3 and a croniter loop for cron, uvicorn for HTTP (with wrk,
Debian's package; without it the http group is skipped in one line); with --brokers, Celery,
Dramatiq, Huey and arq on a Redis server the suite starts on 127.0.0.1 and stops (--brokers
first installs what it lacks: redis-server through scripts/services, the libraries of the
[brokers] extra through pip). A missing peer is named in one line on stderr and the rest runs.
Every server and process a benchmark starts is stopped, and every SysV queue and segment it
creates removed, before the next one starts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _brokers  # noqa: E402
import _peers  # noqa: E402
import _summary  # noqa: E402
import _swoole  # noqa: E402
import bench_cluster  # noqa: E402
import bench_cron  # noqa: E402
import bench_dispatch  # noqa: E402
import bench_envelope  # noqa: E402
import bench_http  # noqa: E402
import bench_process  # noqa: E402
import bench_queue  # noqa: E402
import bench_table  # noqa: E402

from pyswtask.settings import DEFAULTS  # noqa: E402

# Runs go here unless --out names a file: trying the suite must not replace the committed run.
LOCAL_DIR = os.path.join(HERE, "results", "local")
TASK_BYTES = 103          # the packed task of every workload that does not name a size
# (envelope bytes, tasks, in flight per worker) for async_throughput; the peers run fewer.
PAYLOADS = ((103, 200_000, 1000), (1024, 200_000, 1000), (8192, 40_000, 1000),
            (65536, 10_000, 1000), (1 << 20, 1_000, 100))
CRON_RULES = 20
# From this task size up Swoole passes the task through a temporary file (its task_tmpdir);
# async_throughput then also runs Swoole with task_tmpdir on a tmpfs ("swoole_tmpfs").
SWOOLE_TMPFILE_BYTES = 8192

Runner = Callable[[], list[dict[str, Any]]]


@dataclass
class Group:
    """Workloads measured together: each runner returns the rows of one system for one round."""
    name: str
    workloads: tuple[str, ...]
    runners: list[tuple[str, Runner]] = field(default_factory=list)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ours(rows: list[dict[str, Any]] | dict[str, Any]) -> list[dict[str, Any]]:
    """Marks pyswtask's rows as the ones the peers are compared with."""
    rows = [rows] if isinstance(rows, dict) else rows
    return [dict(r, ours=r.get("ours", True)) for r in rows]


def renamed(rows: list[dict[str, Any]], workload: str | None = None,
            system: str | None = None) -> list[dict[str, Any]]:
    return [dict(r, workload=workload or r["workload"], system=system or r["system"]) for r in rows]


def swoole(script: str, *args: Any, names: dict[str, tuple[str, str]] | None = None,
           timeout: float = 300.0) -> list[dict[str, Any]]:
    rows = _swoole.renamed(_swoole.run(script, *map(str, args), timeout=timeout), names or {})
    for r in rows:
        if r["unit"] == "us":
            r.setdefault("p50_us", r["value"])
            r.setdefault("p99_us", r.get("p99"))
            r.setdefault("mean_us", r.get("mean"))
    return rows


def peer_payload(size: int) -> dict[str, Any]:
    """What the Pool and the executor send: the call's name, method and the same params."""
    return {"name": "demo", "method": "echo", "params": bench_dispatch.payload_params(size)}


def cron_row(row: dict[str, Any] | None, is_ours: bool) -> list[dict[str, Any]]:
    if row is None:
        return []
    row = dict(row)
    row["records"] = row.pop("runs")    # the runs of the rules seen, not the suite's rounds
    return [dict(row, ours=is_ours, rules=CRON_RULES)]


def build(args: argparse.Namespace, has_swoole: bool, brokers: list[str],
          redis: Any) -> list[Group]:
    q = 10 if args.quick else 1
    groups: list[Group] = []

    for size, n, inflight in PAYLOADS:
        n = max(n // q, 200)
        label = bench_dispatch.payload_label(size)
        workload = f"async_throughput:{label}"
        g = Group(workload, (workload,))
        g.runners.append(("pyswtask", lambda n=n, s=size, i=inflight, w=workload: ours(
            bench_dispatch.pyswtask_async(n, payload=s, inflight=i, workload=w))))
        if has_swoole:
            g.runners.append(("swoole", lambda n=n, s=size, i=inflight, w=workload: swoole(
                "async_throughput.php", "--n", n, "--payload", s, "--inflight", i,
                names={"async_throughput": (w, "swoole")})))
            # Bodies this large go through a temporary file in Swoole's task_tmpdir (/tmp by
            # default): also with it on a tmpfs, Swoole's best configuration for them.
            tmpfs = _swoole.tmpfs_dir() if size >= SWOOLE_TMPFILE_BYTES else None
            if tmpfs is not None:
                g.runners.append(("swoole_tmpfs", lambda n=n, s=size, i=inflight, w=workload,
                                  d=tmpfs: swoole(
                    "async_throughput.php", "--n", n, "--payload", s, "--inflight", i,
                    "--task-tmpdir", d, names={"async_throughput": (w, "swoole_tmpfs")})))
        g.runners.append(("Pool", lambda n=n, s=size, w=workload: _peers.pool_async(
            max(n // 5, 100), payload=peer_payload(s), workload=w)))
        g.runners.append(("ProcessPoolExecutor", lambda n=n, s=size, w=workload: _peers.executor_async(
            max(n // 10, 100), payload=peer_payload(s), workload=w)))
        groups.append(g)

    n_co = 20_000 // q
    g = Group("co_roundtrip", ("co_roundtrip",))
    g.runners.append(("pyswtask", lambda: ours(bench_dispatch.pyswtask_co(
        n_co, "", args.spin, payload=TASK_BYTES, workload="co_roundtrip"))))
    if has_swoole:
        g.runners.append(("swoole", lambda: swoole(
            "co_roundtrip.php", "--n", n_co, "--payload", TASK_BYTES,
            names={"co_roundtrip_taskwait": ("co_roundtrip", "swoole taskwait"),
                   "co_roundtrip_taskco": ("co_roundtrip", "swoole taskCo")})))
    g.runners.append(("Pool", lambda: renamed(_peers.pool_co(
        n_co // 4, payload=peer_payload(TASK_BYTES)), "co_roundtrip")))
    g.runners.append(("ProcessPoolExecutor", lambda: renamed(_peers.executor_co(
        n_co // 4, payload=peer_payload(TASK_BYTES)), "co_roundtrip")))
    g.runners.append(("floor", lambda: renamed(_peers.socketpair_pingpong(
        n_co, same_cpu=None, size=TASK_BYTES + 20), "co_roundtrip",
        "raw SEQPACKET ping-pong (floor)")))
    groups.append(g)

    n_batch = 100_000 // q
    g = Group("batch_co_100", ("batch_co_100",))
    g.runners.append(("pyswtask", lambda: ours(bench_dispatch.pyswtask_batch(n_batch, TASK_BYTES))))
    if has_swoole:
        g.runners.append(("swoole", lambda: swoole(
            "batch_co_100.php", "--batches", n_batch // 100, "--payload", TASK_BYTES,
            names={"batch_co_100": ("batch_co_100", "swoole taskWaitMulti"),
                   "batch_taskco_100": ("batch_co_100", "swoole taskCo")})))
    g.runners.append(("Pool", lambda: _peers.pool_batch(
        n_batch // 100 // 4, payload=peer_payload(TASK_BYTES))))
    g.runners.append(("ProcessPoolExecutor", lambda: _peers.executor_batch(
        n_batch // 100 // 10, payload=peer_payload(TASK_BYTES))))
    groups.append(g)

    n_proc = 200_000 // q
    g = Group("process_to_task", ("process_to_task", "process_pipe_message"))
    g.runners.append(("pyswtask", lambda: ours(
        [bench_process.one("process", n_proc, TASK_BYTES), bench_process.one("pipe", n_proc, TASK_BYTES)])))
    if has_swoole:
        g.runners.append(("swoole", lambda: swoole(
            "process_to_task.php", "--n", n_proc, "--payload", TASK_BYTES)
            + swoole("process_to_task.php", "--n", n_proc, "--payload", TASK_BYTES, "--pipe-only")))
    groups.append(g)

    n_q, n_qco = 200_000 // q, 20_000 // q
    g = Group("queue", ("queue_oneway", "queue_reply"))
    g.runners.append(("pyswtask", lambda: ours(bench_queue.pyswtask_queue(n_q, n_qco, 3, TASK_BYTES))))
    if has_swoole:
        g.runners.append(("swoole", lambda: bench_queue.swoole_queue(n_q, n_qco, TASK_BYTES)))
    strlen = bench_dispatch.payload_strlen(TASK_BYTES)
    n_b, n_bco = 3000 // q, 300 // q
    for name in brokers:
        g.runners.append((name, lambda name=name: _brokers.run(
            name, redis, n_b, n_bco, strlen, TASK_BYTES)))
    groups.append(g)

    ops = 1_000_000 // q
    g = Group("table", ("table_set", "table_get", "table_incr"))
    g.runners.append(("pyswtask", lambda: bench_table.pyswtask_table(ops)))
    if has_swoole:
        g.runners.append(("swoole", lambda: bench_table.swoole_table(ops)))
    groups.append(g)

    g = Group("envelope", ("envelope_pack", "envelope_unpack"))
    g.runners.append(("pyswtask", lambda: bench_envelope.pyswtask_envelope(ops, TASK_BYTES)))
    g.runners.append(("msgpack", lambda: bench_envelope.msgpack_envelope(ops, TASK_BYTES)))
    groups.append(g)

    secs = 10.0 if args.quick else 30.0
    g = Group("cron_jitter", ("cron_jitter",))
    g.runners.append(("pyswtask", lambda: cron_row(
        bench_cron.bench_pyswtask(secs, CRON_RULES, load=False), True)))
    g.runners.append(("APScheduler", lambda: cron_row(bench_cron.bench_apscheduler(secs, CRON_RULES), False)))
    g.runners.append(("croniter", lambda: cron_row(bench_cron.bench_croniter_loop(secs, CRON_RULES), False)))
    if not args.quick:
        g.runners.append(("pyswtask load", lambda: cron_row(
            bench_cron.bench_pyswtask(secs, CRON_RULES, load=True), False)))
    groups.append(g)

    http_secs = 3.0 if args.quick else 10.0
    g = Group("http", ("http_hello", "http_task"))
    if bench_http.wrk_path() is not None:       # else it says so in one line
        g.runners.append(("pyswtask", lambda: bench_http.pyswtask_http(http_secs, 64)))
        g.runners.append(("uvicorn", lambda: bench_http.uvicorn_http(http_secs, 64)))
        if has_swoole:
            g.runners.append(("swoole", lambda: bench_http.swoole_http(http_secs, 64)))
        if "celery" in brokers:
            g.runners.append(("uvicorn + Celery", lambda: bench_http.celery_http(
                http_secs, 64, redis)))
        groups.append(g)

    if brokers:
        g = Group("cluster", bench_cluster.WORKLOADS)
        n_c, n_cco = 3000 // q, 300 // q
        g.runners.append(("pyswtask", lambda: ours(bench_cluster.pyswtask_cluster(
            redis, n_c, n_cco))))
        for name in brokers:
            g.runners.append((name, lambda name=name: bench_cluster.peer_cluster(
                name, redis, n_c, n_cco)))
        g.runners.append(("redis", lambda: bench_cluster.redis_floor(redis, 100_000 // q)))
        groups.append(g)

    if args.only:
        rx = re.compile(args.only)
        groups = [g for g in groups if rx.search(g.name) or any(rx.search(w) for w in g.workloads)]
    return groups


def _cmd(*cmd: str) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1])
            mem = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "cpus_allowed": len(os.sched_getaffinity(0)),
            "memory": mem, "kernel": platform.release(), "os": _os_name(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def _os_name() -> str:
    try:
        with open("/etc/os-release") as f:
            for ln in f:
                if ln.startswith("PRETTY_NAME="):
                    return ln.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def versions(has_swoole: bool, redis: Any) -> dict[str, Any]:
    import pyswtask

    out: dict[str, Any] = {
        "python": platform.python_version(), "pyswtask": getattr(pyswtask, "__version__", None)
        or _version("pyswtask"),
        "pyswtask_commit": _cmd("git", "-C", HERE, "rev-parse", "--short", "HEAD"),
        "msgpack": _version("msgpack"), "numpy": _version("numpy"),
        "apscheduler": _version("apscheduler"), "croniter": _version("croniter"),
    }
    if has_swoole:
        out["php"] = _cmd("php", "-r", "echo PHP_VERSION;")
        out["swoole"] = _swoole.version()
    if redis is not None:
        out["redis"] = redis.version
        for name in ("celery", "dramatiq", "huey", "arq", "redis-py"):
            out[name] = _version("redis" if name == "redis-py" else name)
    return out


def output_path(out: str | None) -> str:
    """--out, or a new file in perf/results/local/ named after the time of the run."""
    if out:
        return out
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return os.path.join(LOCAL_DIR, f"run-{stamp}.jsonl")


MAIN_PID = os.getpid()


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM unwinds like ^C, so that every finally block stops what it started. A child
    forked by a peer (a Pool worker) inherits this handler: there SIGTERM does what it did."""
    if os.getpid() != MAIN_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    parser.add_argument("--quick", action="store_true",
                        help="10x smaller runs, 10 s cron windows, 2 rounds unless --runs")
    parser.add_argument("--only", metavar="REGEX", help="workloads (or groups) matching REGEX")
    parser.add_argument("--runs", type=int, help="interleaved rounds, medians kept (default 3)")
    parser.add_argument("--brokers", action="store_true",
                        help="also Celery, Dramatiq, Huey and arq on a local Redis (queue, http and "
                        "cluster workloads), installing what they need when missing")
    parser.add_argument("--spin", type=float, default=DEFAULTS["task_wait_spin"],
                        help="pyswtask's task_wait_spin for CO (default: the server's)")
    parser.add_argument("--out", metavar="PATH",
                        help="where the JSON lines go (default: a new perf/results/local/run-*.jsonl, "
                             "ignored by git; --out perf/results/latest.jsonl replaces the committed run)")
    args = parser.parse_args()
    runs = args.runs or (2 if args.quick else 3)
    args.out = output_path(args.out)

    signal.signal(signal.SIGTERM, _interrupt)
    os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))

    has_swoole = _swoole.version() is not None     # prints the one line when it is missing
    redis = None
    brokers: list[str] = []
    started = time.time()
    rounds: list[list[dict[str, Any]]] = [[] for _ in range(runs)]
    errors: list[dict[str, Any]] = []
    try:
        if args.brokers:
            _brokers.install_missing()
            why = _brokers.missing()
            libs = _brokers.available()
            if why is not None:
                log(f"brokers: {why}")
            elif not libs:
                log("brokers: celery, dramatiq, huey, arq and redis are not installed "
                    "(pip install 'pyswtask[brokers]'); skipped")
            else:
                absent = [b for b in _brokers.BROKERS if b not in libs]
                if absent:
                    log(f"brokers: {', '.join(absent)} not installed (pip install 'pyswtask[brokers]'); "
                        "skipped")
                groups_wanted = build(args, has_swoole, libs, None)
                if any(g.name in ("queue", "http", "cluster") for g in groups_wanted):
                    redis = _brokers.RedisServer()
                    brokers = libs
                    log(f"brokers: redis-server {redis.version} on 127.0.0.1:{redis.port}")
        groups = build(args, has_swoole, brokers, redis)
        if not groups:
            parser.error(f"--only {args.only!r} matches no workload")
        meta = {"meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         "command": "python perf/run.py " + " ".join(sys.argv[1:]),
                         "runs": runs, "quick": args.quick, "only": args.only,
                         "brokers": args.brokers, "machine": machine(),
                         "versions": versions(has_swoole, redis), "task_bytes": TASK_BYTES,
                         "groups": [g.name for g in groups]}}
        for i in range(runs):
            for g in groups:
                order = g.runners if i % 2 == 0 else g.runners[::-1]
                for label, runner in order:
                    t = time.monotonic()
                    try:
                        rows = runner()
                    except Exception as exc:
                        log(f"[round {i + 1}/{runs}] {g.name} {label}: FAILED {exc!r}")
                        traceback.print_exc(file=sys.stderr)
                        errors.append({"round": i + 1, "group": g.name, "system": label,
                                       "error": repr(exc)[:500]})
                        continue
                    rounds[i].extend(dict(r, round=i + 1) for r in rows)
                    shown = ", ".join(f"{r['system']} {r['workload']} {r['value']:,.1f} {r['unit']}"
                                      for r in rows)
                    log(f"[round {i + 1}/{runs}] {g.name} {label} ({time.monotonic() - t:.1f} s): {shown}")
    finally:
        if redis is not None:
            redis.stop()

    rows = _summary.medians(rounds)
    for r in rows:
        r.pop("round", None)
    ratio_rows = _summary.ratios(rounds, rows)
    meta["meta"]["duration_s"] = round(time.time() - started, 1)
    meta["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["meta"]["errors"] = errors
    for r in rows + ratio_rows:
        print(json.dumps(r), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        for r in [meta] + rows + ratio_rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, args.out)
    log(f"wrote {os.path.relpath(args.out)} ({len(rows)} results, {len(ratio_rows)} ratios, "
        f"{meta['meta']['duration_s']:.0f} s); python perf/report.py --input {os.path.relpath(args.out)} "
        "makes its report")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
