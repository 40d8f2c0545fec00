# Declarations of core/table.pyx: a Swoole\Table-like hash table of typed rows in shared memory.
# The structs below are its layout (version _STABLE_VERSION): a change to them must bump it. The
# segment describes itself (capacity, key width, columns), so a process that did not declare
# the table can attach to it by key.

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    _STABLE_MAGIC = 0x42545753      # b"SWTB"
    _STABLE_VERSION = 1
    _STABLE_NAME_W = 64
    _STABLE_COL_NAME_W = 32
    _STABLE_MAX_COLUMNS = 64        # columns present in a set() are a 64-bit mask
    _STABLE_MAX_KEY = 1024
    _STABLE_MAX_WIDTH = 1 << 20
    _STABLE_STACK = 1024            # rows up to this many data bytes are copied on the stack
    _STABLE_ROW_HEAD = 12           # next, hash, key length, used: the key follows

    _COL_INT = 1
    _COL_FLOAT = 2
    _COL_STR = 3
    _COL_BYTES = 4


cdef struct STableHeader:
    uint32_t magic
    uint32_t layout_version
    uint32_t capacity           # rows
    uint32_t nbuckets           # a power of two >= capacity
    uint32_t row_size
    uint32_t key_width
    uint32_t ncolumns
    uint32_t data_offset        # where the columns start in a row
    uint64_t buckets_offset
    uint64_t rows_offset
    uint64_t total_size
    uint32_t used               # rows holding a key
    uint32_t free_head          # 1-based row index of the free-row stack, 0 when full
    uint32_t free_lock          # pid of the holder of the free-row stack, 0 when free
    uint32_t reserved
    uint64_t recovered          # locks taken over from a holder that died
    uint64_t refused            # inserts refused because the table was full
    char name[_STABLE_NAME_W]


cdef struct STableColumn:
    char name[_STABLE_COL_NAME_W]
    uint32_t type
    uint32_t width              # str/bytes: bytes of data, after a uint32 length
    uint32_t offset             # from the start of the row
    uint32_t size               # bytes taken in the row


cdef struct STableBucket:
    uint32_t lock               # pid of the holder, 0 when free
    uint32_t head               # 1-based row index of the chain's first row, 0 when empty


cdef struct STableRowHead:
    uint32_t next               # 1-based index of the next row of the chain (or free stack)
    uint32_t hash
    uint16_t key_len
    uint8_t used
    uint8_t reserved


# Final methods: called directly, not through the vtable (Table subclasses it in Python
# and overrides none of them).
cdef class SharedTable:
    cdef object _buf                # the segment's buffer: keeps the mapping alive
    cdef char *base
    cdef STableHeader *hdr
    cdef STableColumn *cols
    cdef STableBucket *buckets
    cdef char *rows
    cdef size_t row_size
    cdef uint32_t mask
    cdef uint32_t capacity
    cdef uint32_t key_width
    cdef uint32_t ncols
    cdef uint32_t data_offset
    cdef uint32_t data_size
    cdef tuple col_names
    cdef dict col_index
    cdef str table_name
    cdef public double lock_timeout

    @cython.final
    cdef int bound(self) except -1
    @cython.final
    cdef const char *key_of(self, object key, Py_ssize_t *n) except NULL
    @cython.final
    cdef int column_of(self, object column) except -1
    @cython.final
    cdef int lock_slow(self, uint32_t *word) except -1
    @cython.final
    cdef char *row(self, uint32_t i) noexcept nogil
    @cython.final
    cdef char *find(self, STableBucket *b, uint32_t h, const char *k, Py_ssize_t n) noexcept nogil
    @cython.final
    cdef char *insert(self, STableBucket *b, uint32_t h, const char *k, Py_ssize_t n) except? NULL
    @cython.final
    cdef int release_row(self, uint32_t i) except -1
    @cython.final
    cdef object decode(self, const char *data, uint32_t c)
    @cython.final
    cdef dict row_dict(self, const char *data)
    @cython.final
    cdef int full(self) except -1
