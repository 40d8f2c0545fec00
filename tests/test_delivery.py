"""Task.deliver from real workers to real task workers: CO, ASYNC, batch and asyncio."""

from __future__ import annotations

import pytest
from _testbase import ServerRunner


def test_co_async_and_batch_deliver_results(servers: ServerRunner) -> None:
    srv = servers.run('''
        finished = []

        @listener(Event.FINISH_TASK)
        def on_finish(ev):
            emit(event="finish", task_id=ev.params[0], result=ev.params[1])

        def start(server, wid):
            if wid != 0:
                return
            emit(event="co", result=Task.deliver("Demo", "echo", [1, "abc", 3.5]))
            ids = [Task.deliver("Demo", "echo", [i], Task.TYPE_ASYNC,
                                callback=lambda tid, r: emit(event="callback", task_id=tid, result=r))
                   for i in range(20)]
            emit(event="ids", ids=ids)
            emit(event="batch", result=Task.deliver_batch(
                [("Demo", "echo", [i]) for i in range(2000)] + [("Demo", "pid")], timeout=10))
            server.after(500, server.shutdown)

        server = Server(worker_num=2, task_worker_num=2)
        server.on("worker_start", start)
        sys.exit(server.start())
    ''')
    assert srv.by_event("co")[0]["result"] == [1, "abc", 3.5]
    ids = srv.by_event("ids")[0]["ids"]
    assert len(set(ids)) == 20 and all(isinstance(i, int) for i in ids)
    finishes = {r["task_id"]: r["result"] for r in srv.by_event("finish")}
    callbacks = {r["task_id"]: r["result"] for r in srv.by_event("callback")}
    assert finishes == callbacks == {tid: i for i, tid in enumerate(ids)}
    batch = srv.by_event("batch")[0]["result"]
    assert batch[:2000] == list(range(2000))
    assert isinstance(batch[2000], int)


def test_failures_come_back_as_task_errors(servers: ServerRunner) -> None:
    srv = servers.run('''
        def start(server, wid):
            if wid != 0:
                return
            for name, method, params in [("Demo", "boom", ["it broke"]), ("Nope", "x", []),
                                         ("Demo", "nope", []), ("Demo", "_secret", []),
                                         ("Demo", "__class__", []), ("Demo", "pid", [1])]:
                try:
                    Task.deliver(name, method, params)
                    emit(event="error", call=method, type=None)
                except TaskError as e:
                    emit(event="error", call=method, type=e.remote_type, message=e.remote_message,
                         tb=e.remote_traceback, text=str(e))
            try:
                Task.deliver("Demo", "echo", [object()])
            except TypeError as e:
                emit(event="typeerror", message=str(e))
            # Nothing of the refused call was sent: the task worker has counted only this one.
            emit(event="count", result=Task.deliver("Demo", "count", dst_worker_id=0))
            emit(event="after", result=Task.deliver("Demo", "echo", ["still serving"]))
            server.shutdown()

        server = Server(worker_num=1, task_worker_num=1)
        server.on("worker_start", start)
        sys.exit(server.start())
    ''')
    errors = {r["call"]: r for r in srv.by_event("error")}
    boom = errors["boom"]
    assert (boom["type"], boom["message"], boom["text"]) == ("ValueError", "it broke",
                                                             "ValueError: it broke")
    assert "server_app.py" in boom["tb"] and "raise ValueError(message)" in boom["tb"]
    assert errors["x"]["type"] == "UnknownTask" and "'Nope' is not registered" in errors["x"]["message"]
    for hidden in ("nope", "_secret", "__class__"):
        assert errors[hidden]["type"] == "UnknownMethod", errors[hidden]
        assert f"no public method '{hidden}'" in errors[hidden]["message"]
    assert errors["pid"]["type"] == "TypeError" and "positional argument" in errors["pid"]["message"]
    assert "params[0] = <object object" in srv.by_event("typeerror")[0]["message"]
    assert "not msgpack-able" in srv.by_event("typeerror")[0]["message"]
    assert srv.by_event("count")[0]["result"] == 1
    assert srv.by_event("after")[0]["result"] == "still serving"
    # The task worker logged the exception with its type, message, file and line.
    assert "raised ValueError: it broke at" in srv.err and "server_app.py:" in srv.err


def test_co_timeout_raises_and_the_late_result_is_dropped(servers: ServerRunner) -> None:
    srv = servers.run('''
        def start(server, wid):
            if wid != 0:
                return
            t0 = time.monotonic()
            try:
                Task.deliver("Demo", "sleep", [0.5, "late"], timeout=0.2, dst_worker_id=0)
                emit(event="timeout", raised=False)
            except TaskTimeout as e:
                emit(event="timeout", raised=True, elapsed=time.monotonic() - t0, text=str(e))
            # Same task worker: this call is answered after the late result has arrived.
            emit(event="next", result=Task.deliver("Demo", "echo", ["mine"], dst_worker_id=0))
            server.shutdown()

        server = Server(worker_num=1, task_worker_num=1)
        server.on("worker_start", start)
        sys.exit(server.start())
    ''')
    timeout = srv.by_event("timeout")[0]
    assert timeout["raised"] and 0.19 <= timeout["elapsed"] < 1.0
    assert "Demo.sleep gave no result within 0.2 s" in timeout["text"]
    assert srv.by_event("next")[0]["result"] == "mine"


def test_a_co_caller_polls_only_briefly_for_a_slow_result(servers: ServerRunner) -> None:
    """task_wait_spin is bounded: a worker blocked half a second on a slow task, after fast
    round trips (so it polls first), spends little of it on the CPU."""
    srv = servers.run('''
        def start(server, wid):
            if wid != 0:
                return
            fast = [Task.deliver("Demo", "echo", [i]) for i in range(20)]
            cpu, wall = time.process_time(), time.monotonic()
            slow = Task.deliver("Demo", "sleep", [0.5, "slept"], timeout=5)
            emit(event="slow", fast=fast, slow=slow, cpu=time.process_time() - cpu,
                 wall=time.monotonic() - wall)
            server.shutdown()

        server = Server(worker_num=1, task_worker_num=1, task_wait_spin=float(sys.argv[1]))
        server.on("worker_start", start)
        sys.exit(server.start())
    ''', args=["0.05"])
    r = srv.by_event("slow")[0]
    assert r["fast"] == list(range(20)) and r["slow"] == "slept" and r["wall"] >= 0.45
    # Polling the whole half second would cost about 0.5 s of CPU.
    assert r["cpu"] < 0.25, r


def test_asyncio_co_does_not_block_the_worker_loop(servers: ServerRunner) -> None:
    srv = servers.run('''
        ticks = []

        async def main(server):
            tid = server.tick(20, lambda t: ticks.append(time.monotonic()))
            t0 = time.monotonic()
            results = await asyncio.gather(
                Task.co("Demo", "sleep", [0.3, "a"], dst_worker_id=0),
                Task.co("Demo", "sleep", [0.3, "b"], dst_worker_id=1),
                Task.co("Demo", "later", ["async method"]))
            emit(event="gather", results=results, elapsed=time.monotonic() - t0, ticks=len(ticks))
            try:
                await Task.co("Demo", "sleep", [0.5], timeout=0.1)
            except TaskTimeout as e:
                emit(event="co_timeout", text=str(e))
            try:
                await Task.co("Demo", "boom")
            except TaskError as e:
                emit(event="co_error", type=e.remote_type)
            outcomes = await Task.co_batch([("Demo", "echo", [1]), ("Demo", "boom"),
                                            ("Demo", "sleep", [1.0])], timeout=0.4)
            emit(event="co_batch", kinds=[type(o).__name__ for o in outcomes], first=outcomes[0])
            server.clear_timer(tid)
            server.shutdown()

        def start(server, wid):
            if wid == 0:
                return main(server)

        server = Server(worker_num=1, task_worker_num=2)
        server.on("worker_start", start)
        sys.exit(server.start())
    ''')
    gather = srv.by_event("gather")[0]
    assert gather["results"] == ["a", "b", "async method"]
    assert 0.29 <= gather["elapsed"] < 1.5
    assert gather["ticks"] >= 5, "the loop was blocked while awaiting Task.co"
    assert "gave no result within 0.1 s" in srv.by_event("co_timeout")[0]["text"]
    assert srv.by_event("co_error")[0]["type"] == "ValueError"
    batch = srv.by_event("co_batch")[0]
    assert batch["kinds"] == ["int", "TaskError", "TaskTimeout"] and batch["first"] == 1


def test_large_payloads_cross_in_fragments(servers: ServerRunner) -> None:
    srv = servers.run('''
        def start(server, wid):
            if wid != 0:
                return
            blob = os.urandom(1 << 20)
            emit(event="co", same=Task.deliver("Demo", "echo", [blob], timeout=10) == blob)
            text = "x" * 300_000
            out = Task.deliver_batch([("Demo", "echo", [text + str(i)]) for i in range(8)], timeout=10)
            emit(event="batch", same=out == [text + str(i) for i in range(8)])
            emit(event="empty", result=Task.deliver("Demo", "echo", [b""]))
            server.shutdown()

        server = Server(worker_num=1, task_worker_num=2)
        server.on("worker_start", start)
        sys.exit(server.start())
    ''')
    assert srv.by_event("co")[0]["same"] is True
    assert srv.by_event("batch")[0]["same"] is True
    assert srv.by_event("empty")[0]["result"] == "b''"


def test_an_async_flood_of_large_tasks_does_not_deadlock(servers: ServerRunner) -> None:
    # 400 ASYNC tasks of 64 KiB, and their results as large, in flight at once: far above the
    # 4 MiB high-water mark on both sides. The task worker stops reading tasks while its results
    # back up; the worker must go on reading results while it waits for room to send.
    srv = servers.run('''
        blob = b"x" * 65536

        def start(server, wid):
            state = {"done": 0, "same": True}

            def on_done(task_id, result):
                state["done"] += 1
                state["same"] = state["same"] and result == blob
                if state["done"] == 400:
                    emit(event="flood", done=state["done"], same=state["same"])
                    server.shutdown()

            for _ in range(400):
                Task.deliver("Demo", "echo", [blob], Task.TYPE_ASYNC, callback=on_done)

        server = Server(worker_num=1, task_worker_num=1)
        server.on("worker_start", start)
        sys.exit(server.start())
    ''', timeout=60)
    assert srv.by_event("flood") == [{"event": "flood", "done": 400, "same": True}]


def test_dispatch_prefers_an_idle_task_worker_and_honours_dst(servers: ServerRunner) -> None:
    srv = servers.run('''
        def start(server, wid):
            if wid != 0:
                return
            pids = [Task.deliver("Demo", "pid", dst_worker_id=i) for i in range(2)]
            Task.deliver("Demo", "sleep", [1.0], Task.TYPE_ASYNC, dst_worker_id=0)
            server.after(200, lambda: probe(server, pids))

        def probe(server, pids):
            # Task worker 0 is busy for a second: every undirected call goes to task worker 1.
            seen = [Task.deliver("Demo", "pid") for _ in range(10)]
            emit(event="idle", pids=pids, seen=seen)
            try:
                Task.deliver("Demo", "pid", dst_worker_id=5)
            except ValueError as e:
                emit(event="bad_dst", text=str(e))
            server.shutdown()

        server = Server(worker_num=1, task_worker_num=2)
        server.on("worker_start", start)
        sys.exit(server.start())
    ''')
    idle = srv.by_event("idle")[0]
    assert idle["pids"][0] != idle["pids"][1]
    assert set(idle["seen"]) == {idle["pids"][1]}
    assert "dst_worker_id 5 is out of range: there are 2 task workers" in srv.by_event("bad_dst")[0]["text"]


def test_quick_calls_stay_on_one_task_worker_and_slow_work_spreads(
        servers: ServerRunner) -> None:
    # Calls awaited one by one whose tasks run faster than a wake-up all go to the first task
    # worker (one process woken, not each in turn); one running something slow gets no more of
    # them, and a batch is spread over the task workers whatever the calls before it.
    srv = servers.run('''
        def start(server, wid):
            if wid != 0:
                return
            quick = [Task.deliver("Demo", "pid") for _ in range(60)]
            t0 = time.monotonic()
            batch = Task.deliver_batch([("Demo", "sleep", [0.5, "b"])] * 2, timeout=5)
            emit(event="quick", pids=quick[20:], batch=batch,
                 batch_s=time.monotonic() - t0)
            Task.deliver("Demo", "sleep", [1.0], Task.TYPE_ASYNC, dst_worker_id=0)
            server.after(200, lambda: probe(server))

        def probe(server):
            seen = [Task.deliver("Demo", "pid") for _ in range(10)]
            emit(event="slow", seen=seen, first=Task.deliver("Demo", "pid", dst_worker_id=1))
            server.shutdown()

        server = Server(worker_num=1, task_worker_num=2)
        server.on("worker_start", start)
        sys.exit(server.start())
    ''')
    quick = srv.by_event("quick")[0]
    counts = sorted((quick["pids"].count(p) for p in set(quick["pids"])), reverse=True)
    assert counts[0] >= 36, f"quick calls spread over the task workers: {counts}"
    assert quick["batch"] == ["b", "b"] and quick["batch_s"] < 0.9, quick
    slow = srv.by_event("slow")[0]
    assert set(slow["seen"]) == {slow["first"]}, slow


def test_task_worker_events_fire_around_each_task(servers: ServerRunner) -> None:
    srv = servers.run('''
        for name in (Event.BEFORE_TASK, Event.AFTER_TASK, Event.RESOURCE_RELEASE):
            events.listen(name, lambda ev: emit(event="tw_event", name=ev.name, params=ev.params))

        def start(server, wid):
            Task.deliver("Demo", "echo", [5])
            try:
                Task.deliver("Demo", "boom")
            except TaskError:
                pass
            server.shutdown()

        server = Server(worker_num=1, task_worker_num=1)
        server.on("worker_start", start)
        sys.exit(server.start())
    ''')
    seen = [(r["name"], r["params"][1]) for r in srv.by_event("tw_event")]
    assert seen == [("task.before", "echo"), ("task.after", "echo"), ("resource.release", "echo"),
                    ("task.before", "boom"), ("task.after", "boom"), ("resource.release", "boom")]
    after = [r["params"] for r in srv.by_event("tw_event") if r["name"] == "task.after"]
    assert [p[3] for p in after] == [True, False]


@pytest.mark.parametrize("where, n", [("worker_start", 1), ("timer", 1), ("timer", 1000)])
def test_async_tasks_leave_while_the_delivering_callback_still_runs(
        servers: ServerRunner, where: str, n: int) -> None:
    # Swoole's task() writes at once. ASYNC tasks may be coalesced for a burst, but a callback
    # that goes on synchronously after delivering (here a blocking sleep of 2 s) must not hold
    # them until the worker's loop gets control back: the last one starts long before that.
    srv = servers.run(f'''
        N = {n}

        @task()
        class Clock:
            def now(self, i):
                if i == N - 1:
                    emit(event="started", at=time.time())

        def burst(server):
            emit(event="delivered", at=time.time())
            for i in range(N):
                Task.deliver("Clock", "now", [i], Task.TYPE_ASYNC)
            time.sleep(2)
            server.after(300, server.shutdown)

        def start(server, wid):
            if {where!r} == "worker_start":
                burst(server)
            else:
                server.after(100, lambda: burst(server))

        server = Server(worker_num=1, task_worker_num=2)
        server.on("worker_start", start)
        sys.exit(server.start())
    ''')
    delivered = srv.by_event("delivered")[0]["at"]
    started = srv.by_event("started")[0]["at"]
    assert started - delivered < (0.5 if n == 1 else 1.0), (
        f"the last of {n} ASYNC tasks started {started - delivered:.3f} s late")


def test_delivery_outside_a_worker_is_refused_with_directions() -> None:
    from pyswtask import ServerNotRunning, Task

    with pytest.raises(ServerNotRunning, match="works inside a worker of a running pyswtask server"):
        Task.deliver("Demo", "echo", [1])
    with pytest.raises(ServerNotRunning, match="message queue"):
        Task.deliver_batch([("Demo", "echo")])
