# Declarations of core/arena.pyx: the shared-memory ring a channel's large bodies are written
# into, one per direction of each channel, made by the master before it forks.

from libc.stdint cimport int64_t, uint32_t, uint64_t

cdef enum:
    # Bodies of this size and more go through the arena, when it has room: below it, a copy
    # through the socket costs less than the reference does (measured with perf/run.py).
    _ARENA_MIN_BODY = 16384
    _ARENA_ALIGN = 64
    _ARENA_HEADER = 128         # head at 0, tail at 64: each on a cache line of its own
    _ARENA_REF_SIZE = 16        # a reference frame's body: u64 position, u32 length, u32 zero
    # The pages of a ring this process has not used yet are mapped ahead of use by this much at
    # a time, in one system call, instead of one page fault per page (see Arena._map_ahead).
    _ARENA_MAP_AHEAD = 2 << 20


@cython.final
cdef class Arena:
    cdef char *map                  # the mapping: header, then the ring
    cdef size_t map_len
    cdef char *ring
    cdef readonly uint64_t capacity
    cdef uint64_t *head             # end of the last block reserved (written by the producer)
    cdef uint64_t *tail             # everything before it may be reused (raised by the consumer)
    cdef uint64_t mapped            # ring offsets below it are in this process's page tables
    cdef bint writes                # mapped for writing (the producer) or for reading

    cdef int _map_ahead(self, uint64_t end, uint64_t n, bint write) noexcept

    cdef int64_t reserve(self, size_t n) noexcept
    cdef uint64_t held(self) noexcept
    cdef const char *block(self, uint64_t pos, uint32_t n) noexcept
    cdef void consumed(self, uint64_t end) noexcept
    cdef object copy_out(self, uint64_t pos, uint32_t n)


cdef inline uint64_t arena_end(uint64_t pos, uint64_t n) noexcept nogil:
    # Where the block of n bytes at pos ends, aligned as reserve aligns it.
    return pos + ((n + _ARENA_ALIGN - 1) & ~(<uint64_t>_ARENA_ALIGN - 1))
