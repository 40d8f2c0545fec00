"""Hostile input: random and mutated bytes where frames, envelopes and pipe messages are read.

Whatever arrives, the parsers return a value or raise their documented error (ProtocolError for
frames and envelopes, ValueError for pipe messages), the readers of real sockets log and drop a
bad record and go on serving, and a task or method name from the wire is looked up among the
registered tasks only. test_frame.py has the basic cases; this file adds mutations of valid
records, the readers fed whole hostile records, and real servers fed garbage on their sockets.
tests/fuzz/fuzz_frames.py runs the same checks under atheris for as long as one likes.
"""

from __future__ import annotations

import math
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
    brief_repr,
    pack_envelope,
    pack_frame,
    parse_frames,
    unpack_envelope,
    unpack_value,
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
# How a frame whose body would be in an arena is reported where there is none: that frame is
# dropped, not its record (flags drawn as 0xFF include FLAG_ARENA).
NO_ARENA = "dropped: a reference to an arena this channel does not have"


def counted(errors: list[str]) -> list[str]:
    """The errors that stand for a dropped record, or a task refused: not the frames dropped
    alone."""
    return [e for e in errors if not e.endswith(STRAY) and not e.endswith(NO_ARENA)]


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


# -- the core's msgpack decoder ---------------------------------------------------------------

# Everything msgpack packs, and map keys of every hashable kind strict_map_key=False allows.
exts = (st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=20))
        | st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999)))
any_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
               | st.text(max_size=40) | st.binary(max_size=40) | exts
               # ASCII of every length the decoder copies directly, and past it
               | st.text(st.characters(max_codepoint=127), min_size=2, max_size=140)
               | st.tuples(st.text(st.characters(max_codepoint=127), max_size=130),
                           st.characters(min_codepoint=128, exclude_categories=("Cs",))).map("".join)
               # every width of str, bin and int
               | st.sampled_from([0, 31, 32, 255, 256, 65535, 65536]).map(lambda k: "é" * (k // 2))
               | st.sampled_from([0, 255, 256, 65535, 65536]).map(lambda k: b"y" * k)
               | st.sampled_from([127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, -32, -33,
                                  -128, -129, -32768, -32769, -(2**31), -(2**31) - 1]))
keys = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
        | st.text(max_size=10) | st.binary(max_size=10) | exts)
any_values = st.recursive(
    any_scalars,
    lambda inner: st.lists(inner, max_size=6) | st.tuples(inner, inner)
    | st.dictionaries(keys, inner, max_size=6),
    max_leaves=30)


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
            if not (a == b or (math.isnan(a) and math.isnan(b))):
                return False
        elif a != b:
            return False
    return True


def decoded(data: bytes) -> tuple[bool, Any]:
    """(True, value) or (False, the exception) from unpack_value, and the same from msgpack."""
    try:
        return True, unpack_value(data)
    except Exception as exc:
        return False, exc


def reference(data: bytes) -> tuple[bool, Any]:
    try:
        return True, msgpack.unpackb(data, strict_map_key=False)
    except Exception as exc:
        return False, exc


def check_decoder(data: bytes) -> None:
    """The core's decoder returns what msgpack returns, and raises exactly when it raises: a
    ValueError (or TypeError for an unhashable map key) where msgpack raises one."""
    ok, got = decoded(data)
    ref_ok, want = reference(data)
    assert ok == ref_ok, (data[:60], got, want)
    if ok:
        assert same(got, want), (data[:60], got, want)
    else:
        assert isinstance(got, (ValueError, TypeError)), repr(got)
        if isinstance(want, TypeError):   # the unhashable key is found in the same place
            assert type(got) is TypeError and str(got) == str(want)


def envelope_oracle(body: bytes) -> Any:
    """What unpack_envelope must do, from msgpack: a message prefix to raise with, or the tuple."""
    try:
        obj = msgpack.unpackb(body, strict_map_key=False)
    except Exception:
        return "task envelope is not valid msgpack: "
    if (type(obj) is list and len(obj) == 6
            and [type(v) for v in obj] == [str, str, list, int, str, int]):
        return tuple(obj)
    return f"malformed task envelope: {brief_repr(obj)}"


def check_envelope_against_msgpack(body: bytes) -> None:
    want = envelope_oracle(body) if body else "empty task envelope"
    try:
        got = unpack_envelope(body)
    except ProtocolError as exc:
        assert isinstance(want, str), (body[:60], exc, want)
        assert str(exc).startswith(want) if want.endswith(": ") else str(exc) == want, (exc, want)
    else:
        assert isinstance(want, tuple) and same(list(got), list(want)), (body[:60], got, want)


@FAST
@given(any_values)
def test_the_decoder_reads_what_msgpack_packs_as_msgpack_does(value: Any) -> None:
    encodings = [msgpack.packb(value)]
    try:
        encodings.append(msgpack.packb(value, use_single_float=True))
    except OverflowError:   # a double past float32's range
        pass
    for data in encodings:
        check_decoder(data)
        assert same(unpack_value(data), msgpack.unpackb(data, strict_map_key=False))
        assert same(unpack_value(bytearray(data)), unpack_value(memoryview(data)))


@FAST
@given(any_values)
def test_every_truncation_and_any_trailing_byte_raises(value: Any) -> None:
    data = msgpack.packb(value)
    for cut in range(min(len(data), 400)):
        with pytest.raises(ValueError):
            unpack_value(data[:cut])
    with pytest.raises(msgpack.ExtraData):
        unpack_value(data + b"\xc0")


@pytest.mark.parametrize("size", [129, 200, 4096, 65537])
def test_long_text_decodes_as_msgpack_decodes_it_whatever_its_first_non_ascii_byte(
        size: int) -> None:
    """Long str bodies are copied while they are checked, a block of 64 bytes at a time: a
    non-ASCII character (or invalid UTF-8) in any block, on either side of a block's edge, and
    in the tail after the last whole block, gives what msgpack gives."""
    for at in sorted({0, 1, 62, 63, 64, 65, size // 2, size - 65, size - 64, size - 2, size - 1}):
        text = "x" * at + "\u00e9" + "y" * (size - at - 2)
        for data in (msgpack.packb(text), msgpack.packb(text).replace(b"\xc3\xa9", b"\xff\xfe"),
                     msgpack.packb([1, 2, 3, text])):
            check_decoder(data)
    check_decoder(msgpack.packb("z" * size))


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_decode_or_raise_as_with_msgpack(data: bytes) -> None:
    check_decoder(data)
    check_envelope_against_msgpack(data)


@FAST
@given(st.data(), any_values)
def test_mutated_msgpack_decodes_or_raises_as_with_msgpack(data: st.DataObject, value: Any) -> None:
    bad = data.draw(mutated(msgpack.packb(value), []))
    check_decoder(bad)
    check_envelope_against_msgpack(bad)
    # The same body with a header in front: lengths claimed past it, types mixed.
    prefix = data.draw(st.sampled_from([b"\x96", b"\x92", b"\x81", b"\xdc\x00\x06", b"\xdd\x00\x00\x00\x06",
                                        b"\x96\xa1t\xa1m", b"\x96\xa1t\xa1m\x90\x01\xa0"]))
    check_decoder(prefix + bad)
    check_envelope_against_msgpack(prefix + bad)


@FAST
@given(st.text(), st.text(), st.lists(any_values, max_size=5), st.integers(-(2**63), 2**64 - 1),
       st.text(max_size=40), st.integers(-(2**63), 2**64 - 1), st.data())
def test_envelopes_of_any_params_unpack_as_msgpack_does(name: str, method: str, params: list[Any],
                                                        type: int, logid: str, spanid: int,
                                                        data: st.DataObject) -> None:
    fields = [name, method, params, type, logid, spanid]
    check_envelope_against_msgpack(msgpack.packb(fields))
    # One field of another type, anywhere: refused with the same message as before.
    fields[data.draw(st.integers(0, 5))] = data.draw(any_values)
    check_envelope_against_msgpack(msgpack.packb(fields))


# Encodings msgpack.packb never writes but msgpack.unpackb reads: every width of every type.
WIDE = [
    b"\xcc\x05", b"\xcd\x00\x05", b"\xce\x00\x00\x00\x05", b"\xcf" + b"\xff" * 8,
    b"\xd0\xff", b"\xd1\x80\x00", b"\xd2\x80\x00\x00\x00", b"\xd3\x80" + b"\x00" * 7,
    b"\xd0\x05", b"\xd3" + b"\x00" * 7 + b"\x05", b"\xca\x3f\xc0\x00\x00", b"\xca\x7f\xc0\x00\x01",
    b"\xd9\x01a", b"\xda\x00\x01a", b"\xdb\x00\x00\x00\x01a", b"\xc4\x01a", b"\xc5\x00\x01a",
    b"\xc6\x00\x00\x00\x01a", b"\xdc\x00\x01\xc0", b"\xdd\x00\x00\x00\x01\xc0",
    b"\xde\x00\x01\x01\x02", b"\xdf\x00\x00\x00\x01\xa1k\xc3", b"\xdc\x00\x00", b"\xdf\x00\x00\x00\x00",
    b"\xc7\x00\x05", b"\xc8\x00\x01\x05a", b"\xc9\x00\x00\x00\x01\x05a", b"\xd8\x05" + b"z" * 16,
    b"\xd6\xff\x00\x00\x00\x01", b"\xd7\xff" + b"\x00" * 8, b"\xc7\x0c\xff" + b"\x00" * 12,
    b"\xdc\x00\x06\xa1t\xa1m\x90\x01\xa0\x00", b"\xdd\x00\x00\x00\x06\xa1t\xa1m\x90\x01\xa0\x00",
    b"\x96\xd9\x01t\xda\x00\x01m\xdc\x00\x00\xcf" + b"\x00" * 7 + b"\x01\xdb\x00\x00\x00\x00\xd0\xff",
]
# Refused: the unused byte, bad UTF-8 in every str width, lengths past the end in every width,
# keys that cannot be hashed, timestamps of a length msgpack does not read.
BAD = [
    b"\xc7\x01\xff\x00", b"\xd5\xff\x00\x00", b"\x91\xd4\xff\x00",
    b"\xc1", b"\x91\xc1", b"\x81\xc1\xc0", b"\xa1\xff", b"\xd9\x02\xc3\x28", b"\xda\x00\x01\x80",
    b"\xdb\x00\x00\x00\x03\xed\xa0\x80", b"\xa2\xf0\x9f", b"\x82\xa1\xff\x01",
    b"\xd9\xff", b"\xda\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xc4\x05ab", b"\xc5\xff\xff",
    b"\xc6\xff\xff\xff\xff", b"\xdc\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xde\xff\xff\x01",
    b"\xdf\xff\xff\xff\xff", b"\xc7\xff\x05", b"\xc8\xff\xff\x05", b"\xc9\xff\xff\xff\xff\x05",
    b"\xd8\x05", b"\xcf\x00", b"\xcb\x00\x00", b"\xca", b"\x9f", b"\x8f", b"\xbf",
    b"\x81\x90\xc0", b"\x81\x80\xc0", b"\x81\x91\x90\xc0", b"\x91\x81\x81\xc0\xc0\xc0",
    b"\x94\x81\x90\xc0", b"\xc0\xc0", b"\x90\x00\x00",
]


@pytest.mark.parametrize("data", WIDE + BAD + NASTY_MSGPACK, ids=range(len(WIDE + BAD + NASTY_MSGPACK)))
def test_every_encoding_decodes_or_raises_as_with_msgpack(data: bytes) -> None:
    check_decoder(data)
    check_envelope_against_msgpack(data)
    if data in WIDE:
        unpack_value(data)
    elif data in BAD:
        with pytest.raises((ValueError, TypeError)):
            unpack_value(data)


@pytest.mark.parametrize("depth", [1, 2, 1023, 1024, 1025, 1026, 5000])
@pytest.mark.parametrize("opener,leaf", [(b"\x91", b"\xc0"), (b"\x81\xc0", b"\xc0"),
                                         (b"\x92\x01", b"\x90"), (b"\x81\xa1k", b"\x80"),
                                         (b"\xdc\x00\x01", b"\x01"), (b"\xc7\x00\x05\x91", b"\xc0")])
def test_nesting_is_bounded_where_msgpack_bounds_it(depth: int, opener: bytes, leaf: bytes) -> None:
    check_decoder(opener * depth + leaf)
    check_envelope_against_msgpack(opener * depth + leaf)


@pytest.mark.parametrize("length", [2, 7, 8, 9, 16, 31, 32, 127, 128, 129, 300])
def test_a_bad_utf8_byte_anywhere_in_a_str_raises_as_with_msgpack(length: int) -> None:
    text = b"abcdefgh" * 40
    for at in sorted({0, 1, length // 2, length - 2, length - 1}):
        for bad in (b"\x80", b"\xff", b"\xc3", b"\xed"):
            raw = text[:at] + bad + text[at + 1:length]
            data = (bytes([0xa0 | length]) if length < 32 else b"\xd9" + bytes([length])
                    if length < 256 else b"\xda" + length.to_bytes(2, "big")) + raw
            with pytest.raises(UnicodeDecodeError):
                msgpack.unpackb(data)
            with pytest.raises(UnicodeDecodeError):
                unpack_value(data)


def test_the_deepest_nesting_fits_a_small_thread_stack() -> None:
    """The decoder recurses once per level, up to msgpack's 1024: a thread with a 1 MiB stack
    (Linux gives 8) decodes the deepest value and refuses the next level, and never crashes."""
    import threading

    results: list[Any] = []

    def run() -> None:
        for depth in (1024, 1025, 100_000):
            for opener in (b"\x91", b"\x81\xc0", b"\x81\x91\xc0"):
                data = opener * depth + b"\xc0"
                results.append(decoded(data)[0] == reference(data)[0])

    old = threading.stack_size(1 << 20)
    try:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    finally:
        threading.stack_size(old)
    assert results == [True] * 9


def test_decoded_values_are_new_objects_not_views_of_the_buffer() -> None:
    buf = bytearray(msgpack.packb([b"bytes", "text", {"k": [1.5]}]))
    value = unpack_value(buf)
    buf[:] = b"\x00" * len(buf)
    assert value == [b"bytes", "text", {"k": [1.5]}]
    with pytest.raises(BufferError):
        unpack_value(memoryview(msgpack.packb([1, 2]))[::-1])


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
        dropped = counted(errors)
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
        errors = [e for e in counted(errors) if "malformed lost-task notice" not in e]
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
        assert len(counted(errors)) == loop.bad_records + len(refused)

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
        pack_frame(FRAME_PIPE, 0, 94, 0, msgpack.packb(["tasks", [os.getpid(), 2,
                                                                   [["Demo", "_secret", []], 5],
                                                                   [1]]])),
        pack_frame(FRAME_PIPE, 0, 96, 0, msgpack.packb(["tasks", [["Demo", "echo", [1]]]])),
        pack_frame(FRAME_PIPE, 0, 97, 0, msgpack.packb(["tasks", [7, 2, [["Demo", "echo", [1]]],
                                                                   [0]]])),
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
    assert "malformed tasks message from process 0 dropped: [['Demo', 'echo', [1]]]" in srv.err
    assert "malformed tasks message from process 0 dropped: [7, 2, [['Demo', 'echo', [1]]], [0]]" \
        in srv.err
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
