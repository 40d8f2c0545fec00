# The crontab's two shared-memory tables: fixed-width records behind a small header that holds
# a process-shared, robust mutex. Layout diagram and locking: the docstring of CronTable; the
# record structs and the table's fields: crontable.pxd.

from libc.string cimport memcpy, memset

from .includes.posix cimport strnlen
from .includes.pthread cimport (EOWNERDEAD, PTHREAD_MUTEX_ROBUST, PTHREAD_PROCESS_SHARED,
                                pthread_mutex_consistent, pthread_mutex_init, pthread_mutex_lock,
                                pthread_mutex_unlock, pthread_mutexattr_init,
                                pthread_mutexattr_setpshared, pthread_mutexattr_setrobust,
                                pthread_mutexattr_t)
from .includes.python cimport PyBytes_AS_STRING

LAYOUT_VERSION = _LAYOUT_VERSION
TABLE_HEADER = _TABLE_HEADER

# The one definition of each record: field name and numpy type, in struct order. Offsets and
# the record size come from the C structs in crontable.pxd (see _RowDtype), so the numpy view
# cannot drift.
ORIGIN_FIELDS = (
    ("used", "u1"), ("overlap", "u1"), ("last_status", "u1"), ("reserved", "u1"),
    ("inflight", "<u4"), ("add_time", "<i8"), ("last_due", "<i8"), ("last_duration", "<f8"),
    ("run_count", "<u8"), ("fail_count", "<u8"), ("rule", f"S{_RULE_W}"),
    ("task", f"S{_NAME_W}"), ("method", f"S{_NAME_W}"),
)
RUN_FIELDS = (
    ("used", "u1"), ("status", "u1"), ("reserved", "<u2"), ("job", "<u4"), ("sec", "<i8"),
    ("delivered_at", "<f8"), ("started_at", "<f8"), ("duration", "<f8"),
    ("minute", f"S{_MINUTE_W}"), ("task", f"S{_NAME_W}"), ("method", f"S{_NAME_W}"),
)


class TableFull(RuntimeError):
    """A shared-memory table has no free row."""


def _offsets_origin():
    cdef OriginRow r
    cdef char *b = <char *>&r
    return ([<char *>&r.used - b, <char *>&r.overlap - b, <char *>&r.last_status - b,
             <char *>&r.reserved - b, <char *>&r.inflight - b, <char *>&r.add_time - b,
             <char *>&r.last_due - b, <char *>&r.last_duration - b, <char *>&r.run_count - b,
             <char *>&r.fail_count - b, <char *>&r.rule[0] - b, <char *>&r.task[0] - b,
             <char *>&r.method[0] - b], sizeof(OriginRow))


def _offsets_run():
    cdef RunRow r
    cdef char *b = <char *>&r
    return ([<char *>&r.used - b, <char *>&r.status - b, <char *>&r.reserved - b,
             <char *>&r.job - b, <char *>&r.sec - b, <char *>&r.delivered_at - b,
             <char *>&r.started_at - b, <char *>&r.duration - b, <char *>&r.minute[0] - b,
             <char *>&r.task[0] - b, <char *>&r.method[0] - b], sizeof(RunRow))


class _RowDtype:
    """A table class's ``dtype``: the numpy structured dtype of its rows, made on first use, so
    that numpy is imported only by a process that asks for a numpy view."""

    def __init__(self, fields, layout):
        self.fields = fields
        self.layout = layout
        self.dtype = None

    def __get__(self, obj, objtype=None):
        if self.dtype is None:
            import numpy
            offsets, itemsize = self.layout()
            self.dtype = numpy.dtype({"names": [f[0] for f in self.fields],
                                      "formats": [f[1] for f in self.fields],
                                      "offsets": offsets, "itemsize": itemsize})
        return self.dtype


cdef int _put_str(char *dst, size_t width, str value, str field) except -1:
    cdef bytes raw = value.encode("utf-8")
    cdef Py_ssize_t n = len(raw)
    if n > <Py_ssize_t>width:
        raise ValueError(f"{field} is {n} bytes, longer than its {width}-byte column: {value!r:.80}")
    memset(dst, 0, width)
    memcpy(dst, PyBytes_AS_STRING(raw), n)
    return 0


cdef inline str _get_str(const char *src, size_t width):
    return src[:strnlen(src, width)].decode("utf-8", "replace")


cdef class CronTable:
    """A table of fixed-width records in shared memory.

    ::

        offset 0     header: magic "SCTB", layout version, kind, capacity, row size, used rows,
                     dropped inserts, lock recoveries, top (44 bytes; rows are taken lowest
                     first and every row from top up is free, so scans stop at top)
        offset 64    pthread mutex: process-shared and robust (a holder that dies does not
                     leave it locked; the next taker repairs it and counts a recovery)
        offset 128   capacity x row size bytes of rows; a row with used == 0 is free

    Every write, and every read that must be consistent, holds the mutex; critical sections are
    short loops over C structs, never Python callbacks, so a process that is killed inside one
    costs at most that one write. Readers that only inspect (to_numpy) take no lock.
    """

    def __init__(self, buf, bint create=False, uint32_t capacity=0):
        cdef unsigned char[:] view = buf
        cdef pthread_mutexattr_t attr
        cdef size_t need
        # Before the header is read: a segment too short for it must not be read past its end.
        if <size_t>view.shape[0] < _TABLE_HEADER:
            raise ValueError(f"a segment of {view.shape[0]} bytes is too small for a table "
                             f"header ({_TABLE_HEADER} bytes)")
        self.buf = buf
        self.base = <char *>&view[0]
        self.hdr = <TableHeader *>self.base
        self.mutex = <pthread_mutex_t *>(self.base + 64)
        if sizeof(pthread_mutex_t) > 64:
            raise RuntimeError("pthread_mutex_t does not fit the table header on this platform")
        if create:
            need = self.nbytes(capacity)
            if <size_t>view.shape[0] < need:
                raise ValueError(f"{view.shape[0]} bytes cannot hold {capacity} rows ({need} needed)")
            memset(self.base, 0, need)
            self.hdr.magic = _TABLE_MAGIC
            self.hdr.layout_version = _LAYOUT_VERSION
            self.hdr.kind = self.kind_expected
            self.hdr.capacity = capacity
            self.hdr.row_size = self.row_size
            pthread_mutexattr_init(&attr)
            pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED)
            pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST)
            if pthread_mutex_init(self.mutex, &attr) != 0:
                raise OSError("pthread_mutex_init failed")
        elif (self.hdr.magic != _TABLE_MAGIC or self.hdr.kind != self.kind_expected
                or self.hdr.row_size != self.row_size):
            raise ValueError("the shared memory does not hold a table of this kind")
        elif self.hdr.layout_version != _LAYOUT_VERSION:
            raise ValueError(f"table layout version {self.hdr.layout_version}, this pyswtask "
                             f"reads version {_LAYOUT_VERSION}")
        elif <size_t>view.shape[0] < self.nbytes(self.hdr.capacity):
            raise ValueError("the shared memory is smaller than its table says")

    @property
    def capacity(self):
        return self.hdr.capacity

    @property
    def used(self):
        return self.hdr.used

    @property
    def dropped(self):
        """Inserts refused because the table was full."""
        return self.hdr.dropped

    cdef inline char *row(self, uint32_t i) noexcept nogil:
        return self.base + _TABLE_HEADER + <size_t>i * self.row_size

    cdef int check(self, uint32_t i) except -1:
        if i >= self.hdr.capacity:
            raise IndexError(f"row {i} is outside the table ({self.hdr.capacity} rows)")
        return 0

    cdef int lock(self) except -1:
        cdef int r
        with nogil:
            r = pthread_mutex_lock(self.mutex)
        if r == EOWNERDEAD:
            pthread_mutex_consistent(self.mutex)
            self.hdr.recovered += 1
        elif r != 0:
            raise OSError(r, "locking a cron table failed")
        return 0

    cdef inline void unlock(self) noexcept nogil:
        pthread_mutex_unlock(self.mutex)

    def to_numpy(self):
        """A live numpy view of every row (free rows have used == 0); no copy, no lock."""
        import numpy
        return numpy.frombuffer(self.buf, dtype=self.dtype, count=self.hdr.capacity,
                                offset=_TABLE_HEADER)


cdef class OriginTable(CronTable):
    """One row per scheduled method: its rule, task, method and run statistics."""

    dtype = _RowDtype(ORIGIN_FIELDS, _offsets_origin)

    def __cinit__(self, *args, **kwargs):
        self.kind_expected = _KIND_ORIGIN
        self.row_size = sizeof(OriginRow)

    @staticmethod
    def nbytes(uint32_t capacity):
        return _TABLE_HEADER + <size_t>capacity * sizeof(OriginRow)

    def add(self, str rule, str task, str method, int64_t add_time, bint overlap=True):
        """Adds a job; returns its row (the job id). TableFull when no row is free."""
        cdef OriginRow r
        cdef uint32_t i
        memset(&r, 0, sizeof(r))
        r.used = 1
        r.overlap = overlap
        r.add_time = add_time
        r.last_due = -1
        _put_str(r.rule, _RULE_W, rule, "rule")
        _put_str(r.task, _NAME_W, task, "task name")
        _put_str(r.method, _NAME_W, method, "method name")
        self.lock()
        try:
            for i in range(self.hdr.capacity):
                if not (<OriginRow *>self.row(i)).used:
                    memcpy(self.row(i), &r, sizeof(r))
                    self.hdr.used += 1
                    if i >= self.hdr.top:
                        self.hdr.top = i + 1
                    return i
            self.hdr.dropped += 1
        finally:
            self.unlock()
        raise TableFull(f"the crontab's origin table is full ({self.hdr.capacity} rows)")

    def get(self, uint32_t job):
        """One row as a dict."""
        cdef OriginRow r
        self.check(job)
        self.lock()
        memcpy(&r, self.row(job), sizeof(r))
        self.unlock()
        return {"job": job, "used": bool(r.used), "rule": _get_str(r.rule, _RULE_W),
                "task": _get_str(r.task, _NAME_W), "method": _get_str(r.method, _NAME_W),
                "overlap": bool(r.overlap), "add_time": r.add_time, "inflight": r.inflight,
                "last_due": r.last_due, "last_status": r.last_status,
                "last_duration": r.last_duration, "run_count": r.run_count,
                "fail_count": r.fail_count}

    def rows(self):
        """Every used row, as dicts."""
        return [self.get(i) for i in range(self.hdr.top) if (<OriginRow *>self.row(i)).used]

    def last_duration(self, uint32_t job):
        """How long the job's last run took (seconds), or None before its first run."""
        cdef OriginRow *r = <OriginRow *>self.row(job)
        cdef double took
        cdef uint64_t count
        self.check(job)
        self.lock()
        took = r.last_duration
        count = r.run_count
        self.unlock()
        return took if count else None

    def begin(self, uint32_t job):
        """Counts one more delivery in flight; False (nothing counted) when the job does not
        allow overlap and one is still in flight."""
        cdef OriginRow *r = <OriginRow *>self.row(job)
        cdef bint ok
        self.check(job)
        self.lock()
        ok = r.overlap or r.inflight == 0
        if ok:
            r.inflight += 1
        self.unlock()
        return ok

    def finish(self, uint32_t job, int64_t due, int status, double duration):
        """Records the outcome of one run (DONE or FAILED) and ends its flight."""
        cdef OriginRow *r = <OriginRow *>self.row(job)
        self.check(job)
        self.lock()
        if r.inflight:
            r.inflight -= 1
        r.last_due = due
        r.last_status = <uint8_t>status
        r.last_duration = duration
        r.run_count += 1
        if status == FAILED:
            r.fail_count += 1
        self.unlock()

    def abandon(self, uint32_t job):
        """Ends a flight that did not run (a cluster run whose lease another attempt holds
        when it comes to start), without counting a run."""
        cdef OriginRow *r = <OriginRow *>self.row(job)
        self.check(job)
        self.lock()
        if r.inflight:
            r.inflight -= 1
        self.unlock()


cdef class RunTable(CronTable):
    """One row per due execution of a job in the coming minute(s)."""

    dtype = _RowDtype(RUN_FIELDS, _offsets_run)

    def __cinit__(self, *args, **kwargs):
        self.kind_expected = _KIND_RUN
        self.row_size = sizeof(RunRow)

    @staticmethod
    def nbytes(uint32_t capacity):
        return _TABLE_HEADER + <size_t>capacity * sizeof(RunRow)

    def insert(self, uint32_t job, str task, str method, str minute, int64_t sec):
        """Adds a pending row; returns its index, -2 when (job, sec) is there already (so a
        minute written twice is delivered once), -1 when the table is full (counted)."""
        cdef RunRow r
        cdef RunRow *p
        cdef uint32_t i
        cdef int64_t free_at = -1
        memset(&r, 0, sizeof(r))
        r.used = 1
        r.status = PENDING
        r.job = job
        r.sec = sec
        _put_str(r.minute, _MINUTE_W, minute, "minute")
        _put_str(r.task, _NAME_W, task, "task name")
        _put_str(r.method, _NAME_W, method, "method name")
        self.lock()
        try:
            for i in range(self.hdr.top):
                p = <RunRow *>self.row(i)
                if p.used:
                    if p.job == job and p.sec == sec:
                        return -2
                elif free_at < 0:
                    free_at = i
            if free_at < 0:
                if self.hdr.top == self.hdr.capacity:
                    self.hdr.dropped += 1
                    return -1
                free_at = self.hdr.top
                self.hdr.top += 1
            memcpy(self.row(<uint32_t>free_at), &r, sizeof(r))
            self.hdr.used += 1
            return free_at
        finally:
            self.unlock()

    def claim_due(self, int64_t now, int64_t grace):
        """Takes every pending row due at or before now: those due within grace seconds become
        DELIVERING and are returned as (row, job, sec), oldest first; older ones become
        SKIPPED and are returned apart. Each row is claimed once, whoever asks."""
        cdef RunRow *p
        cdef uint32_t i
        cdef list due = [], skipped = []
        self.lock()
        try:
            for i in range(self.hdr.top):
                p = <RunRow *>self.row(i)
                if p.used and p.status == PENDING and p.sec <= now:
                    if p.sec < now - grace:
                        p.status = SKIPPED
                        skipped.append((i, p.job, p.sec))
                    else:
                        p.status = DELIVERING
                        due.append((i, p.job, p.sec))
        finally:
            self.unlock()
        due.sort(key=_by_sec)
        return due, skipped

    def next_due(self):
        """The earliest second a pending row is due, or None."""
        cdef RunRow *p
        cdef uint32_t i
        cdef int64_t best = -1
        self.lock()
        for i in range(self.hdr.top):
            p = <RunRow *>self.row(i)
            if p.used and p.status == PENDING and (best < 0 or p.sec < best):
                best = p.sec
        self.unlock()
        return None if best < 0 else best

    def set_status(self, uint32_t row, int status, double when=0.0, double duration=0.0):
        """DELIVERED records when (delivered_at), RUNNING when (started_at), DONE / FAILED the
        duration."""
        cdef RunRow *p = <RunRow *>self.row(row)
        self.check(row)
        self.lock()
        p.status = <uint8_t>status
        if status == DELIVERED:
            p.delivered_at = when
        elif status == RUNNING:
            p.started_at = when
        elif status == DONE or status == FAILED:
            p.duration = duration
        self.unlock()

    def clean(self, int64_t finished_before, int64_t stale_before):
        """Frees finished rows (done, failed, skipped) due before finished_before, and rows stuck
        unfinished (delivered, delivering, running) due before stale_before, which it returns
        as (row, job, sec, status) so that their loss is reported. Pending rows stay: the exec
        process skips or delivers them."""
        cdef RunRow *p
        cdef uint32_t i
        cdef list stale = []
        cdef int freed = 0
        self.lock()
        for i in range(self.hdr.top):
            p = <RunRow *>self.row(i)
            if not p.used or p.status == PENDING:
                continue
            if p.status >= DONE:
                if p.sec < finished_before:
                    p.used = 0
                    freed += 1
            elif p.sec < stale_before:
                stale.append((i, p.job, p.sec, p.status))
                p.used = 0
                freed += 1
        self.hdr.used -= freed
        while self.hdr.top and not (<RunRow *>self.row(self.hdr.top - 1)).used:
            self.hdr.top -= 1
        self.unlock()
        return stale

    def get(self, uint32_t row):
        cdef RunRow r
        self.check(row)
        self.lock()
        memcpy(&r, self.row(row), sizeof(r))
        self.unlock()
        return {"row": row, "used": bool(r.used), "status": r.status, "job": r.job,
                "sec": r.sec, "minute": _get_str(r.minute, _MINUTE_W),
                "task": _get_str(r.task, _NAME_W), "method": _get_str(r.method, _NAME_W),
                "delivered_at": r.delivered_at, "started_at": r.started_at,
                "duration": r.duration}

    def rows(self):
        """Every used row, as dicts, by due second."""
        out = [self.get(i) for i in range(self.hdr.top) if (<RunRow *>self.row(i)).used]
        out.sort(key=lambda r: (r["sec"], r["job"]))
        return out


def _by_sec(item):
    return item[2]
