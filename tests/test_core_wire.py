"""The core's wire helpers that the Python side calls instead of handling frames itself: reply
datagrams and their reassembly, the queue's stop sentinel, and the task-worker state layout
with the LOST reports made from it."""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import msgpack
import pytest
import sysv_ipc

from pyswtask._core import (
    FLAG_FRAG_FIRST,
    FLAG_FRAG_LAST,
    FLAG_FRAG_MORE,
    FRAME_ERROR,
    FRAME_LOST,
    FRAME_RESULT,
    FRAME_TASK,
    HEADER_SIZE,
    RECORD_MAX,
    QueueReader,
    ReplyAssembler,
    ReplyWriter,
    TaskWorkerStates,
    hold_size,
    is_sentinel,
    pack_frame,
    parse_frames,
    reply_records,
    sentinel,
)

CHUNK = RECORD_MAX - HEADER_SIZE
TID = (4242 << 32) | 7


def assembler(**kw: Any) -> tuple[ReplyAssembler, list[str]]:
    errors: list[str] = []
    return ReplyAssembler(on_protocol_error=errors.append, **kw), errors


def packed_of_size(n: int) -> bytes:
    """A msgpack body of exactly n bytes: a bin value after its 2, 3 or 5 byte header."""
    for head in (2, 3, 5):
        body = msgpack.packb(b"x" * max(n - head, 0))
        if len(body) == n:
            return body
    raise AssertionError(f"no bin value packs to {n} bytes")


@pytest.mark.parametrize("size", [1, 5 + 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 1,
                                  3 * CHUNK + 17])
@pytest.mark.parametrize("ok", [True, False])
def test_reply_records_round_trip_at_the_fragment_boundaries(size: int, ok: bool) -> None:
    body = msgpack.packb(None) if size == 1 else packed_of_size(size)
    assert len(body) == size
    records = reply_records(TID, ok, 3, body)
    assert all(len(r) <= RECORD_MAX for r in records)
    frames = [f for r in records for f in parse_frames(r)]
    assert len(records) == len(frames) == max(1, -(-size // CHUNK))
    assert {f[0] for f in frames} == {FRAME_RESULT if ok else FRAME_ERROR}
    assert {(f[2], f[3]) for f in frames} == {(TID, 3)}
    assert b"".join(f[4] for f in frames) == body
    if len(frames) == 1:
        assert frames[0][1] == 0
    else:
        flags = [f[1] for f in frames]
        assert flags == ([FLAG_FRAG_FIRST | FLAG_FRAG_MORE] + [FLAG_FRAG_MORE] * (len(frames) - 2)
                         + [FLAG_FRAG_LAST])
    a, errors = assembler()
    got = [a.feed(r) for r in records]
    assert got[:-1] == [[]] * (len(records) - 1)
    assert got[-1] == [(TID, ok, msgpack.unpackb(body))]
    assert not errors and a.bad_records == 0


def reply_pair(pid: int, sndtimeo: float = 1.0, **kw: Any) -> tuple[
        ReplyWriter, socket.socket, ReplyAssembler, list[tuple[int, bool]]]:
    """A task worker's writer and a program's bound reply socket with its assembler, on a
    prefix of this test process only."""
    prefix = b"\0pyswtask-reply-test/%d/" % os.getpid()
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(prefix + b"%d" % pid)
    tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    usec = int(sndtimeo * 1e6)
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("@ll", usec // 10**6,
                                                                     usec % 10**6))
    dropped: list[tuple[int, bool]] = []
    writer = ReplyWriter(tx, prefix, 3, lambda tid, gone: dropped.append((tid, gone)))
    return writer, rx, ReplyAssembler(on_protocol_error=pytest.fail, **kw), dropped


@pytest.mark.parametrize("size", [1, CHUNK, CHUNK + 1, 3 * CHUNK + 17])
def test_a_reply_writer_reaches_the_program_by_its_pid_in_the_task_id(size: int) -> None:
    """The writer sends what reply_records makes to the socket the task id's pid names; the
    assembler receives it from the socket itself, whole, in its own buffer."""
    body = msgpack.packb(None) if size == 1 else packed_of_size(size)
    writer, rx, a, dropped = reply_pair(4242)
    with rx:
        writer.send(TID, True, body)
        writer.send(TID + 1, False, msgpack.packb(["ValueError", "no", ""]))
        got: list[tuple[int, bool, Any]] = []
        while len(got) < 2:
            results = a.receive(rx.fileno(), 0.0, 5.0)
            assert results is not None, "a reply did not come"
            got += results
    assert got == [(TID, True, msgpack.unpackb(body)), (TID + 1, False, ["ValueError", "no", ""])]
    assert not dropped


def test_a_reply_to_a_gone_or_full_program_is_dropped_and_said_so() -> None:
    writer, rx, a, dropped = reply_pair(4243, sndtimeo=0.05)
    with rx:
        # No socket of pid 9999: the program is gone.
        writer.send((9999 << 32) | 1, True, msgpack.packb(1))
        assert dropped == [((9999 << 32) | 1, True)]
        # A program that never reads: its socket fills, and a send waits SO_SNDTIMEO, then
        # drops that one result, and the writer goes on.
        tid = 4243 << 32
        while len(dropped) == 1:
            tid += 1
            writer.send(tid, True, msgpack.packb(tid))
        assert dropped[1] == (tid, False)
        first = a.receive(rx.fileno(), 0.0, 1.0)
        assert first == [((4243 << 32) | 1, True, (4243 << 32) | 1)]


def test_receive_polls_then_waits_and_gives_none_when_nothing_came() -> None:
    writer, rx, a, _ = reply_pair(4244)
    with rx:
        t = time.monotonic()
        assert a.receive(rx.fileno(), 0.0, 0.0) is None
        assert a.receive(rx.fileno(), 0.02, 0.0) is None
        assert a.receive(rx.fileno(), 0.0, 0.1) is None
        assert time.monotonic() - t >= 0.11
        # A reply sent during the wait ends it.
        threading.Timer(0.05, writer.send, ((4244 << 32) | 5, True, msgpack.packb("late"))).start()
        t = time.monotonic()
        assert a.receive(rx.fileno(), 0.0, 5.0) == [((4244 << 32) | 5, True, "late")]
        assert time.monotonic() - t < 4.0
        # Longer than a record: dropped and said so, as feed() does.
        errors: list[str] = []
        b = ReplyAssembler(on_protocol_error=errors.append)
        tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with tx:
            tx.sendto(b"\0" * (RECORD_MAX + 1), rx.getsockname())
            assert b.receive(rx.fileno(), 0.0, 1.0) == [] and b.bad_records == 1
        assert f"a datagram of {RECORD_MAX + 1} bytes" in errors[0]


def test_replies_of_several_tasks_interleave_and_come_out_whole() -> None:
    a, errors = assembler()
    big1, big2 = packed_of_size(CHUNK + 10), packed_of_size(2 * CHUNK + 3)
    # From two task workers: one sends the datagrams of one reply before the next.
    r1, r2 = reply_records(1, True, 0, big1), reply_records(2, False, 1, big2)
    out = []
    for rec in [r1[0], r2[0], r2[1], r1[1], r2[2]]:
        out += a.feed(rec)
    assert [(t, ok) for t, ok, _ in out] == [(1, True), (2, False)]
    # A new reply from the same task worker: the rest of its earlier one never comes.
    r3, r4 = reply_records(3, True, 0, big1), reply_records(4, True, 0, big1)
    assert a.feed(r3[0]) == [] and a.feed(r4[0]) == [] and not errors
    assert [t for t, _, _ in a.feed(r4[1])] == [4]
    assert a.feed(r3[1]) == [] and "a fragment of task 3 from 0" in errors[0]


def test_stray_and_malformed_reply_records_are_dropped() -> None:
    a, errors = assembler()
    # A fragment without its start: dropped, said once for its body (its start went to a dead
    # reader, or never existed); the record is not counted as bad.
    assert a.feed(pack_frame(FRAME_RESULT, FLAG_FRAG_MORE, 1, 0, b"x")) == []
    assert a.feed(pack_frame(FRAME_RESULT, FLAG_FRAG_LAST, 1, 0, b"x")) == []
    assert a.bad_records == 0 and errors == [
        "reply socket: a fragment of task 1 from 0 on channel -1 whose start never came: "
        "dropped, with the rest of its body"]
    errors.clear()
    # A bad header drops the record and says why.
    assert a.feed(b"XX" + pack_frame(FRAME_RESULT, 0, 1, 0, b"\xc0")[2:]) == []
    assert a.bad_records == 1 and "bad magic" in errors[-1]
    # A frame type no reply carries is refused like on a worker's channel.
    assert a.feed(pack_frame(FRAME_TASK, 0, 1, 0, b"\xc0")) == []
    assert a.bad_records == 2 and "does not take" in errors[-1]
    # A body that is not msgpack becomes a ProtocolError result, so the caller is answered.
    ((tid, ok, value),) = a.feed(pack_frame(FRAME_RESULT, 0, 9, 0, b"\xc1"))
    assert (tid, ok, value[0]) == (9, False, "ProtocolError")
    # Longer than a record: no sender makes one.
    assert a.feed(b"\0" * (RECORD_MAX + 1)) == [] and a.bad_records == 3
    assert a.feed(b"") == []


def test_a_reply_body_past_max_body_is_dropped_and_said_so() -> None:
    a, errors = assembler(max_body=CHUNK + 100)
    records = reply_records(5, True, 0, packed_of_size(CHUNK + 101))
    assert a.feed(records[0]) == []
    assert a.feed(records[1]) == []
    assert errors == [f"reply socket: the body of task 5 from 0 on channel -1 grows past "
                      f"package_max_length ({CHUNK + 100} bytes): dropped"]
    # Its fragments are gone: a later LAST of the same task completes nothing, and the reader
    # takes the next reply.
    assert a.feed(records[1]) == []
    assert [t for t, _, _ in a.feed(reply_records(6, True, 0, packed_of_size(CHUNK))[0])] == [6]
    small, errors = assembler(max_body=4)
    assert small.feed(pack_frame(FRAME_RESULT, 0, 6, 0, packed_of_size(10))) == []
    assert errors == ["reply socket: the body of task 6 is 10 bytes, above package_max_length "
                      "(4 bytes): dropped"]
    assert small.feed(pack_frame(FRAME_RESULT, 0, 7, 0, msgpack.packb(12))) == [(7, True, 12)]


def test_the_stop_sentinel() -> None:
    text = sentinel(0x01020304)
    assert text == b"\0\0\0\0\x04\x03\x02\x01"
    assert is_sentinel(text) and is_sentinel(bytearray(text)) and is_sentinel(sentinel(0))
    assert not is_sentinel(text + b"\0") and not is_sentinel(text[:7]) and not is_sentinel(b"")
    assert not is_sentinel(b"\0\0\0\x01abcd")
    # A record begins with the frame magic: never a sentinel, whatever its length.
    assert not is_sentinel(pack_frame(FRAME_TASK, 0, 1, 0, b"")[:8])


def states(workers: int = 3, task_workers: int = 2) -> tuple[TaskWorkerStates, mmap.mmap]:
    buf = mmap.mmap(-1, TaskWorkerStates.nbytes(workers, task_workers))
    return TaskWorkerStates(buf, workers, task_workers), buf


def test_the_state_layout_is_the_documented_one() -> None:
    st, buf = states()
    assert TaskWorkerStates.nbytes(3, 2) == 8 * 2 * (2 + 3) and TaskWorkerStates.nbytes(1, 0) == 8
    # Task worker 1: running task 0x55 of worker 2; it read up to 0x10 / 0 / 0x55 from workers.
    struct.pack_into("<5Q", buf, 8 * 5, 0x55, 2, 0x10, 0, 0x55)
    assert st.get(1) == (0x55, 2, [0x10, 0, 0x55])
    assert st.get(0) == (0, 0, [0, 0, 0])
    with pytest.raises(ValueError):
        st.get(2)
    with pytest.raises(ValueError, match="too small"):
        TaskWorkerStates(mmap.mmap(-1, 8), 3, 2)
    st.release()
    buf.close()   # released: nothing holds the mmap's buffer any more


def test_lost_reports_name_each_workers_tasks_and_clear_the_slots() -> None:
    st, buf = states()
    struct.pack_into("<5Q", buf, 8 * 5, 0x55, 2, 0x10, 0, 0x50)
    reports = st.lost_reports(1, 4, "task worker 4 (pid 9) was killed")
    assert [w for w, _ in reports] == [0, 2]
    (f0,), (f2,) = parse_frames(reports[0][1]), parse_frames(reports[1][1])
    # Worker 0: its last read task only, the running one being worker 2's.
    assert f0[:4] == (FRAME_LOST, 0, 0x10, 4)
    assert msgpack.unpackb(f0[4]) == [0, 0x10, "task worker 4 (pid 9) was killed"]
    assert f2[:4] == (FRAME_LOST, 0, 0x55, 4)
    assert msgpack.unpackb(f2[4]) == [0x55, 0x50, "task worker 4 (pid 9) was killed"]
    assert st.get(1) == (0, 2, [0, 0, 0])
    assert st.lost_reports(1, 4, "again") == []
    st.release()
    buf.close()


def test_the_core_does_not_import_numpy_until_a_numpy_view_is_asked_for() -> None:
    code = ("import mmap, sys, pyswtask, pyswtask._core as c\n"
            "assert 'numpy' not in sys.modules, 'imported at load'\n"
            "t = c.RunTable(mmap.mmap(-1, c.RunTable.nbytes(2)), create=True, capacity=2)\n"
            "t.insert(0, 'T', 'm', '202601010000', 5)\n"
            "assert 'numpy' not in sys.modules, 'imported by a table'\n"
            "assert t.to_numpy()['sec'][0] == 5 and 'numpy' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_queue_message_received_after_a_wrap_of_the_hold_wakes_the_idle_task_loop() -> None:
    """The reader's hold is a ring: a message that does not fit before its end goes to the
    start, behind a wrap marker. When the task loop had taken everything, the commit of that
    message must still wake it, or it sleeps with a task waiting (a CO delivery gets no reply).
    """
    msgmax, capacity = 1024, 16384
    hold = bytearray(hold_size(msgmax, capacity))
    queue = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX)
    wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        reader = QueueReader(queue.id, 1, msgmax, wake_fd, os.getpid(), capacity, hold)
        # An idle reader whose every record was taken and released, its tail just short of
        # the ring's end: the next message cannot fit there.
        pos = len(hold) - 64 - 512
        struct.pack_into("<3Q", hold, 0, pos, pos, pos)
        thread = threading.Thread(target=reader.run, daemon=True)
        thread.start()
        queue.send(b"a task", type=1)
        assert select.select([wake_fd], [], [], 5.0)[0], "the task loop was not woken"
        assert struct.unpack_from("<3Q", hold, 0)[2] > len(hold) - 64, "no wrap"
        os.read(wake_fd, 8)
        queue.send(sentinel(os.getpid()), type=1)
        thread.join(5.0)
        assert reader.finished and reader.error == 0
    finally:
        os.close(wake_fd)
        queue.remove()
