# Declarations of core/reply.pyx: a command's reassembler of its reply datagrams, and a task
# worker's writer of them.

from libc.stdint cimport uint16_t

from .includes.posix cimport sockaddr_un


cdef class ReplyAssembler(RecordReader):
    cdef Channel chan               # where fragments are reassembled; its body_max bounds them
    cdef list results               # filled by on_frame during feed()

    cdef list _feed(self, const char *record, size_t n)


cdef class ReplyWriter:
    cdef object sock                # owns fd
    cdef int fd
    cdef uint16_t worker_id
    cdef object on_dropped          # on_dropped(task_id, gone)
    cdef Channel chan               # frames (and fragments) one result at a time
    cdef sockaddr_un addr           # the prefix, then the pid of the last result's program
    cdef size_t prefix_len
    cdef unsigned int addr_len
    cdef long pid                   # whose address addr holds (-1: none yet)

    cdef void _shrink(self) noexcept
