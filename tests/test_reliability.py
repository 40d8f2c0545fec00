"""Crashes, recycling, reload, backpressure and large payloads, in real servers."""

from __future__ import annotations

import os
import signal
import time

import pytest
from _testbase import ServerRunner
from test_process import read_records


def test_a_task_worker_killed_mid_task_fails_its_task_fast_and_loses_nothing_else(
        servers: ServerRunner) -> None:
    srv = servers.start('''
        from pyswtask import TaskWorkerLost
        server = Server(worker_num=1, task_worker_num=1, max_wait_time=2.0)

        def go(server, wid):
            emit(event="tw", pid=Task.deliver("Demo", "pid"))
            started = time.time()
            emit(event="co_started")
            try:
                Task.deliver("Demo", "sleep", [20.0], timeout=30)
            except TaskWorkerLost as e:
                emit(event="co_lost", at=time.time(), text=str(e), waited=time.time() - started)
            emit(event="tw2", pid=Task.deliver("Demo", "pid", timeout=10))
            got = {}
            def done(tid, result):
                got[tid] = result
                if len(got) == 21:
                    kinds = {k: type(v).__name__ for k, v in got.items()}
                    emit(event="async_done", lost=[t for t in order if kinds[t] == "TaskWorkerLost"],
                         echoed=sorted(v for v in got.values() if isinstance(v, int)),
                         first=order[0], texts=[str(v) for v in got.values() if not isinstance(v, int)])
                    server.shutdown()
            # One loop turn: the sleep and the 20 echoes leave in one record, so the task worker
            # has read them all when it dies during the sleep.
            order = [Task.deliver("Demo", "sleep", [20.0], Task.TYPE_ASYNC, callback=done)]
            order += [Task.deliver("Demo", "echo", [i], Task.TYPE_ASYNC, callback=done)
                      for i in range(20)]
            emit(event="async_started")
        server.on("worker_start", go)
        server.start()
    ''')
    recs = read_records(srv, lambda r: any(x["event"] == "co_started" for x in r))
    tw_pid = next(r["pid"] for r in recs if r["event"] == "tw")
    time.sleep(0.3)
    killed_at = time.time()
    os.kill(tw_pid, signal.SIGKILL)
    recs = read_records(srv, lambda r: any(x["event"] == "async_started" for x in r))
    co = next(r for r in recs if r["event"] == "co_lost")
    assert co["at"] - killed_at < 1.0, "TaskWorkerLost came later than 1 s after the kill"
    assert (f"task worker 1 (pid {tw_pid}) died with signal SIGKILL while running this task or "
            "sending its result") in co["text"]
    tw2 = next(r["pid"] for r in recs if r["event"] == "tw2")
    assert tw2 != tw_pid
    time.sleep(0.3)
    os.kill(tw2, signal.SIGKILL)
    assert srv.wait(30) == 0, srv.err
    done = srv.by_event("async_done")[0]
    assert done["lost"] == [done["first"]], "only the running task may be lost"
    assert done["echoed"] == list(range(20)), "a task the dead worker had not started was lost"
    assert "while running this task" in done["texts"][0]


def test_a_killed_worker_is_respawned_and_its_results_go_to_nobody_else(
        servers: ServerRunner) -> None:
    srv = servers.start('''
        server = Server(worker_num=1, task_worker_num=1, max_wait_time=1.0)

        @listener(Event.FINISH_TASK)
        def on_finish(ev):
            emit(event="finish", pid=os.getpid(), task_id=ev.params[0])

        def go(server, wid):
            ids = [Task.deliver("Demo", "sleep", [0.3, i], Task.TYPE_ASYNC) for i in range(3)]
            emit(event="delivered", pid=os.getpid(), ids=ids)
        server.on("worker_start", go)
        server.start()
    ''')
    first = next(r for r in read_records(srv, lambda r: any(x["event"] == "delivered" for x in r))
                 if r["event"] == "delivered")
    os.kill(first["pid"], signal.SIGKILL)
    recs = read_records(srv, lambda r: len([x for x in r if x["event"] == "finish"]) >= 3,
                        timeout=20)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.wait(20) == 0
    second = next(r for r in recs if r["event"] == "delivered")
    assert second["pid"] != first["pid"]
    finishes = [r for r in recs if r["event"] == "finish"]
    assert {r["task_id"] for r in finishes} == set(second["ids"])
    assert not set(first["ids"]) & {r["task_id"] for r in finishes}, \
        "the new worker took results of the killed one"
    assert all(r["pid"] == second["pid"] for r in finishes)


def test_task_max_request_recycles_task_workers_without_losing_or_repeating_a_task(
        servers: ServerRunner) -> None:
    srv = servers.run('''
        server = Server(worker_num=1, task_worker_num=2, task_max_request=500, max_wait_time=2.0)

        def go(server, wid):
            got = []
            pids = set()
            def done(tid, result):
                got.append(result[0])
                pids.add(result[1])
                if len(got) == 5000:
                    emit(event="done", values=sorted(got), pids=len(pids))
                    server.shutdown()
            def burst(start):
                for i in range(start, start + 1000):
                    Task.deliver("Both", "run", [i], Task.TYPE_ASYNC, callback=done)
                if start + 1000 < 5000:
                    server.after(20, lambda: burst(start + 1000))
            burst(0)
        server.on("worker_start", go)

        @task()
        class Both:
            def run(self, i):
                return [i, os.getpid()]
        server.start()
    ''', timeout=60)
    done = srv.by_event("done")[0]
    assert done["values"] == list(range(5000)), "a task was lost or run twice"
    assert done["pids"] >= 8, "task workers were not recycled"
    assert "recycled itself" in srv.err


def test_max_request_recycles_a_worker_after_its_results_came_back(servers: ServerRunner) -> None:
    srv = servers.start('''
        server = Server(worker_num=1, task_worker_num=1, max_request=300, max_wait_time=2.0)

        def go(server, wid):
            results = []
            def done(t, r):
                results.append(r)
                if len(results) == 300:
                    emit(event="all", pid=os.getpid(), ok=sorted(results) == list(range(300)))
            for i in range(300):
                Task.deliver("Demo", "echo", [i], Task.TYPE_ASYNC, callback=done)
        server.on("worker_start", go)
        server.start()
    ''')
    recs = read_records(srv, lambda r: len({x["pid"] for x in r if x["event"] == "all"}) >= 3,
                        timeout=30)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.wait(20) == 0
    assert all(r["ok"] for r in recs if r["event"] == "all")
    assert "delivered 300 tasks (max_request): recycling" in srv.err


def test_reload_restarts_task_workers_one_at_a_time_and_every_task_runs_once(
        servers: ServerRunner) -> None:
    srv = servers.start('''
        server = Server(worker_num=2, task_worker_num=2, max_wait_time=3.0)

        def go(server, wid):
            got = []
            pids = set()
            N = 50_000
            def done(tid, result):
                got.append(result[0])
                pids.add(result[1])
                if len(got) == N:
                    emit(event="done", wid=wid, ok=sorted(got) == list(range(wid * N, (wid + 1) * N)),
                         pids=sorted(pids))
            emit(event="go", wid=wid)
            def burst(start):
                for i in range(start, min(start + 2000, (wid + 1) * N)):
                    Task.deliver("Both", "run", [i], Task.TYPE_ASYNC, callback=done)
                if start + 2000 < (wid + 1) * N:
                    server.after(10, lambda: burst(start + 2000))
            burst(wid * N)
        server.on("worker_start", go)

        @task()
        class Both:
            def run(self, i):
                return [i, os.getpid()]
        server.start()
    ''')
    read_records(srv, lambda r: len([x for x in r if x["event"] == "go"]) == 2)
    time.sleep(0.2)
    os.kill(srv.pid, signal.SIGUSR2)
    recs = read_records(srv, lambda r: len([x for x in r if x["event"] == "done"]) == 2,
                        timeout=60)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.wait(20) == 0, srv.err
    done = [r for r in recs if r["event"] == "done"]
    assert all(d["ok"] for d in done), "a task was lost or run twice during the reload"
    assert len(set().union(*(d["pids"] for d in done))) >= 3, "no task worker was replaced"
    assert "reloading the task workers one at a time" in srv.err


def test_reload_of_workers_keeps_one_serving_at_a_time(servers: ServerRunner) -> None:
    srv = servers.start('''
        server = Server(worker_num=2, task_worker_num=1, max_wait_time=1.0)
        def go(server, wid):
            emit(event="up", wid=wid, pid=os.getpid(), t=time.time(),
                 ok=Task.deliver("Demo", "echo", [wid]) == wid)
            server.on("worker_stop", lambda s, w: emit(event="down", wid=w, t=time.time()))
        server.on("worker_start", go)
        server.start()
    ''')
    first = read_records(srv, lambda r: len(r) == 2)
    os.kill(srv.pid, signal.SIGUSR1)
    recs = read_records(srv, lambda r: len([x for x in r if x["event"] == "up"]) == 2, timeout=20)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.wait(20) == 0
    ups = [r for r in recs if r["event"] == "up"]
    downs = [r for r in recs if r["event"] == "down"]
    assert {r["pid"] for r in ups}.isdisjoint(r["pid"] for r in first)
    assert all(r["ok"] for r in ups)
    # The second worker went down only after the first one's successor was up.
    assert downs[1]["t"] >= ups[0]["t"], (downs, ups)


def test_task_queue_size_bounds_the_tasks_in_flight(servers: ServerRunner) -> None:
    srv = servers.run('''
        server = Server(worker_num=1, task_worker_num=1, task_queue_size=1000)

        def go(server, wid):
            got = []
            peak = 0
            def done(tid, result):
                got.append(result)
                if len(got) == 50_000:
                    emit(event="done", ok=sorted(got) == list(range(50_000)), peak=peak)
                    server.shutdown()
            for i in range(50_000):
                Task.deliver("Demo", "echo", [i], Task.TYPE_ASYNC, callback=done)
                peak = max(peak, server_dispatcher().pending_count)
        server.on("worker_start", go)

        def server_dispatcher():
            from pyswtask import roles
            return roles.current().dispatcher
        server.start()
    ''', timeout=60)
    done = srv.by_event("done")[0]
    assert done["ok"]
    assert done["peak"] <= 1000


SIZES = [0, 1, 65_515, 65_516, 1 << 20, (64 << 20) - 64]


@pytest.mark.slow
@pytest.mark.parametrize("path", ["co", "async", "pipe"])
def test_payloads_up_to_64_mib_in_every_path(servers: ServerRunner, path: str) -> None:
    srv = servers.run('''
        PATH = sys.argv[1]
        SIZES = %r
        server = Server(worker_num=1, task_worker_num=1)

        @listener(Event.PIPE_MESSAGE)
        def on_pipe(ev):
            if ev.params[0] != "message":
                return
            data = ev.params[1]
            note(len(data), data == b"p" * len(data))

        got = []
        def note(size, same):
            emit(event="got", size=size, same=same)
            got.append(size)
            if len(got) == len(SIZES):
                server.shutdown()

        def go(server, wid):
            for size in SIZES:
                value = b"v" * size
                if PATH == "co":
                    back = Task.deliver("Demo", "echo", [value], timeout=30)
                    note(size, back == value)
                elif PATH == "async":
                    Task.deliver("Demo", "echo", [value], Task.TYPE_ASYNC,
                                 callback=lambda t, r: note(len(r), r == b"v" * len(r)))
                else:
                    server.send_message(b"p" * size, 0)
            try:
                Task.deliver("Demo", "echo", [b"x" * (64 << 20)])
            except ValueError as e:
                emit(event="too_big", text=str(e))
        server.on("worker_start", go)
        server.start()
    ''' % SIZES, args=[path], timeout=90)
    got = srv.by_event("got")
    assert sorted(r["size"] for r in got) == SIZES
    assert all(r["same"] for r in got)
    assert "above the server's package_max_length (67108864)" in srv.by_event("too_big")[0]["text"]


def test_task_workers_recycled_by_task_max_request_are_replaced_at_once(
        servers: ServerRunner) -> None:
    # One task a millisecond keeps each channel record to a task or two, so every task worker
    # recycles after about 20 tasks and some 20 processes take turns. A recycled one that waited
    # out the crash back-off (up to respawn_backoff_max, 5 s) left its channel unserved: the run
    # took about a minute, with gaps of seconds.
    srv = servers.run('''
        N = 400
        server = Server(worker_num=1, task_worker_num=2, task_max_request=20)

        @task()
        class Stamp:
            def run(self, i):
                return [i, os.getpid(), time.time()]

        def go(server, wid):
            got = []
            started = time.time()
            def done(tid, result):
                got.append(result)
                if len(got) == N:
                    finish()
            def finish():
                ran = [r for r in got if isinstance(r, list)]
                emit(event="done", elapsed=time.time() - started, values=sorted(r[0] for r in ran),
                     pids=len({r[1] for r in ran}), times=sorted(r[2] for r in ran),
                     errors=[repr(r) for r in got if not isinstance(r, list)][:5])
                server.shutdown()
            def deliver(i):
                Task.deliver("Stamp", "run", [i], Task.TYPE_ASYNC, callback=done)
                if i + 1 < N:
                    server.after(1, lambda: deliver(i + 1))
            deliver(0)
            # Reports what ran by then instead of waiting out the back-offs to the end.
            server.after(30_000, lambda: len(got) < N and finish())
        server.on("worker_start", go)
        server.start()
    ''', timeout=60)
    done = srv.by_event("done")[0]
    assert not done["errors"], done["errors"]
    assert done["values"] == list(range(400)), \
        f"a task was lost or run twice ({len(done['values'])} of 400 ran)"
    assert done["pids"] >= 15, f"only {done['pids']} task worker processes ran the tasks"
    assert done["elapsed"] < 15.0, f"400 tasks took {done['elapsed']:.1f} s"
    times = done["times"]
    gap = max(b - a for a, b in zip(times, times[1:]))
    assert gap < 2.0, f"no task ran for {gap:.2f} s"
    assert "recycled itself; respawning" in srv.err


def test_task_max_request_stops_at_the_limit_inside_a_burst_and_hands_the_rest_over(
        servers: ServerRunner) -> None:
    # 400 ASYNC tasks in one loop turn leave as one record per task worker: a task worker that
    # ran every task of the record it read before looking at the limit ran 200 (or all 400).
    srv = servers.run('''
        N = 400
        server = Server(worker_num=1, task_worker_num=2, task_max_request=20)

        @task()
        class Stamp:
            def run(self, i):
                return [i, os.getpid()]

        def go(server, wid):
            got = []
            started = time.time()
            def done(tid, result):
                got.append(result)
                if len(got) == N:
                    finish()
            def finish():
                ran = [r for r in got if isinstance(r, list)]
                per_pid = {}
                for _, pid in ran:
                    per_pid[pid] = per_pid.get(pid, 0) + 1
                emit(event="done", elapsed=time.time() - started, values=sorted(r[0] for r in ran),
                     per_pid=sorted(per_pid.values()),
                     errors=[repr(r) for r in got if not isinstance(r, list)][:5])
                server.shutdown()
            for i in range(N):
                Task.deliver("Stamp", "run", [i], Task.TYPE_ASYNC, callback=done)
            server.after(30_000, lambda: len(got) < N and finish())
        server.on("worker_start", go)
        server.start()
    ''', timeout=60)
    done = srv.by_event("done")[0]
    assert not done["errors"], done["errors"]
    assert done["values"] == list(range(400)), \
        f"a task was lost or run twice ({len(done['values'])} of 400 ran)"
    assert max(done["per_pid"]) <= 20, f"tasks run per task worker process: {done['per_pid']}"
    assert len(done["per_pid"]) >= 20
    assert done["elapsed"] < 20.0, f"400 tasks took {done['elapsed']:.1f} s"


def test_a_task_worker_killed_after_a_long_life_is_replaced_at_once(servers: ServerRunner) -> None:
    srv = servers.start('''
        server = Server(worker_num=1, task_worker_num=1)
        server.on("task_worker_start", lambda s, w: emit(event="tw_start", pid=os.getpid()))

        def go(server, wid):
            seen = set()
            def done(tid, pid):
                if isinstance(pid, int) and pid not in seen:
                    seen.add(pid)
                    emit(event="served", pid=pid, t=time.time())
            server.tick(20, lambda timer_id: Task.deliver("Demo", "pid", [], Task.TYPE_ASYNC,
                                                          callback=done))
        server.on("worker_start", go)
        server.start()
    ''')
    first = read_records(srv, lambda r: any(x["event"] == "served" for x in r))
    old = next(r["pid"] for r in first if r["event"] == "served")
    time.sleep(1.5)  # well past the first second, in which a death counts as a crash at start
    killed_at = time.time()
    os.kill(old, signal.SIGKILL)
    recs = read_records(srv, lambda r: any(x["event"] == "served" and x["pid"] != old for x in r))
    new = next(r for r in recs if r["event"] == "served" and r["pid"] != old)
    # Swoole replaces it in about 10 ms; a second leaves room for a loaded machine.
    assert new["t"] - killed_at < 1.0, f"the successor served {new['t'] - killed_at:.2f} s after the kill"
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.wait(20) == 0, srv.err
    assert "died with signal SIGKILL; respawning in 0.0 s" in srv.err


def test_workers_recycled_by_max_request_are_replaced_at_once(servers: ServerRunner) -> None:
    # Each worker delivers its 20 tasks at start and recycles within a fraction of a second;
    # with the crash back-off the tenth would have started some 20 s after the first.
    srv = servers.start('''
        server = Server(worker_num=1, task_worker_num=1, max_request=20)

        def go(server, wid):
            emit(event="up", pid=os.getpid(), t=time.time())
            for i in range(20):
                Task.deliver("Demo", "echo", [i], Task.TYPE_ASYNC)
        server.on("worker_start", go)
        server.start()
    ''')
    ups = read_records(srv, lambda r: len(r) >= 10, timeout=30)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.wait(20) == 0, srv.err
    assert len({r["pid"] for r in ups}) == len(ups)
    took = ups[-1]["t"] - ups[0]["t"]
    assert took < 8.0, f"10 workers took {took:.1f} s to take turns"
    assert "delivered 20 tasks (max_request): recycling" in srv.err
    assert "respawning in" not in srv.err, "a recycled worker was respawned as after a crash"


def test_a_worker_that_exits_0_before_it_serves_keeps_its_back_off(servers: ServerRunner) -> None:
    # Exit code 0 alone does not make a recycle: respawning this one at once would fork in a loop.
    srv = servers.start('''
        server = Server(worker_num=1, task_worker_num=1)

        def go(server, wid):
            emit(event="up", pid=os.getpid())
            sys.exit(0)
        server.on("worker_start", go)
        server.start()
    ''')
    read_records(srv, lambda r: len(r) >= 4, timeout=20)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.wait(20) == 0, srv.err
    delays = [line.rsplit("respawning in ", 1)[1] for line in srv.err.splitlines()
              if "worker 0" in line and "died with exit code 0; respawning in" in line]
    assert delays[:3] == ["0.1 s", "0.2 s", "0.4 s"], delays
