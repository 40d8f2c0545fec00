# Pipe messages between any two processes of a server: an inbox per process, a queue per
# destination. Message bodies are opaque here; the facade packs [type, data] into them.
# Declarations in mailbox.pxd.

from libc.errno cimport EINTR, errno

from .includes.clock cimport monotonic
from .includes.posix cimport POLLIN, POLLOUT, poll, pollfd
from .includes.python cimport (PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE,
                               PyErr_CheckSignals)

cdef class Mailbox(RecordReader):
    """This process's inbox and its send queues to every inbox of the server.

    A message reassembled past max_body (package_max_length; 0: no limit) is dropped.
    A message id is made like a task id (this process's epoch in the high 32 bits), so that the
    fragments of a large message are reassembled per message even when several processes write
    to the same inbox at once.
    """

    def __init__(self, int self_id, int inbox_fd, out_fds, *, uint64_t epoch, on_protocol_error,
                 size_t max_body=0):
        self.self_id = self_id
        self.who = f"inbox of process {self_id}"
        self.inbox = Channel(inbox_fd, self_id)
        self.inbox.body_max = max_body
        self.outs = [Channel(fd, i) for i, fd in enumerate(out_fds)]
        self.epoch = epoch & 0xFFFFFFFF
        self.on_protocol_error = on_protocol_error

    def fileno(self):
        """The inbox descriptor: readable when a message is waiting."""
        return self.inbox.fd

    @property
    def size(self):
        """How many inboxes (processes) there are to send to."""
        return len(self.outs)

    cdef Channel _out(self, int dst):
        if not 0 <= dst < len(self.outs):
            raise ValueError(f"dst_worker_id {dst} is out of range: there are {len(self.outs)} "
                             f"processes (0..{len(self.outs) - 1})")
        return <Channel>self.outs[dst]

    cdef int _put(self, Channel ch, bytes body) except -1:
        self.counter += 1
        return ch.put(_FRAME_PIPE, 0, (self.epoch << 32) | self.counter, self.self_id,
                      PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))

    def send(self, int dst, bytes body, double timeout=-1.0):
        """Queues one message to process dst and sends what the inbox takes.

        timeout < 0: never block; returns False while part of the queue is left (send the rest
        with flush() when out_fileno(dst) is writable). timeout >= 0: blocks until the message
        is written; raises TimeoutError after timeout seconds, taking the message back if none
        of it had left (a message larger than one record may have gone out in part)."""
        cdef Channel ch = self._out(dst)
        cdef size_t before = ch.queued()
        self._put(ch, body)
        ch.flush()
        if not ch.queued():
            return True
        if timeout < 0:
            return False
        self._drain_to(ch, 0, ch.queued() - before, timeout)
        return True

    def send_behind(self, int dst, bytes body, size_t high_water=1 << 20, bint at_once=True,
                    double timeout=-1.0):
        """Queues one message and sends what the inbox takes now, without waiting for the rest;
        returns the bytes left queued for dst, which flush() sends later. at_once=False sends
        only once a whole record is queued: the caller holds the message to go out with the
        ones that follow it. Blocks only while more than high_water bytes wait, so a sender
        cannot outrun its reader without bound: timeout >= 0 bounds that wait, then raises
        TimeoutError as send() does (the message taken back if none of it left)."""
        cdef Channel ch = self._out(dst)
        cdef size_t before = ch.queued()
        self._put(ch, body)
        if at_once or ch.queued() >= _RECORD_MAX:
            ch.flush()
        if ch.queued() > high_water:
            self._drain_to(ch, high_water, ch.queued() - before, timeout)
        return ch.queued()

    cdef int _drain_to(self, Channel ch, size_t upto, size_t length, double timeout) except -1:
        """Sends as the inbox drains until at most upto bytes are left queued. timeout >= 0
        bounds the wait: then TimeoutError, and the last message queued (length bytes) taken
        back if none of it left."""
        cdef double deadline = monotonic() + timeout, left = 0.1
        cdef pollfd pfd
        cdef int r
        while ch.queued() > upto:
            if timeout >= 0:
                left = deadline - monotonic()
                if left <= 0:
                    self._timed_out(ch, length, timeout)
            pfd.fd = ch.fd
            pfd.events = POLLOUT
            with nogil:
                r = poll(&pfd, 1, <int>(min(left, 0.1) * 1000.0) + 1)
            if r < 0 and errno == EINTR:
                PyErr_CheckSignals()
            ch.flush()
        return 0

    cdef int _timed_out(self, Channel ch, size_t length, double timeout) except -1:
        if ch.queued() >= length:
            ch.out.end -= length        # none of it left: take it back whole
            raise TimeoutError(f"pipe message to process {ch.peer} not sent within "
                               f"{timeout} s: its inbox is full")
        raise TimeoutError(f"pipe message to process {ch.peer} only partly sent within "
                           f"{timeout} s; the rest goes with the next send or flush")

    def wait_writable(self, dsts, double timeout):
        """Waits until one of the inboxes dsts has room, or timeout seconds pass."""
        cdef pollfd pfds[64]
        cdef int n = 0, r
        for dst in dsts[:64]:
            pfds[n].fd = (<Channel>self.outs[dst]).fd
            pfds[n].events = POLLOUT
            n += 1
        with nogil:
            r = poll(pfds, n, <int>(timeout * 1000.0))
        if r < 0 and errno == EINTR:
            PyErr_CheckSignals()

    def out_fileno(self, int dst):
        return (<Channel>self.outs[dst]).fd

    def flush(self):
        """Sends what is queued to every inbox as far as they take it; returns the
        destinations still holding queued bytes."""
        cdef Channel ch
        cdef list left = []
        for ch in self.outs:
            if ch.queued():
                ch.flush()
                if ch.queued():
                    left.append(ch.peer)
        return left

    def wait(self, double timeout):
        """Waits until a message is waiting (True) or timeout seconds pass (False); a negative
        timeout waits for ever."""
        cdef pollfd pfd
        cdef int r
        cdef int ms = -1 if timeout < 0 else <int>(timeout * 1000.0)
        pfd.fd = self.inbox.fd
        pfd.events = POLLIN
        with nogil:
            r = poll(&pfd, 1, ms)
        if r < 0:
            if errno == EINTR:
                PyErr_CheckSignals()
                return False
            raise OSError(errno, "poll failed")
        return r > 0

    cdef int on_frame(self, Channel ch, FrameHeader *h, const char *body, size_t n) except -1:
        self.received.append((h.src_worker, h.task_id, PyBytes_FromStringAndSize(body, n)))
        return 0

    def receive(self):
        """The messages waiting now, as (src, message id, body) tuples; never blocks."""
        cdef int got, k, i
        self.received = []
        for k in range(_READ_BUDGET // 2):
            got = self.recv_two(self.inbox.fd)
            for i in range(got):
                self.read_record(self.inbox, self.records[i], self.record_len[i], _FRAME_PIPE)
            if got < 2:
                break
        out, self.received = self.received, None
        return out
