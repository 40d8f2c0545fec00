"""The wire format of the compiled core: frames and task envelopes."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyswtask import _core
from pyswtask._core import (
    FRAME_ERROR,
    FRAME_RESULT,
    FRAME_TASK,
    HEADER_SIZE,
    RECORD_MAX,
    ProtocolError,
    brief_repr,
    pack_envelope,
    pack_frame,
    pack_value,
    packed_size,
    parse_frames,
    unpack_envelope,
)
from pyswtask.errors import TaskError
from pyswtask.transport.pipe import unpack_message


def test_header_layout_matches_the_documented_diagram() -> None:
    frame = pack_frame(FRAME_TASK, 0x01, 0x0102030405060708, 7, b"xyz")
    assert HEADER_SIZE == 20
    magic, ver, ftype, flags, rsv, src, task_id, body_len = struct.unpack_from("<2sBBBBHQI", frame)
    assert (magic, ver, ftype, flags, rsv) == (b"SW", 1, FRAME_TASK, 0x01, 0)
    assert (src, task_id, body_len) == (7, 0x0102030405060708, 3)
    assert frame[HEADER_SIZE:] == b"xyz"
    assert "| magic | ver |type |flags|" in (_core.__doc__ or "")


def test_frames_round_trip_in_one_record() -> None:
    frames = [(FRAME_TASK, 0, 1, 0, b""), (FRAME_RESULT, 2, 2**64 - 1, 65535, b"a" * 1000),
              (FRAME_ERROR, 4, 3, 1, b"\x00\xff")]
    record = b"".join(pack_frame(*f) for f in frames)
    assert parse_frames(record) == frames


@pytest.mark.parametrize("cut", [1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 2])
def test_truncated_frames_are_rejected(cut: int) -> None:
    frame = pack_frame(FRAME_TASK, 0, 9, 0, b"body")
    with pytest.raises(ProtocolError, match="truncated"):
        parse_frames(frame[:cut])


@pytest.mark.parametrize("offset,value,message", [
    (0, b"XX", "bad magic"), (2, b"\x09", "unsupported frame version"),
    (3, b"\x00", "unknown frame type"), (3, b"\x09", "unknown frame type"),
    (16, b"\xff\xff\xff\x7f", "truncated body"),
])
def test_corrupt_headers_are_rejected(offset: int, value: bytes, message: str) -> None:
    frame = bytearray(pack_frame(FRAME_TASK, 0, 9, 0, b"body"))
    frame[offset:offset + len(value)] = value
    with pytest.raises(ProtocolError, match=message):
        parse_frames(bytes(frame))


def test_second_frame_defect_names_its_offset() -> None:
    good = pack_frame(FRAME_RESULT, 0, 1, 0, b"ok")
    with pytest.raises(ProtocolError, match=f"offset {len(good)}"):
        parse_frames(good + b"\x00" * 5)


def test_pack_frame_refuses_bodies_larger_than_a_record_and_unknown_types() -> None:
    with pytest.raises(ValueError, match="exceeds one record"):
        pack_frame(FRAME_TASK, 0, 1, 0, b"x" * RECORD_MAX)
    with pytest.raises(ValueError, match="unknown frame type"):
        pack_frame(9, 0, 1, 0, b"")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_parser(data: bytes) -> None:
    try:
        frames = parse_frames(data)
    except ProtocolError:
        return
    assert sum(HEADER_SIZE + len(f[4]) for f in frames) == len(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=60), st.integers(0, 200), st.binary(min_size=1, max_size=4))
def test_mutated_frames_parse_or_fail_cleanly(body: bytes, pos: int, patch: bytes) -> None:
    frame = bytearray(pack_frame(FRAME_TASK, 0, 5, 1, body))
    pos %= len(frame)
    frame[pos:pos + len(patch)] = patch
    try:
        parse_frames(bytes(frame))
    except ProtocolError:
        pass


def test_strided_and_reversed_views_are_refused_not_read_past_their_end() -> None:
    """Regression: the parsers copied from &view[0] as from a flat buffer; a reversed
    memoryview made them read past its end (and crash at a page boundary)."""
    frame = pack_frame(FRAME_TASK, 0, 1, 0, b"abcdef")
    envelope = pack_envelope("t", "m", [1])
    for view in (memoryview(frame)[::-1], memoryview(frame + frame)[::2]):
        with pytest.raises(BufferError):
            parse_frames(view)
        with pytest.raises(BufferError):
            pack_frame(FRAME_TASK, 0, 1, 0, view)
    with pytest.raises(BufferError):
        unpack_envelope(memoryview(envelope)[::-1])
    # Flat views of every kind are read as they are.
    assert pack_frame(FRAME_TASK, 0, 1, 0, memoryview(b"xabcdefx")[1:-1]) == frame
    assert parse_frames(bytearray(frame)) == parse_frames(memoryview(frame)) == parse_frames(frame)
    assert unpack_envelope(bytearray(envelope)) == unpack_envelope(memoryview(envelope))


def test_envelope_round_trip_keeps_swoft_field_order() -> None:
    body = pack_envelope("demo", "echo", [1, "abc", 3.5], 2, "log-1", 7)
    assert msgpack.unpackb(body) == ["demo", "echo", [1, "abc", 3.5], 2, "log-1", 7]
    assert unpack_envelope(body) == ("demo", "echo", [1, "abc", 3.5], 2, "log-1", 7)
    assert _core.ENVELOPE_FIELDS == ("name", "method", "params", "type", "logid", "spanid")


def test_envelope_params_keep_nested_values_and_int_map_keys() -> None:
    params = [{"a": [1, 2], 3: b"raw"}, None, True, -(2**63), 2**64 - 1]
    assert unpack_envelope(pack_envelope("t", "m", params))[2] == params


@pytest.mark.parametrize("obj", [
    [], ["t", "m", [], 1, ""], ["t", "m", "notalist", 1, "", 0], [1, "m", [], 1, "", 0],
    {"name": "t"}, ["t", "m", [], "1", "", 0], "text",
])
def test_malformed_envelopes_are_rejected(obj: object) -> None:
    with pytest.raises(ProtocolError, match="malformed task envelope"):
        unpack_envelope(msgpack.packb(obj))


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x96\xa1t"])
def test_invalid_msgpack_envelopes_are_rejected(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        unpack_envelope(data)


def test_pack_envelope_needs_a_list_or_tuple_of_packable_params() -> None:
    with pytest.raises(TypeError, match="list or tuple, not dict"):
        pack_envelope("t", "m", {"a": 1})
    with pytest.raises(TypeError):
        pack_envelope("t", "m", [object()])


# The core packs bodies itself (core/pack.pyx): the bytes msgpack packs, at every boundary of
# every format, and msgpack's own result or error for whatever it leaves to msgpack.
_PACKB = msgpack.Packer(use_bin_type=True, autoreset=True).pack
_BOUNDS = [0, 1, 15, 16, 31, 32, 127, 128, 255, 256, 65535, 65536, 70000]
_INTS = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63,
         2**64 - 1, 2**64, -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1,
         -2**63, -2**63 - 1]


def _outcome(pack, value):
    try:
        return pack(value)
    except Exception as exc:
        return type(exc), str(exc)


class _Str(str):
    pass


class _Int(int):
    pass


_COVERED = [
    *[i for i in _INTS if -2**63 <= i < 2**64], None, True, False, 0.5, -0.0, float("inf"),
    float("nan"), 1e300,
    *["x" * n for n in _BOUNDS], *[b"y" * n for n in _BOUNDS],
    "\u00e9\u4e2d\U0001f600" * 50,
    *[[1] * n for n in _BOUNDS[:9]], *[tuple(range(n)) for n in (15, 16, 65536)],
    *[{i: "v" for i in range(n)} for n in (0, 15, 16, 65536)], {b"k": [None, {"a": (1,)}]},
]
# Left to msgpack: subclasses, other buffers, what does not encode or fit 64 bits.
_LEFT = [_Str("s"), _Int(3), [_Str("s")], bytearray(b"ab"), memoryview(b"cd"), "\ud800",
         [2**64], [-2**63 - 1], [object()], {"k": {1, 2}}]


@pytest.mark.parametrize("value", _COVERED, ids=repr)
def test_the_core_packs_what_msgpack_packs(value: object) -> None:
    assert pack_value(value) == _PACKB(value)
    assert packed_size(value) == len(_PACKB(value))


@pytest.mark.parametrize("value", _LEFT, ids=repr)
def test_what_the_core_leaves_to_msgpack_packs_or_fails_as_there(value: object) -> None:
    assert packed_size(value) == -1
    assert _outcome(pack_value, value) == _outcome(_PACKB, value)


_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
    | st.sampled_from(_INTS) | st.floats() | st.text(max_size=300)
    | st.binary(max_size=300) | st.builds(lambda n: "x" * n, st.sampled_from(_BOUNDS)),
    lambda inner: st.lists(inner, max_size=20) | st.tuples(inner, inner)
    | st.dictionaries(st.integers() | st.text(max_size=5), inner, max_size=20),
    max_leaves=60)


@settings(max_examples=400, deadline=None)
@given(_values)
def test_the_core_packs_any_value_as_msgpack_does(value: object) -> None:
    assert _outcome(pack_value, value) == _outcome(_PACKB, value)


def test_values_nested_deeper_than_the_core_packs_are_packed_by_msgpack() -> None:
    deep: list[object] = []
    for _ in range(200):
        deep = [deep]
    assert packed_size(deep) == -1
    assert pack_value(deep) == _PACKB(deep)
    for _ in range(400):
        deep = [deep]
    assert _outcome(pack_value, deep) == _outcome(_PACKB, deep)


# msgpack nests up to 1024 levels: this decodes, and repr() of it exceeds the recursion limit.
DEEP = b"\x91" * 1000 + b"\xc0"


def test_deeply_nested_values_are_refused_in_the_documented_type() -> None:
    """Regression: the error messages repr()'d the decoded value, and one nested 1000 deep
    raised RecursionError instead: out of a task worker's loop, or the master's, it was fatal."""
    brief = r"\[\[\[\[\[\.\.\.\]\]\]\]\]$"
    with pytest.raises(ProtocolError, match="malformed task envelope: " + brief):
        unpack_envelope(DEEP)
    with pytest.raises(ValueError, match=r"pipe message is not \[type, data\]: " + brief):
        unpack_message(DEEP)
    error = TaskError.from_wire(msgpack.unpackb(DEEP))
    assert str(error) == "ProtocolError: malformed error reply: [[[[[...]]]]]"


def test_brief_repr_is_bounded_whatever_it_gets() -> None:
    assert brief_repr(msgpack.unpackb(DEEP)) == "[[[[[...]]]]]"
    assert len(brief_repr(["x" * 10_000] * 1000)) <= 200
    assert len(brief_repr({i: b"y" * 500 for i in range(500)}, 50)) <= 50
    assert brief_repr(["t", "m", [], "1", "", 0]) == "['t', 'm', [], '1', '', 0]"
