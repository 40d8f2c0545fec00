# SysV message queues: tasks from separate programs (commands), and from workers when
# task_ipc_mode is 2 or 3. A message's text is a record: whole frames, as on a channel.
# Declarations in msgqueue.pxd.

from libc.errno cimport EAGAIN, EIDRM, EINTR, EINVAL, ENOMSG, EPERM, errno
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memmove, memset
from posix.signal cimport kill
from posix.unistd cimport close, read, usleep, write

from .includes.clock cimport monotonic
from .includes.epoll cimport EPOLL_CLOEXEC, epoll_create1, epoll_event, epoll_wait

from .includes.pthread cimport (pthread_mutex_destroy, pthread_mutex_init, pthread_mutex_lock,
                                pthread_mutex_unlock)
from .includes.python cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from .includes.sysv cimport IPC_NOWAIT, msgrcv, msgsnd

cdef enum:
    _SENTINEL_SIZE = 8
    # How long a task worker waits for the remaining parts of a body whose first part it took.
    _PARTS_WAIT_US = 10000000
    # Control messages (see sentinel_pid).
    _CTL_STOP = 1
    _CTL_WAKE = 2
    # What QueueReader.receive returns.
    RECV_RECORD = 1             # a record was committed to the hold: take it
    RECV_WOKEN = 2              # the watch woke it: something else is due
    RECV_INTERRUPTED = 3        # a signal (EINTR): run Python's handlers
    RECV_NO_ROOM = 4            # the hold is full: results must leave first
    RECV_PARTS_WAIT = 5         # the rest of a body has not come yet: try again soon
    RECV_EMPTY = 6              # nothing waiting (when not blocking)
    RECV_END = 7                # its stop sentinel came, or the queue is gone

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


# Control messages, of 8 bytes: 4 marker bytes then the pid (u32, little-endian) of the process
# they are for. The stop sentinel (marker 0) stops that process's reader; the wake-up (marker
# 0xFFFFFFFF) ends its task loop's msgrcv when the loop has something else to do (direct
# reading). A record starts with the frame magic, so it is never one.

cdef inline int sentinel_pid(const char *text, size_t n, uint32_t *pid) noexcept nogil:
    """_CTL_STOP for a stop sentinel, _CTL_WAKE for a wake-up, else 0; stores the pid named."""
    cdef uint32_t marker
    if n != _SENTINEL_SIZE:
        return 0
    memcpy(&marker, text, 4)
    if marker != 0 and marker != <uint32_t>0xFFFFFFFF:
        return 0
    memcpy(pid, text + 4, 4)
    if marker == 0:
        return _CTL_STOP
    return _CTL_WAKE


def sentinel(uint32_t pid):
    """The text of the message that stops the queue reader of the process pid."""
    return b"\0\0\0\0" + pid.to_bytes(4, "little")


def wake_message(uint32_t pid):
    """The text of the message that ends the msgrcv of the process pid's task loop."""
    return b"\xff\xff\xff\xff" + pid.to_bytes(4, "little")


def is_sentinel(text):
    """Whether a message's text is a control message (a stop sentinel or a wake-up, of any
    process): not a task."""
    cdef const unsigned char[::1] view = text
    cdef uint32_t pid
    return view.shape[0] == _SENTINEL_SIZE and sentinel_pid(<const char *>&view[0], 8, &pid) != 0


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


# A task worker's hold: the messages its reader took from the queue and the task worker has not
# finished, in shared memory (one area per task worker index, mapped by the master before it
# forks), so that when the task worker dies the master can put back what it had not started
# (``recover_hold``). The reader receives straight into it, so holding costs no extra copy.
#
#     0    u64 head    position of the first record not released: before it, every task ran and
#                      its result left the process
#     8    u64 done    position of the first record the task loop has not taken
#     16   u64 tail    position of the next record: the reader receives there
#     24   u64 run     2 * position of the frame running + 1; 2 * a position after which
#                      nothing runs: the frames before it ran, the ones after did not start
#     32   u64 gone    task id of a body whose first parts were released before it ran (0: none)
#     40   u64 gone_sf its frame flags << 16 | its worker
#     48..63           zero
#     64   records, at byte positions counted since the start (offset: position % capacity)
#
# A record: u32 text length, u32 zero, the message as msgrcv writes it (long mtype, text),
# padded to 8 bytes. A record never wraps: a u32 _WRAP where none fits sends the next one to
# the start. Every byte outside the records is zero, so a message received just before the
# process died (mtype set, length not yet) ends where its frames end.

cdef enum:
    _HOLD_HEADER = 64
    _REC_HEADER = 16            # u32 length, u32 zero, long mtype
    _H_HEAD = 0
    _H_DONE = 1
    _H_TAIL = 2
    _H_RUN = 3
    _H_GONE = 4
    _H_GONE_SF = 5

cdef uint32_t _WRAP = 0xFFFFFFFF


cdef inline size_t rec_size(size_t n) noexcept nogil:
    return _REC_HEADER + ((n + 7) & ~(<size_t>7))


def hold_size(size_t msgmax, size_t capacity=1 << 20):
    """The bytes of a task worker's hold area: its header and a ring of capacity bytes (at
    least four messages)."""
    return _HOLD_HEADER + hold_capacity(msgmax, capacity)


cdef size_t hold_capacity(size_t msgmax, size_t capacity) noexcept:
    cdef size_t least = 4 * rec_size(msgmax)
    if capacity < least:
        capacity = least
    return (capacity + 7) & ~(<size_t>7)


cdef class QueueReader:
    """A task worker's reader of the queue, run by a thread of its own (msgrcv has no
    descriptor to poll). The thread never takes the GIL on its path: it receives each message
    into the hold (see above; a private one when hold is None), under a plain mutex, and writes
    the wake descriptor (an eventfd in the task worker's epoll set) when nothing was waiting.
    The task loop runs each record where it lies (``take``, ``taken``) and releases what is
    finished (``release``).

    mtype > 0 reads that type only (ipc modes 1 and 2: this task worker's own messages); < 0
    reads every type up to -mtype (mode 3: contention). The thread ends at a sentinel naming
    this process, or when the queue is removed.

    direct: the task loop's own thread waits in msgrcv (``receive``), as a task worker with
    nothing but the queue to wait for can: a message wakes that thread alone, instead of the
    reader thread, which then wakes the loop. The thread only watches: it waits on the task
    loop's epoll descriptor (``watch_loop``) and until the loop's next deadline while the loop
    is in msgrcv, and then ends that msgrcv by a wake-up message (see sentinel_pid) of the
    loop's own type. wake_fd is then the watch's own (blocking) eventfd, which ``receive``
    writes when it arms the watch or brings its deadline forward. Signals end msgrcv by EINTR
    (the thread that runs ``run`` must block them, so that they reach the loop's thread).
    """

    def __cinit__(self, *args, **kwargs):
        pthread_mutex_init(&self.mutex, NULL)
        self.watch_epfd = -1

    def __init__(self, int msqid, long mtype, size_t msgmax, int wake_fd, uint32_t pid,
                 size_t capacity=1 << 20, hold=None, bint direct=False):
        cdef unsigned char[::1] view
        self.msqid = msqid
        self.mtype = mtype
        self.msgmax = msgmax
        self.wake_fd = wake_fd
        self.pid = pid
        self.direct = direct
        if direct:
            self.watch_epfd = epoll_create1(EPOLL_CLOEXEC)
            if self.watch_epfd < 0:
                raise OSError(errno, "epoll_create1 failed")
            add_readable(self.watch_epfd, wake_fd, 1, "the watch's eventfd")
        self.cap = hold_capacity(msgmax, capacity)
        if hold is None:
            hold = bytearray(_HOLD_HEADER + self.cap)
        self.hold = memoryview(hold).cast("B")
        view = self.hold
        if <size_t>view.shape[0] < _HOLD_HEADER + self.cap:
            raise ValueError("the queue hold area is smaller than hold_size(msgmax, capacity)")
        self.hdr = <uint64_t *>&view[0]
        self.ring = <char *>&view[0] + _HOLD_HEADER
        # Whatever a predecessor left was put back by the master; start from an empty hold.
        memset(&view[0], 0, _HOLD_HEADER + self.cap)

    def __dealloc__(self):
        pthread_mutex_destroy(&self.mutex)
        if self.watch_epfd >= 0:
            close(self.watch_epfd)

    def watch_loop(self, int epfd):
        """(direct) The task loop's epoll descriptor: the watch wakes the loop's msgrcv when
        it is readable."""
        if not self.direct:
            raise ValueError("watch_loop is for a reader made with direct=True")
        add_readable(self.watch_epfd, epfd, 0, "the task loop's descriptor")

    def run(self):
        """The thread's body: the reader, or with direct, the watch."""
        if self.direct:
            with nogil:
                self._watch()
            return
        with nogil:
            self._run()
        self.finished = True
        self._wake()

    cdef void _run(self) noexcept nogil:
        cdef ssize_t n
        cdef char *rec
        cdef long ptype
        while True:
            rec = self._reserve()
            n = msgrcv(self.msqid, rec + 8, self.msgmax, self.mtype, 0)
            if n < 0:
                if errno == EINTR:
                    continue
                if errno != EIDRM and errno != EINVAL:
                    self.error = errno
                return
            n = self._control(rec, n)
            if n == -_CTL_STOP:
                return
            if n < 0:
                continue
            # Once committed, the record may be run and released at any time: look first.
            ptype = open_part_type(rec + _REC_HEADER, <size_t>n)
            self._commit(rec, <size_t>n)
            if ptype and self._read_parts(ptype) < 0:
                return

    cdef int _control(self, char *rec, ssize_t n) noexcept nogil:
        """n, the length of the message just received into rec, when it is a record; else the
        control message is consumed, and: -_CTL_STOP / -_CTL_WAKE when it named this process,
        -3 when it named another (put back for it, in contention mode, while that one lives)."""
        cdef uint32_t target
        cdef int kind = sentinel_pid(rec + _REC_HEADER, <size_t>n, &target)
        if kind == 0:
            return <int>n
        if target != self.pid:
            if kill(<int>target, 0) == 0 or errno == EPERM:
                msgsnd(self.msqid, rec + 8, n, IPC_NOWAIT)
            kind = 3
        # The hold keeps no trace of it (recover_hold reads zeros as the end).
        memset(rec + 8, 0, 8 + <size_t>n)
        if kind == 3:
            usleep(100)         # its owner's turn
        return -kind

    cdef int receive(self, double deadline, bint block) noexcept nogil:
        """(direct) Receives the next message into the hold, on the task loop's thread;
        waits for it in msgrcv when block, the watch ending the wait at deadline (monotonic; 0:
        none) or when the loop's epoll descriptor is readable. Returns a RECV_ value."""
        cdef char *rec
        cdef ssize_t n
        cdef long ptype
        cdef bint kick, last
        cdef FrameHeader h
        while True:
            rec = self._try_reserve()
            if rec == NULL:
                return RECV_NO_ROOM
            if self.open_ptype:
                # The later parts of a body follow its first at once, unless its sender died.
                n = msgrcv(self.msqid, rec + 8, self.msgmax, self.open_ptype, IPC_NOWAIT)
                if n < 0:
                    if errno != ENOMSG and errno != EINTR:
                        return self._end_direct()
                    if monotonic() - self.parts_since < _PARTS_WAIT_US * 1e-6:
                        return RECV_PARTS_WAIT
                    # The task loop drops the fragments it has.
                    self.lost_parts += 1
                    self.open_ptype = 0
                    continue
                self.parts_since = monotonic()
                last = (check_header(rec + _REC_HEADER, <size_t>n, &h) != NULL
                        or (h.flags & _FLAG_FRAG_LAST) != 0)
                self._commit(rec, <size_t>n)
                if last:
                    self.open_ptype = 0
                return RECV_RECORD
            if block:
                pthread_mutex_lock(&self.mutex)
                kick = not self.armed or (deadline > 0 and (self.deadline <= 0
                                                            or deadline < self.deadline))
                self.armed = True
                self.fired = False
                self.deadline = deadline
                pthread_mutex_unlock(&self.mutex)
                if kick:
                    self._wake()
            n = msgrcv(self.msqid, rec + 8, self.msgmax, self.mtype, 0 if block else IPC_NOWAIT)
            if n < 0:
                if errno == EINTR:
                    return RECV_INTERRUPTED
                if errno == ENOMSG:
                    return RECV_EMPTY
                return self._end_direct()
            n = self._control(rec, n)
            if n == -_CTL_WAKE:
                pthread_mutex_lock(&self.mutex)
                self.wake_sent = False
                pthread_mutex_unlock(&self.mutex)
                return RECV_WOKEN
            if n == -_CTL_STOP:
                self.finished = True
                self.end_watch()
                return RECV_END
            if n < 0:
                continue
            ptype = open_part_type(rec + _REC_HEADER, <size_t>n)
            self._commit(rec, <size_t>n)
            if ptype:
                self.open_ptype = ptype
                self.parts_since = monotonic()
            return RECV_RECORD

    cdef int _end_direct(self) noexcept nogil:
        # msgrcv failed for good: the queue is gone (its server stopped), or worse.
        if errno != EIDRM and errno != EINVAL:
            self.error = errno
        self.finished = True
        self.end_watch()
        return RECV_END

    cdef void end_watch(self) noexcept nogil:
        """(direct) Ends the watch thread."""
        pthread_mutex_lock(&self.mutex)
        self.quit = True
        pthread_mutex_unlock(&self.mutex)
        self._wake()

    cdef void _watch(self) noexcept nogil:
        # While the task loop is armed (in msgrcv): wait on its epoll descriptor, until its
        # deadline; then end its msgrcv with one wake-up message, and sleep until armed again.
        cdef epoll_event ev
        cdef int n, timeout
        cdef double deadline, now
        cdef uint64_t count
        cdef char wake[16]             # long mtype, then the 8 bytes
        cdef uint32_t marker = <uint32_t>0xFFFFFFFF
        (<long *>wake)[0] = self.mtype if self.mtype > 0 else -self.mtype
        memcpy(wake + sizeof(long), &marker, 4)
        memcpy(wake + sizeof(long) + 4, &self.pid, 4)
        pthread_mutex_lock(&self.mutex)
        while not self.quit:
            if not self.armed:
                pthread_mutex_unlock(&self.mutex)
                read(self.wake_fd, &count, 8)
                pthread_mutex_lock(&self.mutex)
                continue
            deadline = self.deadline
            pthread_mutex_unlock(&self.mutex)
            timeout = -1
            if deadline > 0:
                now = monotonic()
                timeout = 0 if deadline <= now else <int>((deadline - now) * 1000.0) + 1
            n = epoll_wait(self.watch_epfd, &ev, 1, timeout)
            pthread_mutex_lock(&self.mutex)
            if n < 0:
                if errno == EINTR:
                    continue
                self.error = errno
                break
            if n > 0 and ev.data.u64 == 1:
                read(self.wake_fd, &count, 8)       # armed again, or a new deadline
                continue
            if n == 0 and (self.deadline <= 0 or monotonic() < self.deadline):
                continue                            # the deadline moved on meanwhile
            self.armed = False
            self.fired = True
            if self.wake_sent or self.quit:
                continue
            self.wake_sent = True
            pthread_mutex_unlock(&self.mutex)
            # Waits for room when the queue is full: only a message can end msgrcv.
            while msgsnd(self.msqid, wake, _SENTINEL_SIZE, 0) < 0 and errno == EINTR:
                pass
            pthread_mutex_lock(&self.mutex)
        pthread_mutex_unlock(&self.mutex)

    cdef char *_try_reserve(self) noexcept nogil:
        """Where the next message goes, when there is room for one; else NULL."""
        cdef size_t need = rec_size(self.msgmax), off, skip
        cdef uint64_t tail
        pthread_mutex_lock(&self.mutex)
        tail = self.hdr[_H_TAIL]
        off = tail % self.cap
        skip = self.cap - off if self.cap - off < need else 0
        if tail - self.hdr[_H_HEAD] + skip + need <= self.cap:
            if skip:
                (<uint32_t *>(self.ring + off))[0] = _WRAP
                self.hdr[_H_TAIL] = tail + skip
                off = 0
            pthread_mutex_unlock(&self.mutex)
            return self.ring + off
        pthread_mutex_unlock(&self.mutex)
        return NULL

    cdef char *_reserve(self) noexcept nogil:
        """Where the next message goes, once there is room for one: what does not fit waits
        in the queue, where it holds back its senders."""
        cdef char *rec
        cdef unsigned int waits = 0
        while True:
            rec = self._try_reserve()
            if rec != NULL:
                return rec
            # The task loop frees room once results it held have left: nudge it now and then,
            # as it may be waiting for nothing but that.
            if waits % 50 == 0:
                self._wake()
            waits += 1
            usleep(200)

    cdef void _commit(self, char *rec, size_t n) noexcept nogil:
        cdef bint was_empty
        (<uint32_t *>rec)[0] = <uint32_t>n
        pthread_mutex_lock(&self.mutex)
        was_empty = self.used == 0
        self.hdr[_H_TAIL] += rec_size(n)
        self.used += rec_size(n)
        pthread_mutex_unlock(&self.mutex)
        if was_empty and not self.direct:
            self._wake()

    cdef ssize_t take(self, char **text, uint64_t *pos) noexcept nogil:
        """The next record for the task loop, where it lies: its text and length, and its
        position; -1 when none is waiting. It stays held until ``taken`` and ``release``."""
        cdef uint64_t done
        cdef uint32_t n
        pthread_mutex_lock(&self.mutex)
        if self.used == 0:
            pthread_mutex_unlock(&self.mutex)
            return -1
        done = self.hdr[_H_DONE]
        n = (<uint32_t *>(self.ring + done % self.cap))[0]
        if n == _WRAP:
            # used counts committed records only: one follows the wrap.
            done += self.cap - done % self.cap
            self.hdr[_H_DONE] = done
            n = (<uint32_t *>(self.ring + done % self.cap))[0]
        pthread_mutex_unlock(&self.mutex)
        text[0] = self.ring + done % self.cap + _REC_HEADER
        pos[0] = done
        return n

    cdef void taken(self) noexcept nogil:
        """The record take gave has been run: every frame of it ran or was refused."""
        cdef uint64_t done = self.hdr[_H_DONE]
        cdef size_t size = rec_size((<uint32_t *>(self.ring + done % self.cap))[0])
        pthread_mutex_lock(&self.mutex)
        self.hdr[_H_DONE] = done + size
        self.used -= size
        pthread_mutex_unlock(&self.mutex)
        self.hdr[_H_RUN] = 2 * (done + size)

    cdef inline void running(self, uint64_t pos) noexcept nogil:
        self.hdr[_H_RUN] = 2 * pos + 1

    cdef inline void ran(self, uint64_t pos) noexcept nogil:
        self.hdr[_H_RUN] = 2 * pos + 2

    cdef void mark_running(self, uint64_t pos, bint on) noexcept nogil:
        """Marks the frame at pos as a task still running (a coroutine task, deferred) or not:
        recover_hold reports a marked frame before the run position lost while running."""
        cdef FrameHeader *f = <FrameHeader *>(self.ring + pos % self.cap)
        if on:
            f.flags = f.flags | _FLAG_HELD_RUNNING
        else:
            f.flags = f.flags & ~_FLAG_HELD_RUNNING

    cdef void release(self, uint64_t upto) noexcept nogil:
        """Frees the records before position upto (their tasks ran and their results left),
        zeroing them: the reader's room, and no stale frame for recover_hold to misread."""
        cdef uint64_t head = self.hdr[_H_HEAD]
        cdef size_t a, b
        if upto > self.hdr[_H_DONE]:
            upto = self.hdr[_H_DONE]
        if upto <= head:
            return
        a = head % self.cap
        b = upto % self.cap
        if upto - head >= self.cap or (b <= a and upto > head):
            memset(self.ring + a, 0, self.cap - a)
            memset(self.ring, 0, b)
        else:
            memset(self.ring + a, 0, b - a)
        pthread_mutex_lock(&self.mutex)
        self.hdr[_H_HEAD] = upto
        pthread_mutex_unlock(&self.mutex)

    cdef inline uint64_t head(self) noexcept nogil:
        return self.hdr[_H_HEAD]

    cdef void give_up(self, uint64_t task_id, uint32_t flags_src) noexcept nogil:
        """The first parts of this task's body are released before it ran (the body outgrew
        the hold): if the process dies now, the master can only report it lost."""
        self.hdr[_H_GONE_SF] = flags_src
        self.hdr[_H_GONE] = task_id

    cdef void _wake(self) noexcept nogil:
        cdef uint64_t one = 1
        write(self.wake_fd, &one, 8)

    cdef int _read_parts(self, long ptype) noexcept nogil:
        """Reads the later parts of a fragmented body whose first part the last message
        ended with, by the body's part type, waiting for them up to _PARTS_WAIT_US. -1: stop."""
        cdef FrameHeader h
        cdef ssize_t r
        cdef char *rec
        cdef bint last
        cdef unsigned int waited = 0, pause = 20
        while True:
            rec = self._reserve()
            r = msgrcv(self.msqid, rec + 8, self.msgmax, ptype, IPC_NOWAIT)
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
            last = (check_header(rec + _REC_HEADER, <size_t>r, &h) != NULL
                    or (h.flags & _FLAG_FRAG_LAST) != 0)
            self._commit(rec, <size_t>r)
            if last:
                return 0


cdef long open_part_type(const char *text, size_t n) noexcept nogil:
    """The part type of the body whose first part ends the message, else 0."""
    cdef size_t off = 0
    cdef FrameHeader h
    cdef FrameHeader last
    cdef bint found = False
    while off < n:
        if check_header(text + off, n - off, &h) != NULL:
            return 0            # the task worker reports the bad record itself
        last = h
        found = True
        off += _HEADER_SIZE + h.body_len
    if not found or not (last.flags & _FLAG_FRAG_FIRST) or (last.flags & _FLAG_FRAG_LAST):
        return 0
    return part_type(last.task_id)


cdef tuple _lost_task(uint64_t task_id, uint64_t flags, uint64_t src):
    # Decoded here, so that what the master does with a lost task never reads frame flags.
    return (task_id, <int>src, (flags & _FLAG_COMMAND) != 0, (flags & _FLAG_ASYNC) != 0)


def recover_hold(hold, size_t msgmax, size_t capacity=1 << 20):
    """After the task worker that owned hold died: what it held, and empties it for its
    successor. Returns (put_back, running, ran, gone, open_part):

    - put_back: [(mtype, text)] to queue again, in order: the frames it had not started (a
      record it was running is cut after the running frame; the parts of a body it had not
      run go back one per message, as they came);
    - running: [(task id, worker, from a separate program, ASYNC)] of the tasks it was running
      (one, or with coroutine tasks deferred, several);
    - ran: [(task id, worker, from a separate program, ASYNC)] of the workers' tasks it ran whose results may not have
      left it;
    - gone: (task id, flags, worker) of a task whose body it had partly released, or None
      (its parts still held are dropped: the body cannot be made whole again);
    - open_part: the part type of a body put back without its last part, whose remaining parts
      are still in the queue (they must be moved behind the ones put back), else 0.
    """
    cdef unsigned char[::1] view = memoryview(hold).cast("B")
    cdef size_t cap = hold_capacity(msgmax, capacity)
    cdef uint64_t *hdr
    cdef char *ring
    cdef uint64_t pos, tail, run, fpos, gone_id
    cdef size_t off, n, foff, keep_from, fsize
    cdef long mtype
    cdef FrameHeader h
    cdef const char *text
    cdef bint committed, started
    cdef list put_back = [], ran = [], held = []
    cdef list running = []
    cdef object gone = None, last
    cdef long open_part = 0
    if <size_t>view.shape[0] < _HOLD_HEADER + cap:
        raise ValueError("the queue hold area is smaller than hold_size(msgmax, capacity)")
    hdr = <uint64_t *>&view[0]
    ring = <char *>&view[0] + _HOLD_HEADER
    pos, tail, run, gone_id = hdr[_H_HEAD], hdr[_H_TAIL], hdr[_H_RUN], hdr[_H_GONE]
    if gone_id:
        gone = _lost_task(gone_id, hdr[_H_GONE_SF] >> 16, hdr[_H_GONE_SF] & 0xFFFF)
    while True:
        off = pos % cap
        committed = pos < tail
        if committed and (<uint32_t *>(ring + off))[0] == _WRAP:
            pos += cap - off
            continue
        mtype = (<long *>(ring + off + 8))[0]
        if not committed and mtype == 0:
            break
        text = ring + off + _REC_HEADER
        if committed:
            n = (<uint32_t *>(ring + off))[0]
        else:
            # Received as the process died: its frames say where it ends (zeros follow).
            n = 0
            while n + _HEADER_SIZE <= msgmax and check_header(text + n, msgmax - n, &h) == NULL:
                n += _HEADER_SIZE + h.body_len
        foff = 0
        keep_from = n
        while foff < n:
            if check_header(text + foff, n - foff, &h) != NULL:
                break           # the task worker refuses the rest of such a record whole
            fsize = _HEADER_SIZE + h.body_len
            fpos = pos + _REC_HEADER + foff
            started = 2 * fpos + 1 <= run
            if gone_id and h.task_id == gone_id and (h.flags & _FLAGS_FRAG):
                pass
            elif started and (h.flags & _FLAGS_FRAG) and not (h.flags & _FLAG_FRAG_LAST):
                # A part of a body: it ran only if its last part did.
                held.append((mtype if not is_later_part(&h) else part_type(h.task_id),
                             PyBytes_FromStringAndSize(text + foff, fsize)))
            elif started:
                held = []
                if 2 * fpos + 1 == run or (h.flags & _FLAG_HELD_RUNNING):
                    running.append(_lost_task(h.task_id, h.flags, h.src_worker))
                elif not (h.flags & _FLAG_COMMAND):
                    ran.append(_lost_task(h.task_id, h.flags, h.src_worker))
            elif keep_from == n:
                keep_from = foff
                put_back.extend(held)
                held = []
            foff += fsize
        if keep_from < foff:
            put_back.append((mtype, PyBytes_FromStringAndSize(text + keep_from,
                                                              foff - keep_from)))
        if not committed:
            break
        pos += rec_size(n)
    put_back.extend(held)
    if gone is not None and (any(t[0] == gone_id for t in running)
                             or any(t[0] == gone_id for t in ran)):
        gone = None         # its body was whole after all: it ran, or runs
    # A body whose first parts go back but not its last: its other parts are still in the
    # queue, and must be moved behind these.
    last = put_back[len(put_back) - 1][1] if put_back else None   # no wraparound here
    if last is not None and not is_last_part(last):
        text = PyBytes_AS_STRING(last)
        n = PyBytes_GET_SIZE(last)
        foff = 0
        memset(&h, 0, sizeof(h))        # read only when the loop set it; gcc can't tell
        while foff < n and check_header(text + foff, n - foff, &h) == NULL:
            foff += _HEADER_SIZE + h.body_len
        if foff and (h.flags & _FLAGS_FRAG):
            open_part = part_type(h.task_id)
    memset(&view[0], 0, _HOLD_HEADER + cap)
    for item in put_back:
        _count_resent(<bytes>(<tuple>item)[1])
    return put_back, running, ran, gone, open_part


cdef void _count_resent(bytes text) noexcept:
    # Each frame of a message put back is sent again: its header counts it (saturating), so
    # the task sees its attempt. The bytes were made above and are not shared yet.
    cdef char *p = PyBytes_AS_STRING(text)
    cdef size_t n = <size_t>PyBytes_GET_SIZE(text), off = 0
    cdef FrameHeader h
    while off < n and check_header(p + off, n - off, &h) == NULL:
        if h.resent < 255:
            (<FrameHeader *>(p + off)).resent = h.resent + 1
        off += _HEADER_SIZE + h.body_len


def is_last_part(text):
    """Whether a message's last frame ends a fragmented body."""
    cdef const unsigned char[::1] view = text
    cdef size_t n = view.shape[0], off = 0
    cdef FrameHeader h
    cdef bint last = False
    while off < n and check_header(<const char *>&view[off], n - off, &h) == NULL:
        last = (h.flags & _FLAG_FRAG_LAST) != 0
        off += _HEADER_SIZE + h.body_len
    return last


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
