# The arena of one direction of a channel: a ring in shared memory that large bodies are
# written into, so that only a small reference frame crosses the socket. Declarations in
# arena.pxd; how frames refer to it: the docstring of _core.pyx.
#
# Layout (one mapping, MAP_SHARED before the fork, so every process sees it at the same place):
#
#     0       u64 head: end position of the last block reserved (the producer's)
#     64      u64 tail: every position before it may be reused (raised by the consumer)
#     128     the ring, capacity bytes; position p lies at offset p % capacity
#
# Positions only grow: a block is [pos, pos + n) and never wraps (one that would is put at the
# start of the next lap, the rest of this lap skipped). The producer is the one process that
# sends on that end of the channel, the consumer the one that reads the other; a successor
# inherits both words. The consumer raises tail to the end of each block it has read: since a
# channel delivers its frames in the order their blocks were reserved, that also frees the
# blocks of frames that can no longer come (their sender died before sending them, or their
# reader died after taking them off the socket); a worker told that a task worker died raises
# tail itself past the blocks of the tasks that task worker had taken.

from libc.errno cimport errno
from libc.stdint cimport uintptr_t
from .includes.python cimport PyBytes_FromStringAndSize
from posix.mman cimport MAP_ANONYMOUS, MAP_FAILED, MAP_NORESERVE, MAP_SHARED, PROT_READ, PROT_WRITE
from posix.mman cimport madvise, mmap, munmap

cdef extern from "<sys/mman.h>" nogil:
    """
    #ifndef MADV_POPULATE_READ
    #define MADV_POPULATE_READ 22
    #endif
    #ifndef MADV_POPULATE_WRITE
    #define MADV_POPULATE_WRITE 23
    #endif
    """
    enum:
        MADV_POPULATE_READ      # Linux 5.14
        MADV_POPULATE_WRITE

cdef extern from *:
    """
    static inline uint64_t pyswtask_load_u64(uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void pyswtask_store_u64(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    /* *p = max(*p, v), against a concurrent raise by another process. */
    static inline void pyswtask_raise_u64(uint64_t *p, uint64_t v) {
        uint64_t cur = __atomic_load_n(p, __ATOMIC_RELAXED);
        while (cur < v && !__atomic_compare_exchange_n(p, &cur, v, 1, __ATOMIC_RELEASE,
                                                       __ATOMIC_RELAXED)) {
        }
    }
    """
    uint64_t pyswtask_load_u64(uint64_t *p) nogil
    void pyswtask_store_u64(uint64_t *p, uint64_t v) nogil
    void pyswtask_raise_u64(uint64_t *p, uint64_t v) nogil

ARENA_MIN_BODY = _ARENA_MIN_BODY


cdef class Arena:
    """One direction's ring of capacity bytes (a multiple of 64 KiB, rounded up). The pages
    are shared memory taken only as they are first written, and blocks go back to the ring's
    start whenever it is empty: bodies that are read as they come keep using the same pages,
    and only a backlog of bodies takes more of the ring."""

    def __cinit__(self, size_t capacity):
        cdef void *m
        capacity = (capacity + 0xFFFF) & ~(<size_t>0xFFFF)
        if capacity == 0:
            raise ValueError("an arena needs a positive capacity")
        m = mmap(NULL, _ARENA_HEADER + capacity, PROT_READ | PROT_WRITE,
                 MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if m == MAP_FAILED:
            raise OSError(errno, f"mmap of a {capacity}-byte arena failed")
        self.map = <char *>m
        self.map_len = _ARENA_HEADER + capacity
        self.ring = self.map + _ARENA_HEADER
        self.capacity = capacity
        self.head = <uint64_t *>self.map
        self.tail = <uint64_t *>(self.map + 64)

    def __dealloc__(self):
        if self.map != NULL:
            munmap(self.map, self.map_len)

    @property
    def used(self):
        """Bytes held by blocks not known to be read yet (and the lap ends skipped between)."""
        return self.held()

    cdef uint64_t held(self) noexcept:
        return pyswtask_load_u64(self.head) - pyswtask_load_u64(self.tail)

    cdef int _map_ahead(self, uint64_t end, uint64_t n, bint write) noexcept:
        # Every page of the ring, in each process, costs a fault the first time it is touched
        # (and the first touch of all a zeroed page): one per 4 KiB of a body, which is most of
        # what passing a body through a fresh ring costs. Mapping the next pages in bulk, a few
        # bodies of this size past this one (256 KiB to _ARENA_MAP_AHEAD), takes one system
        # call for them all, and takes little more of the ring than it would have used. A
        # process maps for one use (a producer writes, a consumer reads); without the call
        # (before Linux 5.14) the pages fault in as before.
        cdef uint64_t start = self.mapped
        if write != self.writes:
            if start:
                return 0        # both uses in one process: a test's; faults are fine there
            self.writes = write
        n = n * 8
        if n < (256 << 10):
            n = 256 << 10
        elif n > _ARENA_MAP_AHEAD:
            n = _ARENA_MAP_AHEAD
        end = (end + n + 0xFFF) & ~(<uint64_t>0xFFF)
        if end > self.capacity:
            end = self.capacity
        self.mapped = end
        # The ring starts after the header, within the mapping's first page.
        cdef uintptr_t a = <uintptr_t>(self.ring + start) & ~(<uintptr_t>0xFFF)
        cdef uintptr_t b = <uintptr_t>(self.ring + end)
        madvise(<void *>a, b - a, MADV_POPULATE_WRITE if write else MADV_POPULATE_READ)
        return 0

    cdef int64_t reserve(self, size_t n) noexcept:
        """The position of a new block of n bytes, or -1 when the ring has no room for it."""
        cdef uint64_t size = arena_end(0, n)
        cdef uint64_t h = self.head[0]
        cdef uint64_t t = pyswtask_load_u64(self.tail)
        cdef uint64_t off = h % self.capacity
        cdef uint64_t pos = h
        cdef uint64_t used
        if size > self.capacity:
            return -1
        if h == t and off:
            # Nothing is held: start the next lap at the ring's start, and skip the rest of this
            # one (no block can be read there any more), so that a stream of bodies that are
            # read as they come keeps using the same few pages instead of touching the whole
            # ring lap after lap.
            pos = h - off + self.capacity
            pyswtask_store_u64(self.head, pos)
            pyswtask_raise_u64(self.tail, pos)
            h = t = pos
            off = 0
        used = h - t
        if off + size > self.capacity or (off > used and off - used >= 2 * (used + size)):
            # The next lap's start: never across the end; nor past a few times what is held,
            # while as much is free at the start (before tail), so that a steady stream keeps
            # to the pages it touched already. After the jump, room is what is left before
            # tail until the consumer has read the blocks it holds now.
            pos = h - off + self.capacity
        if pos + size - t > self.capacity:
            return -1
        if pos % self.capacity + size > self.mapped:
            self._map_ahead(pos % self.capacity + size, size, True)
        pyswtask_store_u64(self.head, pos + size)
        return <int64_t>pos

    cdef const char *block(self, uint64_t pos, uint32_t n) noexcept:
        """The consumer's view of the block [pos, pos + n); NULL unless it lies within what was
        reserved and not yet freed."""
        cdef uint64_t h = pyswtask_load_u64(self.head)
        cdef uint64_t t = pyswtask_load_u64(self.tail)
        if n == 0 or pos < t or pos + n > h or pos % self.capacity + n > self.capacity:
            return NULL
        if pos % self.capacity + n > self.mapped:
            self._map_ahead(pos % self.capacity + n, n, False)
        return self.ring + pos % self.capacity

    cdef object copy_out(self, uint64_t pos, uint32_t n):
        """The producer's copy of its block [pos, pos + n) as bytes, or None once a later block
        was written over it. Only the producer writes the ring and positions only grow, so the
        block is intact, freed or not, until head passes a full lap beyond it."""
        if pyswtask_load_u64(self.head) - pos > self.capacity:
            return None
        return PyBytes_FromStringAndSize(self.ring + pos % self.capacity, n)

    cdef void consumed(self, uint64_t end) noexcept:
        """Everything before end may be reused."""
        if end <= pyswtask_load_u64(self.head):
            pyswtask_raise_u64(self.tail, end)


cdef extern from "<malloc.h>" nogil:
    enum:
        M_TRIM_THRESHOLD
        M_MMAP_THRESHOLD
    int mallopt(int param, int value)


def keep_freed_memory(int mmap_threshold=32 << 20, int trim_threshold=64 << 20):
    """Has malloc keep freed memory for the next large bodies: blocks up to mmap_threshold come
    from the heap, not from a fresh mapping, and up to trim_threshold bytes freed at its top
    stay there. Without it, each body of a MiB or so is a new mapping whose pages fault in and
    are zeroed one by one, then unmapped: most of the cost of passing it (glibc; elsewhere
    nothing is changed). Returns whether malloc took both."""
    return mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and (
        mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1)
