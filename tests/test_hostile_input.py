"""Hostile input: random and mutated bytes where frames, envelopes and pipe messages are read.

Whatever arrives, the parsers return a value or raise their documented error (ProtocolError for
frames and envelopes, ValueError for pipe messages), the readers of real sockets log and drop a
bad record and go on serving, and a task or method name from the wire is looked up among the
registered tasks only. test_frame.py has the basic cases; this file adds mutations of valid
records, the readers fed whole hostile records, and real servers fed garbage on their sockets.
tests/fuzz/fuzz_frames.py runs the same checks under atheris for as long as one likes.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any, Callable, Iterator

import msgpack
import pytest
from _testbase import ServerRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyswtask import TaskError, TaskWorkerLost, UnknownMethod, UnknownTask, task
from pyswtask._core import (
    FLAG_FRAG_FIRST,
    FLAG_FRAG_LAST,
    FLAG_FRAG_MORE,
    FRAME_ERROR,
    FRAME_LOST,
    FRAME_PIPE,
    FRAME_RESULT,
    FRAME_TASK,
    HEADER_SIZE,
    RECORD_MAX,
    TIMEOUT,
    Dispatcher,
    Mailbox,
    ProtocolError,
    TaskLoop,
    pack_envelope,
    pack_frame,
    parse_frames,
    unpack_envelope,
)
from pyswtask.executor import TaskExecutor
from pyswtask.registry import get_spec, registered, resolve
from pyswtask.transport.pipe import pack_message, unpack_message
from pyswtask.transport.relay import RelayClient

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOCKETS = settings(max_examples=40, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# msgpack nests up to 1024 levels; 1000 decodes, and repr() of it exceeds the recursion limit.
DEEP = b"\x91" * 1000 + b"\xc0"


def header(ftype: int = FRAME_TASK, *, magic: bytes = b"SW", version: int = 1, flags: int = 0,
           task_id: int = 77, src: int = 0, body_len: int = 0) -> bytes:
    return magic + struct.pack("<BBBBHQI", version, ftype, flags, 0, src, task_id, body_len)


# -- strategies -----------------------------------------------------------------------------

u64 = st.integers(0, 2**64 - 1)
frames = st.tuples(st.integers(1, 4), st.integers(0, 255), u64, st.integers(0, 65535),
                   st.binary(max_size=300))

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.integers(-1000, 1000), inner, max_size=4),
    max_leaves=20)
c_ints = st.integers(-(2**31), 2**31 - 1)

# Names a hostile caller would try: dunders, privates, the registry's own attributes.
HOSTILE_NAMES = ["__class__", "__init__", "__new__", "__dict__", "__module__", "__doc__",
                 "__reduce__", "__reduce_ex__", "__getattribute__", "__setattr__", "__del__",
                 "__subclasshook__", "__init_subclass__", "__sizeof__", "__eq__", "__dir__",
                 "__pyswtask_task__", "__builtins__", "_secret", "_hidden", "_Spy__mangled",
                 "_tasks", "_instance", "instance", "cls", "methods", "coroutine", "name", "mro",
                 "TaskSpec", "get_spec", "resolve", "object", "", " ", "ping ", "PING"]

# Bytes msgpack treats in unusual ways: nesting, lengths past the buffer, ext types, bad keys.
NASTY_MSGPACK = [
    DEEP, b"\x91" * 100_000 + b"\xc0", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
    b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xc7\x01\xff\x00",
    b"\xd6\xff\x00\x00\x00\x00", b"\xd4\x05\x00", b"\x81\x90\xc0", b"\x81\x80\xc0", b"\xc1",
    b"\x92\xa1t" + DEEP, b"\x96" + DEEP * 6, b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x01",
    msgpack.packb(["t", "m", [], True, "", 0]), msgpack.packb([b"t", "m", [], 1, "", 0]),
    msgpack.packb(["t", "m", {}, 1, "", 0]), msgpack.packb(["t", "m", [], 1.0, "", 0]),
    msgpack.packb(["t", "m", [], 1, "", 0]) + b"\x00", msgpack.packb([["t"], "x"]),
]


@st.composite
def mutated(draw: st.DrawFn, valid: bytes, starts: list[int]) -> bytes:
    """valid with one to three defects: bit flips, cuts, body_len lies, bad header bytes."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "cut", "len", "magic", "version", "type", "flags",
                                   "junk", "byte"]))
        heads = [s for s in starts if s + HEADER_SIZE <= len(data)]
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut" and data:
            del data[draw(st.integers(0, len(data) - 1)):]
        elif op == "junk":
            data += draw(st.binary(min_size=1, max_size=40))
        elif op == "byte" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif heads:
            at = draw(st.sampled_from(heads))
            if op == "len":
                lie = draw(st.sampled_from([0, 1, 0xFFFFFFFF, 0x7FFFFFFF, RECORD_MAX, 1 << 31])
                           | st.integers(0, 2**32 - 1))
                data[at + 16:at + 20] = struct.pack("<I", lie)
            elif op == "magic":
                data[at:at + 2] = draw(st.binary(min_size=2, max_size=2))
            elif op == "version":
                data[at + 2] = draw(st.integers(0, 255))
            elif op == "type":
                data[at + 3] = draw(st.sampled_from([0, 5, 9, 127, 255]) | st.integers(0, 255))
            elif op == "flags":
                data[at + 4] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def hostile_records(draw: st.DrawFn, ftype: int) -> bytes:
    """One record as a hostile peer might write it: noise, a mutated valid record, fragments
    out of order, or a record longer than one RECORD_MAX read."""
    kind = draw(st.sampled_from(["noise", "mutated", "fragment", "valid", "oversized"]))
    if kind == "noise":
        return draw(st.binary(max_size=120))
    fs = draw(st.lists(frames, min_size=1, max_size=3))
    if kind in ("fragment", "valid"):
        # Headers that pass the checks, so the body goes to reassembly and the envelope parser.
        ids = st.sampled_from([1, 2, 3]) if kind == "fragment" else u64
        flags = st.sampled_from([FLAG_FRAG_FIRST, FLAG_FRAG_MORE, FLAG_FRAG_LAST,
                                 FLAG_FRAG_FIRST | FLAG_FRAG_LAST, 0x0E, 0xFF])
        fs = [(ftype, draw(flags) if kind == "fragment" else f[1], draw(ids), f[3],
               draw(st.sampled_from([f[4], DEEP, b"\xc1", b"", msgpack.packb(["a", 1])])))
              for f in fs]
    record = b"".join(pack_frame(*f) for f in fs)
    if kind == "oversized":
        return header(ftype, body_len=RECORD_MAX + 100) + b"x" * (RECORD_MAX + 100)
    if kind == "mutated":
        starts, at = [], 0
        for f in fs:
            starts.append(at)
            at += HEADER_SIZE + len(f[4])
        return draw(mutated(record, starts))
    return record


# How a fragment whose body's start never came is reported (hostile fragments make many).
STRAY = "whose start never came: dropped, with the rest of its body"


def rejected(record: bytes, accepted: int) -> bool:
    """The oracle of RecordReader.read_record: is the record dropped (and logged)?"""
    record = record[:RECORD_MAX]
    try:
        types = [f[0] for f in parse_frames(record)]
    except ProtocolError:
        return True
    ok = {accepted, FRAME_ERROR, FRAME_LOST} if accepted == FRAME_RESULT else {accepted}
    return any(t not in ok for t in types)


# -- frames -----------------------------------------------------------------------------------


@FAST
@given(st.lists(frames, max_size=5))
def test_frames_pack_then_parse_to_the_same_values(fs: list[tuple[int, int, int, int, bytes]]) -> None:
    record = b"".join(pack_frame(*f) for f in fs)
    assert parse_frames(record) == fs
    assert parse_frames(bytearray(record)) == parse_frames(memoryview(record)) == fs


@FAST
@given(st.data(), st.lists(frames, min_size=1, max_size=4))
def test_mutated_records_parse_or_raise_protocol_error(data: st.DataObject,
                                                       fs: list[tuple[int, int, int, int, bytes]]) -> None:
    starts, at = [], 0
    for f in fs:
        starts.append(at)
        at += HEADER_SIZE + len(f[4])
    bad = data.draw(mutated(b"".join(pack_frame(*f) for f in fs), starts))
    try:
        out = parse_frames(bad)
    except ProtocolError as exc:
        assert str(exc).startswith("frame at offset ")
        return
    # What parses covers the record exactly, frame after frame, and each body is its bytes.
    at = 0
    for ftype, _flags, _tid, _src, body in out:
        assert 1 <= ftype <= FRAME_LOST
        assert bad[at + HEADER_SIZE:at + HEADER_SIZE + len(body)] == body
        at += HEADER_SIZE + len(body)
    assert at == len(bad)


@FAST
@given(st.lists(frames, min_size=1, max_size=4), st.integers(1, 2**32 - 1))
def test_a_body_len_past_the_record_is_a_truncated_body(fs: list[Any], excess: int) -> None:
    record = bytearray(b"".join(pack_frame(*f) for f in fs))
    last = len(record) - HEADER_SIZE - len(fs[-1][4])
    claimed = min(len(fs[-1][4]) + excess, 2**32 - 1)
    record[last + 16:last + 20] = struct.pack("<I", claimed)
    with pytest.raises(ProtocolError, match=f"frame at offset {last}: truncated body"):
        parse_frames(bytes(record))


@FAST
@given(st.lists(frames, min_size=1, max_size=4), st.data())
def test_a_cut_record_parses_up_to_the_cut_or_names_the_truncation(fs: list[Any],
                                                                   data: st.DataObject) -> None:
    record = b"".join(pack_frame(*f) for f in fs)
    cut = data.draw(st.integers(0, len(record) - 1))
    bounds = {0}
    for f in fs:
        bounds.add(max(bounds) + HEADER_SIZE + len(f[4]))
    if cut in bounds:
        assert parse_frames(record[:cut]) == fs[:sorted(bounds).index(cut)]
    else:
        with pytest.raises(ProtocolError, match="truncated (header|body)"):
            parse_frames(record[:cut])


@pytest.mark.parametrize("record,why", [
    (header(body_len=0xFFFFFFFF), "truncated body"),
    (header(body_len=0x7FFFFFFF) + b"x" * 100, "truncated body"),
    (header(magic=b"WS"), "bad magic"),
    (header(version=0), "unsupported frame version"),
    (header(version=2), "unsupported frame version"),
    (header(ftype=0), "unknown frame type"),
    (header(ftype=6), "unknown frame type"),
    (header(ftype=255), "unknown frame type"),
    (header()[:HEADER_SIZE - 1], "truncated header"),
])
def test_hand_made_bad_headers(record: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        parse_frames(record)
    with pytest.raises(ProtocolError, match=f"offset {HEADER_SIZE}: {why}"):
        parse_frames(header(body_len=0) + record)


# -- envelopes and pipe messages ------------------------------------------------------------


@FAST
@given(st.text(), st.text(), st.lists(values, max_size=5), c_ints, st.text(max_size=40), c_ints)
def test_envelopes_pack_then_unpack_to_the_same_values(name: str, method: str, params: list[Any],
                                                       type: int, logid: str, spanid: int) -> None:
    body = pack_envelope(name, method, params, type, logid, spanid)
    assert unpack_envelope(body) == (name, method, params, type, logid, spanid)
    assert unpack_envelope(pack_envelope(name, method, tuple(params)))[2] == params


@FAST
@given(st.text(min_size=1), values)
def test_pipe_messages_pack_then_unpack_to_the_same_values(mtype: str, data: Any) -> None:
    assert unpack_message(pack_message(mtype, data)) == (mtype, data)


def check_envelope(body: bytes) -> None:
    try:
        out = unpack_envelope(body)
    except ProtocolError as exc:
        assert len(str(exc)) < 600
        return
    assert [type(v) for v in out] == [str, str, list, int, str, int]


def check_message(body: bytes) -> None:
    try:
        mtype, _data = unpack_message(body)
    except ValueError as exc:
        assert type(exc) is ValueError and len(str(exc)) < 600
        return
    assert type(mtype) is str


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_as_envelope_or_pipe_message(body: bytes) -> None:
    check_envelope(body)
    check_message(body)


@FAST
@given(st.data(), st.text(max_size=10), st.lists(values, max_size=4))
def test_mutated_envelopes_and_messages(data: st.DataObject, name: str, params: list[Any]) -> None:
    for valid in (pack_envelope(name, "m", params), pack_message(name or "t", params)):
        bad = data.draw(mutated(valid, []))
        check_envelope(bad)
        check_message(bad)


@pytest.mark.parametrize("body", NASTY_MSGPACK, ids=range(len(NASTY_MSGPACK)))
def test_nasty_msgpack_is_refused_in_the_documented_type(body: bytes) -> None:
    """Regression for DEEP: the error message repr()'d the decoded value, and a value nested
    1000 deep raised RecursionError instead of ProtocolError (killing a task worker's loop)."""
    check_envelope(body)
    check_message(body)
    if body == DEEP:
        error = TaskError.from_wire(msgpack.unpackb(body))
        assert str(error) == "ProtocolError: malformed error reply: [[[[[...]]]]]"


# -- the readers of real sockets, in this process --------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield a, b
    a.close()
    b.close()


def with_pair(fn: Callable[[socket.socket, socket.socket], None]) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        fn(a, b)
    finally:
        a.close()
        b.close()


@SOCKETS
@given(st.lists(hostile_records(FRAME_PIPE), min_size=1, max_size=6))
def test_an_inbox_drops_hostile_records_and_still_delivers(records: list[bytes]) -> None:
    def run(r: socket.socket, w: socket.socket) -> None:
        errors: list[str] = []
        inbox = Mailbox(0, r.fileno(), [w.fileno()], epoch=0xFEEDBEEF,
                        on_protocol_error=errors.append)
        for record in records:
            w.send(record)
            inbox.receive()
        bad = sum(rejected(rec, FRAME_PIPE) for rec in records)
        dropped = [e for e in errors if not e.endswith(STRAY)]
        assert inbox.bad_records == len(dropped) == bad
        assert all(e.startswith("inbox of process 0: record on channel 0 dropped at offset ")
                   for e in dropped)
        big = os.urandom(3 * RECORD_MAX)
        assert inbox.send(0, b"small", 1.0) and inbox.send(0, big, 1.0)
        got = [m[2] for m in inbox.receive()]
        assert got[-2:] == [b"small", big]

    with_pair(run)


@SOCKETS
@given(st.lists(hostile_records(FRAME_RESULT), min_size=1, max_size=6))
def test_a_dispatcher_drops_hostile_records_and_still_gets_its_result(records: list[bytes]) -> None:
    def run(mine: socket.socket, peer: socket.socket) -> None:
        errors: list[str] = []
        d = Dispatcher(0, [mine.fileno()], bytearray(1), on_finish=print,
                       make_error=TaskError.from_wire, make_lost=TaskWorkerLost.lost,
                       on_protocol_error=errors.append, epoch=0x5EED)
        # Nothing reads before the call: send only what the socket buffer takes at once.
        peer.setblocking(False)
        sent = []
        try:
            for record in records:
                peer.send(record)
                sent.append(record)
            # The first call's id is known: the real result waits behind the garbage.
            peer.send(pack_frame(FRAME_RESULT, 0, (0x5EED << 32) | 1, 0, msgpack.packb("real")))
        except BlockingIOError:
            return
        assert d.call(pack_envelope("t", "m", []), 0, 2.0) == "real"
        bad = sum(rejected(rec, FRAME_RESULT) for rec in sent)
        # A lost-task notice with a bad body is logged apart; its record is not dropped.
        errors = [e for e in errors if "malformed lost-task notice" not in e
                  and not e.endswith(STRAY)]
        assert d.bad_records == len(errors) == bad

    with_pair(run)


def run_task_loop(task_end: socket.socket, **kw: Any) -> tuple[TaskLoop, list[str]]:
    """Serves the records already written to task_end's peer, then stops."""
    errors: list[str] = []
    rfd, wfd = os.pipe()
    try:
        kw.setdefault("execute", lambda env, tid, src: (True, env[2]))
        loop = TaskLoop(1, 0, [task_end.fileno()], bytearray(1), rfd, on_signal=lambda s: True,
                        on_protocol_error=errors.append, **kw)
        os.write(wfd, b"\x0f")
        loop.run(2.0)
    finally:
        os.close(rfd)
        os.close(wfd)
    return loop, errors


def replies(sock: socket.socket) -> list[tuple[int, int, int, int, bytes]]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out += parse_frames(sock.recv(RECORD_MAX))
    except BlockingIOError:
        return out
    finally:
        sock.setblocking(True)


@SOCKETS
@given(st.lists(hostile_records(FRAME_TASK), min_size=1, max_size=6))
def test_a_task_loop_drops_hostile_records_and_serves_the_next_task(records: list[bytes]) -> None:
    def run(worker_end: socket.socket, task_end: socket.socket) -> None:
        # Nothing reads before the loop runs: send only what the socket buffer takes at once.
        worker_end.setblocking(False)
        try:
            for record in records:
                worker_end.send(record)
            worker_end.send(pack_frame(FRAME_TASK, 0, 0xABC, 0, pack_envelope("t", "m", ["after"])))
        except BlockingIOError:
            return
        worker_end.setblocking(True)
        loop, errors = run_task_loop(task_end)
        out = replies(worker_end)
        # Every record was read, the last task was served, and every task frame that passed
        # the header checks got an answer (RESULT, or ERROR for a broken envelope).
        assert (FRAME_RESULT, 0, 0xABC, 1, msgpack.packb(["after"])) in out
        assert loop.bad_records == sum(rejected(rec, FRAME_TASK) for rec in records)
        assert len(out) == loop.tasks_done
        refused = [e for e in errors if " refused: " in e]
        assert len(refused) == sum(f[0] == FRAME_ERROR and msgpack.unpackb(f[4])[0] == "ProtocolError"
                                   for f in out)
        assert len([e for e in errors if not e.endswith(STRAY)]) == loop.bad_records + len(refused)

    with_pair(run)


# -- reassembly: package_max_length and stray fragments --------------------------------------

LIMIT = 100_000
CHUNK = RECORD_MAX - HEADER_SIZE


def fragments(ftype: int, task_id: int, body: bytes, src: int = 0) -> list[bytes]:
    """The records of one fragmented body, as Channel.put cuts it."""
    parts = [body[i:i + CHUNK] for i in range(0, len(body), CHUNK)]
    flags = [FLAG_FRAG_MORE] * len(parts)
    flags[0] |= FLAG_FRAG_FIRST
    flags[-1] = (flags[-1] & FLAG_FRAG_FIRST) | FLAG_FRAG_LAST
    return [pack_frame(ftype, f, task_id, src, p) for f, p in zip(flags, parts)]


def test_an_inbox_drops_a_message_past_package_max_length_and_reads_the_next(
        pair: tuple[socket.socket, socket.socket]) -> None:
    r, w = pair
    errors: list[str] = []
    inbox = Mailbox(0, r.fileno(), [w.fileno()], epoch=1, on_protocol_error=errors.append,
                    max_body=LIMIT)
    for record in fragments(FRAME_PIPE, 5, b"x" * (3 * CHUNK)):
        w.send(record)
    assert inbox.receive() == []
    assert errors == [f"inbox of process 0: the body of task 5 from 0 on channel 0 grows past "
                      f"package_max_length ({LIMIT} bytes): dropped"]
    # What the channel takes next, up to the limit, arrives.
    fits = b"y" * LIMIT
    assert inbox.send(0, fits, 1.0)
    assert [m[2] for m in inbox.receive()] == [fits]
    assert len(errors) == 1 and inbox.bad_records == 0


def test_a_stray_fragment_is_reported_once_for_its_body(
        pair: tuple[socket.socket, socket.socket]) -> None:
    r, w = pair
    errors: list[str] = []
    inbox = Mailbox(0, r.fileno(), [w.fileno()], epoch=1, on_protocol_error=errors.append)
    for record in fragments(FRAME_PIPE, 9, b"z" * (2 * CHUNK + 10), src=3)[1:]:
        w.send(record)
    w.send(pack_frame(FRAME_PIPE, 0, 10, 3, b"whole"))
    assert inbox.receive() == [(3, 10, b"whole")]
    assert errors == ["inbox of process 0: a fragment of task 9 from 3 on channel 0 whose start "
                      "never came: dropped, with the rest of its body"]


def test_a_dispatcher_drops_a_result_past_package_max_length_and_gets_the_next(
        pair: tuple[socket.socket, socket.socket]) -> None:
    mine, peer = pair
    errors: list[str] = []
    finished: list[Any] = []
    d = Dispatcher(0, [mine.fileno()], bytearray(1), on_finish=lambda *a: finished.append(a),
                   make_error=TaskError.from_wire, make_lost=TaskWorkerLost.lost,
                   on_protocol_error=errors.append, epoch=0x5EED, max_body=LIMIT)
    first = (0x5EED << 32) | 1
    for record in fragments(FRAME_RESULT, first, msgpack.packb(b"r" * LIMIT), src=1):
        peer.send(record)
    assert d.call(pack_envelope("t", "m", []), 0, 0.3) is TIMEOUT
    peer.send(pack_frame(FRAME_RESULT, 0, first + 1, 1, msgpack.packb("second")))
    assert d.call(pack_envelope("t", "m", []), 0, 2.0) == "second"
    assert errors == [f"worker 0: the body of task {first} from 1 on channel 0 grows past "
                      f"package_max_length ({LIMIT} bytes): dropped"]


def test_a_task_loop_drops_a_task_past_package_max_length_and_serves_the_next(
        pair: tuple[socket.socket, socket.socket]) -> None:
    worker_end, task_end = pair
    for record in fragments(FRAME_TASK, 0xA1, pack_envelope("t", "m", [b"p" * (LIMIT + 10)])):
        worker_end.send(record)
    worker_end.send(pack_frame(FRAME_TASK, 0, 0xA2, 0, pack_envelope("t", "m", ["after"])))
    # Its result would pass the limit: the caller gets an error instead of nothing.
    worker_end.send(pack_frame(FRAME_TASK, 0, 0xA3, 0, pack_envelope("t", "big", [])))

    def execute(env: Any, task_id: int, src: int) -> tuple[bool, Any]:
        return True, (b"r" * LIMIT if env[1] == "big" else env[2])

    loop, errors = run_task_loop(task_end, max_body=LIMIT, execute=execute)
    out = replies(worker_end)
    assert [(f[0], f[2]) for f in out] == [(FRAME_RESULT, 0xA2), (FRAME_ERROR, 0xA3)]
    assert msgpack.unpackb(out[0][4]) == ["after"]
    kind, message, _ = msgpack.unpackb(out[1][4])
    assert kind == "ValueError" and message.startswith("the result of t.big packs to ")
    assert message.endswith(f"bytes, above the server's package_max_length ({LIMIT})")
    assert errors == [f"task worker 1: the body of task {0xA1} from 0 on channel 0 grows past "
                      f"package_max_length ({LIMIT} bytes): dropped"]


@pytest.mark.parametrize("stray", [5, {"1": 2}, {1: 2}, [1], [1, True], [1, True, "x", 4], "abc",
                                   b"\x01\x01\x00", [[1], True, 0], [1, 1, "int ok"], None])
def test_a_stray_task_result_does_not_break_a_waiting_delivery(
        pair: tuple[socket.socket, socket.socket], stray: Any) -> None:
    """Regression: any process can send a "task.result" message; a malformed one made a user
    process's CO deliver_by_process raise TypeError, KeyError or ValueError."""
    r, w = pair
    inbox = Mailbox(0, r.fileno(), [w.fileno()], epoch=1, on_protocol_error=print)
    delivery = RelayClient(inbox)
    seen: list[Any] = []
    delivery.callbacks[2] = lambda rid, result: seen.append(result)
    inbox.send(0, pack_message("task.result", stray), 1.0)
    inbox.send(0, pack_message("task.result", [1, True, "mine"]), 1.0)
    assert delivery._wait(1, "Demo", "echo", 2.0) == "mine"
    assert [m[1] for m in delivery.backlog] == [stray]
    assert delivery.take_reply("task.result", stray, 0) is False
    assert seen == [] and 2 in delivery.callbacks
    assert delivery.take_reply("task.result", [2, False, ["KeyError", "k", ""]], 0) is True
    assert isinstance(seen[0], TaskError) and seen[0].remote_type == "KeyError"


# -- name lookup ------------------------------------------------------------------------------


@task("hostile-spy")
class Spy:
    """Records every attribute looked up on its instance, and every instance made."""

    seen: list[str] = []
    made = 0

    def __init__(self) -> None:
        Spy.made += 1

    def __getattribute__(self, name: str) -> Any:
        Spy.seen.append(name)
        return object.__getattribute__(self, name)

    def ping(self) -> str:
        return "pong"

    def _hidden(self) -> str:
        return "hidden"


@FAST
@given(st.sampled_from(HOSTILE_NAMES + ["hostile-spy"]) | st.text(max_size=12),
       st.sampled_from(HOSTILE_NAMES + ["ping"]) | st.text(max_size=12))
def test_names_resolve_only_to_registered_public_methods(name: str, method: str) -> None:
    if name in registered() and method in get_spec(name).methods:
        fn, _ = resolve(name, method)
        assert fn.__name__ == method and not method.startswith("_")
        return
    made = Spy.made
    seen = len(Spy.seen)
    with pytest.raises((UnknownTask, UnknownMethod)) as info:
        resolve(name, method)
    text = str(info.value)
    assert (f"task {name!r} is not registered" in text
            or f"task {name!r} has no public method {method!r}" in text)
    # A refused name reached no getattr on the instance, nor made one.
    assert Spy.made == made and len(Spy.seen) == seen


def test_the_spy_sees_only_its_public_method() -> None:
    for method in HOSTILE_NAMES:
        with pytest.raises(UnknownMethod):
            resolve("hostile-spy", method)
    assert resolve("hostile-spy", "ping")[0]() == "pong"
    assert set(Spy.seen) == {"ping"}


def test_the_executor_refuses_hostile_names_and_caches_none() -> None:
    from pyswtask.events import EventManager

    executor = TaskExecutor(EventManager())
    for name, method in [("hostile-spy", m) for m in HOSTILE_NAMES] + [(n, "ping") for n in HOSTILE_NAMES]:
        ok, value = executor.execute((name, method, [], 1, "", 0), 1, 0)
        assert not ok and value[0] in ("UnknownTask", "UnknownMethod") and value[2] == ""
    assert executor._resolved == {}
    assert executor.execute(("hostile-spy", "ping", [], 1, "", 0), 2, 0) == (True, "pong")


# -- real servers ----------------------------------------------------------------------------

# Written onto sockets from inside a worker. A helper finds the worker's task channels: they are
# exactly the descriptors in its dispatcher's epoll set (Linux lists them in /proc fdinfo).
GARBAGE_SCRIPT = '''
    import msgpack, struct
    from pyswtask import roles
    from pyswtask._core import (pack_frame, pack_envelope, FRAME_TASK, FRAME_RESULT, FRAME_PIPE,
                                FLAG_FRAG_FIRST, FLAG_FRAG_MORE)

    DEEP = b"\\x91" * 1000 + b"\\xc0"

    def header(ftype=FRAME_TASK, magic=b"SW", version=1, task_id=77, body_len=0):
        return magic + struct.pack("<BBBBHQI", version, ftype, 0, 0, 0, task_id, body_len)

    def channel_fds():
        with open(f"/proc/self/fdinfo/{roles.current().dispatcher.fileno()}") as f:
            return [int(line.split()[1]) for line in f if line.startswith("tfd:")]

    CHANNEL_GARBAGE = [
        b"",
        b"\\x00" * 7,
        b"not a frame at all, just some text",
        header(magic=b"XX"),
        header(version=9),
        header(ftype=0),
        header(ftype=FRAME_RESULT),
        header(body_len=0xFFFFFFFF) + b"short",
        header(body_len=100_000) + b"x" * 100_000,
        pack_frame(FRAME_TASK, 0, 77, 0, b"\\xc1"),
        pack_frame(FRAME_TASK, 0, 78, 0, msgpack.packb(["Demo", "echo"])),
        pack_frame(FRAME_TASK, 0, 79, 0, DEEP),
        pack_frame(FRAME_TASK, FLAG_FRAG_MORE, 80, 0, b"a fragment without its start"),
        pack_frame(FRAME_TASK, FLAG_FRAG_FIRST, 81, 0, b"\\x96"),
        pack_frame(FRAME_TASK, 0, 82, 0, pack_envelope("Demo", "echo", [1])) + b"\\xff" * 9,
    ]
    INBOX_GARBAGE = [
        b"junk",
        header(ftype=FRAME_TASK),
        pack_frame(FRAME_PIPE, 0, 90, 0, b"\\xc1"),
        pack_frame(FRAME_PIPE, 0, 91, 0, DEEP),
        pack_frame(FRAME_PIPE, 0, 92, 0, b"\\x92\\xa4task" + DEEP),
        pack_frame(FRAME_PIPE, 0, 93, 0, msgpack.packb(["task", [1, 2]])),
        pack_frame(FRAME_PIPE, 0, 94, 0, msgpack.packb(["tasks", [["Demo", "_secret", []], 5]])),
        pack_frame(FRAME_PIPE, 0, 95, 0, msgpack.packb(["pyswtask.start_process", "nope"])),
    ]

    def start(server, wid):
        pid = Task.deliver("Demo", "pid")
        (fd,) = channel_fds()
        for record in CHANNEL_GARBAGE:
            os.write(fd, record)
        mailbox = roles.current().mailbox
        for dst in (0, 1, server.master_id):   # this worker, the task worker, the master
            for record in INBOX_GARBAGE:
                os.write(mailbox.out_fileno(dst), record)
        time.sleep(0.3)
        blob = os.urandom(200_000)
        emit(event="after", pid_before=pid, echo=Task.deliver("Demo", "echo", ["still here"]),
             big=Task.deliver("Demo", "echo", [blob]) == blob, pid_after=Task.deliver("Demo", "pid"))
        server.after(300, server.shutdown)

    server = Server(worker_num=1, task_worker_num=1)
    server.on("worker_start", start)
    sys.exit(server.start())
'''


def test_garbage_on_a_task_channel_and_the_inboxes_is_logged_and_dropped(servers: ServerRunner) -> None:
    srv = servers.run(GARBAGE_SCRIPT)
    after = srv.by_event("after")[0]
    assert after["echo"] == "still here" and after["big"] is True
    # The same task worker served before and after: it was never respawned.
    pid = after["pid_before"]
    assert after["pid_after"] == pid
    assert "died with" not in srv.err and "Traceback" not in srv.err, srv.err
    task_worker = f"{pid} pyswtask.task_worker ERROR task worker 1: "
    for why in ["offset 0: truncated header", "offset 0: bad magic",
                "offset 0: unsupported frame version", "offset 0: unknown frame type",
                "offset 0: a frame of a type this end does not take", "offset 0: truncated body",
                "offset 36: truncated header"]:   # after a good frame of 36 bytes
        assert f"{task_worker}record on channel 0 dropped at {why}" in srv.err, why
    for tid, why in [(77, "task envelope is not valid msgpack"),
                     (78, "malformed task envelope: ['Demo', 'echo']"),
                     (79, "malformed task envelope: [[[[[...]]]]]")]:
        assert f"{task_worker}task {tid} from worker 0 on channel 0 refused: {why}" in srv.err
    # Every inbox reader dropped what was not a pipe message, and went on reading.
    for inbox in (0, 1, 2):
        for why in ("truncated header", "a frame of a type this end does not take"):
            assert f"inbox of process {inbox}: record on channel {inbox} dropped at offset 0: {why}" \
                in srv.err, (inbox, why)
    assert srv.err.count("pipe message from process 0 dropped: pipe message is not valid msgpack") == 2
    assert srv.err.count("pipe message is not [type, data]: [[[[[...]]]]]") == 3
    assert "master: message from process 0 dropped: pipe message is not valid msgpack" in srv.err
    assert "malformed task message from process 0 dropped: [[[[[...]]]]]" in srv.err
    assert "malformed task message from process 0 dropped: [1, 2]" in srv.err
    assert "task 5 for process 0 not delivered" in srv.err
    assert "start of unknown process 'nope' refused" in srv.err


NAMES_SCRIPT = '''
    from pyswtask import process

    HOSTILE = %r

    @task()
    class Spy:
        def __init__(self):
            emit(event="spy_init")
        def __getattribute__(self, name):
            emit(event="spy_getattr", name=name)
            return object.__getattribute__(self, name)
        def ping(self):
            return "pong"
        def _hidden(self):
            return "hidden"

    def outcome(call):
        try:
            return ["ok", call()]
        except TaskError as e:
            return [e.remote_type, e.remote_message]

    def start(server, wid):
        pid = Task.deliver("Demo", "pid")
        emit(event="methods", out={m: outcome(lambda: Task.deliver("Spy", m)) for m in HOSTILE})
        emit(event="tasks", out={n: outcome(lambda: Task.deliver(n, "ping")) for n in HOSTILE})
        batch = Task.deliver_batch([("Spy", m) for m in HOSTILE] + [(n, "ping") for n in HOSTILE])
        emit(event="batch", types=sorted({type(r).__name__ for r in batch}))
        emit(event="after", ping=Task.deliver("Spy", "ping"), pid=pid, pid_after=Task.deliver("Demo", "pid"))

    @process(name="prober")
    def prober(server, proc):
        for m in ("__class__", "__init__", "_hidden", "instance"):
            emit(event="by_process", method=m,
                 out=outcome(lambda: Task.deliver_by_process("Spy", m, type=Task.TYPE_CO)))
        emit(event="by_process", method="ping",
             out=outcome(lambda: Task.deliver_by_process("Spy", "ping", type=Task.TYPE_CO)))
        server.shutdown()
        proc.sleep(60)

    server = Server(worker_num=1, task_worker_num=1)
    server.on("worker_start", start)
    sys.exit(server.start())
'''


def test_hostile_task_and_method_names_are_refused_and_serving_goes_on(servers: ServerRunner) -> None:
    srv = servers.run(NAMES_SCRIPT % (HOSTILE_NAMES,))
    for method, (kind, message) in srv.by_event("methods")[0]["out"].items():
        assert kind == "UnknownMethod", (method, kind, message)
        assert message.startswith(f"task 'Spy' has no public method {method!r} (methods: ping)")
    for name, (kind, message) in srv.by_event("tasks")[0]["out"].items():
        assert kind == "UnknownTask", (name, kind, message)
        assert message.startswith(f"task {name!r} is not registered (registered: Demo, Spy")
    assert srv.by_event("batch")[0]["types"] == ["TaskError"]
    after = srv.by_event("after")[0]
    assert after["ping"] == "pong" and after["pid"] == after["pid_after"]
    by_process = {r["method"]: r["out"] for r in srv.by_event("by_process")}
    assert by_process.pop("ping") == ["ok", "pong"]
    assert all(out[0] == "UnknownMethod" for out in by_process.values()), by_process
    # None of the refused names reached the instance: it was made once, for ping, and only
    # ping was ever looked up on it.
    assert len(srv.by_event("spy_init")) == 1
    assert {r["name"] for r in srv.by_event("spy_getattr")} == {"ping"}
    assert "died with" not in srv.err
