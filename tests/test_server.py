"""The server's life cycle: hooks, timers, respawn, stopping, settings and the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from _testbase import ServerRunner, wait_for


def test_hooks_run_in_every_process_of_their_kind(servers: ServerRunner) -> None:
    srv = servers.run('''
        server = Server(worker_num=3, task_worker_num=2, pid_file="master.pid")
        server.on("start", lambda s: emit(event="start", pid=os.getpid(),
                                          pid_file=open("master.pid").read().strip()))
        server.on("worker_start", lambda s, wid: emit(event="worker_start", wid=wid, pid=os.getpid()))
        server.on("worker_stop", lambda s, wid: emit(event="worker_stop", wid=wid))
        server.on("task_worker_start", lambda s, wid: emit(event="tw_start", wid=wid))
        server.on("task_worker_stop", lambda s, wid: emit(event="tw_stop", wid=wid))
        server.on("shutdown", lambda s: emit(event="shutdown", pid_left=os.path.exists("master.pid")))
        events.listen(Event.WORKER_START, lambda ev: emit(event="ev_worker_start", wid=ev.params[0]))
        server.on("worker_start", lambda s, wid: wid == 2 and s.after(300, s.shutdown))
        sys.exit(server.start())
    ''')
    start = srv.by_event("start")[0]
    assert start["pid_file"] == str(start["pid"]) == str(srv.pid)
    assert sorted(r["wid"] for r in srv.by_event("worker_start")) == [0, 1, 2]
    assert sorted(r["wid"] for r in srv.by_event("ev_worker_start")) == [0, 1, 2]
    assert sorted(r["wid"] for r in srv.by_event("worker_stop")) == [0, 1, 2]
    assert sorted(r["wid"] for r in srv.by_event("tw_start")) == [3, 4]
    assert sorted(r["wid"] for r in srv.by_event("tw_stop")) == [3, 4]
    assert len({r["pid"] for r in srv.by_event("worker_start")}) == 3
    assert srv.by_event("shutdown")[0]["pid_left"] is True
    assert not (srv.path.parent / "master.pid").exists()


def test_timers_tick_after_and_clear(servers: ServerRunner) -> None:
    srv = servers.run('''
        def start(server, wid):
            t0 = time.monotonic()
            ticks = []
            def on_tick(timer_id):
                ticks.append(round(time.monotonic() - t0, 3))
                if len(ticks) == 5:
                    emit(event="cleared", ok=server.clear_timer(timer_id),
                         again=server.clear_timer(timer_id))
            server.tick(50, on_tick)
            cancelled = server.after(100, lambda: emit(event="must_not_fire"))
            server.clear_timer(cancelled)
            server.after(150, lambda: emit(event="after", at=round(time.monotonic() - t0, 3)))
            server.after(600, lambda: (emit(event="ticks", ticks=ticks), server.shutdown()))
            try:
                server.tick(0, on_tick)
            except ValueError as e:
                emit(event="bad_ms", text=str(e))

        server = Server(worker_num=1, task_worker_num=0)
        server.on("worker_start", start)
        sys.exit(server.start())
    ''')
    ticks = srv.by_event("ticks")[0]["ticks"]
    assert len(ticks) == 5, "the timer went on after clear_timer"
    assert all(0.04 <= b - a <= 0.2 for a, b in zip([0.0] + ticks, ticks)), ticks
    assert srv.by_event("cleared")[0] == {"event": "cleared", "ok": True, "again": False}
    assert 0.14 <= srv.by_event("after")[0]["at"] < 0.5
    assert not srv.by_event("must_not_fire")
    assert "positive number of milliseconds" in srv.by_event("bad_ms")[0]["text"]


def test_timers_outside_a_worker_are_refused() -> None:
    from pyswtask import Server

    with pytest.raises(RuntimeError, match=r"tick\(\) works in workers and task workers"):
        Server().tick(10, lambda t: None)


def test_a_killed_task_worker_is_respawned_and_serves_again(servers: ServerRunner,
                                                          tmp_path: object) -> None:
    srv = servers.start('''
        def start(server, wid):
            emit(event="pid", pid=Task.deliver("Demo", "pid", dst_worker_id=0))
            def wait_go(timer_id):
                if os.path.exists("go"):
                    server.clear_timer(timer_id)
                    emit(event="after", pid=Task.deliver("Demo", "pid", dst_worker_id=0, timeout=5),
                         echo=Task.deliver("Demo", "echo", ["alive"]))
                    server.shutdown()
            server.tick(20, wait_go)

        server = Server(worker_num=1, task_worker_num=1)
        server.on("worker_start", start)
        sys.exit(server.start())
    ''')
    line = wait_for(lambda: srv.proc.stdout.readline(), timeout=15)  # type: ignore[union-attr]
    old_pid = __import__("json").loads(line)["pid"]
    os.kill(old_pid, signal.SIGKILL)
    (srv.path.parent / "go").touch()
    assert srv.wait(30) == 0, srv.err
    after = srv.by_event("after")[0]
    assert after["pid"] != old_pid and after["echo"] == "alive"
    assert f"task worker 1 (pid {old_pid}) died with signal SIGKILL; respawning" in srv.err
    assert not srv.group_alive()


def test_a_killed_worker_is_respawned_with_its_id(servers: ServerRunner) -> None:
    srv = servers.start('''
        def start(server, wid):
            # Looked at before the line goes out: the test creates the file once it has read
            # both lines, and only a worker started after that may stop the server.
            restarted = os.path.exists("restarted")
            emit(event="worker_start", wid=wid, pid=os.getpid(),
                 echo=Task.deliver("Demo", "echo", [wid]))
            if restarted:
                server.shutdown()

        server = Server(worker_num=2, task_worker_num=1)
        server.on("worker_start", start)
        sys.exit(server.start())
    ''')
    import json
    first = [json.loads(wait_for(lambda: srv.proc.stdout.readline(), timeout=15))  # type: ignore[union-attr]
             for _ in range(2)]
    victim = next(r for r in first if r["wid"] == 1)
    (srv.path.parent / "restarted").touch()
    os.kill(victim["pid"], signal.SIGKILL)
    assert srv.wait(30) == 0, srv.err
    again = [r for r in srv.by_event("worker_start") if r["wid"] == 1]
    assert len(again) == 1 and again[0]["pid"] != victim["pid"] and again[0]["echo"] == 1


def test_sigterm_lets_in_flight_tasks_finish(servers: ServerRunner) -> None:
    srv = servers.start('''
        @listener(Event.FINISH_TASK)
        def done(ev):
            emit(event="finish", result=ev.params[1])

        def start(server, wid):
            Task.deliver("Demo", "sleep", [0.8, "finished in time"], Task.TYPE_ASYNC)
            emit(event="delivered")

        server = Server(worker_num=1, task_worker_num=1, max_wait_time=3)
        server.on("worker_start", start)
        sys.exit(server.start())
    ''')
    wait_for(lambda: srv.proc.stdout.readline(), timeout=15)  # type: ignore[union-attr]
    t0 = time.monotonic()
    os.kill(srv.pid, signal.SIGTERM)
    assert srv.wait(15) == 0, srv.err
    assert time.monotonic() - t0 < 3.0
    assert [r["result"] for r in srv.by_event("finish")] == ["finished in time"]
    assert not srv.group_alive()


def test_a_stuck_task_is_killed_after_max_wait_time(servers: ServerRunner) -> None:
    srv = servers.start('''
        def start(server, wid):
            Task.deliver("Demo", "sleep", [60], Task.TYPE_ASYNC)
            emit(event="delivered")

        server = Server(worker_num=1, task_worker_num=1, max_wait_time=0.5)
        server.on("worker_start", start)
        sys.exit(server.start())
    ''')
    wait_for(lambda: srv.proc.stdout.readline(), timeout=15)  # type: ignore[union-attr]
    time.sleep(0.2)
    t0 = time.monotonic()
    os.killpg(srv.pid, signal.SIGINT)  # Ctrl-C reaches the whole group; only the master acts
    assert srv.wait(15) == 0, srv.err
    assert time.monotonic() - t0 < 4.0
    assert "did not stop in time: killing it" in srv.err
    assert "still without a result" in srv.err
    assert not srv.group_alive()


def test_bad_settings_are_refused() -> None:
    from pyswtask import Server

    with pytest.raises(TypeError, match="unknown server setting.*max_wiat_time.*known: .*max_wait_time"):
        Server(max_wiat_time=3)
    with pytest.raises(ValueError, match="worker_num must be at least 1"):
        Server(worker_num=0)
    with pytest.raises(ValueError, match="task_worker_num must be a non-negative int"):
        Server(task_worker_num=-1)
    with pytest.raises(ValueError, match="max_wait_time must be a non-negative number"):
        Server(max_wait_time="3")
    with pytest.raises(ValueError, match="unknown hook 'worker_begin'"):
        Server().on("worker_begin", print)
    with pytest.raises(RuntimeError, match="not running"):
        Server().shutdown()


def test_cli_version_and_run(servers: ServerRunner) -> None:
    import pyswtask

    out = subprocess.run([sys.executable, "-m", "pyswtask", "--version"], capture_output=True,
                         text=True, timeout=30)
    assert out.stdout.strip() == f"pyswtask {pyswtask.__version__}"
    srv = servers.start('''
        def start(server, wid):
            emit(event="ran", result=Task.deliver("Demo", "echo", ["via cli"]))
            server.shutdown()
        server = Server(worker_num=1, task_worker_num=1)
        server.on("worker_start", start)
    ''', name="cliapp.py")
    srv.proc.kill()
    srv.proc.wait(timeout=10)
    for stream in (srv.proc.stdout, srv.proc.stderr):
        stream.close()  # type: ignore[union-attr]
    run = subprocess.run([sys.executable, "-m", "pyswtask", "run", "cliapp:server"],
                         cwd=srv.path.parent, capture_output=True, text=True, timeout=60,
                         start_new_session=True)
    assert run.returncode == 0, run.stderr
    assert '"result": "via cli"' in run.stdout
    bad = subprocess.run([sys.executable, "-m", "pyswtask", "run", "cliapp:nothing"],
                         cwd=srv.path.parent, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "has no attribute 'nothing'" in bad.stderr


@pytest.mark.slow
def test_children_stop_when_the_master_is_killed_outright(servers: ServerRunner) -> None:
    srv = servers.start('''
        from pyswtask import process

        @process(name="helper")
        def helper(server, proc):
            proc.sleep(60)

        server = Server(worker_num=2, task_worker_num=2)
        server.on("worker_start", lambda s, wid: wid == 0 and emit(event="up"))
        sys.exit(server.start())
    ''')
    wait_for(lambda: srv.proc.stdout.readline(), timeout=15)  # type: ignore[union-attr]
    time.sleep(0.3)
    def session() -> list[str]:
        return subprocess.run(["pgrep", "-s", str(srv.pid)], capture_output=True, text=True,
                              timeout=10).stdout.split()

    assert len(session()) == 6    # master, 2 workers, 2 task workers, 1 user process
    os.kill(srv.pid, signal.SIGKILL)
    srv.proc.wait(timeout=10)
    wait_for(lambda: not session(), timeout=10)
