"""Large task and result bodies through the channels' shared-memory arenas, in real servers:
intact at every size around the threshold, a full arena falling back to the socket, and a task
worker killed with bodies in its arena."""

from __future__ import annotations

import mmap
import os
import signal
import socket
import textwrap
import time
from typing import Any

import pytest
from _testbase import ServerRunner
from test_process import read_records

from pyswtask._core import (
    ARENA_MIN_BODY,
    FLAG_ARENA,
    FLAG_ASYNC,
    FRAME_RESULT,
    FRAME_TASK,
    Arena,
    Dispatcher,
    TaskLoop,
    pack_envelope,
    pack_frame,
    parse_frames,
)

# Tasks that hash what they get and echo it back, so both directions are checked.
BIG = '''
import hashlib
from pyswtask import roles

@task("Big")
class Big:
    def digest(self, data):
        return [hashlib.sha256(data).hexdigest(), data]
    def double(self, data):
        return data * 2
    def attempt(self, data):
        return [hashlib.sha256(data).hexdigest(), Task.current().attempt]
    def slow(self, data, seconds):
        time.sleep(seconds)
        return [hashlib.sha256(data).hexdigest(), len(data)]
    def seq(self, data, i, meta=None):
        # 2 ms each: a burst fills the task worker's window faster than it takes bodies.
        started = time.time()
        Big.ran.append(i)
        time.sleep(0.002)
        return [hashlib.sha256(data).hexdigest(), i, meta, started]
    def ran_so_far(self):
        return list(Big.ran)
Big.ran = []

def blob(size, seed):
    # Different bytes for every task, so that a body read from a reused block shows.
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32) + b"z" * (size % 32)

def envelope_size(n, co):
    # A CO envelope carries its caller's deadline (a float) as a seventh field.
    from pyswtask.envelope import TYPE_ASYNC, TYPE_CO, pack_task
    if co:
        return len(pack_task("Big", "digest", [b"x" * n], TYPE_CO, 0, time.time() + 30))
    return len(pack_task("Big", "digest", [b"x" * n], TYPE_ASYNC, 0))

def params_for(body_size, co=False):
    # The bytes length whose packed task envelope is body_size bytes, exactly.
    n = body_size - (envelope_size(0, co) + 4)
    while envelope_size(n, co) > body_size:
        n -= 1
    while envelope_size(n, co) < body_size:
        n += 1
    assert envelope_size(n, co) == body_size, body_size
    return n

def arena():
    d = roles.current().dispatcher
    return {"used": d.arena_used, "sent": d.arena_counts[0], "full": d.arena_counts[1],
            "waiting": d.backlog_count}
'''


def script(body: str) -> str:
    return BIG + textwrap.dedent(body)


@pytest.mark.timeout(90)
def test_bodies_around_the_threshold_and_up_to_a_mib_arrive_intact(servers: ServerRunner) -> None:
    srv = servers.run(script('''
        import hashlib
        server = Server(worker_num=1, task_worker_num=2)
        SIZES = [ARENA - 1, ARENA, ARENA + 1, 65536, 65600, 1 << 20, 3 << 20]

        def go(server, wid):
            ok = []
            for i, size in enumerate(SIZES):
                data = blob(params_for(size, co=True), i)
                got = Task.deliver("Big", "digest", [data], timeout=30)
                ok.append(got == [hashlib.sha256(data).hexdigest(), data])
            emit(event="co", ok=ok, **arena())
            done = {}
            def finish(tid, result):
                done[tid] = result
                if len(done) == len(sent):
                    emit(event="async", ok=[done[t] == want for t, want in sent.items()],
                         **arena())
                    server.shutdown()
            sent = {}
            for i, size in enumerate(SIZES * 3):
                data = blob(params_for(size), 100 + i)
                tid = Task.deliver("Big", "digest", [data], Task.TYPE_ASYNC, callback=finish)
                sent[tid] = [hashlib.sha256(data).hexdigest(), data]
        server.on("worker_start", go)
        server.start()
    '''.replace("ARENA", str(ARENA_MIN_BODY))), timeout=80)
    co = srv.by_event("co")[0]
    assert co["ok"] == [True] * 7, co
    # Every body from the threshold up went by reference (the one below it did not).
    assert (co["sent"], co["full"]) == (6, 0)
    done = srv.by_event("async")[0]
    assert done["ok"] == [True] * 21
    assert (done["sent"], done["full"]) == (6 + 18, 0)
    assert done["used"] == 0, "an arena still holds bodies read long ago"


@pytest.mark.timeout(90)
def test_large_tasks_beyond_the_arena_window_wait_in_the_worker_in_order_as_delivered(
        servers: ServerRunner) -> None:
    """A task worker gets a window of large bodies in its arena at a time; the rest wait in the
    worker, packed later from what they were delivered with, and leave in order as it takes
    bodies. Params that could change meanwhile (a dict in them) are packed at once, and the
    list of params is copied: what the caller changes after deliver() is never what runs."""
    srv = servers.run(script('''
        import hashlib
        server = Server(worker_num=1, task_worker_num=1)
        N = 120

        def go(server, wid):
            order, wrong = [], []
            def finish(tid, result):
                i = want[tid][1]
                order.append(i)
                if result[:3] != want[tid]:
                    wrong.append(i)
                if len(order) == N:
                    server.after(100, lambda: done())
            def done():
                emit(event="done", order=order, wrong=wrong, **arena())
                server.shutdown()
            want = {}
            for i in range(N):
                data = blob(65536, i)
                meta = {"i": i} if i % 2 else None
                params = [data, i, meta] if meta else [data, i]
                tid = Task.deliver("Big", "seq", params, Task.TYPE_ASYNC, callback=finish)
                want[tid] = [hashlib.sha256(data).hexdigest(), i, meta and {"i": i}]
                params[1] = -1
                if meta:
                    meta["i"] = -1
            emit(event="burst", **arena())
        server.on("worker_start", go)
        server.start()
    '''), timeout=80)
    burst = srv.by_event("burst")[0]
    # 120 bodies of 64 KiB: a window of 512 KiB of them in the arena (7 whole ones, more as the
    # task worker takes them), the rest waiting.
    assert burst["sent"] + burst["waiting"] == 120, burst
    assert burst["sent"] >= 7 and burst["waiting"] > 0, burst
    done = srv.by_event("done")[0]
    assert done["wrong"] == [] and done["order"] == list(range(120)), done
    assert (done["waiting"], done["used"], done["full"]) == (0, 0, 0), done


@pytest.mark.timeout(90)
def test_a_blocking_callback_does_not_hold_back_large_tasks_beyond_the_window(
        servers: ServerRunner) -> None:
    """The flush watch sends what waits beyond the window while the delivering code blocks,
    as the task worker takes bodies: none waits for the loop to come back."""
    srv = servers.run(script('''
        server = Server(worker_num=1, task_worker_num=1)
        N = 100

        def go(server, wid):
            starts = []
            def finish(tid, result):
                starts.append(result[3])
                if len(starts) == N:
                    emit(event="done", last_start=max(starts), sleep_end=sleep_end)
                    server.shutdown()
            for i in range(N):
                Task.deliver("Big", "seq", [blob(65536, i), i], Task.TYPE_ASYNC, callback=finish)
            emit(event="burst", delivered=time.time(), **arena())
            time.sleep(1.5)
            sleep_end = time.time()
        server.on("worker_start", go)
        server.start()
    '''), timeout=80)
    burst = srv.by_event("burst")[0]
    assert burst["waiting"] > 0, burst
    done = srv.by_event("done")[0]
    # 100 tasks of 2 ms each: all started during the 1.5 s sleep.
    assert done["last_start"] < burst["delivered"] + 1.0 < done["sleep_end"], (burst, done)


@pytest.mark.timeout(90)
def test_a_co_call_behind_large_tasks_waiting_keeps_its_turn_and_one_given_up_never_runs(
        servers: ServerRunner) -> None:
    srv = servers.run(script('''
        from pyswtask import TaskTimeout
        server = Server(worker_num=1, task_worker_num=1)

        def go(server, wid):
            for i in range(60):
                Task.deliver("Big", "slow", [blob(65536, i), 0.004], Task.TYPE_ASYNC)
            waiting = arena()["waiting"]
            try:
                Task.deliver("Big", "seq", [b"gave up", -1], timeout=0.05)
                first = "ran"
            except TaskTimeout:
                first = "timed out"
            t0 = time.monotonic()
            ran = Task.deliver("Big", "ran_so_far", timeout=30)
            emit(event="co", waiting=waiting, first=first, ran=ran,
                 seconds=time.monotonic() - t0)
            server.shutdown()
        server.on("worker_start", go)
        server.start()
    '''), timeout=80)
    co = srv.by_event("co")[0]
    assert co["waiting"] > 0 and co["first"] == "timed out", co
    # The call given up while it waited in the worker was never sent, so never ran.
    assert co["ran"] == [], co
    # The second call waited for the 60 tasks ahead of it (0.24 s of sleeps at least).
    assert co["seconds"] > 0.15, co


@pytest.mark.timeout(90)
def test_more_large_tasks_than_the_arena_holds_go_through_the_socket_and_none_is_lost(
        servers: ServerRunner) -> None:
    srv = servers.start(script('''
        import hashlib
        # 256 KiB per channel and direction: three 64 KiB bodies; each worker's burst is 300.
        server = Server(worker_num=2, task_worker_num=2, task_arena_size=256 << 10)
        N = 300

        def go(server, wid):
            done = []
            want = {}
            def finish(tid, result):
                done.append(result == want[tid])
                if len(done) == N:
                    server.after(200, lambda: emit(event="done", wid=wid, ok=sum(done),
                                                   n=len(done), **arena()))
            for i in range(N):
                data = blob(65536, wid * 1000 + i)
                tid = Task.deliver("Big", "digest", [data], Task.TYPE_ASYNC, callback=finish)
                want[tid] = [hashlib.sha256(data).hexdigest(), data]
        server.on("worker_start", go)
        server.start()
    '''))
    recs = read_records(srv, lambda r: len([x for x in r if x["event"] == "done"]) == 2,
                        timeout=60)
    for done in (r for r in recs if r["event"] == "done"):
        assert (done["ok"], done["n"]) == (300, 300), done
        assert done["sent"] >= 3 and done["full"] >= 100, done
        assert done["sent"] + done["full"] == 300
        assert done["used"] == 0, done


@pytest.mark.timeout(90)
def test_a_task_worker_killed_with_bodies_in_its_arena_leaks_none(servers: ServerRunner) -> None:
    srv = servers.start(script('''
        import hashlib
        from pyswtask import TaskWorkerLost
        server = Server(worker_num=1, task_worker_num=1, max_wait_time=2.0)
        N = 40

        def go(server, wid):
            emit(event="tw", pid=Task.deliver("Demo", "pid"))
            done = {}
            want = {}
            def finish(tid, result):
                done[tid] = result
                if len(done) == N:
                    # The arena is read again once the last callback ran: nothing is left held.
                    server.after(300, lambda: report())
            def report():
                lost = [t for t in order if isinstance(done[t], TaskWorkerLost)]
                good = [t for t in order if done[t] == want[t]]
                emit(event="done", n=len(done), lost=len(lost), good=len(good),
                     first_lost=order.index(lost[0]) if lost else None, **arena())
                server.shutdown()
            order = []
            for i in range(N):
                data = blob(65536 + 7 * i, i)
                tid = Task.deliver("Big", "slow", [data, 0.05], Task.TYPE_ASYNC, callback=finish)
                order.append(tid)
                want[tid] = [hashlib.sha256(data).hexdigest(), len(data)]
            emit(event="burst", **arena())
        server.on("worker_start", go)
        server.start()
    '''))
    recs = read_records(srv, lambda r: any(x["event"] == "burst" for x in r))
    burst = next(r for r in recs if r["event"] == "burst")
    # 40 bodies of 64 KiB are more than a task worker's window in the arena (512 KiB): the rest
    # wait in the worker, and go to the successor with those sent again.
    assert burst["sent"] + burst["waiting"] == 40 and burst["used"] > 0, burst
    assert burst["sent"] >= 7 and burst["waiting"] > 0, burst
    tw_pid = next(r["pid"] for r in recs if r["event"] == "tw")
    time.sleep(0.4)
    os.kill(tw_pid, signal.SIGKILL)
    assert srv.wait(60) == 0, srv.err
    done = srv.by_event("done")[0]
    assert done["n"] == 40
    # The task it was running is lost, every other one ran once, and its arena space is back.
    assert done["lost"] == 1 and done["good"] == 39, done
    assert 0 < done["first_lost"] < 39
    assert done["used"] == 0, done


@pytest.mark.timeout(90)
def test_a_large_task_read_but_not_started_by_a_killed_task_worker_is_sent_again_intact(
        servers: ServerRunner) -> None:
    # Its body is kept only in the arena: sent again, it is read back from there. The held
    # small task and the large one after it leave in one record, so the task worker killed
    # while it runs the first has read the second without starting it.
    srv = servers.start(script('''
        import hashlib
        from pyswtask import TaskWorkerLost
        server = Server(worker_num=1, task_worker_num=1, max_wait_time=2.0)

        def go(server, wid):
            emit(event="tw", pid=Task.deliver("Demo", "pid"))
            server.after(50, burst)

        def burst():
            done = {}
            data = blob(65536, 7)
            def finish(tid, result):
                done[tid] = result
                if len(done) == 3:
                    server.after(300, lambda: report())
            def report():
                emit(event="done", first=done[t1] == [hashlib.sha256(b"a").hexdigest(), 1],
                     lost=type(done[t2]).__name__, big=done[t3],
                     want=hashlib.sha256(data).hexdigest(), **arena())
                server.shutdown()
            t1 = Task.deliver("Big", "slow", [b"a", 0.0], Task.TYPE_ASYNC, callback=finish)
            t2 = Task.deliver("Big", "slow", [b"b", 5.0], Task.TYPE_ASYNC, callback=finish)
            t3 = Task.deliver("Big", "attempt", [data], Task.TYPE_ASYNC, callback=finish)
            emit(event="burst", **arena())
        server.on("worker_start", go)
        server.start()
    '''))
    recs = read_records(srv, lambda r: any(x["event"] == "burst" for x in r))
    burst = next(r for r in recs if r["event"] == "burst")
    assert burst["sent"] == 1 and burst["used"] > 0
    tw_pid = next(r["pid"] for r in recs if r["event"] == "tw")
    time.sleep(1.5)
    os.kill(tw_pid, signal.SIGKILL)
    assert srv.wait(60) == 0, srv.err
    done = srv.by_event("done")[0]
    assert done["first"] and done["lost"] == "TaskWorkerLost", done
    assert done["big"] == [done["want"], 2], "the large task was not sent again intact"
    assert done["used"] == 0, done


@pytest.mark.timeout(90)
def test_finish_callbacks_of_large_results_run_between_batches_of_a_few_mib(
        servers: ServerRunner) -> None:
    # Twenty 1 MiB results wait while the worker sleeps; the loop decodes a few MiB of them,
    # runs their callbacks (freeing them), then reads on: never all twenty alive at once.
    srv = servers.run(script('''
        import hashlib
        server = Server(worker_num=1, task_worker_num=1)
        N = 20

        def go(server, wid):
            server.after(50, burst)

        def burst():
            got = []
            want = {}
            def finish(tid, result):
                got.append((tid, result == want[tid], roles.current().dispatcher.pending_count))
                if len(got) == N:
                    emit(event="done", order=[g[0] for g in got] == sorted(want),
                         ok=all(g[1] for g in got), waiting=[g[2] for g in got])
                    server.shutdown()
            for i in range(N):
                data = blob(1 << 20, i)
                tid = Task.deliver("Big", "double", [data[: len(data) // 2]], Task.TYPE_ASYNC,
                                   callback=finish)
                want[tid] = data[: len(data) // 2] * 2
            time.sleep(3)       # every result comes meanwhile
        server.on("worker_start", go)
        server.start()
    '''), timeout=80)
    done = srv.by_event("done")[0]
    assert done["order"] and done["ok"], done
    # Results not yet decoded when the first callback ran: all but the first batch's.
    assert 10 <= done["waiting"][0] < 20, done
    assert done["waiting"][-1] == 0


@pytest.mark.timeout(60)
def test_package_max_length_still_refuses_large_params_and_results(servers: ServerRunner) -> None:
    srv = servers.run(script('''
        server = Server(worker_num=1, task_worker_num=1, package_max_length=100_000)

        def go(server, wid):
            try:
                Task.deliver("Big", "digest", [b"p" * 150_000])
            except ValueError as e:
                emit(event="params", text=str(e))
            try:
                Task.deliver("Big", "double", [b"r" * 60_000])
            except TaskError as e:
                emit(event="result", text=str(e))
            emit(event="fits", ok=Task.deliver("Big", "digest", [b"f" * 90_000])[1] == b"f" * 90_000,
                 **arena())
            server.shutdown()
        server.on("worker_start", go)
        server.start()
    '''))
    assert "above the server's package_max_length (100000)" in srv.by_event("params")[0]["text"]
    assert "above the server's package_max_length (100000)" in srv.by_event("result")[0]["text"]
    fits = srv.by_event("fits")[0]
    assert fits["ok"] and fits["sent"] == 2 and fits["used"] == 0


def test_a_reference_outside_the_arena_is_dropped_and_named() -> None:
    # A worker's dispatcher reading a result frame that points past what its task worker wrote.
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    errors: list[str] = []
    tasks, results = Arena(1 << 20), Arena(1 << 20)
    busy = mmap.mmap(-1, 1)
    try:
        d = Dispatcher(0, [left.fileno()], busy, on_finish=lambda *a: None,
                       make_error=RuntimeError, make_lost=RuntimeError,
                       on_protocol_error=errors.append, epoch=1, arenas=[(tasks, results)])
        body = pack_envelope("Big", "digest", [b"q" * (ARENA_MIN_BODY + 10)])
        d.submit(body)
        assert tasks.used > len(body) and d.arena_counts == (1, 0)
        ref = (4096).to_bytes(8, "little") + (70_000).to_bytes(4, "little") + bytes(4)
        right.send(pack_frame(FRAME_RESULT, FLAG_ARENA, (1 << 32) | 1, 0, ref))
        right.send(pack_frame(FRAME_RESULT, FLAG_ARENA, (1 << 32) | 1, 0, b"short"))
        d.on_readable()
        assert errors == [
            f"worker 0: task {(1 << 32) | 1} from 0 on channel 0 dropped: an arena reference "
            "outside what was written there",
            f"worker 0: task {(1 << 32) | 1} from 0 on channel 0 dropped: a malformed arena "
            "reference",
        ]
        assert d.pending_count == 1, "a bad reference completed the task"
        del d
    finally:
        left.close()
        right.close()
        busy.close()



def test_a_body_in_the_arena_leaves_in_one_record_with_the_frames_around_it() -> None:
    # Inside a loop turn, ASYNC tasks after the first are held for the turn's end, a task whose
    # body goes to the arena too (its reference is one more frame): the turn's flush sends them
    # in one record, in order, with no send per body.
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    right.setblocking(False)
    tasks, results = Arena(1 << 20), Arena(1 << 20)
    busy = mmap.mmap(-1, 1)
    scheduled: list[Any] = []

    def records() -> list[list[tuple[int, bool]]]:
        out = []
        while True:
            try:
                frames = parse_frames(right.recv(65536))
            except BlockingIOError:
                return out
            out.append([(f[2], bool(f[1] & FLAG_ARENA)) for f in frames])
    try:
        d = Dispatcher(0, [left.fileno()], busy, on_finish=lambda *a: None,
                       make_error=RuntimeError, make_lost=RuntimeError,
                       on_protocol_error=print, epoch=1, arenas=[(tasks, results)])
        d.set_scheduler(scheduled.append)
        small = pack_envelope("Big", "digest", [b"s"])
        first = d.submit(small)
        held = d.submit(small)
        big = d.submit(pack_envelope("Big", "digest", [b"b" * ARENA_MIN_BODY]))
        big2 = d.submit(pack_envelope("Big", "digest", [b"c" * ARENA_MIN_BODY]))
        last = d.submit(small)
        # The first went through at once; the rest wait for the turn's flush.
        assert records() == [[(first, False)]]
        assert len(scheduled) == 1, "one flush scheduled for the turn's end"
        scheduled.pop()()
        assert records() == [[(held, False), (big, True), (big2, True), (last, False)]]
        del d
    finally:
        left.close()
        right.close()
        busy.close()


def test_large_results_of_one_record_leave_together_in_one_record() -> None:
    # A task worker sends the results of a record's quick tasks together when the record is
    # done, large ones in its arena too: one send and one wake-up of the worker for all four,
    # not one each.
    worker_end, task_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tasks, results = Arena(1 << 20), Arena(1 << 20)
    stop_r, stop_w = os.pipe()
    worker_end.send(b"".join(
        pack_frame(FRAME_TASK, FLAG_ASYNC, i, 0, pack_envelope("Big", "echo", [i]))
        for i in range(1, 5)))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            loop = TaskLoop(1, 0, [task_end.fileno()], bytearray(1), stop_r,
                            execute=lambda env, task_id, src: (True, bytes([env[2][0]]) * 40000),
                            on_signal=lambda b: 1, on_protocol_error=print,
                            arenas=[(tasks, results)])
            loop.run(2.0)
            code = 0
        finally:
            os._exit(code)
    try:
        worker_end.settimeout(10.0)
        frames = parse_frames(worker_end.recv(65536))
        assert [(f[0], f[2], bool(f[1] & FLAG_ARENA)) for f in frames] == [
            (FRAME_RESULT, i, True) for i in range(1, 5)]
        # Each reference names a block of its result's size: 40,000 bytes and their header.
        assert [int.from_bytes(f[4][8:12], "little") for f in frames] == [40003] * 4
        assert results.used >= 4 * 40003
    finally:
        os.write(stop_w, b"\x0f")
        os.waitpid(pid, 0)
        for fd in (stop_r, stop_w):
            os.close(fd)
        worker_end.close()
        task_end.close()


def _rss_kib(size_kib: int) -> int:
    # The resident size of this process's one mapping of size_kib (an arena made for it).
    lines = open("/proc/self/smaps").read().splitlines()
    found = [int(next(x for x in lines[i:] if x.startswith("Rss:")).split()[1])
             for i, line in enumerate(lines)
             if line.startswith("Size:") and int(line.split()[1]) == size_kib]
    assert len(found) == 1, found
    return found[0]


def test_a_ring_is_mapped_ahead_of_its_bodies_in_bulk() -> None:
    # The producer's first body maps the next few bodies' pages too (one system call, not a
    # page fault per 4 KiB), bounded to a few bodies: not the whole ring.
    capacity = (5 << 20) + (3 << 16)        # a size no other mapping of this process has
    size_kib = (capacity + 4096) // 1024
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tasks, results = Arena(capacity), Arena(1 << 20)
    busy = mmap.mmap(-1, 1)
    try:
        d = Dispatcher(0, [left.fileno()], busy, on_finish=lambda *a: None,
                       make_error=RuntimeError, make_lost=RuntimeError,
                       on_protocol_error=print, epoch=1, arenas=[(tasks, results)])
        body = pack_envelope("Big", "digest", [b"q" * 20000])
        d.submit(body)
        rss = _rss_kib(size_kib)
        assert 256 <= rss <= 512, rss
        for _ in range(10):
            d.submit(body)
        assert _rss_kib(size_kib) <= 1024, "mapped far beyond the bodies"
        del d
    finally:
        left.close()
        right.close()
        busy.close()
