# Declarations of core/crontable.pyx: the crontab's shared-memory tables. The structs below are
# the layout (version _LAYOUT_VERSION): a change to them must bump it. ORIGIN_FIELDS / RUN_FIELDS
# in the .pyx name the same fields in the same order with their numpy types; offsets and sizes
# come from these structs.

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from .includes.pthread cimport pthread_mutex_t

cdef enum:
    _TABLE_MAGIC = 0x42544353        # b"SCTB"
    _LAYOUT_VERSION = 1
    _TABLE_HEADER = 128              # the mutex sits at offset 64, up to 64 bytes
    _KIND_ORIGIN = 1
    _KIND_RUN = 2

    _RULE_W = 100
    _NAME_W = 255
    _MINUTE_W = 12

# Run-time row status: 0..2 as in Swoft's crontab, then what it lacked.
cpdef enum RunStatus:
    PENDING = 0
    DELIVERED = 1
    DELIVERING = 2
    RUNNING = 3
    DONE = 4
    FAILED = 5
    SKIPPED = 6
    ELSEWHERE = 7        # once per cluster: another node holds the run's lease, or ran it


cdef packed struct TableHeader:
    uint32_t magic
    uint32_t layout_version
    uint32_t kind
    uint32_t capacity
    uint32_t row_size
    uint32_t used
    uint64_t dropped            # inserts refused because the table was full
    uint64_t recovered          # times the lock was taken over from a dead holder
    uint32_t top                # rows at and above this index are all free: scans stop here


cdef packed struct OriginRow:
    uint8_t used
    uint8_t overlap
    uint8_t last_status
    uint8_t reserved
    uint32_t inflight           # delivered and not finished
    int64_t add_time
    int64_t last_due
    double last_duration
    uint64_t run_count
    uint64_t fail_count
    char rule[_RULE_W]
    char task[_NAME_W]
    char method[_NAME_W]


cdef packed struct RunRow:
    uint8_t used
    uint8_t status
    uint16_t reserved
    uint32_t job                # the origin row it came from
    int64_t sec                 # the unix second it is due
    double delivered_at
    double started_at
    double duration
    char minute[_MINUTE_W]      # YmdHi, as Swoft keyed it
    char task[_NAME_W]
    char method[_NAME_W]


cdef class CronTable:
    cdef object buf
    cdef char *base
    cdef TableHeader *hdr
    cdef pthread_mutex_t *mutex
    cdef uint32_t kind_expected
    cdef size_t row_size

    cdef char *row(self, uint32_t i) noexcept nogil
    cdef int check(self, uint32_t i) except -1
    cdef int lock(self) except -1
    cdef void unlock(self) noexcept nogil


cdef class OriginTable(CronTable):
    pass


cdef class RunTable(CronTable):
    pass
