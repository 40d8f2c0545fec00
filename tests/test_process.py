"""User processes, pipe messages and Task.deliver_by_process, in real servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from _testbase import ServerRunner


def read_records(srv: object, until: object, timeout: float = 20.0) -> list[dict[str, object]]:
    """Reads JSON lines from a running server until until(records) is true."""
    records: list[dict[str, object]] = []
    deadline = time.monotonic() + timeout
    while not until(records):  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"server did not say it in time; got {records}")
        line = srv.proc.stdout.readline()  # type: ignore[attr-defined]
        if not line:
            raise AssertionError(f"server ended early; got {records}\n{srv.proc.stderr.read()}")  # type: ignore[attr-defined]
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def test_a_user_process_delivers_async_and_co_tasks(servers: ServerRunner) -> None:
    srv = servers.run('''
        from pyswtask import process, ServerNotRunning

        @process(name="producer")
        def producer(server, proc):
            emit(event="co", result=Task.deliver_by_process("Demo", "echo", [1, "a"], type=Task.TYPE_CO))
            emit(event="co_least", result=Task.deliver_by_process("Demo", "pid", worker_id=-1,
                                                                 type=Task.TYPE_CO))
            try:
                Task.deliver_by_process("Demo", "boom", ["from process"], type=Task.TYPE_CO)
            except TaskError as e:
                emit(event="co_error", type=e.remote_type, message=e.remote_message)
            try:
                Task.deliver_by_process("Demo", "sleep", [1.0], type=Task.TYPE_CO, timeout=0.2)
            except TaskTimeout as e:
                emit(event="co_timeout", text=str(e))
            got = []
            req = Task.deliver_by_process("Demo", "echo", ["async"], worker_id=1,
                                          callback=lambda rid, r: got.append((rid, r)))
            plain = Task.deliver_by_process("Demo", "count", worker_id=0)
            for bad in (5, "0"):
                try:
                    Task.deliver_by_process("Demo", "echo", [1], worker_id=bad)
                except ValueError as e:
                    emit(event="bad_worker", text=str(e))
            try:
                Task.deliver_by_process("Demo", "echo", [{1, 2}])
            except TypeError as e:
                emit(event="bad_params", text=str(e))
            deadline = time.monotonic() + 5
            while not got and time.monotonic() < deadline:
                proc.read_messages(0.1)
            emit(event="async", req=req, got=got, plain=plain)
            server.shutdown()
            proc.sleep(60)

        @listener(Event.FINISH_TASK)
        def finished(ev):
            emit(event="worker_finish", wid=server.worker_id, result=ev.params[1])

        server = Server(worker_num=2, task_worker_num=2)
        sys.exit(server.start())
    ''')
    assert srv.by_event("co")[0]["result"] == [1, "a"]
    assert isinstance(srv.by_event("co_least")[0]["result"], int)
    assert srv.by_event("co_error")[0] == {"event": "co_error", "type": "ValueError",
                                           "message": "from process"}
    assert "Demo.sleep gave no result within 0.2 s" in srv.by_event("co_timeout")[0]["text"]
    texts = [r["text"] for r in srv.by_event("bad_worker")]
    assert all("worker_id" in t and "out of range" in t and "0..1" in t for t in texts), texts
    assert "data" not in srv.by_event("bad_params")[0]["text"]
    assert "params[0] = {1, 2} (set) is not msgpack-able" in srv.by_event("bad_params")[0]["text"]
    done = srv.by_event("async")[0]
    assert done["got"] == [[done["req"], "async"]] and isinstance(done["plain"], int)
    # The worker that delivered on the process's behalf fired its own finish events too.
    finishes = {(r["wid"], json.dumps(r["result"])) for r in srv.by_event("worker_finish")}
    assert (1, '"async"') in finishes and (0, "1") in finishes


def test_pipe_messages_between_every_kind_of_process(servers: ServerRunner) -> None:
    srv = servers.start('''
        from pyswtask import process
        ALL = range(5)    # workers 0-1, task worker 2, processes 3 (sync) and 4 (async)

        @listener(Event.PIPE_MESSAGE)
        def got(ev):
            mtype, data, src = ev.params
            emit(event="got", me=server.worker_id if server.worker_id >= 0 else None,
                 type=mtype, data=data, src=src)

        def greet(me):
            for dst in ALL:
                if dst != me:
                    server.send_message({"from": me}, dst, type="hello")

        @process(name="sync")
        def sync_proc(server, proc):
            greet(proc.id)
            proc.sleep(60)

        @process(name="async")
        async def async_proc(server, proc):
            greet(proc.id)
            await asyncio.sleep(60)

        server = Server(worker_num=2, task_worker_num=1)
        server.on("worker_start", lambda s, wid: greet(wid))
        server.on("task_worker_start", lambda s, wid: greet(wid))
        sys.exit(server.start())
    ''')
    records = read_records(srv, lambda rs: len(rs) >= 20)
    os.kill(srv.pid, signal.SIGTERM)
    assert srv.wait(20) == 0, srv.err
    pairs = {(r["src"], r["me"]) for r in records if r["event"] == "got"}
    assert pairs == {(a, b) for a in range(5) for b in range(5) if a != b}
    assert all(r["type"] == "hello" and r["data"] == {"from": r["src"]} for r in records)
    assert not srv.group_alive()


def test_large_messages_cross_whole(servers: ServerRunner) -> None:
    srv = servers.run('''
        import hashlib
        from pyswtask import process

        def digest(b):
            return hashlib.sha256(b).hexdigest()

        @process(name="echoer")
        async def echoer(server, proc):
            await asyncio.sleep(60)

        @listener(Event.PIPE_MESSAGE)
        def got(ev):
            mtype, data, src = ev.params
            if server.worker_id == 2:          # the process sends each big message back
                server.send_message(data, src, type="back", timeout=10)
            else:
                emit(event="back", size=len(data), digest=digest(data))
                server.shutdown()

        def start(server, wid):
            blob = os.urandom(1 << 20)
            emit(event="sent", size=len(blob), digest=digest(blob))
            server.send_message(blob, 2, type="big")

        server = Server(worker_num=1, task_worker_num=1)
        server.on("worker_start", start)
        sys.exit(server.start())
    ''')
    sent, back = srv.by_event("sent")[0], srv.by_event("back")[0]
    assert back["size"] == sent["size"] == 1 << 20 and back["digest"] == sent["digest"]


def test_a_failing_listener_does_not_stop_the_others(servers: ServerRunner) -> None:
    srv = servers.run('''
        @listener(Event.PIPE_MESSAGE, priority=5)
        def first(ev):
            emit(event="first")
            raise RuntimeError("first listener broke")

        @listener(Event.PIPE_MESSAGE)
        def second(ev):
            emit(event="second", data=ev.params[1])
            server.shutdown()

        server = Server(worker_num=2, task_worker_num=0)
        server.on("worker_start", lambda s, wid: wid == 0 and s.send_message("hi", 1))
        sys.exit(server.start())
    ''')
    assert [r["event"] for r in srv.records()] == ["first", "second"]
    assert "first listener broke" in srv.err


def test_user_processes_are_respawned_with_back_off_and_titled(servers: ServerRunner) -> None:
    srv = servers.start('''
        from pyswtask import process

        @process(name="steady")
        def steady(server, proc):
            emit(event="steady", pid=os.getpid())
            proc.sleep(60)

        @process(name="crasher")
        def crasher(server, proc):
            raise RuntimeError("crashes at once")

        server = Server(worker_num=1, task_worker_num=1)
        sys.exit(server.start())
    ''')
    first = read_records(srv, lambda rs: len(rs) >= 1)[0]
    wanted = ("pyswtask: master", "pyswtask: worker 0", "pyswtask: task worker 1",
              "pyswtask: process steady")
    # A child takes its title as it starts: on a loaded machine the last one may lag the
    # steady process's first line.
    deadline = time.monotonic() + 10
    while True:
        titles = subprocess.run(["ps", "-o", "args=", "--sid", str(srv.pid)],
                                capture_output=True, text=True, timeout=10).stdout
        if all(t in titles for t in wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for title in wanted:
        assert title in titles, titles
    time.sleep(1.2)  # a process that lived a second or more is respawned at once
    os.kill(first["pid"], signal.SIGKILL)
    second = read_records(srv, lambda rs: len(rs) >= 1)[0]
    assert second["pid"] != first["pid"]
    time.sleep(0.5)
    os.kill(srv.pid, signal.SIGTERM)
    assert srv.wait(20) == 0
    assert "process steady" in srv.err and "died with signal SIGKILL; respawning in 0.0 s" in srv.err
    delays = [line.rsplit("respawning in ", 1)[1] for line in srv.err.splitlines()
              if "process crasher" in line and "respawning in" in line]
    assert delays[:3] == ["0.1 s", "0.2 s", "0.4 s"], delays
    assert not srv.group_alive()


def test_delivery_from_an_orphaned_process_says_the_server_is_gone(servers: ServerRunner) -> None:
    srv = servers.start('''
        from pyswtask import process, ServerNotRunning

        import signal

        @process(name="orphan")
        def orphan(server, proc):
            # Outlives its master on purpose: children get SIGTERM when the master dies.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            emit(event="ready")
            while True:
                try:
                    Task.deliver_by_process("Demo", "echo", [1])
                except ServerNotRunning as e:
                    emit(event="gone", text=str(e))
                    return
                time.sleep(0.05)

        server = Server(worker_num=1, task_worker_num=1)
        sys.exit(server.start())
    ''')
    read_records(srv, lambda rs: len(rs) >= 1)
    os.kill(srv.pid, signal.SIGKILL)
    gone = read_records(srv, lambda rs: len(rs) >= 1)[0]
    assert gone["text"] == "Task.deliver_by_process: the server this process belonged to has stopped"


def test_deliver_by_process_and_send_message_outside_a_server() -> None:
    import pytest

    from pyswtask import DeliveryError, Server, ServerNotRunning, Task

    with pytest.raises(DeliveryError, match="works in the user processes of a running server"):
        Task.deliver_by_process("Demo", "echo")
    with pytest.raises(ServerNotRunning, match="send_message works inside the processes"):
        Server().send_message("x", 0)


def test_a_boot_false_process_starts_on_request(servers: ServerRunner) -> None:
    srv = servers.run('''
        from pyswtask import process

        @process(name="on_demand", boot=False)
        def on_demand(server, proc):
            emit(event="on_demand", pid=os.getpid(), id=proc.id)
            server.shutdown()
            proc.sleep(60)

        def start(server, wid):
            emit(event="worker", ids=server.process_ids, master=server.master_id)
            try:
                server.start_process("nope")
            except ValueError as e:
                emit(event="unknown", text=str(e))
            server.after(300, lambda: server.start_process("on_demand"))

        server = Server(worker_num=1, task_worker_num=1)
        server.on("worker_start", start)
        sys.exit(server.start())
    ''')
    worker = srv.by_event("worker")[0]
    assert worker["ids"] == {"on_demand": 2} and worker["master"] == 3
    assert srv.by_event("unknown")[0]["text"] == (
        "this server has no user process named 'nope' (processes: on_demand)")
    (started,) = srv.by_event("on_demand")
    assert started["id"] == 2
    assert "starting process on_demand on request" in srv.err


def test_async_deliveries_queued_behind_a_full_inbox_all_run(servers: ServerRunner) -> None:
    srv = servers.start('''
        from pyswtask import process
        N = 20000   # per process: far more than a worker's inbox holds at once

        done = 0

        @listener(Event.FINISH_TASK)
        def finished(ev):
            global done
            done += 1
            if done == N:
                emit(event="all_done", wid=server.worker_id)

        @process(name="sleeper")
        def sleeper(server, proc):
            for i in range(N):
                Task.deliver_by_process("Demo", "echo", [i], worker_id=0)
            emit(event="sent", by="sleeper")
            time.sleep(60)     # no pyswtask call: what is queued must still go out

        @process(name="quitter")
        def quitter(server, proc):
            if os.path.exists("quit"):
                proc.sleep(60)   # the respawned one: nothing more to send
            open("quit", "w").close()
            for i in range(N):
                Task.deliver_by_process("Demo", "echo", [i], worker_id=1)
            emit(event="sent", by="quitter")
            # returns: the process exits, writing out its queue first

        server = Server(worker_num=2, task_worker_num=2)
        sys.exit(server.start())
    ''')
    records = read_records(srv, lambda rs: sum(r["event"] == "all_done" for r in rs) == 2,
                           timeout=60)
    os.kill(srv.pid, signal.SIGTERM)
    assert srv.wait(20) == 0, srv.err
    assert {r["wid"] for r in records if r["event"] == "all_done"} == {0, 1}
    assert {r["by"] for r in records if r["event"] == "sent"} == {"sleeper", "quitter"}


def test_stray_task_results_do_not_break_a_process_waiting_for_its_own(servers: ServerRunner) -> None:
    """Regression: any process can send a "task.result" message; a malformed one made the CO
    deliver_by_process waiting in a user process raise TypeError, KeyError or ValueError."""
    srv = servers.run('''
        from pyswtask import process

        @process(name="waiter")
        def waiter(server, proc):
            try:
                emit(event="co", result=Task.deliver_by_process("Demo", "sleep", [0.6, "real"],
                                                                type=Task.TYPE_CO, timeout=5))
            except Exception as e:
                emit(event="co", error=f"{type(e).__name__}: {e}")
            server.shutdown()
            proc.sleep(60)

        def start(server, wid):
            def stray():
                for bad in (5, {"1": 2}, [1], [1, True], "abc", [[1], True, 0], [1, True, "x", 4]):
                    server.send_message(bad, server.process_ids["waiter"], type="task.result")
            server.after(200, stray)

        server = Server(worker_num=1, task_worker_num=1)
        server.on("worker_start", start)
        sys.exit(server.start())
    ''')
    assert srv.by_event("co")[0] == {"event": "co", "result": "real"}


def test_a_burst_of_async_deliveries_leaves_promptly_while_the_process_sleeps(
        servers: ServerRunner) -> None:
    # A burst's deliveries are held to leave many to a record; what the burst leaves behind
    # goes out once it pauses, with no further call from the process. A lone delivery after a
    # pause goes at once.
    srv = servers.start('''
        from pyswtask import process
        N = 500

        @listener(Event.FINISH_TASK)
        def finished(ev):
            value = ev.params[1]
            if value in (N - 1, "lone"):
                emit(event="finished", value=value, at=time.monotonic())

        @process(name="producer")
        def producer(server, proc):
            time.sleep(1.0)
            for i in range(N):
                Task.deliver_by_process("Demo", "echo", [i], worker_id=0)
            emit(event="sent", what="burst", at=time.monotonic())
            time.sleep(2.0)          # no pyswtask call
            Task.deliver_by_process("Demo", "echo", ["lone"], worker_id=1)
            emit(event="sent", what="lone", at=time.monotonic())
            time.sleep(60)

        server = Server(worker_num=2, task_worker_num=2)
        sys.exit(server.start())
    ''')
    records = read_records(srv, lambda rs: sum(r["event"] == "finished" for r in rs) == 2,
                           timeout=30)
    os.kill(srv.pid, signal.SIGTERM)
    assert srv.wait(20) == 0, srv.err
    sent = {r["what"]: r["at"] for r in records if r["event"] == "sent"}
    done = {r["value"]: r["at"] for r in records if r["event"] == "finished"}
    assert done[499] - sent["burst"] < 1.0, (sent, done)
    assert done["lone"] - sent["lone"] < 0.5, (sent, done)


def test_a_burst_of_pipe_messages_arrives_whole_in_order_while_the_process_sleeps(
        servers: ServerRunner) -> None:
    # A user process's send_message is held in a burst as its ASYNC deliveries are: what the
    # burst leaves behind goes out once it pauses, with no further call from the process.
    srv = servers.start('''
        from pyswtask import process
        N = 3000
        got = []

        @listener(Event.PIPE_MESSAGE)
        def on_message(ev):
            mtype, data, src = ev.params
            if mtype == "seq":
                got.append(data)
                if len(got) == N:
                    emit(event="burst", ordered=got == list(range(N)), at=time.monotonic())
            elif mtype == "lone":
                emit(event="lone", at=time.monotonic())

        @process(name="producer")
        def producer(server, proc):
            time.sleep(1.0)
            for i in range(N):
                server.send_message(i, 0, type="seq")
            emit(event="sent", what="burst", at=time.monotonic())
            time.sleep(2.0)          # no pyswtask call
            server.send_message(None, 0, type="lone")
            emit(event="sent", what="lone", at=time.monotonic())
            time.sleep(60)

        server = Server(worker_num=1, task_worker_num=1)
        sys.exit(server.start())
    ''')
    records = read_records(srv, lambda rs: any(r["event"] == "lone" for r in rs), timeout=30)
    os.kill(srv.pid, signal.SIGTERM)
    assert srv.wait(20) == 0, srv.err
    sent = {r["what"]: r["at"] for r in records if r["event"] == "sent"}
    burst = next(r for r in records if r["event"] == "burst")
    lone = next(r for r in records if r["event"] == "lone")
    assert burst["ordered"]
    assert burst["at"] - sent["burst"] < 1.0, (sent, burst)
    assert lone["at"] - sent["lone"] < 0.5, (sent, lone)


def test_send_message_from_a_process_times_out_on_a_full_inbox_and_loses_nothing_else(
        servers: ServerRunner) -> None:
    srv = servers.start('''
        from pyswtask import process
        sizes = []

        @listener(Event.PIPE_MESSAGE)
        def on_message(ev):
            mtype, data, src = ev.params
            sizes.append(len(data))
            if mtype == "last":
                emit(event="got", sizes=sizes)

        def start(server, wid):
            # The worker reads nothing for 3 s: its inbox fills, then the sender's queue.
            server.after(10, lambda: time.sleep(3.0))

        @process(name="producer")
        def producer(server, proc):
            time.sleep(1.0)
            blob, sent = b"x" * 300_000, 0
            try:
                for _ in range(20):
                    server.send_message(blob, 0, type="big", timeout=0.5)
                    sent += 1
            except TimeoutError as e:
                emit(event="timeout", sent=sent, text=str(e))
            server.send_message(b"", 0, type="last", timeout=10)
            time.sleep(60)

        server = Server(worker_num=1, task_worker_num=1)
        server.on("worker_start", start)
        sys.exit(server.start())
    ''')
    records = read_records(srv, lambda rs: any(r["event"] == "got" for r in rs), timeout=30)
    os.kill(srv.pid, signal.SIGTERM)
    assert srv.wait(20) == 0, srv.err
    timeout = next(r for r in records if r["event"] == "timeout")
    assert 2 <= timeout["sent"] < 20, timeout
    assert timeout["text"] == "pipe message to process 0 not sent within 0.5 s: its inbox is full"
    # Every message sent before the refused one arrived once, and the refused one never did.
    got = next(r for r in records if r["event"] == "got")
    assert got["sizes"] == [300_000] * timeout["sent"] + [0]
