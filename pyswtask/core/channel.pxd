# Declarations of core/channel.pyx: one end of a channel (an outgoing frame queue and the
# reassembly of fragmented bodies) and the record reader the loops are built on.

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from libc.errno cimport errno, EAGAIN, EINTR

from .includes.posix cimport MSG_DONTWAIT, iovec, mmsghdr, recv

cdef enum:
    _EVENTS_MAX = 32
    # Records read from one channel per turn, so that one busy peer cannot starve the others.
    _READ_BUDGET = 64


cdef enum:
    # What Channel.assemble did with a fragment, besides keeping it.
    _ASM_KEPT = 0
    _ASM_STRAY = 1          # its body's start never came: dropped, with the rest of that body
    _ASM_TOO_LONG = 2       # its body grew past body_max: dropped, with the rest of it


@cython.final
cdef class _Partial:
    cdef uint16_t src               # the sender: one body at a time is reassembled per sender
    cdef object buf                 # bytearray; None while the rest of a dropped body is skipped


cdef struct Buf:
    char *data
    size_t start        # first byte not yet sent
    size_t end          # first free byte
    size_t cap


cdef class Channel:
    cdef readonly int fd
    cdef readonly int peer
    cdef Buf out
    cdef uint32_t mask          # the epoll events registered now
    cdef dict frags             # task id -> _Partial, bodies being reassembled
    cdef int rcvtimeo_ms        # SO_RCVTIMEO set now (0: none), for blocking waits
    cdef size_t frag_max        # largest body of one frame; larger ones are fragmented
    cdef size_t body_max        # largest body reassembled (package_max_length; 0: no limit)
    cdef Arena tx_arena         # large bodies sent on this end go here when it has room, or None
    cdef Arena rx_arena         # and those received come from here (None: refused)
    cdef uint64_t spilled       # end of the block the last put wrote into tx_arena (0: none)
    cdef uint64_t spilled_at    # and its position
    cdef readonly uint64_t arena_sent   # bodies sent by reference
    cdef readonly uint64_t arena_full   # bodies for the arena that went through the socket: no room

    cdef size_t queued(self) noexcept
    cdef char *reserve(self, size_t n) except NULL
    cdef char *put_arena_space(self, uint8_t ftype, uint8_t flags, uint64_t task_id,
                               uint16_t src, size_t n, uint8_t resent=*) except? NULL
    cdef char *put_space(self, uint8_t ftype, uint8_t flags, uint64_t task_id, uint16_t src,
                         size_t n, uint8_t resent=*) except? NULL
    cdef int put(self, uint8_t ftype, uint8_t flags, uint64_t task_id, uint16_t src,
                 const char *body, size_t n, uint8_t resent=*) except -1
    cdef int put_fragments(self, uint8_t ftype, uint8_t flags, uint64_t task_id, uint16_t src,
                           const char *body, size_t n, uint8_t resent=*) except -1
    cdef size_t record_size(self) noexcept
    cdef int flush(self) except -1
    cdef int update_interest(self, int epfd, size_t high_water) except -1
    cdef object assemble(self, FrameHeader *h, const char *p, int *status)
    cdef _Partial _start(self, FrameHeader *h, bint first)


cdef class RecordReader:
    cdef char *scratch              # one record, as received
    cdef char *records[2]           # recv_two's records: scratch, and a second buffer
    cdef size_t record_len[2]
    cdef iovec iov[2]
    cdef mmsghdr msgs[2]
    cdef object on_protocol_error   # on_protocol_error(message)
    cdef str who                    # names this end in those messages
    cdef readonly uint64_t bad_records
    cdef Arena arena                # the arena of the frame on_frame has now, if its body is there
    cdef uint64_t arena_end         # the end of that body's block (0: not in an arena)
    cdef const char *arena_body

    # on_frame returns 1 to leave the rest of the record unread (read_record returns where).
    cdef int on_frame(self, Channel ch, FrameHeader *h, const char *body, size_t n) except -1
    cdef int _dropped(self, Channel ch, FrameHeader *h, int status) except -1
    cdef int _from_arena(self, Channel ch, FrameHeader *h, const char *ref) except -1
    cdef void release_arena(self) noexcept
    cdef int recv_two(self, int fd) except -1
    cdef Py_ssize_t read_record(self, Channel ch, const char *record, size_t n,
                                uint8_t accepted) except -1


cdef inline void write_ref(char *p, uint64_t pos, uint32_t n) noexcept nogil:
    # A reference frame's body: where in the sender's arena the body lies, and its length.
    cdef uint32_t zero = 0
    memcpy(p, &pos, 8)
    memcpy(p + 8, &n, 4)
    memcpy(p + 12, &zero, 4)


cdef inline void read_ref(const char *p, uint64_t *pos, uint32_t *n) noexcept nogil:
    memcpy(pos, p, 8)
    memcpy(n, p + 8, 4)


cdef ssize_t recv_record_blocking(Channel ch, char *buf, double timeout) except? -2
cdef size_t queued_bytes(list channels)
cdef bint any_queued(list channels)


cdef inline ssize_t recv_record(int fd, char *buf) except? -2:
    # One record into buf (RECORD_MAX bytes); -1 when none is waiting.
    cdef ssize_t r
    while True:
        r = recv(fd, buf, _RECORD_MAX, MSG_DONTWAIT)
        if r >= 0:
            return r
        if errno == EAGAIN:
            return -1
        if errno != EINTR:
            raise OSError(errno, "recv from channel failed")
