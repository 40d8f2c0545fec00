"""Task.current() from every origin, FINISH_TASK's origin, timers in task workers, and
concurrent async tasks (task_enable_coroutine, task_max_concurrency)."""

from __future__ import annotations

import json
import os
import select
import signal
import time
from typing import Any

import msgpack
import pytest
import sysv_ipc
from _testbase import ServerProcess, ServerRunner, wait_for
from test_queue import command, queue_exists

from pyswtask import NoTaskRunning, Server, Task, TaskOrigin
from pyswtask._core import ENVELOPE_EXTRA_FIELDS, ProtocolError, pack_envelope, unpack_envelope
from pyswtask.context import TaskContext, context_from_wire
from pyswtask.envelope import ORIGIN_CRON, ORIGIN_USER_PROCESS, TYPE_ASYNC, TYPE_CO

_keys = iter(range(0x7A200000 + (os.getpid() & 0xFFF) * 16, 0x7A200000 + (os.getpid() & 0xFFF) * 16 + 16))


def new_key() -> int:
    key = next(_keys)
    for remove in (lambda: sysv_ipc.MessageQueue(key).remove(),
                   lambda: sysv_ipc.SharedMemory(key).remove()):
        try:
            remove()
        except sysv_ipc.ExistentialError:
            pass
    return key


def stop(srv: ServerProcess) -> ServerProcess:
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.wait(30)
    assert code == 0, f"server exited with {code}\n{srv.err}"
    return srv


# -- the envelope's optional fields -------------------------------------------------------------

def test_the_envelope_keeps_six_fields_unless_it_carries_more() -> None:
    six = pack_envelope("t", "m", [1], 2, "log", 3)
    assert msgpack.unpackb(six) == ["t", "m", [1], 2, "log", 3]
    assert unpack_envelope(six) == ("t", "m", [1], 2, "log", 3)
    seven = pack_envelope("t", "m", [1], 1, "", 0, 1700000000.5)
    assert unpack_envelope(seven) == ("t", "m", [1], 1, "", 0, 1700000000.5)
    nine = pack_envelope("t", "m", [], 2, "", 0, None, 4242, ORIGIN_CRON)
    assert unpack_envelope(nine) == ("t", "m", [], 2, "", 0, None, 4242, ORIGIN_CRON)
    assert ENVELOPE_EXTRA_FIELDS == ("deadline", "origin_pid", "origin_role")
    # An int deadline is packed as a float: the reader takes floats only.
    assert unpack_envelope(pack_envelope("t", "m", [], 1, "", 0, 5))[6] == 5.0


@pytest.mark.parametrize("fields", [
    ["t", "m", [], 1, "", 0, "soon"],                     # deadline not a float
    ["t", "m", [], 1, "", 0, None, "pid", 2],             # origin pid not an int
    ["t", "m", [], 1, "", 0, None, 7, 2.5],               # origin role not an int
    ["t", "m", [], 1, "", 0, None, 7],                    # eight fields
    ["t", "m", [], 1, "", 0, None, 7, 2, 0],              # ten fields
])
def test_malformed_extra_fields_are_refused(fields: list[Any]) -> None:
    with pytest.raises(ProtocolError, match="malformed task envelope"):
        unpack_envelope(msgpack.packb(fields))


def test_the_context_is_read_from_the_header_and_the_envelope() -> None:
    worker_pid, task_id = 1234, (1234 << 32) | 9
    ctx = context_from_wire(("T", "m", [], TYPE_ASYNC, "", 0), task_id, 1, False, 1, 3)
    assert ctx == TaskContext(id=task_id, name="T", method="m", type="async",
                              origin_pid=worker_pid, origin_role="worker", deadline=None,
                              attempt=1, worker_id=1, task_worker_id=3)
    ctx = context_from_wire(("T", "m", [], TYPE_CO, "", 0, 99.5), task_id, 0, True, 3, 3)
    assert (ctx.origin_role, ctx.origin_pid, ctx.type, ctx.deadline, ctx.attempt,
            ctx.worker_id) == ("program", worker_pid, "co", 99.5, 3, None)
    ctx = context_from_wire(("T", "m", [], TYPE_CO, "", 0, 7.0, 555, ORIGIN_USER_PROCESS),
                            task_id, 0, False, 1, 3)
    assert ctx.origin == TaskOrigin(555, "user_process") and ctx.type == "co"


def test_outside_a_server_there_is_no_current_task() -> None:
    with pytest.raises(NoTaskRunning, match="Task.current\\(\\) works inside a task method, in a "
                                            "task worker; this process is a program outside"):
        Task.current()


def test_the_new_settings_are_checked_by_name() -> None:
    assert Server(task_enable_coroutine=True).settings["task_max_concurrency"] == 100
    with pytest.raises(ValueError, match="setting task_enable_coroutine must be True or False"):
        Server(task_enable_coroutine=1)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="setting task_max_concurrency must be a positive int"):
            Server(task_max_concurrency=bad)


# -- every origin --------------------------------------------------------------------------------

ORIGINS = '''
    import dataclasses
    from pyswtask import NoTaskRunning, process, scheduled

    KEY = int(sys.argv[1])

    @task()
    class Ctx:
        def who(self, tag):
            emit(event="ctx", tag=tag, now=time.time(), **dataclasses.asdict(Task.current()))
            return tag

        @scheduled(cron="* * * * * *")
        def every_second(self):
            emit(event="ctx", tag="cron", now=time.time(), **dataclasses.asdict(Task.current()))

    @listener(Event.FINISH_TASK)
    def finished(event):
        emit(event="finish", id=event.params[0], result=event.params[1], pid=event.origin.pid,
             role=event.origin.role)

    @listener(Event.PROCESS_START)
    def process_start(event):
        emit(event="process", name=event.params[0], pid=os.getpid())

    @process(name="feeder")
    def feeder(server, proc):
        sent = time.time()
        result = Task.deliver_by_process("Ctx", "who", ["up-co"], timeout=5, worker_id=0,
                                         type=Task.TYPE_CO)
        emit(event="feeder", pid=os.getpid(), sent=sent, result=result)
        Task.deliver_by_process("Ctx", "who", ["up-async"], worker_id=0)
        proc.sleep(60)

    async def awaiting():
        sent = time.time()
        await Task.co("Ctx", "who", ["worker-await"], timeout=4)
        emit(event="sent", tag="worker-await", at=sent)

    def worker_start(server, wid):
        emit(event="worker", pid=os.getpid())
        sent = time.time()
        Task.deliver("Ctx", "who", ["worker-co"], timeout=5)
        emit(event="sent", tag="worker-co", at=sent)
        emit(event="sent", tag="worker-async",
             id=Task.deliver("Ctx", "who", ["worker-async"], Task.TYPE_ASYNC))
        sent = time.time()
        Task.deliver_batch([("Ctx", "who", ["worker-batch"])], timeout=6)
        emit(event="sent", tag="worker-batch", at=sent)
        asyncio.get_event_loop().create_task(awaiting())

    def task_worker_start(server, wid):
        try:
            Task.current()
        except NoTaskRunning as exc:
            emit(event="outside", text=str(exc))

    server = Server(worker_num=1, task_worker_num=1, cron=True, message_queue_key=KEY,
                    max_wait_time=2.0)
    server.on("worker_start", worker_start)
    server.on("task_worker_start", task_worker_start)
    server.start()
'''


@pytest.mark.timeout(90)
def test_task_context_from_every_origin(servers: ServerRunner) -> None:
    key = new_key()
    srv = servers.start(ORIGINS, args=[str(key)])
    wait_for(lambda: srv.proc.poll() is not None or queue_exists(key), timeout=20)
    time.sleep(0.5)
    program = command('''
        sent = time.time()
        Task.deliver("Ctx", "who", ["program-co"], timeout=5)
        Task.deliver("Ctx", "who", ["program-async"], Task.TYPE_ASYNC)
        Task.flush()
        emit(event="program", pid=os.getpid(), sent=sent)
    ''', key)[0]
    time.sleep(2.5)         # the crontab runs its every-second rule at least once
    stop(srv)
    ctx = {}
    for r in srv.by_event("ctx"):
        ctx.setdefault(r["tag"], r)
    worker = srv.by_event("worker")[0]["pid"]
    feeder = srv.by_event("feeder")[0]
    cron_exec = next(r["pid"] for r in srv.by_event("process") if r["name"] == "cronExec")
    sent = {r["tag"]: r for r in srv.by_event("sent")}
    task_worker = 1

    def check(tag: str, type: str, origin: tuple[int, str], worker_id: int | None,
              timeout: float | None = None, sent_at: float = 0.0) -> None:
        c = ctx[tag]
        assert (c["type"], c["origin_pid"], c["origin_role"]) == (type, *origin), c
        assert (c["attempt"], c["worker_id"], c["task_worker_id"]) == (1, worker_id, task_worker), c
        assert (c["name"], c["method"]) == (("pyswtask.cron", "run") if tag == "cron"
                                            else ("Ctx", "who"))
        if timeout is None:
            assert c["deadline"] is None, c
        else:
            # The caller's own clock, at the delivery, plus its timeout.
            assert sent_at + timeout <= c["deadline"] <= sent_at + timeout + 1.0, (c, sent_at)
            assert c["deadline"] > c["now"]

    check("worker-co", "co", (worker, "worker"), 0, 5, sent["worker-co"]["at"])
    check("worker-async", "async", (worker, "worker"), 0)
    check("worker-batch", "co", (worker, "worker"), 0, 6, sent["worker-batch"]["at"])
    check("worker-await", "co", (worker, "worker"), 0, 4, sent["worker-await"]["at"])
    check("up-co", "co", (feeder["pid"], "user_process"), 0, 5, feeder["sent"])
    check("up-async", "async", (feeder["pid"], "user_process"), 0)
    check("cron", "async", (cron_exec, "cron"), 0)
    check("program-co", "co", (program["pid"], "program"), None, 5, program["sent"])
    check("program-async", "async", (program["pid"], "program"), None)
    assert feeder["result"] == "up-co"
    assert ctx["worker-async"]["id"] == sent["worker-async"]["id"]
    assert len({c["id"] for c in ctx.values()}) == len(ctx)
    # FINISH_TASK, in the worker: the same origin as the task saw, for the worker's own ASYNC
    # task and for those it delivered on behalf of the user process and the crontab.
    finishes = {r["id"]: r for r in srv.by_event("finish")}
    for tag in ("worker-async", "up-co", "up-async", "cron"):
        f = finishes[ctx[tag]["id"]]
        assert (f["pid"], f["role"]) == (ctx[tag]["origin_pid"], ctx[tag]["origin_role"]), tag
    assert finishes[ctx["up-async"]["id"]]["result"] == "up-async"
    # CO results go to their callers, not to FINISH_TASK.
    assert ctx["worker-co"]["id"] not in finishes
    assert srv.by_event("outside")[0]["text"] == (
        "Task.current() works inside a task method: this task worker runs none now (a hook, "
        "timer or listener runs between tasks)")


ATTEMPT = '''
    import dataclasses

    @task()
    class Ctx:
        def who(self, tag):
            emit(event="ctx", tag=tag, **dataclasses.asdict(Task.current()))
            return tag

        def hold(self):
            emit(event="holding", pid=os.getpid())
            time.sleep(30)

    def finished(task_id, result):
        emit(event="finished", id=task_id, result=repr(result))

    def worker_start(server, wid):
        Task.deliver("Ctx", "who", ["first"], timeout=5)
        # The first ASYNC task of a loop turn leaves at once, the next ones together: hold and
        # second share a record, which the task worker reads whole before it starts hold;
        # killed while it holds, it never started second.
        Task.deliver("Ctx", "who", ["alone"], Task.TYPE_ASYNC, callback=finished)
        Task.deliver("Ctx", "hold", [], Task.TYPE_ASYNC, callback=finished)
        Task.deliver("Ctx", "who", ["second"], Task.TYPE_ASYNC, callback=finished)

    server = Server(worker_num=1, task_worker_num=1, max_wait_time=2.0)
    server.on("worker_start", worker_start)
    server.start()
'''


@pytest.mark.timeout(60)
def test_a_task_sent_again_after_its_task_worker_died_sees_attempt_2(servers: ServerRunner) -> None:
    srv = servers.start(ATTEMPT)
    holding = wait_for(lambda: _line(srv, "holding"), timeout=20)
    os.kill(holding["pid"], signal.SIGKILL)
    wait_for(lambda: _line(srv, "ctx", tag="second"), timeout=20)
    stop(srv)
    ctx = {r["tag"]: r for r in srv.by_event("ctx")}
    assert ctx["first"]["attempt"] == 1
    assert ctx["second"]["attempt"] == 2
    results = [r["result"] for r in srv.by_event("finished")]
    assert "'second'" in results and any("TaskWorkerLost" in r for r in results), results


def _line(srv: ServerProcess, event: str, **match: Any) -> dict[str, Any] | None:
    """A JSON line of a running server, read as it comes. Read from the pipe's descriptor, not
    its buffered reader, so no line waits in a buffer that select cannot see."""
    fd = srv.proc.stdout.fileno()  # type: ignore[union-attr]
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        srv.out += chunk.decode()
    for line in srv.out.splitlines():
        if line.startswith("{") and line.endswith("}"):
            r = json.loads(line)
            if r.get("event") == event and all(r.get(k) == v for k, v in match.items()):
                return r  # type: ignore[no-any-return]
    return None


# -- timers in a task worker ---------------------------------------------------------------------

TIMERS = '''
    SPANS = []

    @task()
    class Work:
        def run(self, seconds):
            start = time.monotonic()
            time.sleep(seconds)
            SPANS.append((start, time.monotonic()))
            return seconds

        def later(self, ms):
            # A timer started inside a task: it fires after the task, though nothing else comes.
            server.after(ms, lambda: emit(event="later", at=time.monotonic()))
            return time.monotonic()

        def report(self):
            return SPANS

    def task_worker_start(server, wid):
        fires = []

        def tick(timer_id):
            fires.append(time.monotonic())
            if len(fires) == 20:
                server.clear_timer(timer_id)
                emit(event="ticks", fires=fires, pid=os.getpid())

        server.tick(50, tick)
        server.after(120, lambda: emit(event="after", at=time.monotonic()))

    def worker_start(server, wid):
        results = [Task.deliver("Work", "run", [0.03], timeout=5) for _ in range(20)]
        emit(event="results", results=results)
        time.sleep(1.5)
        spans = Task.deliver("Work", "report", timeout=5)
        emit(event="spans", spans=spans)
        started = Task.deliver("Work", "later", [200], timeout=5)
        emit(event="later_started", at=started)
        server.after(800, server.shutdown)

    server = Server(worker_num=1, task_worker_num=1, max_wait_time=2.0)
    server.on("worker_start", worker_start)
    server.on("task_worker_start", task_worker_start)
    server.start()
'''


@pytest.mark.timeout(60)
def test_timers_in_a_task_worker_fire_between_tasks(servers: ServerRunner) -> None:
    srv = servers.run(TIMERS)
    assert srv.by_event("results")[0]["results"] == [0.03] * 20
    fires = srv.by_event("ticks")[0]["fires"]
    assert len(fires) == 20           # cleared at the 20th: no 21st
    assert all(b > a for a, b in zip(fires, fires[1:]))
    # None fired while a task ran: timers run between tasks only.
    spans = srv.by_event("spans")[0]["spans"]
    assert len(spans) == 20
    for at in fires:
        assert not any(start < at < end for start, end in spans), at
    assert len(srv.by_event("after")) == 1
    # The timer a task started fired once its time came, with nothing else to wake the loop.
    later = srv.by_event("later")
    assert len(later) == 1
    assert later[0]["at"] - srv.by_event("later_started")[0]["at"] >= 0.19
    assert "Traceback" not in srv.err, srv.err


# -- concurrent async tasks ----------------------------------------------------------------------

CONCURRENT = '''
    import dataclasses

    NOW = {"running": 0, "peak": 0, "sync": []}

    @task()
    class Co:
        async def nap(self, i):
            before = Task.current()
            await asyncio.sleep(0.1)
            after = Task.current()
            assert before == after, (before, after)
            return [i * 2, after.id]

        async def track(self, seconds):
            NOW["running"] += 1
            NOW["peak"] = max(NOW["peak"], NOW["running"])
            await asyncio.sleep(seconds)
            NOW["running"] -= 1
            return NOW["peak"]

        async def fail(self):
            await asyncio.sleep(0.01)
            raise KeyError("gone")

        def hold(self, seconds):
            start = time.monotonic()
            time.sleep(seconds)
            NOW["sync"].append((start, time.monotonic()))
            return seconds

        def report(self):
            peak, NOW["peak"] = NOW["peak"], 0
            return {"peak": peak, "sync": NOW["sync"], "pid": os.getpid()}

    async def main(server):
        t = time.monotonic()
        results = await Task.co_batch([("Co", "nap", [i]) for i in range(100)], timeout=20)
        emit(event="naps", took=time.monotonic() - t, results=results)
        t = time.monotonic()
        mixed = await Task.co_batch([("Co", "hold", [0.1]) for _ in range(5)]
                                    + [("Co", "nap", [i]) for i in range(20)], timeout=20)
        emit(event="mixed", took=time.monotonic() - t, results=mixed)
        emit(event="report", **await Task.co("Co", "report"))
        peaks = await Task.co_batch([("Co", "track", [0.05]) for _ in range(40)], timeout=20)
        emit(event="peaks", peaks=peaks, report=await Task.co("Co", "report"))
        try:
            await Task.co("Co", "fail")
        except TaskError as exc:
            emit(event="failed", type=exc.remote_type, message=exc.remote_message)
        server.shutdown()

    def worker_start(server, wid):
        asyncio.get_event_loop().create_task(main(server))

    server = Server(worker_num=1, task_worker_num=1, task_enable_coroutine=True,
                    task_max_concurrency=int(sys.argv[1]), max_wait_time=2.0)
    server.on("worker_start", worker_start)
    server.start()
'''


@pytest.mark.timeout(90)
def test_a_hundred_async_tasks_run_at_once_on_one_task_worker(servers: ServerRunner) -> None:
    srv = servers.run(CONCURRENT, args=["100"], timeout=60)
    naps = srv.by_event("naps")[0]
    assert [r[0] for r in naps["results"]] == [i * 2 for i in range(100)]
    assert len({r[1] for r in naps["results"]}) == 100     # each saw its own Task.current()
    # One at a time, 100 naps of 0.1 s take 10 s; at once, a fraction of a second.
    assert naps["took"] < 5.0, naps["took"]
    mixed = srv.by_event("mixed")[0]
    assert mixed["results"][:5] == [0.1] * 5
    assert [r[0] for r in mixed["results"][5:]] == [i * 2 for i in range(20)]
    # Sync methods still run one at a time, whatever coroutines run around them.
    spans = sorted(srv.by_event("report")[0]["sync"])
    assert len(spans) == 5
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    assert srv.by_event("peaks")[0]["report"]["peak"] == 40
    failed = srv.by_event("failed")[0]
    assert (failed["type"], failed["message"]) == ("KeyError", "'gone'")


@pytest.mark.timeout(90)
def test_task_max_concurrency_bounds_the_coroutines_running_at_once(servers: ServerRunner) -> None:
    srv = servers.run(CONCURRENT, args=["7"], timeout=60)
    peaks = srv.by_event("peaks")[0]
    assert len(peaks["peaks"]) == 40 and max(peaks["peaks"]) == 7
    assert peaks["report"]["peak"] == 7
    naps = srv.by_event("naps")[0]
    assert [r[0] for r in naps["results"]] == [i * 2 for i in range(100)]   # nothing lost


QUEUE_ATTEMPT = '''
    import dataclasses

    @task()
    class Ctx:
        def who(self, tag):
            emit(event="ctx", tag=tag, **dataclasses.asdict(Task.current()))
            return tag

        def hold(self):
            emit(event="holding", pid=os.getpid())
            time.sleep(30)

    server = Server(worker_num=1, task_worker_num=1, message_queue_key=int(sys.argv[1]),
                    max_wait_time=2.0)
    server.start()
'''


@pytest.mark.timeout(60)
def test_a_queue_task_put_back_after_its_task_worker_died_sees_attempt_2(
        servers: ServerRunner) -> None:
    key = new_key()
    srv = servers.start(QUEUE_ATTEMPT, args=[str(key)])
    wait_for(lambda: srv.proc.poll() is not None or queue_exists(key), timeout=20)
    time.sleep(0.5)
    # ASYNC tasks of a program leave many to a message: the task worker takes both at once.
    command('''
        Task.deliver("Ctx", "hold", [], Task.TYPE_ASYNC)
        Task.deliver("Ctx", "who", ["put-back"], Task.TYPE_ASYNC)
        Task.flush()
    ''', key)
    holding = wait_for(lambda: _line(srv, "holding"), timeout=20)
    os.kill(holding["pid"], signal.SIGKILL)
    wait_for(lambda: _line(srv, "ctx", tag="put-back"), timeout=20)
    stop(srv)
    (ctx,) = srv.by_event("ctx")
    assert (ctx["attempt"], ctx["origin_role"], ctx["worker_id"]) == (2, "program", None)
