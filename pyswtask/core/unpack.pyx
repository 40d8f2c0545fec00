# The msgpack decoder of the core: task envelopes, results, LOST bodies and reply records are
# read straight from the frame's buffer into Python objects, without a copy of the bytes or a
# call into msgpack. It returns what msgpack.unpackb(data, strict_map_key=False) returns, value
# for value and type for type (ext types, the timestamp among them, are handed to msgpack
# itself), and raises wherever that raises. Declarations in unpack.pxd.

import msgpack

from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from .includes.python cimport (Py_DECREF, Py_INCREF, PyBytes_AS_STRING, PyBytes_FromStringAndSize,
                               PyBytes_GET_SIZE, PyDict_New, PyDict_SetItem, PyFloat_FromDouble,
                               PyList_New, PyList_SET_ITEM, PyLong_FromLong, PyLong_FromLongLong,
                               PyLong_FromUnsignedLongLong, PyObject, PyTuple_New,
                               PyTuple_SET_ITEM, PyUnicode_DATA, PyUnicode_DecodeUTF8,
                               PyUnicode_InternInPlace, PyUnicode_New)

# msgpack's exception types, so that callers catching them (or ValueError) see no difference.
cdef object _ExtraData = msgpack.ExtraData
cdef object _FormatError = msgpack.FormatError
cdef object _StackError = msgpack.StackError
cdef object _msgpack_unpackb = msgpack.unpackb


cdef inline uint16_t _be16(const unsigned char *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline uint32_t _be32(const unsigned char *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t _be64(const unsigned char *p) noexcept nogil:
    return (<uint64_t>_be32(p) << 32) | _be32(p + 4)


cdef object _truncated(MpReader *r, size_t need):
    raise ValueError(f"msgpack data is truncated: {need} bytes needed at offset "
                     f"{r.p - r.base}, {r.end - r.p} left")


cdef object _decode(MpReader *r, int depth):
    """The next value at r.p; r.p moves past it. Every length is checked against the bytes
    left before anything is read or allocated."""
    cdef const unsigned char *p = r.p
    cdef size_t avail = <size_t>(r.end - p)
    cdef size_t n, hdr
    cdef unsigned int b
    cdef uint32_t u32
    cdef uint64_t u64
    cdef float f32
    cdef double f64
    if avail == 0:
        return _truncated(r, 1)
    b = p[0]
    if b <= 0x7f:
        r.p = p + 1
        return PyLong_FromLong(b)
    if b >= 0xe0:
        r.p = p + 1
        return PyLong_FromLong(<long>b - 0x100)
    if b >= 0xa0 and b <= 0xbf:
        n = b & 0x1f
        if n >= avail:
            return _truncated(r, n + 1)
        r.p = p + 1 + n
        return _str(p + 1, n)
    if b >= 0x90 and b <= 0x9f:
        r.p = p + 1
        return _array(r, b & 0x0f, depth)
    if b >= 0x80 and b <= 0x8f:
        r.p = p + 1
        return _map(r, b & 0x0f, depth)
    # Fixed-size values: the header byte and hdr - 1 bytes after it.
    if b == 0xc0:
        r.p = p + 1
        return None
    if b == 0xc2:
        r.p = p + 1
        return False
    if b == 0xc3:
        r.p = p + 1
        return True
    hdr = _HEAD_SIZE[b - 0xc0]
    if hdr == 0:                    # 0xc1, never used by msgpack
        raise _FormatError(f"invalid msgpack type byte 0x{b:02x} at offset {p - r.base}")
    if avail < hdr:
        return _truncated(r, hdr)
    if b == 0xcc:
        r.p = p + 2
        return PyLong_FromLong(p[1])
    if b == 0xcd:
        r.p = p + 3
        return PyLong_FromLong(_be16(p + 1))
    if b == 0xce:
        r.p = p + 5
        return PyLong_FromLongLong(_be32(p + 1))
    if b == 0xcf:
        r.p = p + 9
        return PyLong_FromUnsignedLongLong(_be64(p + 1))
    if b == 0xd0:
        r.p = p + 2
        return PyLong_FromLong(<int8_t>p[1])
    if b == 0xd1:
        r.p = p + 3
        return PyLong_FromLong(<int16_t>_be16(p + 1))
    if b == 0xd2:
        r.p = p + 5
        return PyLong_FromLong(<int32_t>_be32(p + 1))
    if b == 0xd3:
        r.p = p + 9
        return PyLong_FromLongLong(<int64_t>_be64(p + 1))
    if b == 0xca:
        r.p = p + 5
        u32 = _be32(p + 1)
        memcpy(&f32, &u32, 4)
        return PyFloat_FromDouble(f32)
    if b == 0xcb:
        r.p = p + 9
        u64 = _be64(p + 1)
        memcpy(&f64, &u64, 8)
        return PyFloat_FromDouble(f64)
    if b >= 0xd4 and b <= 0xd8:     # fixext 1, 2, 4, 8, 16: type byte and data in hdr
        return _ext(r, hdr)
    # Variable-size values: the length is in the header.
    if b == 0xd9 or b == 0xc4 or b == 0xc7:
        n = p[1]
    elif b == 0xda or b == 0xc5 or b == 0xc8 or b == 0xdc or b == 0xde:
        n = _be16(p + 1)
    else:
        n = _be32(p + 1)
    if b == 0xdc or b == 0xdd:
        r.p = p + hdr
        return _array(r, n, depth)
    if b == 0xde or b == 0xdf:
        r.p = p + hdr
        return _map(r, n, depth)
    if n > avail - hdr:
        return _truncated(r, hdr + n)
    if b >= 0xc7 and b <= 0xc9:     # ext 8, 16, 32: the type byte is counted in hdr
        return _ext(r, hdr + n)
    r.p = p + hdr + n
    if b >= 0xd9:
        return _str(p + hdr, n)
    return PyBytes_FromStringAndSize(<const char *>p + hdr, n)


cdef extern from *:
    """
    /* Copies n bytes to dst while checking them, a block at a time, then a word, then a
       byte; 0 at the first one with a byte above 0x7f (what was copied is then of no use).
       One pass: a body just written by another process is read once, where a check then a
       copy read it twice (CPython's decoder does so whenever the text is not 8-byte aligned
       in the body). A block is four 16-byte registers where SSE2 has them (every x86-64):
       gcc -O2 made the portable block loop go through the stack, and 64 KiB tasks ran
       1.2-1.3x as fast with these. */
    #if defined(__SSE2__)
    #include <emmintrin.h>
    #endif
    static int pyswtask_copy_ascii(unsigned char *dst, const unsigned char *src, size_t n) {
        size_t i = 0;
        uint64_t w;
    #if defined(__SSE2__)
        __m128i a, b, c, d;
        while (i + 64 <= n) {
            a = _mm_loadu_si128((const __m128i *)(src + i));
            b = _mm_loadu_si128((const __m128i *)(src + i + 16));
            c = _mm_loadu_si128((const __m128i *)(src + i + 32));
            d = _mm_loadu_si128((const __m128i *)(src + i + 48));
            if (_mm_movemask_epi8(_mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d))))
                return 0;
            _mm_storeu_si128((__m128i *)(dst + i), a);
            _mm_storeu_si128((__m128i *)(dst + i + 16), b);
            _mm_storeu_si128((__m128i *)(dst + i + 32), c);
            _mm_storeu_si128((__m128i *)(dst + i + 48), d);
            i += 64;
        }
    #else
        uint64_t w0, w1, w2, w3;
        while (i + 32 <= n) {
            memcpy(&w0, src + i, 8);
            memcpy(&w1, src + i + 8, 8);
            memcpy(&w2, src + i + 16, 8);
            memcpy(&w3, src + i + 24, 8);
            if ((w0 | w1 | w2 | w3) & 0x8080808080808080ULL)
                return 0;
            memcpy(dst + i, &w0, 8);
            memcpy(dst + i + 8, &w1, 8);
            memcpy(dst + i + 16, &w2, 8);
            memcpy(dst + i + 24, &w3, 8);
            i += 32;
        }
    #endif
        for (; i + 8 <= n; i += 8) {
            memcpy(&w, src + i, 8);
            if (w & 0x8080808080808080ULL)
                return 0;
            memcpy(dst + i, &w, 8);
        }
        for (; i < n; i++) {
            if (src[i] & 0x80)
                return 0;
            dst[i] = src[i];
        }
        return 1;
    }
    """
    int pyswtask_copy_ascii(unsigned char *dst, const unsigned char *src, size_t n) nogil


cdef object _str(const unsigned char *s, size_t n):
    # Text is mostly ASCII: such a str is made and filled directly, in one pass, the same
    # object PyUnicode_DecodeUTF8 makes. The others, and the shortest (which CPython keeps as
    # singletons), go through it; strict: invalid UTF-8 raises UnicodeDecodeError, as in
    # msgpack. A text that turns out not to be ASCII was copied in part for nothing: mostly
    # its first block.
    if n < 2:
        return PyUnicode_DecodeUTF8(<const char *>s, n, NULL)
    out = PyUnicode_New(n, 127)
    if pyswtask_copy_ascii(<unsigned char *>PyUnicode_DATA(out), s, n):
        return out
    return PyUnicode_DecodeUTF8(<const char *>s, n, NULL)


# Bytes from a type byte 0xc0 + i to the data (or to the end of a fixed-size value); 0 for the
# one unused byte, 0xc1. Fixed-size types whose byte is handled before the table is read have 1.
cdef unsigned char[32] _HEAD_SIZE
_HEAD_SIZE[:] = [1, 0, 1, 1, 2, 3, 5, 3, 4, 6, 5, 9, 2, 3, 5, 9, 2, 3, 5, 9,
                 3, 4, 6, 10, 18, 2, 3, 5, 3, 5, 3, 5]


cdef object _array(MpReader *r, size_t n, int depth):
    cdef Py_ssize_t i
    if depth >= _MP_DEPTH_MAX:
        raise _StackError(f"msgpack data nests deeper than {_MP_DEPTH_MAX} arrays and maps")
    # Every item takes at least one byte. msgpack refuses more items than the whole buffer has
    # bytes at once, and otherwise decodes until the error; so does this, without allocating
    # a list for items that cannot all be there.
    if n > <size_t>(r.end - r.base):
        raise ValueError(f"an array of {n} items at offset {r.p - r.base} is longer than the "
                         f"{r.end - r.base} bytes of msgpack data")
    if n > <size_t>(r.end - r.p):
        for i in range(<Py_ssize_t>n):
            _decode(r, depth + 1)
        return _truncated(r, 1)
    out = PyList_New(n)
    for i in range(<Py_ssize_t>n):
        item = _decode(r, depth + 1)
        Py_INCREF(item)
        PyList_SET_ITEM(out, i, item)
    return out


cdef object _map(MpReader *r, size_t n, int depth):
    cdef size_t i
    cdef PyObject *interned
    if depth >= _MP_DEPTH_MAX:
        raise _StackError(f"msgpack data nests deeper than {_MP_DEPTH_MAX} arrays and maps")
    # A key and a value take at least two bytes; as for arrays, the dict grows only with what
    # is there.
    if n > <size_t>(r.end - r.base) // 2:
        raise ValueError(f"a map of {n} pairs at offset {r.p - r.base} is longer than the "
                         f"{r.end - r.base} bytes of msgpack data")
    out = PyDict_New()
    for i in range(n):
        key = _decode(r, depth + 1)
        value = _decode(r, depth + 1)
        if type(key) is str:
            # As msgpack does: a map's keys are mostly the same few names, kept once.
            interned = <PyObject *>key
            Py_INCREF(key)
            PyUnicode_InternInPlace(&interned)
            key = <object>interned
            Py_DECREF(key)
        # Any hashable key, as strict_map_key=False allows; TypeError for others, as msgpack.
        PyDict_SetItem(out, key, value)
    return out


cdef object _ext(MpReader *r, size_t size):
    # size: the whole ext (header, type byte, data), checked against the buffer by the caller.
    cdef const unsigned char *p = r.p
    r.p = p + size
    return _msgpack_unpackb(PyBytes_FromStringAndSize(<const char *>p, size))


cdef object _finish(MpReader *r, object value):
    if r.p != r.end:
        raise _ExtraData(value, PyBytes_FromStringAndSize(<const char *>r.p, r.end - r.p))
    return value


cdef object mp_unpack(const char *p, Py_ssize_t n):
    """The one msgpack value in p[0:n]; ValueError (msgpack's subclasses of it where msgpack
    raises one), UnicodeDecodeError or TypeError when msgpack.unpackb would raise."""
    cdef MpReader r
    r.base = r.p = <const unsigned char *>p
    r.end = r.p + n
    return _finish(&r, _decode(&r, 0))


cdef tuple mp_unpack_envelope(const char *p, Py_ssize_t n):
    """The fields of a task envelope in p[0:n] (6, 7 or 9 of them, see frame.pyx), decoded
    into the tuple as they come; None as soon as the body is not such an array or a field has
    another type (the body may also be invalid msgpack further on: the caller decodes it whole
    to tell). Raises as mp_unpack."""
    cdef MpReader r
    cdef Py_ssize_t i, count
    r.base = r.p = <const unsigned char *>p
    r.end = r.p + n
    if n >= 1 and 0x96 <= r.p[0] <= 0x99:
        count = r.p[0] & 0x0F
        r.p += 1
    elif n >= 3 and r.p[0] == 0xdc:
        count = _be16(r.p + 1)
        r.p += 3
    elif n >= 5 and r.p[0] == 0xdd:
        count = _be32(r.p + 1)
        r.p += 5
    else:
        return None
    if count != 6 and count != 7 and count != 9:
        return None
    out = PyTuple_New(count)
    for i in range(count):
        value = _decode(&r, 1)
        # (name, method, params, type, logid, spanid[, deadline[, origin pid, origin role]]):
        # str, str, list, int, str, int, float or nil, int, int
        if i == 2:
            if type(value) is not list:
                return None
        elif i == 3 or i == 5 or i == 7 or i == 8:
            if type(value) is not int:
                return None
        elif i == 6:
            if value is not None and type(value) is not float:
                return None
        elif type(value) is not str:
            return None
        Py_INCREF(value)
        PyTuple_SET_ITEM(out, i, value)
    return <tuple>_finish(&r, out)


def unpack_value(data):
    """The one msgpack value in data (bytes or a flat buffer), read as the core reads bodies:
    what msgpack.unpackb(data, strict_map_key=False) returns, raising where that raises."""
    cdef const unsigned char[::1] view
    if type(data) is bytes:
        return mp_unpack(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
    view = data
    if view.shape[0] == 0:
        return mp_unpack(NULL, 0)
    return mp_unpack(<const char *>&view[0], view.shape[0])
