# Declarations of core/state.pyx: the task workers' shared state slots. The layout is
# documented there, and nothing outside TaskWorkerStates computes an offset into it.

from libc.stdint cimport uint16_t, uint32_t, uint64_t

cdef enum:
    _HANDOVER_SIZE = 16 + _RECORD_MAX   # per task worker: length, worker, frames


@cython.final
cdef class TaskWorkerStates:
    cdef object view                # the buffer cast to uint64, released by release()
    cdef uint64_t[::1] slots
    cdef Py_ssize_t width           # slots per task worker: 2 + worker_num
    cdef int worker_num
    cdef int count                  # task workers
    cdef object handover_view       # the hand-over buffer as bytes, released by release()
    cdef unsigned char[::1] handover
    cdef bint has_handover

    cdef int check(self, int index, Py_ssize_t peers) except -1
    cdef void started(self, int index, uint64_t task_id, uint16_t src) noexcept
    cdef void read_upto(self, int index, int peer, uint64_t task_id) noexcept
    cdef int hand_over(self, int index, int peer, const char *p, size_t n) except -1
    cdef size_t take_over(self, int index, char *dst, int *peer) noexcept
    cdef int held_by(self, int index) noexcept
