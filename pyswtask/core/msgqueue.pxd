# Declarations of core/msgqueue.pyx: the SysV message queue's channel, its sender for separate
# programs, and the task worker's reader (a thread, or the task loop itself with a watch thread).

from libc.stdint cimport uint16_t, uint32_t, uint64_t

from .includes.pthread cimport pthread_mutex_t


cdef class QueueChannel(Channel):
    cdef int msqid
    cdef readonly long mtype
    cdef size_t msgmax
    cdef size_t retry_at            # after a full queue: queued bytes before send_full retries
    cdef char *msg                  # mtype, then the text

    cdef int send_full(self) except -1


cdef class QueueSender:
    cdef list outs
    cdef int nout
    cdef int rr
    cdef uint64_t epoch
    cdef uint32_t counter
    cdef int worker_num
    cdef readonly uint64_t puts     # tasks queued so far: a writer-behind sees if more came


cdef class QueueReader:
    cdef int msqid
    cdef int wake_fd
    cdef readonly long mtype
    cdef size_t msgmax
    cdef object hold                # the hold area's memoryview (layout in msgqueue.pyx)
    cdef uint64_t *hdr              # its header words
    cdef char *ring                 # its records
    cdef size_t cap
    cdef size_t used                # bytes of committed records not taken by the task loop
                                    # (a wrap is not counted: a commit after one must wake it)
    cdef pthread_mutex_t mutex
    cdef uint32_t pid
    cdef readonly bint finished
    cdef readonly int error         # errno that stopped the thread, or 0
    cdef readonly uint64_t lost_parts
    # Direct reading (the task loop's own thread waits in msgrcv; the thread only watches the
    # loop's other descriptors and its next deadline, and wakes msgrcv by a message):
    cdef readonly bint direct
    cdef int watch_epfd             # the watch's epoll: the task loop's epoll and wake_fd
    cdef bint armed                 # the task loop waits (or is about to) in msgrcv
    cdef bint quit                  # the watch ends
    cdef bint wake_sent             # a wake-up message is queued and not received yet
    cdef readonly bint fired        # the watch saw something for the loop since it was armed
    cdef double deadline            # when the loop is due anyway (monotonic; 0: never)
    cdef long open_ptype            # part type of a body whose later parts are still coming
    cdef double parts_since         # when the last of them came

    cdef void _run(self) noexcept nogil
    cdef int receive(self, double deadline, bint block) noexcept nogil
    cdef void _watch(self) noexcept nogil
    cdef int _control(self, char *rec, ssize_t n) noexcept nogil
    cdef int _end_direct(self) noexcept nogil
    cdef void end_watch(self) noexcept nogil
    cdef char *_try_reserve(self) noexcept nogil
    cdef char *_reserve(self) noexcept nogil
    cdef void _commit(self, char *rec, size_t n) noexcept nogil
    cdef ssize_t take(self, char **text, uint64_t *pos) noexcept nogil
    cdef void taken(self) noexcept nogil
    cdef void running(self, uint64_t pos) noexcept nogil
    cdef void ran(self, uint64_t pos) noexcept nogil
    cdef void mark_running(self, uint64_t pos, bint on) noexcept nogil
    cdef void release(self, uint64_t upto) noexcept nogil
    cdef uint64_t head(self) noexcept nogil
    cdef void give_up(self, uint64_t task_id, uint32_t flags_src) noexcept nogil
    cdef void _wake(self) noexcept nogil
    cdef int _read_parts(self, long ptype) noexcept nogil
