# The task workers' state, in shared memory: what the master reads when a task worker dies,
# and the LOST frames it sends each worker from it.
#
# Per task worker index, 2 + worker_num uint64 slots (native byte order, one process's memory):
#
#     index * (2 + worker_num) + 0    task id of the task it started last (0: none since)
#                              + 1    the worker that task came from
#                              + 2+w  the last task id it read from worker w (0: none)
#
# A LOST frame (master -> worker w, on the dead task worker's end of their channel, read by the
# worker like a result): task id = the running task when it is w's, else the last read one;
# body = msgpack ``[running, read_upto, reason]``, running being 0 when the task worker's last
# start was another worker's (so it ran every record it read from w whole).
#
# The hand-over area (a second buffer, optional), per task worker index, _HANDOVER_SIZE bytes:
#
#     index * _HANDOVER_SIZE + 0      u64 length of the frames held (0: none)
#                            + 8      u64 the worker whose channel they came from
#                            + 16     the frames: the unread rest of one record
#
# A task worker that reaches task_max_request inside a record leaves the rest here; its
# successor runs it before it reads anything else, so each channel is still read in the order it
# was sent. Whoever writes the length last publishes or takes the rest with that one store, and
# while a rest is held, its worker's read_upto does not count it as read (see lost_reports).
#
# A task taken from the message queue may have come from any worker to any task worker, so
# its LOST frame names task ids: body ``[running, 0, reason, [task ids it ran]]``, running being
# 0 when it was not running one of that worker's tasks (``queue_lost_frame``).
#
# Declarations in state.pxd.

from libc.string cimport memcpy

from .includes.python cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE


cdef class TaskWorkerStates:
    """The state slots of every task worker over buf (nbytes(...) bytes, shared by fork)."""

    def __init__(self, buf, int worker_num, int task_worker_num, handover=None):
        if worker_num < 0 or task_worker_num < 0:
            raise ValueError("process counts cannot be negative")
        self.view = memoryview(buf).cast("Q")
        self.slots = self.view
        self.width = 2 + worker_num
        self.worker_num = worker_num
        self.count = task_worker_num
        if self.slots.shape[0] < self.count * self.width:
            raise ValueError("the task worker state buffer is too small")
        if handover is not None:
            self.handover_view = memoryview(handover).cast("B")
            self.handover = self.handover_view
            if <size_t>self.handover.shape[0] < <size_t>self.count * _HANDOVER_SIZE:
                raise ValueError("the task worker hand-over buffer is too small")
            self.has_handover = True

    @staticmethod
    def nbytes(int worker_num, int task_worker_num):
        """The bytes a buffer needs (never 0: an empty mmap cannot be made)."""
        return max(8 * task_worker_num * (2 + worker_num), 8)

    @staticmethod
    def handover_nbytes(int task_worker_num):
        """The bytes a hand-over buffer needs (never 0)."""
        return max(task_worker_num * _HANDOVER_SIZE, 8)

    cdef int hand_over(self, int index, int peer, const char *p, size_t n) except -1:
        cdef char *area
        cdef uint64_t word
        if not self.has_handover or n == 0 or n > _RECORD_MAX:
            raise ValueError("nothing to hand over, or nowhere to")
        area = <char *>&self.handover[0] + <size_t>index * _HANDOVER_SIZE
        memcpy(area + 16, p, n)
        word = <uint64_t>peer
        memcpy(area + 8, &word, 8)
        word = n
        memcpy(area, &word, 8)
        return 0

    cdef size_t take_over(self, int index, char *dst, int *peer) noexcept:
        cdef char *area
        cdef uint64_t n, word, zero = 0
        if not self.has_handover:
            return 0
        area = <char *>&self.handover[0] + <size_t>index * _HANDOVER_SIZE
        memcpy(&n, area, 8)
        memcpy(&word, area + 8, 8)
        if n == 0 or n > _RECORD_MAX or word >= <uint64_t>self.worker_num:
            return 0
        peer[0] = <int>word
        memcpy(dst, area + 16, n)
        # Read before taken: if this process dies between the two stores, the rest is still
        # held, and lost_reports does not count it as read.
        self.read_upto(index, peer[0], last_task_id(dst, n))
        memcpy(area, &zero, 8)
        return n

    cdef int held_by(self, int index) noexcept:
        """The worker whose frames the hand-over area of task worker index holds; -1: none."""
        cdef char *area
        cdef uint64_t n, word
        if not self.has_handover:
            return -1
        area = <char *>&self.handover[0] + <size_t>index * _HANDOVER_SIZE
        memcpy(&n, area, 8)
        if n == 0:
            return -1
        memcpy(&word, area + 8, 8)
        return <int>word

    def held(self, int index):
        """(worker, frames) held in task worker index's hand-over area, or None."""
        self.check(index, 0)
        cdef int peer = self.held_by(index)
        cdef uint64_t n
        cdef char *area
        if peer < 0:
            return None
        area = <char *>&self.handover[0] + <size_t>index * _HANDOVER_SIZE
        memcpy(&n, area, 8)
        return peer, PyBytes_FromStringAndSize(area + 16, n)

    cdef int check(self, int index, Py_ssize_t peers) except -1:
        if not 0 <= index < self.count:
            raise ValueError(f"no state slots for task worker index {index}")
        if peers > self.worker_num:
            raise ValueError("the task worker state has fewer slots than channels")
        return 0

    cdef inline void started(self, int index, uint64_t task_id, uint16_t src) noexcept:
        cdef Py_ssize_t base = <Py_ssize_t>index * self.width
        # The worker first: a reader that sees the task id sees its worker too.
        self.slots[base + 1] = src
        self.slots[base] = task_id

    cdef inline void read_upto(self, int index, int peer, uint64_t task_id) noexcept:
        self.slots[<Py_ssize_t>index * self.width + 2 + peer] = task_id

    def get(self, int index):
        """(running task id, its worker, [last task id read from each worker])."""
        self.check(index, 0)
        cdef Py_ssize_t base = <Py_ssize_t>index * self.width
        return (self.slots[base], self.slots[base + 1],
                [self.slots[base + 2 + w] for w in range(self.worker_num)])

    def lost_reports(self, int index, int src_worker, str reason):
        """After task worker index died: (worker, LOST frame) for each worker that had tasks
        with it, src_worker naming the dead task worker; clears its slots for its successor."""
        self.check(index, 0)
        cdef Py_ssize_t base = <Py_ssize_t>index * self.width
        cdef uint64_t running = self.slots[base], running_src = self.slots[base + 1]
        cdef uint64_t upto, mine
        cdef int w, held = self.held_by(index)
        cdef bytes body, frame
        cdef list out = []
        for w in range(self.worker_num):
            upto = self.slots[base + 2 + w]
            mine = running if running_src == <uint64_t>w else 0
            if w == held:
                # The rest of its record waits for the successor: read up to the task it ran last.
                upto = mine
            self.slots[base + 2 + w] = 0
            if not (mine or upto):
                continue
            body = packb([mine, upto, reason])
            frame = PyBytes_FromStringAndSize(NULL, _HEADER_SIZE + PyBytes_GET_SIZE(body))
            write_header(PyBytes_AS_STRING(frame), _FRAME_LOST, 0, mine or upto,
                         <uint16_t>src_worker, <uint32_t>PyBytes_GET_SIZE(body))
            memcpy(PyBytes_AS_STRING(frame) + _HEADER_SIZE, PyBytes_AS_STRING(body),
                   PyBytes_GET_SIZE(body))
            out.append((w, frame))
        self.slots[base] = 0
        return out

    def release(self):
        """Lets go of the buffers, so that their mmaps can be closed."""
        self.slots = None
        if self.view is not None:
            self.view.release()
            self.view = None
        self.has_handover = False
        self.handover = None
        if self.handover_view is not None:
            self.handover_view.release()
            self.handover_view = None


def queue_lost_frame(int src_worker, uint64_t running, list ran, str reason):
    """The LOST frame telling a worker which of its tasks from the message queue died with the
    task worker src_worker: the one it was running (0: none of this worker's), and those it
    ran whose results may not have left it."""
    cdef bytes body = packb([running, 0, reason, ran])
    cdef bytes frame = PyBytes_FromStringAndSize(NULL, _HEADER_SIZE + PyBytes_GET_SIZE(body))
    write_header(PyBytes_AS_STRING(frame), _FRAME_LOST, 0, running, <uint16_t>src_worker,
                 <uint32_t>PyBytes_GET_SIZE(body))
    memcpy(PyBytes_AS_STRING(frame) + _HEADER_SIZE, PyBytes_AS_STRING(body),
           PyBytes_GET_SIZE(body))
    return frame
