"""atheris fuzz target for the wire format and the readers of real sockets.

Each input is either parsed as it is (parse_frames, unpack_envelope, pipe.unpack_message, and
the core's msgpack decoder, unpack_value, against msgpack.unpackb), or turned into records (raw
bytes, or frames built from the input with plausible headers so that reassembly and the envelope
parser are reached) that are written to real SOCK_SEQPACKET sockets and read by the compiled
readers: an inbox (Mailbox), a worker's Dispatcher and a task worker's
TaskLoop. Allowed outcomes: a value, or the documented error (ProtocolError for frames and
envelopes, ValueError for pipe messages); the readers must never raise, must count exactly the
records that are malformed, and a TaskLoop must answer only with well-formed frames.

Run it (see README.md): python tests/fuzz/fuzz_frames.py -max_total_time=60
This file is not collected by pytest (its name does not start with test_).
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from typing import Any

import atheris
import msgpack

# The compiled core gives libFuzzer no coverage (that needs a clang build with
# -fsanitize=fuzzer-no-link); the Python side is instrumented, and so are the functions of this
# harness and its oracle, which rewards inputs that reach new outcomes (a frame accepted, a body
# reassembled, a task answered).
with atheris.instrument_imports(include=["pyswtask"]):
    from pyswtask._core import (
        FRAME_ERROR,
        FRAME_LOST,
        FRAME_PIPE,
        FRAME_RESULT,
        FRAME_TASK,
        HEADER_SIZE,
        RECORD_MAX,
        Dispatcher,
        Mailbox,
        ProtocolError,
        TaskLoop,
        pack_envelope,
        pack_frame,
        parse_frames,
        unpack_envelope,
        unpack_value,
    )
    from pyswtask.errors import TaskError, TaskWorkerLost
    from pyswtask.transport import pipe

EPOCH = 0x5EED
FIRST_ID = (EPOCH << 32) | 1   # the id of the one task each Dispatcher has pending
IDS = [0, 1, 2, FIRST_ID, 2**64 - 1]


def same(a: Any, b: Any) -> bool:
    """a == b with the same types all the way down (True is not 1, a NaN equals a NaN); without
    recursion, for values nested past Python's recursion limit."""
    todo = [(a, b)]
    while todo:
        a, b = todo.pop()
        if type(a) is not type(b):
            return False
        if isinstance(a, (list, dict)):
            if len(a) != len(b):
                return False
            todo += zip(a, b)   # a dict's keys, in order
            if isinstance(a, dict):
                todo += zip(a.values(), b.values())
        elif isinstance(a, float):
            if not (a == b or (a != a and b != b)):
                return False
        elif a != b:
            return False
    return True


@atheris.instrument_func
def check_decoder(data: bytes) -> None:
    """The core's msgpack decoder raises exactly when msgpack.unpackb does, and otherwise
    returns the same value."""
    try:
        want = msgpack.unpackb(data, strict_map_key=False)
    except Exception:
        try:
            unpack_value(data)
        except (ValueError, TypeError):
            return
        raise AssertionError(f"msgpack refuses {data[:60]!r}, the core's decoder does not") from None
    got = unpack_value(data)
    assert same(got, want), (data[:60], got, want)


@atheris.instrument_func
def check_parsers(data: bytes) -> None:
    try:
        frames = parse_frames(data)
    except ProtocolError:
        pass
    else:
        at = 0
        for ftype, _flags, _task_id, _src, body in frames:
            assert 1 <= ftype <= FRAME_LOST, ftype
            assert data[at + HEADER_SIZE:at + HEADER_SIZE + len(body)] == body
            at += HEADER_SIZE + len(body)
        assert at == len(data), (at, len(data))
    try:
        envelope = unpack_envelope(data)
    except ProtocolError as exc:
        assert len(str(exc)) < 1000
    else:
        assert [type(v) for v in envelope] == [str, str, list, int, str, int], envelope
    check_decoder(data)
    try:
        mtype, _ = pipe.unpack_message(data)
    except ValueError as exc:
        assert type(exc) is ValueError and len(str(exc)) < 1000
    else:
        assert type(mtype) is str


@atheris.instrument_func
def rejected(record: bytes, accepted: int) -> bool:
    """Whether RecordReader.read_record drops the record (the oracle, from parse_frames)."""
    try:
        types = [f[0] for f in parse_frames(record[:RECORD_MAX])]
    except ProtocolError:
        return True
    ok = {FRAME_RESULT, FRAME_ERROR} if accepted == FRAME_RESULT else {accepted}
    return any(t not in ok for t in types)


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(RECORD_MAX + 1))
        except BlockingIOError:
            return out


class Readers:
    """Socket pairs made once; the readers are made per input (fresh reassembly state)."""

    def __init__(self) -> None:
        pair = socket.socketpair
        self.inbox_r, self.inbox_w = pair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.mine, self.peer = pair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.worker_end, self.task_end = pair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (self.peer, self.worker_end):
            s.setblocking(False)
        self.stop_r, self.stop_w = os.pipe()
        self.errors: list[str] = []
        self.body = pack_envelope("t", "m", [])

    @atheris.instrument_func
    def feed(self, records: list[bytes], accepted: int) -> None:
        errors = self.errors
        errors.clear()
        if accepted == FRAME_PIPE:
            inbox = Mailbox(0, self.inbox_r.fileno(), [self.inbox_w.fileno()], epoch=1,
                            on_protocol_error=errors.append)
            for record in records:
                self.inbox_w.send(record)
                inbox.receive()
            bad = inbox.bad_records
        elif accepted == FRAME_RESULT:
            finished: list[Any] = []
            d = Dispatcher(0, [self.mine.fileno()], bytearray(1),
                           on_finish=lambda *a: finished.append(a), make_error=TaskError.from_wire,
                           make_lost=TaskWorkerLost.lost, on_protocol_error=errors.append,
                           epoch=EPOCH)
            assert d.submit(self.body, 0, None) == FIRST_ID
            drain(self.peer)
            for record in records:
                self.peer.send(record)
                d.on_readable()
            assert all(f[0] == FIRST_ID for f in finished) and len(finished) <= 1
            bad = d.bad_records
        else:
            loop = TaskLoop(1, 0, [self.task_end.fileno()], bytearray(1), self.stop_r,
                            execute=lambda env, tid, src: (True, env[2]),
                            on_signal=lambda s: True, on_protocol_error=errors.append)
            for record in records:
                self.worker_end.send(record)
                # max_wait 0: serve what epoll reports with the stop byte, then return.
                os.write(self.stop_w, b"\x0f")
                loop.run(0.0)
            answered = 0
            for reply in drain(self.worker_end):
                frames = parse_frames(reply)   # the task worker writes only valid frames
                assert all(f[0] in (FRAME_RESULT, FRAME_ERROR) for f in frames), frames
                answered += len(frames)
            assert answered == loop.tasks_done, (answered, loop.tasks_done)
            bad = loop.bad_records
        expected = sum(rejected(r, accepted) for r in records)
        assert bad == expected, (bad, expected, records)
        # Stray fragments are reported apart from the records dropped.
        assert len([e for e in errors if " refused: " not in e
                    and "whose start never came" not in e]) == bad, errors


READERS: Readers | None = None


@atheris.instrument_func
def build_records(fdp: atheris.FuzzedDataProvider, ftype: int) -> list[bytes]:
    """Records of frames whose headers are mostly valid, with a defect now and then."""
    records = []
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        record = b""
        for _ in range(fdp.ConsumeIntInRange(1, 3)):
            kind = fdp.ConsumeIntInRange(0, 3)
            body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
            if kind == 1:
                # a body that is at least a 6-item msgpack array, to get past the first check
                body = b"\x96" + body
            elif kind == 2:
                body = b"\x92\xa1t" + body
            t = ftype if fdp.ConsumeProbability() < 0.85 else fdp.ConsumeIntInRange(1, 4)
            flags = fdp.PickValueInList([0, 0, 1, 0x02, 0x04, 0x08, 0x0A, 0x0E, 0xFF])
            frame = bytearray(pack_frame(t, flags, fdp.PickValueInList(IDS), 0, body))
            defect = fdp.ConsumeIntInRange(0, 9)
            if defect == 1:
                frame[16:20] = struct.pack("<I", fdp.ConsumeIntInRange(0, 2**32 - 1))
            elif defect == 2:
                frame[fdp.ConsumeIntInRange(0, 5)] = fdp.ConsumeIntInRange(0, 255)
            elif defect == 3:
                del frame[fdp.ConsumeIntInRange(0, len(frame)):]
            record += frame
        if fdp.ConsumeIntInRange(0, 15) == 0:
            # longer than one read: the kernel cuts it at RECORD_MAX
            record += b"x" * (RECORD_MAX + 10 - len(record))
        records.append(record)
    return records


@atheris.instrument_func
def TestOneInput(data: bytes) -> None:
    global READERS
    if READERS is None:
        READERS = Readers()
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 5)
    accepted = (FRAME_PIPE, FRAME_RESULT, FRAME_TASK)[fdp.ConsumeIntInRange(0, 2)]
    if mode == 0:
        check_parsers(fdp.ConsumeBytes(sys.maxsize))
    elif mode == 1:
        prefix = fdp.PickValueInList([b"\x96", b"\x92", b"\x92\xa1t", b"\x96\xa1t\xa1m\x90"])
        check_parsers(prefix + fdp.ConsumeBytes(sys.maxsize))
    elif mode in (2, 3):
        READERS.feed(build_records(fdp, accepted), accepted)
    elif mode == 4:
        sizes = [fdp.ConsumeIntInRange(0, 300) for _ in range(fdp.ConsumeIntInRange(1, 6))]
        READERS.feed([fdp.ConsumeBytes(n) for n in sizes], accepted)
    else:
        # a well-formed frame around a body built from the input, so msgpack sees it whole
        body = msgpack.packb(["t", "m", [fdp.ConsumeUnicodeNoSurrogates(20), fdp.ConsumeInt(8)], 1, "", 0])
        body = body[:fdp.ConsumeIntInRange(0, len(body))] + fdp.ConsumeBytes(sys.maxsize)
        check_parsers(body)
        READERS.feed([pack_frame(accepted, 0, FIRST_ID, 0, body)], accepted)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
