"""The compiled Dispatcher and TaskLoop over real SOCK_SEQPACKET sockets, without a server.

The peer of the dispatcher is either a real TaskLoop in a forked process or the test itself
writing raw records, which is how malformed input is injected.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import select
import signal
import socket
import struct
import time
from typing import Any, Iterator

import msgpack
import pytest

from pyswtask._core import (
    FLAG_ASYNC,
    FLAG_FRAG_MORE,
    FRAME_ERROR,
    FRAME_RESULT,
    FRAME_TASK,
    TIMEOUT,
    TW_BUSY,
    TW_IDLE_QUICK,
    Dispatcher,
    TaskLoop,
    TaskWorkerStates,
    pack_envelope,
    pack_frame,
    parse_frames,
)
from pyswtask.errors import TaskError, TaskWorkerLost


def make_dispatcher(fd: int, **kw: Any) -> tuple[Dispatcher, list[Any], list[str]]:
    finished: list[Any] = []
    errors: list[str] = []
    d = Dispatcher(0, [fd], bytearray(1), on_finish=lambda *a: finished.append(a),
                   make_error=TaskError.from_wire, make_lost=TaskWorkerLost.lost,
                   on_protocol_error=errors.append, epoch=77, **kw)
    return d, finished, errors


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    # Blocking at the file level, as the master makes them: the core passes MSG_DONTWAIT.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def task_loop(pair: tuple[socket.socket, socket.socket], tmp_path: Any) -> Iterator[Any]:
    """A TaskLoop in a forked child serving echo/len/boom; its protocol errors go to a file."""
    worker_end, task_end = pair
    log = tmp_path / "protocol-errors.txt"
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            worker_end.close()
            task_end.setblocking(False)

            def execute(env: tuple[Any, ...], task_id: int, src: int) -> tuple[bool, Any]:
                name, method, params = env[:3]
                if method == "boom":
                    return False, ["ValueError", "boom", "tb"]
                return True, (len(params[0]) if method == "len" else params)

            def on_error(message: str) -> None:
                with open(log, "a") as f:
                    f.write(message + "\n")

            loop = TaskLoop(1, 0, [task_end.fileno()], bytearray(1), rfd, execute=execute,
                            on_signal=lambda b: True, on_protocol_error=on_error)
            loop.run(1.0)
            code = 0
        finally:
            os._exit(code)
    try:
        yield worker_end, log, wfd
    finally:
        os.write(wfd, b"\x0f")
        deadline = time.monotonic() + 5
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.01)
        os.close(rfd)
        os.close(wfd)


def pump(d: Dispatcher, timeout: float) -> None:
    """What the event loop does for a dispatcher: wait until its descriptor is readable (at
    most timeout seconds), then call its reader callback."""
    select.select([d.fileno()], [], [], timeout)
    d.on_readable()


def body(*params: Any, method: str = "echo") -> bytes:
    return pack_envelope("t", method, list(params))


def sent_ids(peer: socket.socket, n: int, timeout: float = 5.0) -> list[int]:
    """The task ids of the next n frames the peer receives, in order, whatever the records."""
    got: list[int] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        if select.select([peer], [], [], 0.05)[0]:
            got.extend(f[2] for f in parse_frames(peer.recv(65536)))
    return got


def test_call_round_trip_errors_and_large_bodies(task_loop: Any) -> None:
    sock, _, _ = task_loop
    d, _, _ = make_dispatcher(sock.fileno())
    assert d.call(body(1, "a"), -1, 5.0) == [1, "a"]
    err = d.call(body(method="boom"), -1, 5.0)
    assert isinstance(err, TaskError) and (err.remote_type, err.remote_message) == ("ValueError", "boom")
    big = b"x" * (3 * 65536 + 17)
    assert d.call(body(big, method="len"), 0, 5.0) == len(big)
    assert d.call(body(big), 0, 5.0) == [big]
    assert d.call_many([body(i) for i in range(3000)], -1, 10.0) == [[i] for i in range(3000)]


def test_a_malformed_record_is_dropped_and_the_channel_keeps_serving(task_loop: Any) -> None:
    sock, log, _ = task_loop
    d, _, _ = make_dispatcher(sock.fileno())
    sock.send(b"\x00" * 30)                                           # garbage
    sock.send(pack_frame(FRAME_TASK, 0, 5, 0, b"\xc1"))               # invalid msgpack
    sock.send(pack_frame(FRAME_RESULT, 0, 6, 0, b"\x90"))             # wrong direction
    sock.send(pack_frame(FRAME_TASK, 0, (77 << 32) | 999, 0, msgpack.packb(["t"])))
    assert d.call(body("after garbage"), -1, 5.0) == ["after garbage"]
    text = log.read_text()
    assert "task worker 1: record on channel 0 dropped at offset 0: bad magic" in text
    assert "a frame of a type this end does not take" in text
    assert "task worker 1: task 5 from worker 0 on channel 0 refused: task envelope is not valid" in text
    # A task whose envelope is broken still gets an answer, so no caller waits for nothing.
    assert d.late_results == 2  # the ERROR replies for ids 5 and 77<<32|999 matched no call


def test_a_deeply_nested_envelope_is_answered_and_the_loop_goes_on(task_loop: Any) -> None:
    """Regression: repr() of an envelope nested 1000 deep, for its error message, raised
    RecursionError out of TaskLoop.run, and the task worker died."""
    sock, log, _ = task_loop
    d, _, _ = make_dispatcher(sock.fileno())
    sock.send(pack_frame(FRAME_TASK, 0, 5, 0, b"\x91" * 1000 + b"\xc0"))
    assert d.call(body("after"), -1, 5.0) == ["after"]
    assert ("task worker 1: task 5 from worker 0 on channel 0 refused: malformed task envelope: "
            "[[[[[...]]]]]") in log.read_text()
    assert d.late_results == 1

def test_results_are_matched_by_id_late_and_foreign_ones_dropped(
        pair: tuple[socket.socket, socket.socket]) -> None:
    mine, peer = pair
    scheduled: list[Any] = []
    d, finished, errors = make_dispatcher(mine.fileno())
    d.set_scheduler(scheduled.append)
    ids = [d.submit(body(i), -1, None) for i in range(3)]
    assert all(i >> 32 == 77 for i in ids) and len(set(ids)) == 3
    for fn in scheduled:
        fn()
    assert sent_ids(peer, 3) == ids
    peer.send(pack_frame(FRAME_RESULT, 0, ids[1], 1, msgpack.packb("one")))
    peer.send(pack_frame(FRAME_RESULT, 0, (12 << 32) | 1, 1, msgpack.packb("stale epoch")))
    peer.send(pack_frame(FRAME_RESULT, FLAG_FRAG_MORE, ids[2], 1, b"stray fragment"))
    peer.send(b"SW\x09" + b"\x00" * 40)
    peer.send(pack_frame(FRAME_ERROR, 0, ids[0], 1, msgpack.packb(["KeyError", "k", ""])))
    time.sleep(0.05)
    pump(d, 0.5)
    assert [(f[0], f[1]) for f in finished] == [(ids[1], "one"), (ids[0], finished[1][1])]
    assert isinstance(finished[1][1], TaskError) and finished[1][1].remote_type == "KeyError"
    assert d.late_results == 1 and d.bad_records == 1 and d.pending_count == 1
    assert "a fragment of task" in errors[0] and "whose start never came" in errors[0]
    assert "unsupported frame version" in errors[1] and len(errors) == 2
    assert d.forget(ids[2]) and not d.forget(ids[2])


@pytest.mark.timeout(30)
def test_futures_time_out_in_deadline_order_from_one_timer(
        pair: tuple[socket.socket, socket.socket]) -> None:
    mine, peer = pair
    loop = asyncio.new_event_loop()
    armed: list[float] = []

    def call_later(delay: float, fn: Any) -> asyncio.TimerHandle:
        armed.append(delay)
        return loop.call_later(delay, fn)

    try:
        d, _, _ = make_dispatcher(mine.fileno())
        d.set_scheduler(loop.call_soon, None, call_later)
        loop.add_reader(d.fileno(), d.on_readable)
        t0 = time.monotonic()
        done_at: dict[str, float] = {}
        futures: dict[str, tuple[asyncio.Future[Any], int]] = {}
        for label, timeout in (("c", 0.6), ("a", 0.2), ("b", 0.4), ("answered", 5.0),
                               ("c2", 0.6)):
            fut = loop.create_future()
            fut.add_done_callback(
                lambda f, label=label: done_at.setdefault(label, time.monotonic() - t0))
            futures[label] = (fut, d.submit_future(body(label), -1, fut, timeout))
        # One timer at a time, moved only for an earlier deadline: c, then a.
        assert len(armed) == 2 and armed[0] > 0.5 and armed[1] <= 0.2
        answer = pack_frame(FRAME_RESULT, 0, futures["answered"][1], 1, msgpack.packb("yes"))
        loop.call_later(0.05, peer.send, answer)
        late = pack_frame(FRAME_RESULT, 0, futures["a"][1], 1, msgpack.packb("too late"))
        loop.call_later(0.3, peer.send, late)
        loop.run_until_complete(asyncio.wait([f for f, _ in futures.values()], timeout=10))
        assert sent_ids(peer, 5) == [task_id for _, task_id in futures.values()]
        assert futures["answered"][0].result() == "yes"
        for label in ("a", "b", "c", "c2"):
            assert futures[label][0].result() is TIMEOUT
        assert sorted(done_at, key=done_at.__getitem__) == ["answered", "a", "b", "c", "c2"]
        for label, timeout in (("a", 0.2), ("b", 0.4), ("c", 0.6)):
            assert timeout <= done_at[label] < timeout + 1.0, done_at
        loop.run_until_complete(asyncio.sleep(0.05))
        assert d.pending_count == 0 and d.late_results == 1
        # a future submitted without a timeout waits for its result however long it takes
        fut = loop.create_future()
        task_id = d.submit_future(body("no timeout"), -1, fut)
        loop.run_until_complete(asyncio.sleep(0.3))
        assert not fut.done() and d.pending_count == 1 and d.forget(task_id)
    finally:
        loop.close()


def test_the_futures_of_a_turn_leave_in_one_record_at_the_loops_flush(
        pair: tuple[socket.socket, socket.socket]) -> None:
    # A coroutine awaits its future right after submitting: nothing is written through (nor
    # sent by the flush watch), so the turn's tasks wake the task worker once.
    mine, peer = pair
    scheduled: list[Any] = []
    d, _, _ = make_dispatcher(mine.fileno())
    d.set_scheduler(scheduled.append)
    ids = [d.submit_future(body(i), -1, object()) for i in range(5)]
    assert select.select([peer], [], [], 0.05)[0] == [] and len(scheduled) == 1
    scheduled[0]()
    assert [f[2] for f in parse_frames(peer.recv(65536, socket.MSG_DONTWAIT))] == ids
    assert d.queued == 0


def test_awaited_calls_go_to_the_first_quick_task_worker_and_bursts_are_spread() -> None:
    # The busy flags are written here as task workers write them: TW_IDLE_QUICK once their
    # recent tasks ran faster than a wake-up, with TW_BUSY while they run.
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
    try:
        busy = bytearray(2)
        d = Dispatcher(0, [a.fileno() for a, _ in pairs], busy, on_finish=print,
                       make_error=TaskError.from_wire, make_lost=TaskWorkerLost.lost,
                       on_protocol_error=print, epoch=1)
        scheduled: list[Any] = []
        d.set_scheduler(scheduled.append)

        def where(submit: Any, n: int = 4) -> list[list[int]]:
            ids = [submit(i) for i in range(n)]
            for fn in scheduled:
                fn()
            scheduled.clear()
            got: list[list[int]] = [[], []]
            for k, (_, b) in enumerate(pairs):
                while select.select([b], [], [], 0)[0]:
                    got[k] += [f[2] for f in parse_frames(b.recv(65536))]
            assert sorted(got[0] + got[1]) == sorted(ids)
            return [[ids.index(t) for t in g] for g in got]

        def future(i: int, batch: bool = False) -> int:
            return d.submit_future(body(i), -1, object(), batch=batch)

        assert where(future) == [[0, 2], [1, 3]]        # no quick task worker: in turn
        busy[:] = bytes([0, TW_IDLE_QUICK])
        assert where(future) == [[], [0, 1, 2, 3]]      # one record, to the quick one
        busy[:] = bytes([TW_IDLE_QUICK, TW_IDLE_QUICK])
        assert where(future) == [[0, 1, 2, 3], []]      # the first quick one
        busy[:] = bytes([TW_BUSY | TW_IDLE_QUICK, TW_IDLE_QUICK])
        assert where(future, 1) == [[0], []]             # running quick ones: read without a wake
        time.sleep(0.01)
        assert where(future, 1) == [[], [0]]             # running for long: something slow
        busy[:] = bytes([TW_BUSY, TW_IDLE_QUICK])
        assert where(future, 1) == [[], [0]]
        busy[:] = bytes([TW_IDLE_QUICK, TW_IDLE_QUICK])
        assert where(lambda i: future(i, batch=True)) == [[0, 2], [1, 3]]
        spread = where(lambda i: d.submit(body(i), -1, None))
        assert spread[0] and spread[1], spread          # ASYNC bursts are spread too
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_a_future_with_a_timeout_needs_the_loops_timer(
        pair: tuple[socket.socket, socket.socket]) -> None:
    mine, _ = pair
    d, _, _ = make_dispatcher(mine.fileno())
    d.set_scheduler(lambda fn: None)
    with pytest.raises(ValueError, match="needs set_scheduler"):
        d.submit_future(body(1), -1, object(), 1.0)
    assert d.pending_count == 0


def test_the_first_async_task_of_a_turn_is_written_through_the_rest_coalesced(
        pair: tuple[socket.socket, socket.socket]) -> None:
    mine, peer = pair
    scheduled: list[Any] = []
    d, _, _ = make_dispatcher(mine.fileno())
    d.set_scheduler(scheduled.append)
    first = d.submit(body(0), -1, None)
    # Sent before submit returned, with the loop's flush still to come.
    assert [f[2] for f in parse_frames(peer.recv(65536, socket.MSG_DONTWAIT))] == [first]
    rest = [d.submit(body(i), -1, None) for i in range(1, 1000)]
    for fn in scheduled:
        fn()
    peer.setblocking(False)
    got: list[int] = []
    records = 0
    deadline = time.monotonic() + 10
    while len(got) < len(rest) and time.monotonic() < deadline:
        try:
            data = peer.recv(65536)
        except BlockingIOError:
            time.sleep(0.001)
            continue
        records += 1
        got.extend(f[2] for f in parse_frames(data))
    assert got == rest
    assert records < 100, f"{records} records for {len(rest)} frames: not coalesced"


def test_coalesced_tasks_leave_while_the_loop_is_held_up(
        pair: tuple[socket.socket, socket.socket]) -> None:
    # The loop never runs its flush here, as when the delivering callback sleeps or computes.
    mine, peer = pair
    d, _, _ = make_dispatcher(mine.fileno())
    d.set_scheduler(lambda fn: None)
    for _round in range(2):
        ids = [d.submit(body(i), -1, None) for i in range(100)]
        t0 = time.monotonic()
        assert sent_ids(peer, 100) == ids
        assert time.monotonic() - t0 < 1.0
    assert d.queued == 0


def test_a_burst_is_coalesced_and_survives_a_full_socket(
        pair: tuple[socket.socket, socket.socket]) -> None:
    mine, peer = pair
    scheduled: list[Any] = []
    d, _, _ = make_dispatcher(mine.fileno(), high_water=64 << 20)
    d.set_scheduler(scheduled.append)
    n = 20_000
    payload = b"p" * 1000
    ids = [d.submit(body(payload), -1, None) for _ in range(n)]  # ~20 MB: more than the socket holds
    for fn in scheduled:
        fn()
    peer.setblocking(False)
    got: list[int] = []
    records = 0
    deadline = time.monotonic() + 30
    while len(got) < n and time.monotonic() < deadline:
        try:
            data = peer.recv(65536)
        except BlockingIOError:
            pump(d, 0.01)  # EPOLLOUT: the rest of the queue goes out as room appears
            continue
        records += 1
        got.extend(f[2] for f in parse_frames(data))
    assert got == ids
    assert records < n / 30, f"{records} records for {n} frames: not coalesced"


def test_call_times_out_and_the_late_result_is_dropped(
        pair: tuple[socket.socket, socket.socket]) -> None:
    mine, peer = pair
    d, _, _ = make_dispatcher(mine.fileno())
    t0 = time.monotonic()
    assert d.call(body(1), -1, 0.2) is TIMEOUT
    assert 0.19 <= time.monotonic() - t0 < 1.0
    (frame,) = parse_frames(peer.recv(65536))
    peer.send(pack_frame(FRAME_RESULT, 0, frame[2], 1, msgpack.packb("late")))
    assert d.call(body(2), -1, 0.2) is TIMEOUT
    assert d.late_results == 1


def test_dispatcher_refuses_bad_destinations(pair: tuple[socket.socket, socket.socket]) -> None:
    d, _, _ = make_dispatcher(pair[0].fileno())
    with pytest.raises(ValueError, match="dst_worker_id 3 is out of range: there are 1 task workers"):
        d.submit(body(1), 3, None)
    with pytest.raises(ValueError, match="at least one task worker channel"):
        Dispatcher(0, [], bytearray(1), on_finish=print, make_error=print, make_lost=print,
                   on_protocol_error=print, epoch=1)


def test_a_lost_report_fails_what_went_down_and_sends_the_unstarted_again(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """The master's LOST frame, made from the dead task worker's state slots, as the
    dispatcher reads it: tasks run or running fail with TaskWorkerLost, tasks read but not
    started go to the successor on the same channel."""
    mine, peer = pair
    scheduled: list[Any] = []
    d, finished, errors = make_dispatcher(mine.fileno())
    d.set_scheduler(scheduled.append)
    ids = [d.submit(body(i), -1, None) for i in range(4)]
    for fn in scheduled:
        fn()
    scheduled.clear()
    assert sent_ids(peer, 4) == ids
    # It read all four, ran ids[0] (its result never left) and died running ids[1].
    buf = mmap.mmap(-1, TaskWorkerStates.nbytes(1, 1))
    states = TaskWorkerStates(buf, 1, 1)
    struct.pack_into("<3Q", buf, 0, ids[1], 0, ids[3])
    ((w, frame),) = states.lost_reports(0, 1, "task worker 1 (pid 5) was killed")
    assert w == 0
    peer.send(frame)
    pump(d, 0.5)
    assert [f[0] for f in finished] == ids[:2]
    assert all(isinstance(f[1], TaskWorkerLost) for f in finished)
    assert str(finished[0][1]).endswith("was killed after running this task; its result was lost")
    assert str(finished[1][1]).endswith("was killed while running this task or sending its result")
    for fn in scheduled:
        fn()
    assert [f[:3] for f in parse_frames(peer.recv(65536))] == [
        (FRAME_TASK, FLAG_ASYNC, ids[2]), (FRAME_TASK, FLAG_ASYNC, ids[3])]
    assert d.pending_count == 2 and not errors
    states.release()
    buf.close()


def _serve_in_child(task_end: socket.socket, states: TaskWorkerStates, max_tasks: int,
                    stop_r: int) -> int:
    """Forks a task worker loop over task_end with the given state slots; returns its pid. It
    stops at max_tasks, or when stop_r becomes readable."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            loop = TaskLoop(1, 0, [task_end.fileno()], bytearray(1), stop_r,
                            execute=lambda env, task_id, src: (True, env[2][0]),
                            on_signal=lambda b: 1, on_protocol_error=print, state=states,
                            max_tasks=max_tasks)
            loop.run(2.0)
            code = 0
        finally:
            os._exit(code)
    return pid


def _results(sock: socket.socket, count: int) -> list[int]:
    sock.settimeout(5.0)
    got: list[int] = []
    while len(got) < count:
        got += [msgpack.unpackb(f[4]) for f in parse_frames(sock.recv(65536))
                if f[0] == FRAME_RESULT]
    return got


def test_a_task_worker_at_its_limit_hands_the_rest_of_its_record_to_its_successor(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """task_max_request inside a record: the task worker stops at the limit and leaves the rest
    in its hand-over area; its successor runs that rest before anything sent later; the LOST
    report of the one that stopped neither fails nor sends again what it handed over."""
    worker_end, task_end = pair
    buf = mmap.mmap(-1, TaskWorkerStates.nbytes(1, 1))
    handover = mmap.mmap(-1, TaskWorkerStates.handover_nbytes(1))
    states = TaskWorkerStates(buf, 1, 1, handover)
    stop_r, stop_w = os.pipe()
    try:
        worker_end.send(b"".join(pack_frame(FRAME_TASK, FLAG_ASYNC, i, 0, body(i))
                                 for i in range(1, 11)))
        pid = _serve_in_child(task_end, states, 3, stop_r)
        assert _results(worker_end, 3) == [1, 2, 3]
        assert os.waitpid(pid, 0)[1] == 0
        held = states.held(0)
        assert held is not None and held[0] == 0
        assert [f[2] for f in parse_frames(held[1])] == list(range(4, 11))
        ((w, frame),) = states.lost_reports(0, 1, "recycled")
        assert w == 0 and msgpack.unpackb(parse_frames(frame)[0][4]) == [3, 3, "recycled"]
        # Sent after the record whose rest is held: it must wait for that rest.
        worker_end.send(b"".join(pack_frame(FRAME_TASK, FLAG_ASYNC, i, 0, body(i))
                                 for i in (11, 12)))
        pid = _serve_in_child(task_end, states, 3, stop_r)
        assert _results(worker_end, 3) == [4, 5, 6]
        assert os.waitpid(pid, 0)[1] == 0
        ((w, frame),) = states.lost_reports(0, 1, "recycled")
        assert msgpack.unpackb(parse_frames(frame)[0][4]) == [6, 6, "recycled"]
        pid = _serve_in_child(task_end, states, 0, stop_r)
        assert _results(worker_end, 6) == [7, 8, 9, 10, 11, 12]
        assert states.held(0) is None
        os.write(stop_w, b"\x0f")
        assert os.waitpid(pid, 0)[1] == 0
        # It ran what it took over and the record after it: all read, none running now.
        assert states.get(0)[2] == [12]
    finally:
        os.close(stop_r)
        os.close(stop_w)
        states.release()
        buf.close()
        handover.close()


def test_a_lost_report_counts_a_rest_still_held_as_unread() -> None:
    """Killed after it took the hand-over area's rest but before it cleared it, a task worker
    leaves the rest for the next one: its LOST report must not fail or send it again."""
    buf = mmap.mmap(-1, TaskWorkerStates.nbytes(2, 1))
    handover = mmap.mmap(-1, TaskWorkerStates.handover_nbytes(1))
    states = TaskWorkerStates(buf, 2, 1, handover)
    rest = pack_frame(FRAME_TASK, FLAG_ASYNC, 9, 1, body(9))
    struct.pack_into("<2Q", handover, 0, len(rest), 1)
    handover[16:16 + len(rest)] = rest
    # Read up to the held task 9 from worker 1 (the take was under way); 4 from worker 0 ran.
    struct.pack_into("<4Q", buf, 0, 4, 0, 4, 9)
    reports = states.lost_reports(0, 2, "killed")
    assert [(w, msgpack.unpackb(parse_frames(f)[0][4])) for w, f in reports] == [
        (0, [4, 4, "killed"])]
    assert states.held(0) == (1, rest)
    states.release()
    buf.close()
    handover.close()
