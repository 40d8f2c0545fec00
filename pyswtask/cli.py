"""The ``pyswtask`` command: run a server, serve an ASGI app in the workers of one, deliver a
task to one, inspect its crontab, its message queue, its stats (``status``) and its cluster.

It parses arguments and prints; what it runs or reads belongs to the server, the cron package
and the transports, which it only calls. Nothing imports this module but ``__main__``."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Sequence

from ._version import __version__
from .server import Server


def _importable_cwd() -> None:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def load_server(path: str) -> Server:
    """Imports ``module:attribute`` (gunicorn's app path); the attribute is a Server, or a
    callable returning one. The current directory is importable, as with ``python -m``."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"pyswtask: expected MODULE:SERVER (e.g. myapp.tasks:server), not {path!r}")
    _importable_cwd()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"pyswtask: cannot import {module_name!r}: {exc}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise SystemExit(f"pyswtask: module {module_name!r} has no attribute {attr!r}")
    if callable(obj) and not isinstance(obj, Server):
        obj = obj()
    if not isinstance(obj, Server):
        raise SystemExit(f"pyswtask: {path} is a {type(obj).__name__}, not a pyswtask.Server")
    return obj


def serve_server(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Server:
    """The Server ``pyswtask serve`` starts: the task modules imported first (their ``@task``
    classes registered before the fork), the app imported by the master at start."""
    _importable_cwd()
    for name in args.task_module:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise SystemExit(f"pyswtask: cannot import task module {name!r}: {exc}") from None
    given = {"app": args.app, "bind": args.bind or ["127.0.0.1:8000"],
             "access_log": args.access_log}
    for name in ("max_wait_time", "limit_concurrency", "backlog", "http", "event_loop",
                 "pid_file"):
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    try:
        return Server(worker_num=args.workers, task_worker_num=args.task_workers, **given)
    except ValueError as exc:
        parser.error(str(exc))


def cron_command(args: argparse.Namespace) -> int:
    from . import cron, sysv
    from ._core import RunStatus

    if args.cron_command == "next":
        try:
            times = cron.next_times(args.rule, args.n, args.tz)
        except ValueError as exc:
            print(f"pyswtask: {exc}", file=sys.stderr)
            return 2
        for t in times:
            print(t.isoformat())
        return 0
    if args.key is None and args.pid is None and args.pid_file is None:
        if args.cluster is None:
            print("pyswtask: cron show needs --key, --pid-file, --pid or --cluster",
                  file=sys.stderr)
            return 2
        return cluster_runs(args.cluster, args.last)
    key = args.key
    if key is None:
        pid = args.pid
        if pid is None:
            try:
                with open(args.pid_file) as f:
                    pid = int(f.read().strip())
            except (OSError, ValueError) as exc:
                print(f"pyswtask: cannot read the pid file: {exc}", file=sys.stderr)
                return 2
        key = sysv.default_key(pid)
    try:
        origin, runs, _segments = cron.attach(key)
    except (LookupError, ValueError) as exc:
        print(f"pyswtask: {exc}", file=sys.stderr)
        return 2
    print(f"origin table: {origin.used}/{origin.capacity} rows")
    print(f"{'job':>4} {'rule':<20} {'task.method':<32} {'runs':>6} {'fails':>6} {'last':<10} "
          f"{'took_ms':>8}")
    for r in origin.rows():
        last = RunStatus(r["last_status"]).name if r["last_due"] >= 0 else "-"
        print(f"{r['job']:>4} {r['rule']:<20} {r['task'] + '.' + r['method']:<32} "
              f"{r['run_count']:>6} {r['fail_count']:>6} {last:<10} "
              f"{r['last_duration'] * 1000:>8.1f}")
    print(f"\nrun-time table: {runs.used}/{runs.capacity} rows, {runs.dropped} dropped")
    print(f"{'row':>5} {'minute':<12} {'sec':>10} {'job':>4} {'status':<10} {'delivered':>17} "
          f"{'took_ms':>8}")
    for r in runs.rows():
        print(f"{r['row']:>5} {r['minute']:<12} {r['sec']:>10} {r['job']:>4} "
              f"{RunStatus(r['status']).name:<10} {r['delivered_at']:>17.6f} "
              f"{r['duration'] * 1000:>8.1f}")
    return 0 if args.cluster is None else cluster_runs(args.cluster, args.last)


def cluster_runs(url: str, last: int) -> int:
    """Prints the once-per-cluster runs whose leases are in Redis: holder, node, outcome."""
    from .cluster import connect, describe_url
    from .cron import recent_runs
    from .errors import ClusterUnavailable

    try:
        client = connect(url)
    except (ClusterUnavailable, ImportError, ValueError) as exc:
        print(f"pyswtask: {exc}", file=sys.stderr)
        return 2
    try:
        runs = recent_runs(client, last)
    finally:
        client.close()
    print(f"\ncluster runs at {describe_url(url)}: the last {len(runs)}")
    print(f"{'sec':>10} {'task.method':<32} {'lease holder':<24} {'state':<8} {'took_ms':>8} "
          f"error")
    for r in runs:
        print(f"{r['sec']:>10} {r['name']:<32} {r['holder'] or r['node'] or '-':<24} "
              f"{r['state']:<8} {r['duration'] * 1000:>8.1f} {r['error']}")
    return 0


def _key(value: str) -> int:
    from .transport.msgqueue import parse_key
    try:
        return parse_key(value, "--key")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def deliver_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Delivers one task through the queue: prints the result as JSON (--wait) or the id."""
    from .delivery import Task
    from .errors import PyswtaskError

    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as exc:
        parser.error(f"PARAMS_JSON is not valid JSON: {exc}")
    if not isinstance(params, list):
        parser.error("PARAMS_JSON must be a JSON array, the method's positional arguments")
    Task.configure(message_queue_key=args.key, exit_timeout=args.timeout)
    try:
        if args.wait:
            result = Task.deliver(args.name, args.method, params, Task.TYPE_CO, args.timeout)
            print(json.dumps(result, default=repr))
        else:
            print(Task.deliver(args.name, args.method, params, Task.TYPE_ASYNC, args.timeout))
            if not Task.flush(args.timeout):
                print("pyswtask: the queue stayed full; the task was not sent", file=sys.stderr)
                return 1
    except (PyswtaskError, ValueError, TypeError) as exc:
        print(f"pyswtask: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def queue_command(args: argparse.Namespace) -> int:
    from .transport import msgqueue

    stat = msgqueue.queue_stat(args.key)
    if stat is None:
        print(f"pyswtask: no message queue on key 0x{args.key:x}", file=sys.stderr)
        return 1
    if args.queue_command == "purge":
        print(f"{msgqueue.purge(args.key)} message(s) discarded from queue 0x{args.key:x}")
        return 0
    info = msgqueue.read_info(args.key)
    stat["server_pid"] = info.pid if info is not None and info.alive() else None
    if info is not None:
        stat.update(task_ipc_mode=info.mode, worker_num=info.worker_num,
                    task_worker_num=info.task_worker_num)
    print(json.dumps(stat, indent=2))
    return 0


def status_command(args: argparse.Namespace) -> int:
    """Prints one snapshot as JSON (--json), or redraws a view of it every second until ^C.
    Exit code 1: no server running there; 2: its stats cannot be read."""
    from . import stats
    from .errors import ServerNotRunning

    def take() -> dict[str, object]:
        return stats.read(pid_file=args.pid_file, pid=args.pid, key=args.key)

    try:
        snap = take()
        if args.json:
            print(json.dumps(snap, indent=2))
            return 0
        try:
            from .stats.view import live
        except ImportError:
            print("pyswtask: the live view needs rich: pip install 'pyswtask[status]' (or use "
                  "--json)", file=sys.stderr)
            return 2
        live(take, snap, args.interval)
    except ServerNotRunning as exc:
        print(f"pyswtask: not running: {exc}", file=sys.stderr)
        return 1
    except stats.StatsUnreadable as exc:
        print(f"pyswtask: cannot read the server's stats: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def cluster_command(args: argparse.Namespace) -> int:
    """``pyswtask cluster stat`` / ``dead-letters``: what the cluster's Redis holds."""
    from .cluster import admin
    from .errors import ClusterUnavailable

    try:
        if args.cluster_command == "stat":
            stat = admin.cluster_stat(args.url)
            if args.json:
                print(json.dumps(stat, indent=2))
                return 0
            print(f"nodes alive: {len(stat['nodes'])}")
            for node in stat["nodes"]:
                print(f"  {node.get('node')}  host {node.get('host')}  master pid "
                      f"{node.get('master_pid')}  queues {','.join(node.get('queues') or []) or '-'}")
            print(f"{'queue':<24} {'length':>8} {'pending':>8} {'oldest_s':>9} {'dead':>6}  "
                  "pending per consumer")
            for q in stat["queues"]:
                oldest = "-" if q["oldest_pending_age"] is None else f"{q['oldest_pending_age']:.1f}"
                per = ", ".join(f"{c}={n}" for c, n in q["consumers"].items()) or "-"
                print(f"{q['queue']:<24} {q['length']:>8} {q['pending']:>8} {oldest:>9} "
                      f"{q['dead_letters']:>6}  {per}")
            return 0
        if args.requeue:
            moved = admin.requeue(args.url, args.queue)
            print(f"{moved} dead letter(s) put back on their queue")
            return 0
        letters = admin.dead_letters(args.url, args.queue)
        if args.json:
            print(json.dumps(letters, indent=2))
        else:
            for d in letters:
                print(f"{d['queue']} {d.get('id')} {d.get('task')}.{d.get('method')} "
                      f"deliveries={d.get('deliveries')}: {d.get('error')}")
            print(f"{len(letters)} dead letter(s)")
        return 0
    except (ClusterUnavailable, ImportError, ValueError) as exc:
        print(f"pyswtask: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyswtask", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pyswtask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start a server: pyswtask run module:server")
    run.add_argument("app", help="MODULE:SERVER, the Server object (or a factory) to start")
    serve = sub.add_parser(
        "serve", help="serve an ASGI app in the workers: pyswtask serve module:app --bind HOST:PORT")
    serve.add_argument("app", help="MODULE:APP, the ASGI app (importing it may register @task "
                       "classes)")
    serve.add_argument("--bind", action="append", metavar="ADDRESS",
                       help="HOST:PORT (port 0: the kernel picks; the log says which) or "
                       "unix:/PATH; repeat for more (default 127.0.0.1:8000)")
    serve.add_argument("--workers", type=int, default=2, help="workers serving HTTP (default 2)")
    serve.add_argument("--task-workers", type=int, default=2, help="task workers (default 2)")
    serve.add_argument("--task-module", action="append", default=[], metavar="MODULE",
                       help="import this module first, for its @task classes; repeatable")
    serve.add_argument("--max-wait-time", type=float, help="seconds requests and tasks in flight "
                       "get when the server stops (default 3)")
    serve.add_argument("--limit-concurrency", type=int,
                       help="per worker; beyond it, 503 (default: no limit)")
    serve.add_argument("--backlog", type=int, help="listen backlog (default 2048)")
    serve.add_argument("--access-log", action="store_true", help="log each request")
    serve.add_argument("--http", choices=["auto", "httptools", "h11"], help="HTTP parser")
    serve.add_argument("--event-loop", choices=["asyncio", "uvloop"],
                       help="the workers' loop (default asyncio)")
    serve.add_argument("--pid-file", help="write the master's pid here while it runs")
    for p in (run, serve):
        p.add_argument("--log-level", default="INFO",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    cron = sub.add_parser("cron", help="the crontab: next due times, tables of a running server")
    cron_sub = cron.add_subparsers(dest="cron_command", required=True)
    nxt = cron_sub.add_parser("next", help="print the next due times of a rule")
    nxt.add_argument("rule", help='six fields, seconds first ("*/5 * * * * *"), or five')
    nxt.add_argument("-n", type=int, default=5, help="how many (default 5)")
    nxt.add_argument("--tz", default=None, help="IANA time zone (default: local time)")
    show = cron_sub.add_parser("show", help="print both crontab tables of a running server, "
                               "and with --cluster its once-per-cluster runs")
    where = show.add_mutually_exclusive_group()
    where.add_argument("--key", type=lambda v: int(v, 0), help="the cron_shm_key setting")
    where.add_argument("--pid-file", help="the server's pid_file")
    where.add_argument("--pid", type=int, help="the master's pid")
    show.add_argument("--cluster", metavar="URL", help="the cluster's Redis: list the last runs "
                      "raced for there, with lease holder and outcome")
    show.add_argument("--last", type=int, default=50, help="with --cluster: how many runs "
                      "(default 50)")
    dl = sub.add_parser("deliver", help="deliver one task to a running server through its "
                        "message queue")
    dl.add_argument("name", help="the task's name")
    dl.add_argument("method", help="the method to call")
    dl.add_argument("params", nargs="?", default="[]", metavar="PARAMS_JSON",
                    help="the positional arguments, as a JSON array (default [])")
    dl.add_argument("--key", type=_key, required=True, help="the server's message_queue_key")
    dl.add_argument("--wait", action="store_true",
                    help="deliver CO and print the result as JSON (default: ASYNC, print the id)")
    dl.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    queue = sub.add_parser("queue", help="a server's message queue: what waits in it, or empty it")
    queue_sub = queue.add_subparsers(dest="queue_command", required=True)
    for name, text in (("stat", "messages and bytes waiting, limits, the server on the key"),
                       ("purge", "discard every message waiting in the queue")):
        q = queue_sub.add_parser(name, help=text)
        q.add_argument("--key", type=_key, required=True, help="the message_queue_key")
    st = sub.add_parser("status", help="a running server's processes, queues and crontab, "
                        "redrawn every second (--json: one snapshot)")
    where = st.add_mutually_exclusive_group(required=True)
    where.add_argument("--pid-file", help="the server's pid_file")
    where.add_argument("--pid", type=int, help="the master's pid")
    where.add_argument("--key", type=lambda v: int(v, 0), help="the stats_shm_key setting")
    st.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit")
    st.add_argument("--interval", type=float, default=1.0, help="seconds between redraws")
    cluster = sub.add_parser("cluster", help="the cluster on Redis: nodes, queues, dead letters")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    stat = cluster_sub.add_parser("stat", help="nodes alive; per queue the stream length, "
                                  "pending per consumer, oldest pending age, dead letters")
    dead = cluster_sub.add_parser("dead-letters", help="list the dead letters, or put them "
                                  "back on their queue (--requeue)")
    dead.add_argument("--queue", help="only this queue (default: every queue)")
    dead.add_argument("--requeue", action="store_true",
                      help="move them back to their queue's stream, to run again")
    for p in (stat, dead):
        p.add_argument("--url", required=True, help="the cluster's Redis URL (redis://...)")
        p.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if args.command == "status":
        return status_command(args)
    if args.command == "cluster":
        return cluster_command(args)
    if args.command == "cron":
        return cron_command(args)
    if args.command == "deliver":
        return deliver_command(args, dl)
    if args.command == "queue":
        return queue_command(args)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    server = serve_server(args, serve) if args.command == "serve" else load_server(args.app)
    try:
        return server.start()
    except (ImportError, ValueError) as exc:
        print(f"pyswtask: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
