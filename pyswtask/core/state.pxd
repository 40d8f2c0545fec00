# Declarations of core/state.pyx: the task workers' shared state slots. The layout is
# documented there, and nothing outside TaskWorkerStates computes an offset into it.

from libc.stdint cimport uint16_t, uint32_t, uint64_t


@cython.final
cdef class TaskWorkerStates:
    cdef object view                # the buffer cast to uint64, released by release()
    cdef uint64_t[::1] slots
    cdef Py_ssize_t width           # slots per task worker: 2 + worker_num
    cdef int worker_num
    cdef int count                  # task workers

    cdef int check(self, int index, Py_ssize_t peers) except -1
    cdef void started(self, int index, uint64_t task_id, uint16_t src) noexcept
    cdef void read_upto(self, int index, int peer, uint64_t task_id) noexcept
