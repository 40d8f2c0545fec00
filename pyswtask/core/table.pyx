# A Swoole\Table for Python: string keys to rows of typed columns (int64, float64, fixed-width
# str and bytes) in one shared-memory segment, usable from every process that maps it. The
# declarations and the record structs are in table.pxd; the Python facade (declaration,
# segments, numpy views) is pyswtask/table.py.
#
# Layout (version 1; all offsets from the start of the segment, in STableHeader):
#
#     0                header: magic "SWTB", version, capacity, bucket count, row size, key
#                      width, column count, offsets, used rows, the free-row stack and its
#                      lock, lock recoveries, refused inserts, the table's name
#     sizeof(header)   ncolumns x STableColumn: name, type, width, offset in a row
#     buckets_offset   nbuckets x {lock: u32 pid, head: u32 row}: a power of two >= capacity
#     rows_offset      capacity x row_size: {next, hash, key length, used} + key + columns
#
# A key hashes (FNV-1a) to a bucket; the bucket's rows are a chain through `next`. Rows come
# from a stack of free rows, so the table holds exactly `capacity` keys whatever their hashes,
# and the next insert raises TableFull. Every operation on a key holds its bucket's lock for a
# few memory accesses and never calls Python while holding it (values are encoded before and
# decoded after, from a copy).
#
# Locks are words holding the holder's pid. A locker that cannot take one within a few
# microseconds yields, then sleeps, and checks whether the holder still lives (kill(pid, 0), and
# /proc for a zombie): a lock whose holder died is taken over and counted in `recovered`. What
# the dead holder was writing may be half written (one row), never the chain: a row is filled
# before it is linked and unlinked before it is freed. A lock held by a live process for
# lock_timeout seconds (a stopped process, or a dead holder's pid already reused) raises
# TimeoutError rather than wait forever. Processes that share a table must share a pid namespace.
#
# incr adds with an atomic instruction although it holds the lock: the numpy views read without
# one, and must never see half of a value.

import os as _os
import sys as _sys

from libc.errno cimport errno, ESRCH
from libc.string cimport memcmp, memcpy, memset
from posix.signal cimport kill
from posix.unistd cimport getpid, usleep
from cpython.mem cimport PyMem_Free, PyMem_Malloc

from .includes.atomic cimport (pyswt_add32, pyswt_add64, pyswt_addf64, pyswt_addi64, pyswt_cas32,
                               pyswt_load32, pyswt_pause, pyswt_store32)
from .includes.clock cimport monotonic
from .includes.posix cimport sched_yield, strnlen
from .includes.python cimport (PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE,
                               PyErr_CheckSignals, PyFloat_FromDouble, PyLong_FromLongLong,
                               PyObject, PyUnicode_DecodeUTF8)

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object o, Py_ssize_t *size) except NULL
    bint PyUnicode_CheckExact(object o)
    bint PyUnicode_IS_COMPACT_ASCII(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    void *PyUnicode_DATA(object o)
    bint PyLong_Check(object o)
    bint PyFloat_CheckExact(object o)
    double PyFloat_AS_DOUBLE(object o)
    bint PyBytes_Check(object o)
    bint PyDict_Next(object d, Py_ssize_t *pos, PyObject **k, PyObject **v)

TABLE_LAYOUT_VERSION = _STABLE_VERSION
# Column types as the segment records them.
COLUMN_INT = _COL_INT
COLUMN_FLOAT = _COL_FLOAT
COLUMN_STR = _COL_STR
COLUMN_BYTES = _COL_BYTES
MAX_COLUMNS = _STABLE_MAX_COLUMNS
MAX_KEY_WIDTH = _STABLE_MAX_KEY
MAX_COLUMN_WIDTH = _STABLE_MAX_WIDTH

# The pid written into lock words: getpid() is a system call, so it is read once per process
# (and again in every child forked from it).
cdef uint32_t _table_pid = <uint32_t>getpid()


def _table_after_fork():
    global _table_pid
    _table_pid = <uint32_t>getpid()


_os.register_at_fork(after_in_child=_table_after_fork)


cdef inline uint32_t _fnv1a(const char *k, Py_ssize_t n) noexcept nogil:
    cdef uint32_t h = 2166136261u
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ <unsigned char>k[i]) * 16777619u
    return h


cdef inline size_t _align(size_t n, size_t a) noexcept nogil:
    return (n + a - 1) & ~(a - 1)


cdef inline int _lock(SharedTable t, uint32_t *w) except -1:
    if pyswt_cas32(w, 0, _table_pid):
        return 0
    return t.lock_slow(w)


cdef inline void _unlock(uint32_t *w) noexcept nogil:
    pyswt_store32(w, 0)


def _owner_is_zombie(uint32_t pid):
    """Whether pid is a zombie (dead, not yet reaped: kill(pid, 0) still succeeds)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    i = stat.rfind(b")")
    return i > 0 and stat[i + 2:i + 3] in (b"Z", b"X")


@cython.binding(False)
cdef class SharedTable:
    """The compiled core of ``pyswtask.Table``: a hash table in a shared-memory buffer.

    Unbound until ``_bind`` gives it a buffer (creating the table in it, or reading the one
    there); every operation before that raises RuntimeError. Use ``pyswtask.Table``.
    """

    def __cinit__(self, *args, **kwargs):
        self.base = NULL
        self.hdr = NULL
        self.table_name = "table"
        self.lock_timeout = 30.0
        self.col_names = ()
        self.col_index = {}

    # -- layout ---------------------------------------------------------------------------------

    @staticmethod
    def _layout(uint32_t capacity, uint32_t key_width, list columns):
        """(total bytes, row size, data offset, [(name, type, width, offset, size)]) of a table
        of that shape; columns are (name, type, width) with the types COLUMN_*."""
        cdef size_t off, data_offset, size, row_size, nbuckets = 1, buckets_offset, rows_offset
        if len(columns) > _STABLE_MAX_COLUMNS:
            raise ValueError(f"a table has at most {_STABLE_MAX_COLUMNS} columns, not {len(columns)}")
        data_offset = _align(_STABLE_ROW_HEAD + key_width, 8)
        off = data_offset
        placed = []
        for name, ctype, width in columns:
            if ctype == _COL_INT or ctype == _COL_FLOAT:
                size = 8
            else:
                size = _align(4 + <size_t>width, 8)
            placed.append((name, ctype, width, off, size))
            off += size
        row_size = _align(off, 8)
        while nbuckets < capacity:
            nbuckets <<= 1
        buckets_offset = _align(sizeof(STableHeader) + len(columns) * sizeof(STableColumn), 64)
        rows_offset = _align(buckets_offset + nbuckets * sizeof(STableBucket), 64)
        return (rows_offset + capacity * row_size, row_size, data_offset, placed, nbuckets,
                buckets_offset, rows_offset)

    def _bind(self, buf, bint create=False, str name="table", uint32_t capacity=0,
              uint32_t key_width=64, list columns=None):
        """Binds to the table in buf; with create, first lays out an empty one there."""
        cdef unsigned char[::1] view = buf
        cdef STableHeader *hdr
        cdef STableColumn *col
        cdef STableRowHead *head
        cdef char *rows
        cdef uint32_t i
        cdef bytes raw
        if <size_t>view.shape[0] < sizeof(STableHeader):
            raise ValueError(f"a buffer of {view.shape[0]} bytes is too small for a table header")
        hdr = <STableHeader *>&view[0]
        if create:
            total, row_size, data_offset, placed, nbuckets, buckets_offset, rows_offset = \
                SharedTable._layout(capacity, key_width, columns or [])
            if <size_t>view.shape[0] < <size_t>total:
                raise ValueError(f"{view.shape[0]} bytes cannot hold this table ({total} needed)")
            memset(hdr, 0, total)
            hdr.layout_version = _STABLE_VERSION
            hdr.capacity = capacity
            hdr.nbuckets = nbuckets
            hdr.row_size = row_size
            hdr.key_width = key_width
            hdr.ncolumns = len(placed)
            hdr.data_offset = data_offset
            hdr.buckets_offset = buckets_offset
            hdr.rows_offset = rows_offset
            hdr.total_size = total
            raw = name.encode("utf-8")[:_STABLE_NAME_W - 1]
            memcpy(hdr.name, PyBytes_AS_STRING(raw), len(raw))
            col = <STableColumn *>(<char *>hdr + sizeof(STableHeader))
            for i, (cname, ctype, width, off, size) in enumerate(placed):
                raw = cname.encode("utf-8")
                if len(raw) >= _STABLE_COL_NAME_W:
                    raise ValueError(f"column name {cname!r} is longer than "
                                     f"{_STABLE_COL_NAME_W - 1} bytes")
                memcpy(col[i].name, PyBytes_AS_STRING(raw), len(raw))
                col[i].type = ctype
                col[i].width = width
                col[i].offset = off
                col[i].size = size
            rows = <char *>hdr + <size_t>rows_offset
            for i in range(1, capacity + 1):
                head = <STableRowHead *>(rows + (i - 1) * <size_t>row_size)
                head.next = i + 1 if i < capacity else 0
            hdr.free_head = 1 if capacity else 0
            hdr.magic = _STABLE_MAGIC
        elif hdr.magic != _STABLE_MAGIC:
            raise ValueError("the shared memory does not hold a pyswtask table")
        elif hdr.layout_version != _STABLE_VERSION:
            raise ValueError(f"table layout version {hdr.layout_version}, this pyswtask reads "
                             f"version {_STABLE_VERSION}")
        if <size_t>view.shape[0] < hdr.total_size:
            raise ValueError("the shared memory is smaller than its table says")
        self._buf = buf
        self.base = <char *>hdr
        self.cols = <STableColumn *>(self.base + sizeof(STableHeader))
        self.buckets = <STableBucket *>(self.base + hdr.buckets_offset)
        self.rows = self.base + hdr.rows_offset
        self.row_size = hdr.row_size
        self.mask = hdr.nbuckets - 1
        self.capacity = hdr.capacity
        self.key_width = hdr.key_width
        self.ncols = hdr.ncolumns
        self.data_offset = hdr.data_offset
        self.data_size = hdr.row_size - hdr.data_offset
        self.table_name = hdr.name[:strnlen(hdr.name, _STABLE_NAME_W)].decode("utf-8", "replace")
        names = []
        for i in range(self.ncols):
            names.append(_sys.intern(
                self.cols[i].name[:strnlen(self.cols[i].name, _STABLE_COL_NAME_W)].decode()))
        self.col_names = tuple(names)
        self.col_index = {n: i for i, n in enumerate(names)}
        self.hdr = hdr

    def _unbind(self):
        """Forgets the buffer (before the segment is detached): later calls raise."""
        self.hdr = NULL
        self.base = NULL
        self._buf = None

    @cython.final
    cdef int bound(self) except -1:
        if self.hdr == NULL:
            raise RuntimeError(f"table {self.table_name!r} is not created: declare it with "
                               "Server.table() before start(), or call create() or attach()")
        return 0

    # -- internals ------------------------------------------------------------------------------

    @cython.final
    cdef const char *key_of(self, object key, Py_ssize_t *n) except NULL:
        cdef const char *k
        if PyUnicode_CheckExact(key) and PyUnicode_IS_COMPACT_ASCII(key):
            # An ASCII str is its own UTF-8: read it in place, without a call.
            n[0] = PyUnicode_GET_LENGTH(key)
            k = <const char *>PyUnicode_DATA(key)
            if n[0] <= <Py_ssize_t>self.key_width:
                return k
        elif not isinstance(key, str):
            raise TypeError(f"table keys are str, not {type(key).__name__}")
        k = PyUnicode_AsUTF8AndSize(key, n)
        if n[0] > <Py_ssize_t>self.key_width:
            raise ValueError(f"key is {n[0]} bytes, longer than table {self.table_name!r}'s key "
                             f"width ({self.key_width} bytes): {key!r:.80}")
        return k

    @cython.final
    cdef int column_of(self, object column) except -1:
        cdef uint32_t c
        # Column names in calls are mostly the literals that declared them: interned, the same
        # objects as col_names. Compare pointers before hashing.
        for c in range(self.ncols):
            if <PyObject *>self.col_names[c] == <PyObject *>column:
                return c
        i = self.col_index.get(column)
        if i is None:
            raise KeyError(f"table {self.table_name!r} has no column {column!r} (columns: "
                           f"{', '.join(self.col_names)})")
        return i

    @cython.final
    cdef int lock_slow(self, uint32_t *w) except -1:
        cdef uint32_t owner, seen = 0
        cdef int i, rounds = 0
        cdef double since = 0.0, now, next_proc = 0.0
        while True:
            for i in range(64):
                pyswt_pause()
                if pyswt_load32(w) == 0 and pyswt_cas32(w, 0, _table_pid):
                    return 0
            owner = pyswt_load32(w)
            if owner == 0:
                continue
            rounds += 1
            if rounds < 16:
                with nogil:
                    sched_yield()
                continue
            with nogil:
                usleep(50)
            PyErr_CheckSignals()
            now = monotonic()
            if owner != seen:
                seen = owner
                since = now
            if owner != _table_pid and (
                    (kill(owner, 0) == -1 and errno == ESRCH)
                    or (now >= next_proc and _owner_is_zombie(owner))):
                if pyswt_cas32(w, owner, _table_pid):
                    pyswt_add64(&self.hdr.recovered, 1)
                    return 0
            if now >= next_proc:
                next_proc = now + 0.01
            if now - since > self.lock_timeout:
                raise TimeoutError(f"table {self.table_name!r}: a lock has been held by pid "
                                   f"{owner} for more than {self.lock_timeout:g} s")

    @cython.final
    cdef char *row(self, uint32_t i) noexcept nogil:
        return self.rows + <size_t>(i - 1) * self.row_size

    @cython.final
    cdef char *find(self, STableBucket *b, uint32_t h, const char *k,
                    Py_ssize_t n) noexcept nogil:
        cdef uint32_t i = b.head
        cdef char *r
        cdef STableRowHead *head
        # A chain is never half linked (a row is filled before it is linked, unlinked before it
        # is freed); the bound only keeps a corrupted segment from sending a read out of it.
        while i and i <= self.capacity:
            r = self.row(i)
            head = <STableRowHead *>r
            if head.hash == h and head.key_len == n and memcmp(r + _STABLE_ROW_HEAD, k, n) == 0:
                return r
            i = head.next
        return NULL

    @cython.final
    cdef char *insert(self, STableBucket *b, uint32_t h, const char *k,
                      Py_ssize_t n) except? NULL:
        """A new zeroed row for key k, linked first in its chain (the caller holds b's lock);
        NULL (counted) when no row is free."""
        cdef uint32_t i
        cdef char *r
        cdef STableRowHead *head
        _lock(self, &self.hdr.free_lock)
        i = self.hdr.free_head
        if i > self.capacity:
            i = 0
        if i:
            self.hdr.free_head = (<STableRowHead *>self.row(i)).next
        _unlock(&self.hdr.free_lock)
        if i == 0:
            pyswt_add64(&self.hdr.refused, 1)
            return NULL
        r = self.row(i)
        head = <STableRowHead *>r
        memset(r + self.data_offset, 0, self.data_size)
        memcpy(r + _STABLE_ROW_HEAD, k, n)
        head.hash = h
        head.key_len = <uint16_t>n
        head.used = 1
        head.next = b.head
        pyswt_store32(&b.head, i)
        pyswt_add32(&self.hdr.used, 1)
        return r

    @cython.final
    cdef int release_row(self, uint32_t i) except -1:
        cdef STableRowHead *head = <STableRowHead *>self.row(i)
        head.used = 0
        pyswt_add32(&self.hdr.used, -1)
        _lock(self, &self.hdr.free_lock)
        head.next = self.hdr.free_head
        self.hdr.free_head = i
        _unlock(&self.hdr.free_lock)
        return 0

    @cython.final
    cdef int full(self) except -1:
        raise TableFull(f"table {self.table_name!r} is full ({self.hdr.capacity} rows)")

    @cython.final
    cdef object decode(self, const char *data, uint32_t c):
        # data: a copy of the row's columns (from data_offset)
        cdef STableColumn *col = &self.cols[c]
        cdef const char *p = data + col.offset - self.data_offset
        cdef uint32_t n
        if col.type == _COL_INT:
            return PyLong_FromLongLong((<const int64_t *>p)[0])
        if col.type == _COL_FLOAT:
            return PyFloat_FromDouble((<const double *>p)[0])
        n = (<const uint32_t *>p)[0]
        if n > col.width:
            n = col.width       # a row half written by a process that died
        if col.type == _COL_STR:
            return PyUnicode_DecodeUTF8(p + 4, n, "replace")
        return PyBytes_FromStringAndSize(p + 4, n)

    @cython.final
    cdef dict row_dict(self, const char *data):
        cdef dict d = {}
        cdef uint32_t c
        for c in range(self.ncols):
            d[self.col_names[c]] = self.decode(data, c)
        return d

    # -- operations -----------------------------------------------------------------------------

    def get(self, key, column=None):
        """The row of key as a dict (None when absent), or one column's value (None when the
        key is absent)."""
        cdef Py_ssize_t n
        cdef const char *k
        cdef uint32_t h
        cdef int c = -1
        cdef STableBucket *b
        cdef char *r
        cdef char stack[_STABLE_STACK]
        cdef char *data = stack
        self.bound()
        k = self.key_of(key, &n)
        if column is not None:
            c = self.column_of(column)
        h = _fnv1a(k, n)
        b = &self.buckets[h & self.mask]
        if self.data_size > _STABLE_STACK:
            data = <char *>PyMem_Malloc(self.data_size)
            if data == NULL:
                raise MemoryError()
        try:
            _lock(self, &b.lock)
            r = self.find(b, h, k, n)
            if r != NULL:
                if c < 0:
                    memcpy(data, r + self.data_offset, self.data_size)
                else:
                    memcpy(data + self.cols[c].offset - self.data_offset, r + self.cols[c].offset,
                           self.cols[c].size)
            _unlock(&b.lock)
            if r == NULL:
                return None
            if c < 0:
                return self.row_dict(data)
            return self.decode(data, c)
        finally:
            if data != stack:
                PyMem_Free(data)

    def set(self, key, values):
        """Sets the columns given in values (a dict) of key's row, creating the row (other
        columns zero) if needed. TableFull when a new row does not fit. (No **kwargs form:
        accepting them costs a dict per call, a tenth of the operation.)"""
        cdef Py_ssize_t n, vn, pos = 0
        cdef const char *k
        cdef const char *v
        cdef uint32_t h, c, hint = 0
        cdef uint64_t present = 0
        cdef STableBucket *b
        cdef STableColumn *col
        cdef char *r
        cdef char *p
        cdef char stack[_STABLE_STACK]
        cdef char *data = stack
        cdef PyObject *ko
        cdef PyObject *vo
        self.bound()
        k = self.key_of(key, &n)
        if type(values) is not dict:
            if not isinstance(values, dict):
                raise TypeError(f"set() takes the row as a dict, not {type(values).__name__}")
        if self.data_size > _STABLE_STACK:
            data = <char *>PyMem_Malloc(self.data_size)
            if data == NULL:
                raise MemoryError()
        try:
            while PyDict_Next(values, &pos, &ko, &vo):
                # Rows are usually given in column order, with the interned names the column
                # declarations used: try the next column by identity before hashing.
                if hint < self.ncols and <PyObject *>self.col_names[hint] == ko:
                    c = hint
                else:
                    c = self.column_of(<object>ko)
                hint = c + 1
                col = &self.cols[c]
                p = data + col.offset - self.data_offset
                value = <object>vo
                if col.type == _COL_INT:
                    if not PyLong_Check(value):
                        raise TypeError(f"column {<object>ko!r} holds int, not "
                                        f"{type(value).__name__}")
                    (<int64_t *>p)[0] = value
                elif col.type == _COL_FLOAT:
                    if PyFloat_CheckExact(value):
                        (<double *>p)[0] = PyFloat_AS_DOUBLE(value)
                    elif PyLong_Check(value) or isinstance(value, float):
                        (<double *>p)[0] = value
                    else:
                        raise TypeError(f"column {<object>ko!r} holds float, not "
                                        f"{type(value).__name__}")
                else:
                    if col.type == _COL_STR:
                        if not isinstance(value, str):
                            raise TypeError(f"column {<object>ko!r} holds str, not "
                                            f"{type(value).__name__}")
                        if PyUnicode_IS_COMPACT_ASCII(value):
                            vn = PyUnicode_GET_LENGTH(value)
                            v = <const char *>PyUnicode_DATA(value)
                        else:
                            v = PyUnicode_AsUTF8AndSize(value, &vn)
                    else:
                        if not PyBytes_Check(value):
                            if not isinstance(value, (bytearray, memoryview)):
                                raise TypeError(f"column {<object>ko!r} holds bytes, not "
                                                f"{type(value).__name__}")
                            value = bytes(value)
                        v = PyBytes_AS_STRING(value)
                        vn = PyBytes_GET_SIZE(value)
                    if vn > <Py_ssize_t>col.width:
                        raise ValueError(f"value of column {<object>ko!r} is {vn} bytes, longer "
                                         f"than its width ({col.width} bytes)")
                    (<uint32_t *>p)[0] = <uint32_t>vn
                    memcpy(p + 4, v, vn)
                present |= (<uint64_t>1) << c
            h = _fnv1a(k, n)
            b = &self.buckets[h & self.mask]
            _lock(self, &b.lock)
            try:
                r = self.find(b, h, k, n)
                if r == NULL:
                    r = self.insert(b, h, k, n)
                    if r == NULL:
                        self.full()
                for c in range(self.ncols):
                    if present & ((<uint64_t>1) << c):
                        col = &self.cols[c]
                        p = data + col.offset - self.data_offset
                        if col.type == _COL_INT or col.type == _COL_FLOAT:
                            (<int64_t *>(r + col.offset))[0] = (<int64_t *>p)[0]
                        else:
                            memcpy(r + col.offset, p, 4 + (<uint32_t *>p)[0])
            finally:
                _unlock(&b.lock)
        finally:
            if data != stack:
                PyMem_Free(data)
        return True

    def incr(self, key, column, by=1):
        """Adds by to an int or float column of key's row, atomically, creating the row (all
        zero) if needed; returns the new value. TableFull when a new row does not fit."""
        cdef Py_ssize_t n
        cdef const char *k
        cdef uint32_t h
        cdef int c
        cdef int64_t ib = 0, iv = 0
        cdef double fb = 0.0, fv = 0.0
        cdef STableBucket *b
        cdef STableColumn *col
        cdef char *r
        self.bound()
        k = self.key_of(key, &n)
        c = self.column_of(column)
        col = &self.cols[c]
        if col.type == _COL_INT:
            if not PyLong_Check(by):
                raise TypeError(f"column {column!r} holds int: incr by an int, not "
                                f"{type(by).__name__}")
            ib = by
        elif col.type == _COL_FLOAT:
            if not (PyLong_Check(by) or isinstance(by, float)):
                raise TypeError(f"column {column!r} holds float: incr by a number, not "
                                f"{type(by).__name__}")
            fb = by
        else:
            raise TypeError(f"column {column!r} holds {'str' if col.type == _COL_STR else 'bytes'}"
                            ": only int and float columns can be incremented")
        h = _fnv1a(k, n)
        b = &self.buckets[h & self.mask]
        _lock(self, &b.lock)
        try:
            r = self.find(b, h, k, n)
            if r == NULL:
                r = self.insert(b, h, k, n)
                if r == NULL:
                    self.full()
            if col.type == _COL_INT:
                iv = pyswt_addi64(<int64_t *>(r + col.offset), ib)
            else:
                fv = pyswt_addf64(<double *>(r + col.offset), fb)
        finally:
            _unlock(&b.lock)
        if col.type == _COL_INT:
            return PyLong_FromLongLong(iv)
        return PyFloat_FromDouble(fv)

    def decr(self, key, column, by=1):
        """Subtracts by from an int or float column (incr with -by); returns the new value."""
        return self.incr(key, column, -by)

    def delete(self, key):
        """Removes key's row; returns whether it was there."""
        cdef Py_ssize_t n
        cdef const char *k
        cdef uint32_t h, i, prev = 0
        cdef STableBucket *b
        cdef STableRowHead *head
        cdef char *r
        self.bound()
        k = self.key_of(key, &n)
        h = _fnv1a(k, n)
        b = &self.buckets[h & self.mask]
        _lock(self, &b.lock)
        try:
            i = b.head
            while i and i <= self.capacity:
                r = self.row(i)
                head = <STableRowHead *>r
                if head.hash == h and head.key_len == n and \
                        memcmp(r + _STABLE_ROW_HEAD, k, n) == 0:
                    if prev:
                        (<STableRowHead *>self.row(prev)).next = head.next
                    else:
                        pyswt_store32(&b.head, head.next)
                    self.release_row(i)
                    return True
                prev = i
                i = head.next
            return False
        finally:
            _unlock(&b.lock)

    def exists(self, key):
        """Whether key has a row."""
        cdef Py_ssize_t n
        cdef const char *k
        cdef uint32_t h
        cdef STableBucket *b
        cdef char *r
        self.bound()
        k = self.key_of(key, &n)
        h = _fnv1a(k, n)
        b = &self.buckets[h & self.mask]
        _lock(self, &b.lock)
        r = self.find(b, h, k, n)
        _unlock(&b.lock)
        return r != NULL

    def __contains__(self, key):
        return self.exists(key)

    def __len__(self):
        self.bound()
        return self.hdr.used

    def __getitem__(self, key):
        row = self.get(key)
        if row is None:
            raise KeyError(key)
        return row

    def __setitem__(self, key, values):
        self.set(key, values)

    def __delitem__(self, key):
        if not self.delete(key):
            raise KeyError(key)

    def items(self):
        """(key, row) for every row, in slot order; each row is read under its lock, rows
        set or deleted meanwhile may or may not appear."""
        cdef uint32_t i, cap
        cdef STableRowHead *head
        cdef STableBucket *b
        cdef char *r
        cdef bint ok
        self.bound()
        cap = self.hdr.capacity
        data = bytearray(self.data_size)
        keybuf = bytearray(self.key_width)
        cdef char *d = data
        cdef char *kb = keybuf
        cdef uint16_t kn = 0
        for i in range(1, cap + 1):
            if self.hdr == NULL:
                return
            r = self.row(i)
            head = <STableRowHead *>r
            if not head.used:
                continue
            b = &self.buckets[head.hash & self.mask]
            _lock(self, &b.lock)
            ok = head.used and (head.hash & self.mask) == <uint32_t>(b - self.buckets)
            if ok:
                kn = head.key_len
                if kn > self.key_width:
                    kn = <uint16_t>self.key_width
                memcpy(kb, r + _STABLE_ROW_HEAD, kn)
                memcpy(d, r + self.data_offset, self.data_size)
            _unlock(&b.lock)
            if ok:
                yield kb[:kn].decode("utf-8", "replace"), self.row_dict(d)

    def __iter__(self):
        return self.items()

    def keys(self):
        """Every key, in slot order."""
        return [k for k, _ in self.items()]

    # -- what the facade reads ------------------------------------------------------------------

    def _set_name(self, str name):
        """The name error messages use before the table is bound."""
        self.table_name = name

    def _layout_columns(self):
        """[(name, type, width, offset, size)] as laid out."""
        self.bound()
        return [(self.col_names[c], self.cols[c].type, self.cols[c].width, self.cols[c].offset,
                 self.cols[c].size) for c in range(self.ncols)]

    def _view_layout(self):
        """(rows offset, row size, used-flag offset): where a numpy view finds the rows."""
        self.bound()
        return self.hdr.rows_offset, self.hdr.row_size, 10

    def _buffer(self):
        self.bound()
        return self._buf

    def _stats(self):
        self.bound()
        return {"name": self.table_name, "size": self.hdr.capacity, "used": self.hdr.used,
                "key_width": self.hdr.key_width, "memory_size": self.hdr.total_size,
                "lock_recoveries": self.hdr.recovered, "refused_full": self.hdr.refused}

    def _hold_lock(self, key):
        """Takes key's bucket lock and keeps it (tests: a holder that is then killed)."""
        cdef Py_ssize_t n
        cdef const char *k
        self.bound()
        k = self.key_of(key, &n)
        _lock(self, &self.buckets[_fnv1a(k, n) & self.mask].lock)

    def _release_lock(self, key):
        cdef Py_ssize_t n
        cdef const char *k
        self.bound()
        k = self.key_of(key, &n)
        _unlock(&self.buckets[_fnv1a(k, n) & self.mask].lock)

    def _lock_owner(self, key):
        """The pid holding key's bucket lock, 0 when free."""
        cdef Py_ssize_t n
        cdef const char *k
        self.bound()
        k = self.key_of(key, &n)
        return pyswt_load32(&self.buckets[_fnv1a(k, n) & self.mask].lock)

