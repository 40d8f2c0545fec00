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
# A task taken from the message queue may have come from any worker to any task worker, so
# its LOST frame names task ids: body ``[running, 0, reason, [task ids it ran]]``, running being
# 0 when it was not running one of that worker's tasks (``queue_lost_frame``).
#
# Declarations in state.pxd.

from libc.string cimport memcpy

from .includes.python cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE


cdef class TaskWorkerStates:
    """The state slots of every task worker over buf (nbytes(...) bytes, shared by fork)."""

    def __init__(self, buf, int worker_num, int task_worker_num):
        if worker_num < 0 or task_worker_num < 0:
            raise ValueError("process counts cannot be negative")
        self.view = memoryview(buf).cast("Q")
        self.slots = self.view
        self.width = 2 + worker_num
        self.worker_num = worker_num
        self.count = task_worker_num
        if self.slots.shape[0] < self.count * self.width:
            raise ValueError("the task worker state buffer is too small")

    @staticmethod
    def nbytes(int worker_num, int task_worker_num):
        """The bytes a buffer needs (never 0: an empty mmap cannot be made)."""
        return max(8 * task_worker_num * (2 + worker_num), 8)

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
        cdef int w
        cdef bytes body, frame
        cdef list out = []
        for w in range(self.worker_num):
            upto = self.slots[base + 2 + w]
            mine = running if running_src == <uint64_t>w else 0
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
        """Lets go of the buffer, so that its mmap can be closed."""
        self.slots = None
        if self.view is not None:
            self.view.release()
            self.view = None


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
