# A separate program's reply socket: the results of its CO tasks, written by a task worker and
# reassembled by the program. Nothing else speaks this format; the frames are the channels'.
#
# Each datagram is one record of whole frames, as on a channel: a result whose body fits one
# record is one RESULT (or ERROR) frame; a larger one is fragmented exactly as Channel.put does
# (FRAG_FIRST|FRAG_MORE, FRAG_MORE..., FRAG_LAST), one fragment per datagram. The reader drops,
# and reports, a fragment whose start it never saw and a body that grows past its max_body.
#
# Declarations in reply.pxd.

from libc.errno cimport EAGAIN, ECONNREFUSED, EINTR, ENOENT, errno
from libc.stdint cimport uint16_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport free
from libc.string cimport memcpy

from .includes.clock cimport monotonic
from .includes.posix cimport (AF_UNIX, MSG_DONTWAIT, MSG_TRUNC, POLLIN, poll, pollfd, recv,
                              sched_yield, sendto, sockaddr_un)
from .includes.python cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE


def reply_records(uint64_t task_id, bint ok, int src_worker, bytes body):
    """The datagrams that carry one result (ok) or error body to a command's reply socket."""
    cdef Channel ch = Channel(-1, -1)
    cdef list records = []
    cdef size_t n
    ch.put(_FRAME_RESULT if ok else _FRAME_ERROR, 0, task_id, <uint16_t>src_worker,
           PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))
    while ch.out.start < ch.out.end:
        n = ch.record_size()
        records.append(PyBytes_FromStringAndSize(ch.out.data + ch.out.start, n))
        ch.out.start += n
    return records


cdef class ReplyAssembler(RecordReader):
    """A command's reader of its reply socket: fed the datagrams as they come, it returns each
    whole result as (task id, ok, value), value being the unpacked body (on an error, the
    ``[exception type, message, traceback text]`` list). A bad record, and a body above
    max_body (package_max_length; 0: no limit), are dropped and reported to on_protocol_error."""
    def __init__(self, *, on_protocol_error, size_t max_body=0):
        self.who = "reply socket"
        self.on_protocol_error = on_protocol_error
        self.chan = Channel(-1, -1)
        self.chan.body_max = max_body

    def feed(self, record):
        """The results that the datagram record completes, in order."""
        cdef const unsigned char[::1] view = record
        cdef size_t n = view.shape[0]
        return self._feed(<const char *>&view[0] if n else NULL, n)

    def receive(self, int fd, double spin, double wait):
        """The results that the next datagram on the socket fd completes, as feed() returns
        them, or None when none came: polled without sleeping for up to spin seconds, then
        waited for up to wait seconds more. A signal ends the wait early (its handler runs;
        None). Receives into this assembler's own buffer: no bytes object per datagram. The
        poll yields the CPU between reads, so that a task worker woken onto this CPU answers
        at once rather than after the spin."""
        cdef ssize_t n
        cdef int err, r
        cdef double until
        cdef pollfd pfd
        with nogil:
            # MSG_TRUNC: the datagram's whole length, so that one too long is seen as such.
            n = recv(fd, self.scratch, _RECORD_MAX, MSG_DONTWAIT | MSG_TRUNC)
            err = errno if n < 0 else 0
            if err == EAGAIN and spin > 0:
                until = monotonic() + spin
                while err == EAGAIN and monotonic() < until:
                    sched_yield()
                    n = recv(fd, self.scratch, _RECORD_MAX, MSG_DONTWAIT | MSG_TRUNC)
                    err = errno if n < 0 else 0
            if err == EAGAIN and wait > 0:
                pfd.fd = fd
                pfd.events = POLLIN
                # At most a day per call (the caller waits again for what is left): an int of
                # milliseconds holds about 24 days.
                r = poll(&pfd, 1, <int>(min(wait, 86400.0) * 1000.0) + 1)
                if r > 0:
                    n = recv(fd, self.scratch, _RECORD_MAX, MSG_DONTWAIT | MSG_TRUNC)
                    err = errno if n < 0 else 0
                elif r < 0:
                    err = errno
        if err == EINTR:
            PyErr_CheckSignals()
            return None
        if err == EAGAIN:
            return None
        if err:
            raise OSError(err, "recv on the reply socket failed")
        return self._feed(self.scratch, <size_t>n)

    cdef list _feed(self, const char *record, size_t n):
        cdef list out
        if n > _RECORD_MAX:
            self.bad_records += 1
            self.on_protocol_error(f"{self.who}: a datagram of {n} bytes, longer than a record, "
                                   "dropped")
            return []
        self.results = []
        try:
            if n:
                self.read_record(self.chan, record, n, _FRAME_RESULT)
            out = self.results
        finally:
            self.results = None
        return out

    cdef int on_frame(self, Channel ch, FrameHeader *h, const char *body, size_t n) except -1:
        cdef bint ok = h.type == _FRAME_RESULT
        if not ok and h.type != _FRAME_ERROR:
            return 0
        if self.chan.body_max and n > self.chan.body_max:
            # Only a one-frame body gets here: reassembly drops longer ones as they grow.
            self.on_protocol_error(f"{self.who}: the body of task {h.task_id} is {n} bytes, "
                                   f"above package_max_length ({self.chan.body_max} bytes): "
                                   "dropped")
            return 0
        try:
            value = unpackb(body, n)
        except Exception as exc:
            ok = False
            value = ["ProtocolError", f"task result is not valid msgpack: {exc}", ""]
        self.results.append((h.task_id, ok, value))
        return 0


cdef class ReplyWriter:
    """A task worker's end of the reply sockets: sends each CO result of a separate program to
    that program's socket, the abstract address prefix + its pid (the task id's high 32 bits).
    sock: a blocking AF_UNIX datagram socket, kept open as long as this writer (its
    SO_SNDTIMEO bounds a send to a program that does not read). on_dropped(task_id, gone)
    hears of a result not delivered: gone when the program has no socket any more, else its
    socket stayed full."""

    def __init__(self, sock, bytes prefix, int worker_id, on_dropped):
        if not 0 < len(prefix) < 80:
            raise ValueError(f"a reply address prefix of {len(prefix)} bytes")
        self.sock = sock
        self.fd = sock.fileno()
        self.worker_id = <uint16_t>worker_id
        self.on_dropped = on_dropped
        self.chan = Channel(-1, -1)
        self.addr.sun_family = AF_UNIX
        memcpy(self.addr.sun_path, PyBytes_AS_STRING(prefix), len(prefix))
        self.prefix_len = len(prefix)
        self.pid = -1

    def send(self, uint64_t task_id, bint ok, bytes body):
        """Sends one result (ok) or error body, in as many datagrams as reply_records makes."""
        cdef long pid = <long>(task_id >> 32)
        cdef ssize_t r = 0
        cdef size_t n
        cdef int err = 0
        cdef Channel ch = self.chan
        if pid != self.pid:
            n = <size_t>snprintf(self.addr.sun_path + self.prefix_len,
                                 sizeof(self.addr.sun_path) - self.prefix_len, "%ld", pid)
            # An abstract address is as long as its bytes, with no terminating NUL.
            self.addr_len = <unsigned int>(sizeof(self.addr.sun_family) + self.prefix_len + n)
            self.pid = pid
        ch.put(_FRAME_RESULT if ok else _FRAME_ERROR, 0, task_id, self.worker_id,
               PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))
        while ch.out.start < ch.out.end:
            n = ch.record_size()
            with nogil:
                r = sendto(self.fd, ch.out.data + ch.out.start, n, 0, &self.addr, self.addr_len)
            if r < 0:
                err = errno
                if err == EINTR:
                    PyErr_CheckSignals()
                    continue
                ch.out.start = ch.out.end        # the rest of a body is of no use alone
                self._shrink()
                if err == ECONNREFUSED or err == ENOENT:
                    self.on_dropped(task_id, True)
                elif err == EAGAIN:
                    self.on_dropped(task_id, False)
                else:
                    raise OSError(err, f"send of the result of task {task_id} failed")
                return
            ch.out.start += n
        self._shrink()

    cdef void _shrink(self) noexcept:
        # A large result's fragments grew the buffer: let it go, so that one big answer does not
        # hold its size for the task worker's life.
        cdef Channel ch = self.chan
        if ch.out.cap > (<size_t>_RECORD_MAX) * 4:
            free(ch.out.data)
            ch.out.data = NULL
            ch.out.cap = ch.out.start = ch.out.end = 0
