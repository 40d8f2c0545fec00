# SysV message queues: tasks from separate programs (commands), and from workers when
# task_ipc_mode is 2 or 3. A message's text is a record: whole frames, as on a channel.
# Declarations in msgqueue.pxd.

from libc.errno cimport EAGAIN, EIDRM, EINTR, EINVAL, ENOMSG, errno
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memmove
from posix.unistd cimport usleep, write

from .includes.pthread cimport (pthread_mutex_destroy, pthread_mutex_init, pthread_mutex_lock,
                                pthread_mutex_unlock)
from .includes.python cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from .includes.sysv cimport IPC_NOWAIT, msgrcv, msgsnd

cdef enum:
    _SENTINEL_SIZE = 8
    # Messages a reader holds before it stops taking more: the rest wait in the queue, where
    # they bound their senders.
    _BACKLOG_MAX = 1024
    # How long a task worker waits for the remaining parts of a body whose first part it took.
    _PARTS_WAIT_US = 10000000

# Message types at and above this carry the later parts of a fragmented body, one type per task
# (below it: the task workers' own types). Whichever task worker took the first part reads the
# rest by that type, so in contention mode no other task worker can take a part of it.
cdef long _PART_TYPE_BASE = (<long>1) << 62

PART_TYPE_BASE = _PART_TYPE_BASE


class QueueGone(OSError):
    """The message queue was removed: its server stopped."""


cdef inline long part_type(uint64_t task_id) noexcept nogil:
    return _PART_TYPE_BASE | <long>(task_id & <uint64_t>(_PART_TYPE_BASE - 1))


cdef inline bint is_later_part(FrameHeader *h) noexcept nogil:
    return (h.flags & _FLAGS_FRAG) != 0 and (h.flags & _FLAG_FRAG_FIRST) == 0


cdef int raise_queue_error(int err, str what) except -1:
    if err == EIDRM or err == EINVAL:
        raise QueueGone(err, f"{what}: the message queue is gone (its server stopped)")
    raise OSError(err, f"{what} failed")


cdef class QueueChannel(Channel):
    """A channel whose records go into a message queue, as messages of one type.

    Frames are fragmented at the queue's per-message limit (msgmax) instead of a record's. The
    first part of a fragmented body ends its message; the later parts each go alone, under the
    body's own part type. Sends never block: what the queue does not take stays queued here.
    """

    def __cinit__(self, int fd, int peer, int msqid, long mtype, size_t msgmax):
        if msgmax <= _HEADER_SIZE:
            raise ValueError(f"msgmax {msgmax} leaves no room for a frame")
        self.msqid = msqid
        self.mtype = mtype
        self.msgmax = msgmax
        self.frag_max = msgmax - _HEADER_SIZE
        self.msg = <char *>malloc(sizeof(long) + msgmax)
        if self.msg == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.msg)

    cdef int flush(self) except -1:
        cdef FrameHeader h
        cdef size_t off, total, fsize
        cdef long mtype
        while self.out.start < self.out.end:
            off = self.out.start
            memcpy(&h, self.out.data + off, _HEADER_SIZE)
            if is_later_part(&h):
                mtype = part_type(h.task_id)
                total = _HEADER_SIZE + h.body_len
            else:
                mtype = self.mtype
                total = 0
                while off < self.out.end:
                    memcpy(&h, self.out.data + off, _HEADER_SIZE)
                    fsize = _HEADER_SIZE + h.body_len
                    if total and (is_later_part(&h) or total + fsize > self.msgmax):
                        break
                    total += fsize
                    off += fsize
                    if h.flags & _FLAG_FRAG_FIRST:
                        break
            (<long *>self.msg)[0] = mtype
            memcpy(self.msg + sizeof(long), self.out.data + self.out.start, total)
            if msgsnd(self.msqid, self.msg, total, IPC_NOWAIT) < 0:
                if errno == EAGAIN:
                    return 0
                if errno == EINTR:
                    continue
                raise_queue_error(errno, "msgsnd")
            self.out.start += total
        self.out.start = self.out.end = 0
        return 1

    cdef int send_full(self) except -1:
        """Sends whole messages' worth only, leaving a partial tail queued to fill up."""
        cdef size_t end = self.out.end, cut = self.out.start, off = self.out.start
        cdef FrameHeader h
        # Cut the queue after the last frame that keeps the head at least msgmax long.
        if self.queued() < self.msgmax or self.queued() < self.retry_at:
            return 0
        while off < end:
            memcpy(&h, self.out.data + off, _HEADER_SIZE)
            off += _HEADER_SIZE + h.body_len
            if off - self.out.start >= self.msgmax:
                cut = off
                break
        if cut == self.out.start:
            return 0
        self.out.end = cut
        try:
            self.flush()
        finally:
            # flush resets start and end when all went; keep the tail either way.
            if self.out.start == 0 and self.out.end == 0:
                if cut < end:
                    memmove(self.out.data, self.out.data + cut, end - cut)
                    self.out.end = end - cut
            else:
                self.out.end = end
        # The queue is full: one more message's worth before trying again, not a failed
        # msgsnd per task.
        self.retry_at = self.queued() + self.msgmax if self.queued() >= self.msgmax else 0
        return 0

    cdef int update_interest(self, int epfd, size_t high_water) except -1:
        # A queue has no descriptor: its owner retries sends on a timer instead.
        return 0


# The stop sentinel: a message of 8 bytes, 4 zero bytes then the pid (u32, little-endian) of the
# process whose reader must stop. A record starts with the frame magic, so it is never one.

cdef inline bint sentinel_pid(const char *text, size_t n, uint32_t *pid) noexcept nogil:
    """Whether text is a stop sentinel; if so, stores the pid it names."""
    if n != _SENTINEL_SIZE or text[0] != 0 or text[1] != 0 or text[2] != 0 or text[3] != 0:
        return False
    memcpy(pid, text + 4, 4)
    return True


def sentinel(uint32_t pid):
    """The text of the message that stops the queue reader of the process pid."""
    return b"\0\0\0\0" + pid.to_bytes(4, "little")


def is_sentinel(text):
    """Whether a message's text is a stop sentinel (of any process)."""
    cdef const unsigned char[::1] view = text
    cdef uint32_t pid
    return view.shape[0] == _SENTINEL_SIZE and sentinel_pid(<const char *>&view[0], 8, &pid)


cdef class QueueSender:
    """A separate program's end of a server's queue: numbers its tasks, coalesces ASYNC frames
    into messages of up to msgmax bytes, and spreads the messages over the task workers' types.
    """

    def __init__(self, int msqid, long first_type, int ntypes, size_t msgmax, int worker_num,
                 uint64_t epoch):
        if ntypes < 1 or worker_num < 1:
            raise ValueError("a queue sender needs at least one worker and one task worker")
        self.outs = [QueueChannel(-1, i, msqid, first_type + i, msgmax) for i in range(ntypes)]
        self.nout = ntypes
        self.worker_num = worker_num
        self.epoch = epoch & 0xFFFFFFFF

    def put(self, bytes body, int dst, bint async_=False, size_t backlog_max=0):
        """Queues one task frame for task worker dst (-1: the next one), ASYNC (no result comes
        back) or CO; returns its id, or 0 without queueing it when backlog_max bytes are already
        held back for that worker."""
        cdef QueueChannel ch
        cdef uint64_t task_id
        if dst >= self.nout:
            raise ValueError(f"dst_worker_id {dst} is out of range: the server has {self.nout} "
                             f"task workers (0..{self.nout - 1})")
        if dst < 0:
            ch = <QueueChannel>self.outs[self.rr]
        else:
            ch = <QueueChannel>self.outs[dst]
        if backlog_max and ch.queued() >= backlog_max:
            return 0
        self.puts += 1
        self.counter += 1
        if self.counter == 0:
            self.counter = 1
        task_id = (self.epoch << 32) | self.counter
        # As Swoft's QueueTask did: a source worker id drawn from the workers.
        ch.put(_FRAME_TASK, (_FLAG_ASYNC if async_ else 0) | _FLAG_COMMAND, task_id, <uint16_t>(self.counter % self.worker_num),
               PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))
        if ch.queued() >= ch.msgmax:
            # A full message leaves now; the next goes to the next task worker.
            ch.send_full()
            if dst < 0:
                self.rr = (self.rr + 1) % self.nout
        return task_id

    def flush(self):
        """Sends what the queue takes now; True when nothing is left queued."""
        cdef QueueChannel ch
        cdef bint done = True
        for ch in self.outs:
            if ch.queued() and not ch.flush():
                done = False
        return done

    def discard(self):
        """Drops every frame not sent yet."""
        cdef QueueChannel ch
        for ch in self.outs:
            ch.out.start = ch.out.end = 0

    @property
    def queued(self):
        """Bytes waiting for room in the queue."""
        return queued_bytes(self.outs)


cdef class QueueReader:
    """A task worker's reader of the queue, run by a thread of its own (msgrcv has no
    descriptor to poll). The thread never takes the GIL on its path: messages go into a ring
    buffer under a plain mutex, and the wake descriptor (an eventfd in the task worker's epoll
    set) is written when the ring was empty. The task loop takes them out with ``pop``.

    mtype > 0 reads that type only (ipc modes 1 and 2: this task worker's own messages); < 0
    reads every type up to -mtype (mode 3: contention). The thread ends at a sentinel naming
    this process, or when the queue is removed.
    """

    def __cinit__(self, *args, **kwargs):
        self.msg = NULL
        self.ring = NULL
        pthread_mutex_init(&self.mutex, NULL)

    def __init__(self, int msqid, long mtype, size_t msgmax, int wake_fd, uint32_t pid,
                 size_t capacity=1 << 20):
        self.msqid = msqid
        self.mtype = mtype
        self.msgmax = msgmax
        self.wake_fd = wake_fd
        self.pid = pid
        self.cap = capacity if capacity > 4 * (msgmax + 4) else 4 * (msgmax + 4)
        self.msg = <char *>malloc(sizeof(long) + msgmax)
        self.ring = <char *>malloc(self.cap)
        if self.msg == NULL or self.ring == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.msg)
        free(self.ring)
        pthread_mutex_destroy(&self.mutex)

    def run(self):
        """The thread's body."""
        with nogil:
            self._run()
        self.finished = True
        self._wake()

    cdef void _run(self) noexcept nogil:
        cdef ssize_t n
        cdef uint32_t target
        cdef const char *text = self.msg + sizeof(long)
        while True:
            # Keep room for one more message; what does not fit waits in the queue, where it
            # holds back its senders.
            while not self._room(self.msgmax):
                usleep(200)
            n = msgrcv(self.msqid, self.msg, self.msgmax, self.mtype, 0)
            if n < 0:
                if errno == EINTR:
                    continue
                if errno != EIDRM and errno != EINVAL:
                    self.error = errno
                return
            if sentinel_pid(text, <size_t>n, &target):
                if target == self.pid:
                    return
                # Another task worker's stop (contention mode): put it back for its owner.
                msgsnd(self.msqid, self.msg, n, IPC_NOWAIT)
                usleep(100)
                continue
            self._push(text, <size_t>n)
            if self._read_parts(text, <size_t>n) < 0:
                return

    cdef bint _room(self, size_t n) noexcept nogil:
        cdef bint ok
        pthread_mutex_lock(&self.mutex)
        ok = self.used + 4 + n <= self.cap
        pthread_mutex_unlock(&self.mutex)
        return ok

    cdef void _push(self, const char *text, size_t n) noexcept nogil:
        cdef uint32_t len32 = <uint32_t>n
        cdef bint was_empty
        pthread_mutex_lock(&self.mutex)
        was_empty = self.used == 0
        self._ring_write(<const char *>&len32, 4)
        self._ring_write(text, n)
        self.used += 4 + n
        pthread_mutex_unlock(&self.mutex)
        if was_empty:
            self._wake()

    cdef void _ring_write(self, const char *p, size_t n) noexcept nogil:
        cdef size_t first = self.cap - self.tail
        if first > n:
            first = n
        memcpy(self.ring + self.tail, p, first)
        if n > first:
            memcpy(self.ring, p + first, n - first)
        self.tail = (self.tail + n) % self.cap

    cdef void _ring_read(self, char *p, size_t n) noexcept nogil:
        cdef size_t first = self.cap - self.head
        if first > n:
            first = n
        memcpy(p, self.ring + self.head, first)
        if n > first:
            memcpy(p + first, self.ring, n - first)
        self.head = (self.head + n) % self.cap

    cdef ssize_t pop(self, char *dst) noexcept nogil:
        """One message into dst (msgmax bytes at least); -1 when none is waiting."""
        cdef uint32_t len32
        pthread_mutex_lock(&self.mutex)
        if self.used == 0:
            pthread_mutex_unlock(&self.mutex)
            return -1
        self._ring_read(<char *>&len32, 4)
        self._ring_read(dst, len32)
        self.used -= 4 + len32
        pthread_mutex_unlock(&self.mutex)
        return len32

    cdef void _wake(self) noexcept nogil:
        cdef uint64_t one = 1
        write(self.wake_fd, &one, 8)

    cdef int _read_parts(self, const char *text, size_t n) noexcept nogil:
        """When the message ends with the first part of a fragmented body, reads the later
        parts by the body's part type, waiting for them up to _PARTS_WAIT_US. -1: stop."""
        cdef size_t off = 0
        cdef FrameHeader h
        cdef FrameHeader last
        cdef bint found = False
        cdef long ptype
        cdef ssize_t r
        cdef unsigned int waited = 0, pause = 20
        while off < n:
            if check_header(text + off, n - off, &h) != NULL:
                return 0            # the task worker reports the bad record itself
            last = h
            found = True
            off += _HEADER_SIZE + h.body_len
        if not found or not (last.flags & _FLAG_FRAG_FIRST) or (last.flags & _FLAG_FRAG_LAST):
            return 0
        ptype = part_type(last.task_id)
        while True:
            while not self._room(self.msgmax):
                usleep(200)
            r = msgrcv(self.msqid, self.msg, self.msgmax, ptype, IPC_NOWAIT)
            if r < 0:
                if errno == ENOMSG or errno == EINTR:
                    if waited >= _PARTS_WAIT_US:
                        # The sender died mid-body; the task loop drops the fragments it has.
                        self.lost_parts += 1
                        return 0
                    usleep(pause)
                    waited += pause
                    if pause < 1000:
                        pause *= 2
                    continue
                if errno != EIDRM and errno != EINVAL:
                    self.error = errno
                return -1
            waited = 0
            pause = 20
            self._push(self.msg + sizeof(long), <size_t>r)
            if check_header(self.msg + sizeof(long), <size_t>r, &h) != NULL:
                return 0
            if h.flags & _FLAG_FRAG_LAST:
                return 0


def queue_send(int msqid, long mtype, bytes text):
    """One message, without waiting: True when sent, False when the queue is full."""
    cdef size_t n = PyBytes_GET_SIZE(text)
    cdef char *msg = <char *>malloc(sizeof(long) + n)
    cdef int r
    if msg == NULL:
        raise MemoryError()
    try:
        (<long *>msg)[0] = mtype
        memcpy(msg + sizeof(long), PyBytes_AS_STRING(text), n)
        while True:
            r = msgsnd(msqid, msg, n, IPC_NOWAIT)
            if r == 0:
                return True
            if errno == EAGAIN:
                return False
            if errno != EINTR:
                raise_queue_error(errno, "msgsnd")
    finally:
        free(msg)


def queue_receive(int msqid, long mtype, size_t msgmax):
    """One message of that type (msgrcv's rules) without waiting; None when there is none."""
    cdef char *msg = <char *>malloc(sizeof(long) + msgmax)
    cdef ssize_t n
    if msg == NULL:
        raise MemoryError()
    try:
        while True:
            n = msgrcv(msqid, msg, msgmax, mtype, IPC_NOWAIT)
            if n >= 0:
                return PyBytes_FromStringAndSize(msg + sizeof(long), n)
            if errno == ENOMSG:
                return None
            if errno != EINTR:
                raise_queue_error(errno, "msgrcv")
    finally:
        free(msg)
