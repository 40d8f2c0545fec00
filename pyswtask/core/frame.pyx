# The frame format and the task envelope: packing, parsing and checking them. Declarations in
# frame.pxd; layout diagram and limits: the docstring of _core.pyx.

import msgpack
import reprlib

from libc.string cimport memcpy

from .includes.python cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

HEADER_SIZE = _HEADER_SIZE
RECORD_MAX = _RECORD_MAX
FRAME_VERSION = _FRAME_VERSION
FRAME_TASK = _FRAME_TASK
FRAME_RESULT = _FRAME_RESULT
FRAME_ERROR = _FRAME_ERROR
FRAME_PIPE = _FRAME_PIPE
FRAME_LOST = _FRAME_LOST
FLAG_ASYNC = _FLAG_ASYNC
FLAG_FRAG_FIRST = _FLAG_FRAG_FIRST
FLAG_FRAG_MORE = _FLAG_FRAG_MORE
FLAG_FRAG_LAST = _FLAG_FRAG_LAST
FLAG_COMMAND = _FLAG_COMMAND
FLAG_ARENA = _FLAG_ARENA

# Envelope field order, as TaskHelper::pack had it: name, method, params, type, logid, spanid;
# then, when they are not the defaults, the deadline of a CO delivery (unix time, float) and
# the process a worker delivers for (its pid and its role: see ORIGIN_FIELDS).
ENVELOPE_FIELDS = ("name", "method", "params", "type", "logid", "spanid")
ENVELOPE_EXTRA_FIELDS = ("deadline", "origin_pid", "origin_role")


class ProtocolError(ValueError):
    """A frame or an envelope that does not follow the wire format."""


# Untrusted values in error messages: repr() of a value msgpack decoded can recurse as deep as
# msgpack nests (1024 levels, past Python's recursion limit) and cost as much as its size.
_brief = reprlib.Repr()
_brief.maxlevel = 4
_brief.maxstring = _brief.maxother = 80
_brief.maxlist = _brief.maxtuple = _brief.maxdict = 8


def brief_repr(obj, Py_ssize_t limit=200):
    """repr(obj) for a message about input from the wire: shortened, never more than limit
    characters, and never RecursionError however deeply obj nests."""
    return _brief.repr(obj)[:limit]


cdef bytes packb(object value):
    return mp_packb(value)


cdef object unpackb(const char *p, Py_ssize_t n):
    # As msgpack.unpackb(bytes, strict_map_key=False) (int map keys must be allowed), read in
    # place by core/unpack.pyx: no copy of the body, no keyword call.
    return mp_unpack(p, n)


# The bytes-like arguments below are taken as C-contiguous views ([::1]): the code copies from
# &view[0] as from a flat buffer, which a strided or reversed memoryview is not (reading through
# one went past its end). Such a view is refused with BufferError; bytes(view) makes it flat.

def pack_frame(int ftype, int flags, uint64_t task_id, int src_worker, body):
    """One frame as bytes (header + body). The body must fit one record."""
    cdef const unsigned char[::1] view = body
    cdef Py_ssize_t n = view.shape[0]
    if n > _FRAG_BODY_MAX:
        raise ValueError(f"body of {n} bytes exceeds one record ({_FRAG_BODY_MAX} bytes); "
                         "channels fragment larger bodies")
    if not 0 < ftype <= _FRAME_TYPE_MAX:
        raise ValueError(f"unknown frame type {ftype}")
    out = PyBytes_FromStringAndSize(NULL, _HEADER_SIZE + n)
    cdef char *p = PyBytes_AS_STRING(out)
    write_header(p, <uint8_t>ftype, <uint8_t>flags, task_id, <uint16_t>src_worker, <uint32_t>n)
    if n:
        memcpy(p + _HEADER_SIZE, &view[0], n)
    return out


cdef uint64_t last_task_id(const char *p, size_t n) noexcept nogil:
    """The task id of a record's last frame; 0 when the record is malformed."""
    cdef size_t off = 0
    cdef FrameHeader h
    cdef uint64_t last = 0
    while off < n:
        if check_header(p + off, n - off, &h) != NULL:
            return 0
        last = h.task_id
        off += _HEADER_SIZE + h.body_len
    return last


def parse_frames(data):
    """Splits one record into (type, flags, task_id, src_worker, body) tuples.

    Raises ProtocolError naming the first defect; never reads past the buffer.
    """
    cdef const unsigned char[::1] view = data
    cdef size_t n = view.shape[0], off = 0
    cdef FrameHeader h
    cdef const char *why
    cdef const char *base = <const char *>&view[0] if n else NULL
    frames = []
    while off < n:
        why = check_header(base + off, n - off, &h)
        if why != NULL:
            raise ProtocolError(f"frame at offset {off}: {why.decode()}")
        frames.append((h.type, h.flags, h.task_id, h.src_worker,
                       PyBytes_FromStringAndSize(base + off + _HEADER_SIZE, h.body_len)))
        off += _HEADER_SIZE + h.body_len
    return frames


cdef tuple _envelope_fields(str name, str method, params, int type, str logid, int spanid,
                            deadline, uint32_t origin_pid, uint8_t origin_role):
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"params must be a list or tuple, not {params.__class__.__name__}")
    if deadline is not None:
        deadline = float(deadline)
    if origin_pid:
        return (name, method, params, type, logid, spanid, deadline, origin_pid, origin_role)
    if deadline is not None:
        return (name, method, params, type, logid, spanid, deadline)
    return (name, method, params, type, logid, spanid)


def envelope_to_submit(str name, str method, params, int type=1, str logid="", int spanid=0):
    """What an ASYNC delivery hands Dispatcher.submit: pack_envelope's bytes; or, for a body
    of ARENA_MIN_BODY bytes and more, the envelope's fields unpacked (a tuple), which submit
    packs straight into the arena block the body leaves from (see Dispatcher._put)."""
    cdef tuple fields = _envelope_fields(name, method, params, type, logid, spanid, None, 0, 0)
    cdef Py_ssize_t n = mp_packed_size(fields)
    if n >= _ARENA_MIN_BODY:
        return fields
    return mp_packb_sized(fields, n)


def pack_envelope(str name, str method, params, int type=1, str logid="", int spanid=0,
                  deadline=None, uint32_t origin_pid=0, uint8_t origin_role=0):
    """Packs a task call. params must be a list or tuple; raises TypeError from msgpack when a
    value cannot be packed (the facade names the value).

    Six fields, as before; seven with a deadline (a float, unix time); nine when origin_pid is
    given (the deadline then may be None): a reader of the six-field format reads the common
    case unchanged, and the extra fields cost nothing when they are not used."""
    return packb(_envelope_fields(name, method, params, type, logid, spanid, deadline,
                                  origin_pid, origin_role))


cdef tuple _check_envelope(obj):
    cdef Py_ssize_t n = len(<list>obj) if type(obj) is list else 0
    if (n not in (6, 7, 9) or type((<list>obj)[0]) is not str
            or type((<list>obj)[1]) is not str or type((<list>obj)[2]) is not list
            or type((<list>obj)[3]) is not int or type((<list>obj)[4]) is not str
            or type((<list>obj)[5]) is not int
            or n >= 7 and (<list>obj)[6] is not None and type((<list>obj)[6]) is not float
            or n == 9 and (type((<list>obj)[7]) is not int or type((<list>obj)[8]) is not int)):
        raise ProtocolError(f"malformed task envelope: {brief_repr(obj)}")
    return tuple(<list>obj)


cdef tuple unpack_envelope_c(const char *p, Py_ssize_t n):
    cdef tuple envelope
    try:
        envelope = mp_unpack_envelope(p, n)
        if envelope is not None:
            return envelope
        # Not an envelope: decoded whole, as before the fast path, so that invalid msgpack
        # further on is named as such and the message shows the value.
        obj = unpackb(p, n)
    except Exception as exc:
        raise ProtocolError(f"task envelope is not valid msgpack: {exc}") from None
    return _check_envelope(obj)


def unpack_envelope(body):
    """(name, method, params, type, logid, spanid[, deadline[, origin_pid, origin_role]]) from
    an envelope, as many fields as it has; ProtocolError if malformed."""
    cdef const unsigned char[::1] view
    if type(body) is bytes:
        # The common case, without the cost of acquiring a buffer view.
        if PyBytes_GET_SIZE(body) == 0:
            raise ProtocolError("empty task envelope")
        return unpack_envelope_c(PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))
    view = body
    if view.shape[0] == 0:
        raise ProtocolError("empty task envelope")
    return unpack_envelope_c(<const char *>&view[0], view.shape[0])
