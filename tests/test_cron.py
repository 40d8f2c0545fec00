"""The crontab in real servers: the timer and exec processes, the tables, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime

import pytest
from _testbase import ServerRunner

from pyswtask import cron

# Indented like the test bodies it is prepended to, which the runner dedents together.
CRON_PRELUDE = textwrap.indent(textwrap.dedent('''
    from pyswtask import scheduled
    from pyswtask.cron import due_second

    def ran(name, **extra):
        emit(event="ran", job=name, due=due_second.get(), t=time.time(), **extra)
'''), " " * 8)


def ipc_keys() -> set[int]:
    out = subprocess.run(["ipcs", "-m"], capture_output=True, text=True, timeout=10).stdout
    return {int(line.split()[0], 16) for line in out.splitlines() if line.startswith("0x")}


def runs_of(srv: object, job: str) -> list[dict[str, object]]:
    return [r for r in srv.by_event("ran") if r["job"] == job]  # type: ignore[attr-defined]


@pytest.mark.slow
def test_every_second_every_other_second_and_the_startup_minute(servers: ServerRunner) -> None:
    now = datetime.now()
    # A rule for one second of this very minute, 3 s from now (if the minute has room).
    target = now.second + 3 if now.second < 52 else None
    startup_rule = f"{target} {now.minute} {now.hour} * * *" if target is not None else None
    srv = servers.run(CRON_PRELUDE + f'''
        @task()
        class Jobs:
            @scheduled(cron="* * * * * *")
            def every(self):
                ran("every")

            @scheduled(cron="*/2 * * * * *")
            def even(self):
                ran("even")

            {"" if startup_rule is None else f"@scheduled(cron={startup_rule!r})"}
            def startup(self):
                ran("startup")

        server = Server(worker_num=2, task_worker_num=2, cron=True)
        server.on("worker_start", lambda s, wid: wid == 0 and s.after(6500, s.shutdown))
        sys.exit(server.start())
    ''', timeout=40)
    every = runs_of(srv, "every")
    # Runs due together (a catch-up) may finish in either order on the two task workers.
    dues = sorted(r["due"] for r in every)
    assert len(dues) >= 5 and dues == list(range(dues[0], dues[0] + len(dues))), dues
    # Each ran in its own second, shortly after it began (a late start may catch up once).
    on_time = [r for r in every if r["t"] - r["due"] < 0.5]
    assert len(on_time) >= len(every) - 2
    assert all(0 <= r["t"] - r["due"] < 2.0 for r in every)
    even = [r["due"] for r in runs_of(srv, "even")]
    assert len(even) >= 2 and all(d % 2 == 0 for d in even) and len(set(even)) == len(even)
    if startup_rule is not None:
        startup = runs_of(srv, "startup")
        assert len(startup) == 1 and datetime.fromtimestamp(startup[0]["due"]).second == target
    # This server's tables only: servers of other test runs may come and go meanwhile.
    key = cron.default_key(srv.pid)
    assert not {key, key + 1} & ipc_keys(), "the crontab's shared memory outlived the server"


def test_a_fresh_start_begins_with_the_next_whole_second(servers: ServerRunner) -> None:
    srv = servers.run(CRON_PRELUDE + '''
        @task()
        class Jobs:
            @scheduled(cron="* * * * * *")
            def every(self):
                ran("every")

            @scheduled(cron="*/2 * * * * *")
            def even(self):
                ran("even")

        # Start a fifth into a second, so that the timer comes up while that second is under way.
        time.sleep((1.2 - time.time() % 1.0) % 1.0)
        emit(event="starting", t=time.time())
        server = Server(worker_num=2, task_worker_num=2, cron=True)
        server.on("worker_start", lambda s, wid: wid == 0 and s.after(5500, s.shutdown))
        sys.exit(server.start())
    ''', timeout=40)
    (starting,) = srv.by_event("starting")
    every, even = runs_of(srv, "every"), runs_of(srv, "even")
    # The second under way at start is not run late: the first run is due after the start.
    first = min(r["due"] for r in every + even)
    assert first > starting["t"], (starting, every, even)
    dues = sorted(r["due"] for r in every)
    assert len(dues) >= 3 and dues == list(range(dues[0], dues[0] + len(dues))), dues
    even_dues = [r["due"] for r in even]
    assert len(even_dues) >= 2 and all(d % 2 == 0 for d in even_dues), even
    assert len(set(even_dues)) == len(even_dues), even
    assert all(0 <= r["t"] - r["due"] < 1.5 for r in every + even), (every, even)
    # Never two runs of the every-second rule in one wall-clock second.
    started = [int(r["t"]) for r in every]
    assert len(set(started)) == len(started), every


@pytest.mark.slow
def test_quick_runs_of_a_second_go_to_one_task_worker_slow_ones_spread(
        servers: ServerRunner) -> None:
    srv = servers.run(CRON_PRELUDE + '''
        # Runs record in memory and a timer of the task worker writes them out, so that a quick
        # run stays quick (a write to the test's pipe can take longer than the run itself).
        done = []

        def write_out(*_):
            while done:
                job, due, t = done.pop(0)
                emit(event="ran", job=job, due=due, t=t, pid=os.getpid())

        def quick(i):
            @scheduled(cron="* * * * * *")
            def run(self):
                done.append((f"quick{i}", due_second.get(), time.time()))
            run.__name__ = run.__qualname__ = f"quick{i}"
            return run

        def slow(i):
            @scheduled(cron="* * * * * *")
            def run(self):
                done.append((f"slow{i}", due_second.get(), time.time()))
                time.sleep(0.3)
            run.__name__ = run.__qualname__ = f"slow{i}"
            return run

        methods = {f"quick{i}": quick(i) for i in range(6)}
        methods.update({f"slow{i}": slow(i) for i in range(2)})
        Jobs = task("jobs")(type("Jobs", (), methods))

        def snapshot(server, when):
            cron_runs = server.stats()["task_methods"]["pyswtask.cron.run"]
            emit(event="stats", when=when, buckets=cron_runs["buckets"],
                 bounds=server.stats()["duration_buckets"])

        def stop(server):
            snapshot(server, "end")
            server.shutdown()

        server = Server(worker_num=1, task_worker_num=2, cron=True)
        server.on("worker_start", lambda s, wid: (s.after(3500, lambda: snapshot(s, "early")),
                                                  s.after(8300, lambda: stop(s))))
        server.on("task_worker_start", lambda s, wid: s.tick(200, write_out))
        server.on("task_worker_stop", write_out)
        sys.exit(server.start())
    ''', timeout=40)
    runs = srv.by_event("ran")
    dues = sorted({r["due"] for r in runs})
    assert len(dues) >= 5, runs
    for job in [f"quick{i}" for i in range(6)] + ["slow0", "slow1"]:
        assert sorted(r["due"] for r in runs_of(srv, job)) == dues, (job, runs)
    # From the third second on, every quick job has run before: the second's quick runs go
    # to one task worker together (spread, they would split 3 and 3).
    checked = dues[2:-1]
    together = [sec for sec in checked
                if len({r["pid"] for r in runs if r["due"] == sec
                        and r["job"].startswith("quick")}) == 1]
    assert len(together) >= len(checked) - 1, (checked, [
        (r["job"], r["due"], r["pid"], r["t"] - r["due"]) for r in runs])
    for sec in checked:
        # The slow runs never wait for each other: both start well within their 0.3 s.
        slow = [r for r in runs if r["due"] == sec and r["job"].startswith("slow")]
        assert all(0 <= r["t"] - sec < 0.25 for r in slow), slow
        assert all(0 <= r["t"] - sec < 0.25 for r in runs if r["due"] == sec), runs
    # A run's wait for its second is not its run time. The exec process delivers about 4 ms
    # before the second, so a counted wait would put the first quick run of each second over
    # 2.5 ms: one per second. Between two snapshots (after the first runs of each job, which
    # may be slow on a fresh start), at most one quick run in three seconds may be that slow
    # from the machine's noise alone.
    early, end = (next(s for s in srv.by_event("stats") if s["when"] == when)
                  for when in ("early", "end"))
    bounds = end["bounds"]
    window = [b - a for a, b in zip(early["buckets"], end["buckets"])]
    quick_in_window = window[bounds.index(0.25)]  # the slow runs sleep 0.3 s
    over = quick_in_window - window[bounds.index(0.0025)]
    seconds = quick_in_window // 6
    assert seconds >= 3, (early, end)
    assert over <= seconds // 3, (over, seconds, early, end)


@pytest.mark.slow
def test_a_stopped_exec_process_catches_up_once_each(servers: ServerRunner) -> None:
    srv = servers.start(CRON_PRELUDE + '''
        @task()
        class Jobs:
            @scheduled(cron="* * * * * *")
            def every(self):
                ran("every")

        server = Server(worker_num=1, task_worker_num=1, cron=True, pid_file="master.pid")
        sys.exit(server.start())
    ''')
    time.sleep(2.5)
    exec_pid = int(subprocess.run(["pgrep", "-s", str(srv.pid), "-f", "pyswtask: process cronExec"],
                                  capture_output=True, text=True, timeout=10).stdout.split()[0])
    os.kill(exec_pid, signal.SIGSTOP)
    stopped_at = time.time()
    time.sleep(3.2)
    os.kill(exec_pid, signal.SIGCONT)
    time.sleep(2.2)
    os.kill(srv.pid, signal.SIGTERM)
    assert srv.wait(20) == 0, srv.err
    dues = sorted(r["due"] for r in runs_of(srv, "every"))
    assert dues == list(range(dues[0], dues[0] + len(dues))), \
        f"gap or duplicate: {dues}\n{srv.err}"
    # Due while the exec process was stopped, at least 0.5 s before it went on (at +3.2 s).
    late = [r for r in runs_of(srv, "every") if stopped_at + 0.5 < r["due"] < stopped_at + 2.7]
    assert len(late) >= 2 and all(r["t"] - r["due"] > 0.3 for r in late), \
        (stopped_at, runs_of(srv, "every"), srv.err)


@pytest.mark.slow
def test_outcomes_overlap_and_the_tables(servers: ServerRunner, tmp_path: object) -> None:
    srv = servers.start(CRON_PRELUDE + '''
        @task("cronjobs")
        class Jobs:
            @scheduled(cron="* * * * * *", overlap=False)
            def slow(self):
                ran("slow")
                time.sleep(2.2)

            @scheduled(cron="* * * * * *")
            def fails(self):
                raise RuntimeError("cron job broke")

        def report(server, wid):
            def look():
                origin, runs = server.crontab.tables()
                rows = {f"{r['task']}.{r['method']}": r for r in origin.rows()}
                view = runs.to_numpy()
                used = view[view["used"] == 1]
                emit(event="tables", origin=rows,
                     statuses=sorted(set(int(s) for s in used["status"])),
                     numpy_tasks=sorted(set(t.decode() for t in used["task"])))
            server.after(4500, look)

        server = Server(worker_num=1, task_worker_num=2, cron=True, pid_file="master.pid")
        server.on("worker_start", report)
        sys.exit(server.start())
    ''')
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = srv.proc.stdout.readline()  # type: ignore[union-attr]
        if '"tables"' in line:
            tables = json.loads(line)
            break
    else:
        raise AssertionError("no table report")
    show = subprocess.run([sys.executable, "-m", "pyswtask", "cron", "show", "--pid-file",
                           str(srv.path.parent / "master.pid")], capture_output=True, text=True,
                          timeout=30)
    os.kill(srv.pid, signal.SIGTERM)
    assert srv.wait(20) == 0
    fails = tables["origin"]["cronjobs.fails"]
    assert fails["run_count"] >= 3 and fails["fail_count"] == fails["run_count"]
    assert fails["last_status"] == 5 and fails["rule"] == "* * * * * *"
    slow = tables["origin"]["cronjobs.slow"]
    assert slow["overlap"] is False and slow["run_count"] >= 1 and slow["last_duration"] >= 2.0
    # While slow ran, its next seconds were skipped, not stacked up.
    slow_runs = [r["due"] for r in runs_of(srv, "slow")]
    assert all(b - a >= 2 for a, b in zip(slow_runs, slow_runs[1:])), slow_runs
    assert "skipped: the previous one is still running (overlap=False)" in srv.err
    assert "cron job broke" in srv.err
    assert 5 in tables["statuses"] and 6 in tables["statuses"]   # FAILED and SKIPPED rows
    assert tables["numpy_tasks"] == ["cronjobs"]
    assert show.returncode == 0, show.stderr
    assert "origin table: 2/1024 rows" in show.stdout and "cronjobs.fails" in show.stdout
    assert "run-time table:" in show.stdout and "FAILED" in show.stdout


def test_table_capacity_errors(servers: ServerRunner) -> None:
    srv = servers.run(CRON_PRELUDE + '''
        from pyswtask import TableFull

        @task()
        class Jobs:   # three runs due every second: more than a 2-row table takes in any second
            @scheduled(cron="* * * * * *")
            def a(self):
                pass

            @scheduled(cron="* * * * * *")
            def b(self):
                pass

            @scheduled(cron="* * * * * *")
            def c(self):
                pass

        try:
            Server(worker_num=1, task_worker_num=1, cron=True, cron_task_capacity=1).start()
        except TableFull as e:
            emit(event="origin_full", text=str(e))
        server = Server(worker_num=1, task_worker_num=1, cron=True, cron_run_capacity=2)
        server.on("worker_start", lambda s, wid: s.after(1500, s.shutdown))
        sys.exit(server.start())
    ''')
    assert srv.by_event("origin_full")[0]["text"] == (
        "3 scheduled methods do not fit the origin table: raise the cron_task_capacity "
        "setting (now 1)")
    assert "run-time table full" in srv.err and "raise the cron_run_capacity setting (now 2)" \
        in srv.err


def test_cron_settings_and_misplaced_schedules_are_refused() -> None:
    from pyswtask import Server

    with pytest.raises(ValueError, match="timezone 'Nowhere/City' is not an IANA time zone"):
        Server(cron=True, timezone="Nowhere/City")
    with pytest.raises(ValueError, match="cron_run_capacity must be a positive int"):
        Server(cron_run_capacity=0)
    with pytest.raises(ValueError, match="cron must be True or False"):
        Server(cron="yes")


def test_cron_cli_next_and_errors() -> None:
    out = subprocess.run([sys.executable, "-m", "pyswtask", "cron", "next", "*/20 * * * * *",
                          "-n", "3", "--tz", "UTC"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    times = [datetime.fromisoformat(line) for line in out.stdout.split()]
    assert len(times) == 3 and all(t.second in (0, 20, 40) for t in times)
    assert all(t.utcoffset().total_seconds() == 0 for t in times)  # type: ignore[union-attr]
    bad = subprocess.run([sys.executable, "-m", "pyswtask", "cron", "next", "* * 99 * * *"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "cron rule '* * 99 * * *' is invalid" in bad.stderr
    gone = subprocess.run([sys.executable, "-m", "pyswtask", "cron", "show", "--key", "0x7ffffff0"],
                          capture_output=True, text=True, timeout=30)
    assert gone.returncode == 2 and "no crontab tables at SysV keys 0x7ffffff0" in gone.stderr


@pytest.mark.slow
def test_a_five_field_rule_runs_at_second_zero(servers: ServerRunner) -> None:
    # Waits for the next whole minute: up to a minute, the one slow test of the suite.
    srv = servers.run(CRON_PRELUDE + '''
        @task()
        class Minutely:
            @scheduled(cron="* * * * *")
            def tick(self):
                ran("minutely")
                server.shutdown()

        server = Server(worker_num=1, task_worker_num=1, cron=True)
        sys.exit(server.start())
    ''', timeout=90)
    (run,) = runs_of(srv, "minutely")
    assert run["due"] % 60 == 0 and 0 <= run["t"] - run["due"] < 1.0
