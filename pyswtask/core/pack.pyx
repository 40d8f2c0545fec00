# The msgpack encoder of the core: the bytes msgpack.Packer(use_bin_type=True) writes, written
# where they are sent from (a bytes object of the exact size, an arena block) instead of into
# the packer's buffer and copied from there, once or twice, as a large body was. Declarations
# in pack.pxd.
#
# It covers the types a call and its result are made of, taken exactly (None, bool, int,
# float, str, bytes, list, tuple, dict) and nested up to _MP_PACK_DEPTH_MAX; a value with
# anything else in it (a subclass, bytearray, an ext type, an int beyond 64 bits, a str that
# does not encode) is msgpack's, whole, so that what it accepts and how it refuses stay as they
# were. Sizing first and writing second is safe because nothing between the two runs Python
# code: exact types call no user method while they are walked.

import msgpack

from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy

from .includes.python cimport (PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE,
                               PyObject)

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object o, Py_ssize_t *size) except NULL
    long long PyLong_AsLongLongAndOverflow(object o, int *overflow) except? -1
    unsigned long long PyLong_AsUnsignedLongLong(object o) except? -1
    double PyFloat_AS_DOUBLE(object o)
    Py_ssize_t PyList_GET_SIZE(object o)
    PyObject *PyList_GET_ITEM(object o, Py_ssize_t i)
    PyObject *PyTuple_GET_ITEM(object o, Py_ssize_t i)
    Py_ssize_t PyDict_GET_SIZE(object o)
    int PyDict_Next(object d, Py_ssize_t *pos, PyObject **key, PyObject **value)
    void PyErr_Clear()

cdef object _mp_fallback = msgpack.Packer(use_bin_type=True, autoreset=True).pack


cdef inline Py_ssize_t _len_header(Py_ssize_t n, bint is_str) noexcept:
    # The header of a str (str8 allowed by use_bin_type) or bin of n bytes.
    if is_str and n < 32:
        return 1
    if n < 256:
        return 2
    if n < 65536:
        return 3
    return 5


cdef inline Py_ssize_t _count_header(Py_ssize_t n) noexcept:
    # The header of an array or a map of n items.
    if n < 16:
        return 1
    if n < 65536:
        return 3
    return 5


cdef inline Py_ssize_t _int_size(object o) except -2:
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(o, &overflow)
    if overflow > 0:
        # Above 2**63 - 1: msgpack's uint64, up to 2**64 - 1.
        PyLong_AsUnsignedLongLong(o)
        return 9
    if overflow < 0:
        return -1
    if v >= 0:
        if v < 128:
            return 1
        return 2 if v < 256 else 3 if v < 65536 else 5 if v < 4294967296 else 9
    if v >= -32:
        return 1
    return 2 if v >= -128 else 3 if v >= -32768 else 5 if v >= -2147483648 else 9


cdef Py_ssize_t _size(object o, int depth) except -2:
    cdef type t = type(o)
    cdef Py_ssize_t n, i, total, part
    cdef Py_ssize_t pos = 0
    cdef PyObject *k
    cdef PyObject *v
    if o is None or o is True or o is False or t is float:
        return 9 if t is float else 1
    if t is int:
        try:
            return _int_size(o)
        except OverflowError:
            PyErr_Clear()
            return -1
    if t is str:
        try:
            PyUnicode_AsUTF8AndSize(o, &n)
        except UnicodeError:
            return -1
        return -1 if n > 0xFFFFFFFF else _len_header(n, True) + n
    if t is bytes:
        n = PyBytes_GET_SIZE(o)
        return -1 if n > 0xFFFFFFFF else _len_header(n, False) + n
    if depth >= _MP_PACK_DEPTH_MAX:
        return -1
    if t is list or t is tuple:
        n = PyList_GET_SIZE(o) if t is list else len(<tuple>o)
        total = _count_header(n)
        for i in range(n):
            part = _size(<object>(PyList_GET_ITEM(o, i) if t is list else PyTuple_GET_ITEM(o, i)),
                         depth + 1)
            if part < 0:
                return -1
            total += part
        return total
    if t is dict:
        total = _count_header(PyDict_GET_SIZE(o))
        while PyDict_Next(o, &pos, &k, &v):
            part = _size(<object>k, depth + 1)
            if part < 0:
                return -1
            total += part
            part = _size(<object>v, depth + 1)
            if part < 0:
                return -1
            total += part
        return total
    return -1


cdef Py_ssize_t mp_packed_size(object o) except -2:
    """The length msgpack would pack o to, or -1 when o is left to msgpack (mp_packb)."""
    return _size(o, 0)


cdef inline char *_be(char *p, uint8_t code, uint64_t v, int n) noexcept:
    # code, then the low n bytes of v, big-endian.
    cdef int i
    p[0] = <char>code
    for i in range(n):
        p[n - i] = <char>(v & 0xFF)
        v >>= 8
    return p + 1 + n


cdef inline char *_len(char *p, Py_ssize_t n, uint8_t fix, uint8_t c8, uint8_t c16,
                       uint8_t c32) noexcept:
    # A length header: fix | n below the fix form's bound (fix is 0 where there is none).
    if fix and n < (32 if fix == 0xa0 else 16):
        p[0] = <char>(fix | n)
        return p + 1
    if c8 and n < 256:
        return _be(p, c8, <uint64_t>n, 1)
    if n < 65536:
        return _be(p, c16, <uint64_t>n, 2)
    return _be(p, c32, <uint64_t>n, 4)


cdef char *_write(char *p, object o) noexcept:
    cdef type t = type(o)
    cdef Py_ssize_t n, i
    cdef Py_ssize_t pos = 0
    cdef PyObject *k
    cdef PyObject *v
    cdef int overflow = 0
    cdef long long ll
    cdef double d
    cdef const char *s
    if o is None:
        p[0] = <char>0xc0
        return p + 1
    if o is True or o is False:
        p[0] = <char>(0xc3 if o is True else 0xc2)
        return p + 1
    if t is int:
        ll = PyLong_AsLongLongAndOverflow(o, &overflow)
        if overflow:
            return _be(p, 0xcf, PyLong_AsUnsignedLongLong(o), 8)
        if ll >= 0:
            if ll < 128:
                p[0] = <char>ll
                return p + 1
            if ll < 256:
                return _be(p, 0xcc, <uint64_t>ll, 1)
            if ll < 65536:
                return _be(p, 0xcd, <uint64_t>ll, 2)
            if ll < 4294967296:
                return _be(p, 0xce, <uint64_t>ll, 4)
            return _be(p, 0xcf, <uint64_t>ll, 8)
        if ll >= -32:
            p[0] = <char>ll
            return p + 1
        if ll >= -128:
            return _be(p, 0xd0, <uint64_t>ll, 1)
        if ll >= -32768:
            return _be(p, 0xd1, <uint64_t>ll, 2)
        if ll >= -2147483648:
            return _be(p, 0xd2, <uint64_t>ll, 4)
        return _be(p, 0xd3, <uint64_t>ll, 8)
    if t is float:
        d = PyFloat_AS_DOUBLE(o)
        return _be(p, 0xcb, (<uint64_t *>&d)[0], 8)
    if t is str:
        s = PyUnicode_AsUTF8AndSize(o, &n)     # sized before: cannot fail here
        p = _len(p, n, 0xa0, 0xd9, 0xda, 0xdb)
        memcpy(p, s, n)
        return p + n
    if t is bytes:
        n = PyBytes_GET_SIZE(o)
        p = _len(p, n, 0, 0xc4, 0xc5, 0xc6)
        memcpy(p, PyBytes_AS_STRING(o), n)
        return p + n
    if t is list:
        n = PyList_GET_SIZE(o)
        p = _len(p, n, 0x90, 0, 0xdc, 0xdd)
        for i in range(n):
            p = _write(p, <object>PyList_GET_ITEM(o, i))
        return p
    if t is tuple:
        n = len(<tuple>o)
        p = _len(p, n, 0x90, 0, 0xdc, 0xdd)
        for i in range(n):
            p = _write(p, <object>PyTuple_GET_ITEM(o, i))
        return p
    # A dict: _size let nothing else through.
    p = _len(p, PyDict_GET_SIZE(o), 0x80, 0, 0xde, 0xdf)
    while PyDict_Next(o, &pos, &k, &v):
        p = _write(p, <object>k)
        p = _write(p, <object>v)
    return p


cdef char *mp_pack_into(char *p, object o) noexcept:
    """Writes o, which mp_packed_size has just sized (non-negative), at p; returns its end."""
    return _write(p, o)


cdef bytes mp_packb(object o):
    """msgpack.packb(o, use_bin_type=True): in one copy when this encoder covers o."""
    return mp_packb_sized(o, _size(o, 0))


cdef bytes mp_packb_sized(object o, Py_ssize_t n):
    """mp_packb(o), given n = mp_packed_size(o)."""
    if n < 0:
        return _mp_fallback(o)
    out = PyBytes_FromStringAndSize(NULL, n)
    _write(PyBytes_AS_STRING(out), o)
    return out


def packed_size(value):
    """The length of value packed as the core packs bodies, or -1 when msgpack itself packs it
    (it has a type the core's encoder leaves to msgpack, or cannot be packed at all)."""
    return mp_packed_size(value)


def pack_value(value):
    """msgpack.packb(value, use_bin_type=True), packed as the core packs bodies."""
    return mp_packb(value)
