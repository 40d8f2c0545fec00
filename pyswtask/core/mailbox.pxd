# Declarations of core/mailbox.pyx: a process's inbox and its queues to every other inbox.

from libc.stdint cimport uint16_t, uint32_t, uint64_t


cdef class Mailbox(RecordReader):
    cdef Channel inbox
    cdef list outs
    cdef uint16_t self_id
    cdef uint64_t epoch
    cdef uint32_t counter
    cdef list received              # filled by on_frame during receive()

    cdef Channel _out(self, int dst)
    cdef int _put(self, Channel ch, bytes body) except -1
    cdef int _drain_to(self, Channel ch, size_t upto, size_t length, double timeout) except -1
    cdef int _timed_out(self, Channel ch, size_t length, double timeout) except -1
