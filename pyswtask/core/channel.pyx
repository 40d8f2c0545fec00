# One end of a worker <-> task worker channel: an outgoing frame queue sent as whole records,
# and the reassembly of bodies that were too large for one record; and RecordReader, which
# walks received records for the loops. Declarations in channel.pxd.

from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove, memset

from .includes.epoll cimport (EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD, EPOLLIN, EPOLLOUT, epoll_ctl,
                              epoll_event)
from .includes.posix cimport (MSG_DONTWAIT, MSG_NOSIGNAL, SO_RCVTIMEO, SOL_SOCKET, recv, recvmmsg,
                              send, setsockopt)
from .includes.python cimport (PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE,
                               PyErr_CheckSignals)
from posix.time cimport timeval


cdef int add_readable(int epfd, int fd, uint32_t tag, str what) except -1:
    """Adds fd to epfd for reading, tagged in data.u32 (data.u64 otherwise 0): a loop tells
    its own descriptors from its channels' (tagged with their peer) by the tag."""
    cdef epoll_event ev
    ev.events = EPOLLIN
    ev.data.u64 = 0
    ev.data.u32 = tag
    if epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
        raise OSError(errno, "epoll_ctl failed on " + what)
    return 0


cdef class _Partial:
    pass


cdef class Channel:
    def __cinit__(self, int fd, int peer, *args):
        self.fd = fd
        self.peer = peer
        self.frag_max = _FRAG_BODY_MAX
        self.out.data = NULL
        self.out.start = self.out.end = self.out.cap = 0
        self.mask = 0
        self.rcvtimeo_ms = 0
        self.frags = {}

    def __dealloc__(self):
        free(self.out.data)

    cdef inline size_t queued(self) noexcept:
        return self.out.end - self.out.start

    cdef char *reserve(self, size_t n) except NULL:
        cdef size_t cap
        cdef char *data
        if self.out.start == self.out.end:
            self.out.start = self.out.end = 0
        if self.out.end + n > self.out.cap:
            if self.out.start:
                memmove(self.out.data, self.out.data + self.out.start,
                        self.out.end - self.out.start)
                self.out.end -= self.out.start
                self.out.start = 0
            if self.out.end + n > self.out.cap:
                cap = self.out.cap * 2 if self.out.cap else 16384
                while cap < self.out.end + n:
                    cap *= 2
                data = <char *>realloc(self.out.data, cap)
                if data == NULL:
                    raise MemoryError()
                self.out.data = data
                self.out.cap = cap
        data = self.out.data + self.out.end
        self.out.end += n
        return data

    cdef char *put_arena_space(self, uint8_t ftype, uint8_t flags, uint64_t task_id,
                               uint16_t src, size_t n, uint8_t resent=0) except? NULL:
        """Queues a reference frame to a new arena block of n bytes, which the caller writes at
        the pointer returned; NULL when the body is too small for the arena or the arena has
        no room for it (nothing is queued then)."""
        cdef char *p
        cdef int64_t pos
        self.spilled = 0
        if n < _ARENA_MIN_BODY or self.tx_arena is None or n > 0xFFFFFFFF:
            return NULL
        pos = self.tx_arena.reserve(n)
        if pos < 0:
            self.arena_full += 1
            return NULL
        p = self.reserve(_HEADER_SIZE + _ARENA_REF_SIZE)
        write_header(p, ftype, flags | _FLAG_ARENA, task_id, src, _ARENA_REF_SIZE, resent)
        write_ref(p + _HEADER_SIZE, <uint64_t>pos, <uint32_t>n)
        self.spilled = arena_end(<uint64_t>pos, n)
        self.spilled_at = <uint64_t>pos
        self.arena_sent += 1
        return self.tx_arena.ring + <uint64_t>pos % self.tx_arena.capacity

    cdef char *put_space(self, uint8_t ftype, uint8_t flags, uint64_t task_id, uint16_t src,
                         size_t n, uint8_t resent=0) except? NULL:
        """Queues one frame whose body of n bytes the caller writes at the pointer returned:
        its arena block (the body goes into shared memory, a reference to it on the socket) or
        its place in the queue. Without room in the arena, a large body goes through the socket
        as any body does: never a wait. NULL when it needs fragments (it exceeds one record):
        then put() it."""
        cdef char *p = self.put_arena_space(ftype, flags, task_id, src, n, resent)
        if p != NULL:
            return p
        if n <= self.frag_max:
            p = self.reserve(_HEADER_SIZE + n)
            write_header(p, ftype, flags, task_id, src, <uint32_t>n, resent)
            return p + _HEADER_SIZE
        return NULL

    cdef int put(self, uint8_t ftype, uint8_t flags, uint64_t task_id, uint16_t src,
                 const char *body, size_t n, uint8_t resent=0) except -1:
        """Queues one frame, split into fragments when its body exceeds one record."""
        cdef char *p = self.put_space(ftype, flags, task_id, src, n, resent)
        if p != NULL:
            if n:
                memcpy(p, body, n)
            return 0
        return self.put_fragments(ftype, flags, task_id, src, body, n, resent)

    cdef int put_fragments(self, uint8_t ftype, uint8_t flags, uint64_t task_id, uint16_t src,
                           const char *body, size_t n, uint8_t resent=0) except -1:
        """Queues one frame as fragments, for a body larger than one record."""
        cdef char *p
        cdef size_t off = 0, chunk
        cdef uint8_t fl = _FLAG_FRAG_FIRST
        while off < n:
            chunk = n - off
            if chunk > self.frag_max:
                chunk = self.frag_max
            fl |= _FLAG_FRAG_MORE if off + chunk < n else _FLAG_FRAG_LAST
            p = self.reserve(_HEADER_SIZE + chunk)
            write_header(p, ftype, flags | fl, task_id, src, <uint32_t>chunk, resent)
            memcpy(p + _HEADER_SIZE, body + off, chunk)
            off += chunk
            fl = 0
        return 0

    cdef size_t record_size(self) noexcept:
        """The length of the next record to send: as many whole queued frames as fit one."""
        cdef FrameHeader h
        cdef size_t off = self.out.start, total = 0, fsize
        while off < self.out.end:
            memcpy(&h, self.out.data + off, _HEADER_SIZE)
            fsize = _HEADER_SIZE + h.body_len
            if total and total + fsize > _RECORD_MAX:
                break
            total += fsize
            off += fsize
        return total

    cdef int flush(self) except -1:
        """Sends queued frames, as many whole frames per record as fit, until the queue is empty
        (returns 1) or the socket is full (returns 0; the rest stays queued)."""
        cdef size_t total
        cdef ssize_t r
        while self.out.start < self.out.end:
            total = self.record_size()
            r = send(self.fd, self.out.data + self.out.start, total, MSG_DONTWAIT | MSG_NOSIGNAL)
            if r < 0:
                if errno == EAGAIN:
                    return 0
                if errno == EINTR:
                    continue
                raise OSError(errno, f"send to channel {self.peer} failed")
            # SOCK_SEQPACKET sends a record whole or not at all.
            self.out.start += total
        self.out.start = self.out.end = 0
        return 1

    cdef int update_interest(self, int epfd, size_t high_water) except -1:
        """Registers EPOLLOUT while frames are queued, and stops reading from a peer whose
        replies we cannot send (so a slow reader throttles its writer instead of growing us)."""
        cdef uint32_t mask = 0
        cdef epoll_event ev
        cdef size_t q = self.queued()
        if q < high_water:
            mask |= EPOLLIN
        if q:
            mask |= EPOLLOUT
        if mask != self.mask:
            ev.events = mask
            ev.data.u64 = 0
            ev.data.u32 = <uint32_t>self.peer
            # No interest at all: out of the set, so that mask 0 always means "not in it" and
            # interest that comes back is added again.
            if epoll_ctl(epfd, EPOLL_CTL_DEL if not mask else
                         EPOLL_CTL_MOD if self.mask else EPOLL_CTL_ADD, self.fd, &ev) < 0:
                raise OSError(errno, "epoll_ctl failed")
            self.mask = mask
        return 0

    cdef object assemble(self, FrameHeader *h, const char *p, int *status):
        """Adds a fragment; returns the whole body once its last fragment came, else None.
        status says what was dropped: a body growing past body_max, or a stray fragment (its
        start never came); the rest of such a body is skipped without a word."""
        cdef _Partial part
        cdef object found
        status[0] = _ASM_KEPT
        if h.flags & _FLAG_FRAG_FIRST:
            part = self._start(h, True)
            if self.body_max and h.body_len > self.body_max:
                status[0] = _ASM_TOO_LONG
            else:
                part.buf = bytearray(PyBytes_FromStringAndSize(p, h.body_len))
        else:
            found = self.frags.get(h.task_id)
            if found is None:
                # Its start went to a process that has since died, or never existed.
                status[0] = _ASM_STRAY
                part = self._start(h, False)
            else:
                part = <_Partial>found
                if part.buf is not None:
                    part.buf += PyBytes_FromStringAndSize(p, h.body_len)
                    if self.body_max and <size_t>len(part.buf) > self.body_max:
                        part.buf = None
                        status[0] = _ASM_TOO_LONG
        if not h.flags & _FLAG_FRAG_LAST:
            return None
        del self.frags[h.task_id]
        return None if part.buf is None else bytes(part.buf)

    cdef _Partial _start(self, FrameHeader *h, bint first):
        # A sender queues a body's fragments together (put), so they come one body at a time
        # per sender: a new start from it means the rest of its earlier body will never come
        # (it died). Dropping that one bounds what is held to one body per sender (and one
        # skipped one: a stray only replaces the sender's earlier skipped body, never a live one).
        cdef _Partial part
        cdef list stale = []
        for key, value in self.frags.items():
            part = <_Partial>value
            if part.src == h.src_worker and (first or part.buf is None):
                stale.append(key)
        for key in stale:
            del self.frags[key]
        part = _Partial.__new__(_Partial)
        part.src = h.src_worker
        self.frags[h.task_id] = part
        return part


cdef ssize_t recv_record_blocking(Channel ch, char *buf, double timeout) except? -2:
    """Waits up to timeout seconds for one record; -1 when none came. The socket is blocking
    at the file level (every other call passes MSG_DONTWAIT), so one recv both waits and reads:
    half the syscalls of epoll_wait + recv on the CO path."""
    cdef ssize_t r
    cdef timeval tv
    cdef int ms = <int>(timeout * 1000.0) + 1
    if ms != ch.rcvtimeo_ms:
        tv.tv_sec = ms // 1000
        tv.tv_usec = (ms % 1000) * 1000
        if setsockopt(ch.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0:
            raise OSError(errno, "setsockopt(SO_RCVTIMEO) failed")
        ch.rcvtimeo_ms = ms
    with nogil:
        r = recv(ch.fd, buf, _RECORD_MAX, 0)
    if r >= 0:
        return r
    if errno == EAGAIN:
        return -1
    if errno == EINTR:
        PyErr_CheckSignals()
        return -1
    raise OSError(errno, "recv from channel failed")


cdef size_t queued_bytes(list channels):
    """Bytes the channels still hold to send."""
    cdef Channel ch
    cdef size_t n = 0
    for ch in channels:
        n += ch.queued()
    return n


cdef bint any_queued(list channels):
    """Whether any of the channels still holds frames to send."""
    cdef Channel ch
    for ch in channels:
        if ch.queued():
            return True
    return False


cdef class RecordReader:
    """Walks received records frame by frame for its subclass (Dispatcher, TaskLoop, Mailbox,
    ReplyAssembler):
    checks each header, reassembles fragmented bodies, hands whole frames to on_frame, and drops
    the rest of a record at the first bad frame (records are atomic, so no alignment is lost)."""

    def __cinit__(self, *args, **kwargs):
        cdef int i
        self.scratch = <char *>malloc(_RECORD_MAX)
        self.records[1] = <char *>malloc(_RECORD_MAX)
        if self.scratch == NULL or self.records[1] == NULL:
            raise MemoryError()
        self.records[0] = self.scratch
        memset(self.msgs, 0, sizeof(self.msgs))
        for i in range(2):
            self.iov[i].iov_base = self.records[i]
            self.iov[i].iov_len = _RECORD_MAX
            self.msgs[i].msg_hdr.msg_iov = &self.iov[i]
            self.msgs[i].msg_hdr.msg_iovlen = 1

    def __dealloc__(self):
        free(self.scratch)
        free(self.records[1])

    cdef int on_frame(self, Channel ch, FrameHeader *h, const char *body, size_t n) except -1:
        return 0

    cdef int _dropped(self, Channel ch, FrameHeader *h, int status) except -1:
        if status == _ASM_TOO_LONG:
            self.on_protocol_error(f"{self.who}: the body of task {h.task_id} from "
                                   f"{h.src_worker} on channel {ch.peer} grows past "
                                   f"package_max_length ({ch.body_max} bytes): dropped")
        else:
            self.on_protocol_error(f"{self.who}: a fragment of task {h.task_id} from "
                                   f"{h.src_worker} on channel {ch.peer} whose start never "
                                   "came: dropped, with the rest of its body")
        return 0

    cdef int _from_arena(self, Channel ch, FrameHeader *h, const char *ref) except -1:
        """Resolves a reference frame: 1 with the body's place in self.arena / arena_end and its
        length in h.body_len, or 0 when it was dropped (reported)."""
        cdef uint64_t pos
        cdef uint32_t n
        cdef const char *why = NULL
        cdef const char *body
        if ch.rx_arena is None:
            why = "a reference to an arena this channel does not have"
        elif h.body_len != _ARENA_REF_SIZE or h.flags & _FLAGS_FRAG:
            why = "a malformed arena reference"
        else:
            read_ref(ref, &pos, &n)
            if ch.body_max and n > ch.body_max:
                self.on_protocol_error(f"{self.who}: the body of task {h.task_id} from "
                                       f"{h.src_worker} on channel {ch.peer} is {n} bytes, above "
                                       f"package_max_length ({ch.body_max} bytes): dropped")
                ch.rx_arena.consumed(arena_end(pos, n))
                return 0
            body = ch.rx_arena.block(pos, n)
            if body == NULL:
                why = "an arena reference outside what was written there"
            else:
                self.arena = ch.rx_arena
                self.arena_end = arena_end(pos, n)
                h.body_len = n
                self.arena_body = body
                return 1
        # One frame dropped, not the record: the frames after it are whole.
        self.on_protocol_error(f"{self.who}: task {h.task_id} from {h.src_worker} on channel "
                               f"{ch.peer} dropped: {why.decode()}")
        return 0

    cdef void release_arena(self) noexcept:
        """The body of the frame on_frame has now was read: its block may be reused."""
        if self.arena_end:
            self.arena.consumed(self.arena_end)
            self.arena_end = 0

    cdef int recv_two(self, int fd) except -1:
        """Up to two records from fd in one recvmmsg, into records[0..1] (record_len):
        how many (0: none waiting). One syscall reads a lone record and learns that none
        follows, where recv would spend a second one finding the socket empty; a lone record
        per wake-up is the usual case of a busy worker. An empty record ends the count (a
        closed peer cannot happen while the master holds both ends)."""
        cdef int got, i
        while True:
            got = recvmmsg(fd, self.msgs, 2, MSG_DONTWAIT, NULL)
            if got >= 0:
                break
            if errno == EAGAIN:
                return 0
            if errno != EINTR:
                raise OSError(errno, "recvmmsg from channel failed")
        for i in range(got):
            self.record_len[i] = self.msgs[i].msg_len
            if self.record_len[i] == 0:
                return i
        return got

    cdef Py_ssize_t read_record(self, Channel ch, const char *record, size_t n,
                                uint8_t accepted) except -1:
        """accepted: the frame type this end takes (RESULT also takes ERROR and LOST). Returns
        the offset of the first frame left unread: n, unless on_frame returned 1 to stop."""
        cdef size_t off = 0
        cdef FrameHeader h
        cdef const char *why
        cdef const char *body
        cdef object whole
        cdef int status, stop
        while off < n:
            why = check_header(record + off, n - off, &h)
            if why == NULL and h.type != accepted and not (
                    accepted == _FRAME_RESULT and (h.type == _FRAME_ERROR or
                                                   h.type == _FRAME_LOST)):
                why = "a frame of a type this end does not take"
            if why != NULL:
                self.bad_records += 1
                self.on_protocol_error(f"{self.who}: record on channel {ch.peer} dropped at "
                                       f"offset {off}: {why.decode()}")
                return n
            body = record + off + _HEADER_SIZE
            off += _HEADER_SIZE + h.body_len
            if h.flags & _FLAG_ARENA:
                if not self._from_arena(ch, &h, body):
                    continue
                try:
                    stop = self.on_frame(ch, &h, self.arena_body, h.body_len)
                finally:
                    self.release_arena()
                if stop:
                    return off
            elif h.flags & _FLAGS_FRAG:
                whole = ch.assemble(&h, body, &status)
                if status != _ASM_KEPT:
                    self._dropped(ch, &h, status)
                if whole is not None and self.on_frame(ch, &h, PyBytes_AS_STRING(whole),
                                                       PyBytes_GET_SIZE(whole)):
                    return off
            elif self.on_frame(ch, &h, body, h.body_len):
                return off
        return n
