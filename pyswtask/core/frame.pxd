# Declarations of core/frame.pyx: the frame header, its constants, and the packing helpers the
# other core files use. Layout diagram and limits: the docstring of _core.pyx.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef enum:
    _FRAME_MAGIC = 0x5753          # b"SW" read as a little-endian u16
    _FRAME_VERSION = 1
    _HEADER_SIZE = 20
    # One SOCK_SEQPACKET record at most. 64 KiB stays far below the default AF_UNIX send
    # buffer (about 208 KiB), so a record never fails with EMSGSIZE on an untuned kernel.
    _RECORD_MAX = 65536
    _FRAG_BODY_MAX = _RECORD_MAX - _HEADER_SIZE

    _FRAME_TASK = 1
    _FRAME_RESULT = 2
    _FRAME_ERROR = 3
    _FRAME_PIPE = 4
    _FRAME_LOST = 5
    _FRAME_TYPE_MAX = 5

    _FLAG_ASYNC = 0x01
    _FLAG_FRAG_FIRST = 0x02
    _FLAG_FRAG_MORE = 0x04
    _FLAG_FRAG_LAST = 0x08
    _FLAGS_FRAG = 0x0E
    _FLAG_COMMAND = 0x10
    _FLAG_ARENA = 0x20
    _FLAG_HELD_RUNNING = 0x40     # in a task worker's hold only: a deferred task not finished


cdef packed struct FrameHeader:
    uint16_t magic
    uint8_t version
    uint8_t type
    uint8_t flags
    uint8_t resent          # times sent again since its task worker died holding it unstarted
    uint16_t src_worker
    uint64_t task_id
    uint32_t body_len


cdef bytes packb(object value)
cdef object unpackb(const char *p, Py_ssize_t n)
cdef uint64_t last_task_id(const char *p, size_t n) noexcept nogil
cdef tuple unpack_envelope_c(const char *p, Py_ssize_t n)


cdef inline void write_header(char *dst, uint8_t ftype, uint8_t flags, uint64_t task_id,
                              uint16_t src, uint32_t body_len, uint8_t resent=0) noexcept nogil:
    cdef FrameHeader h
    h.magic = _FRAME_MAGIC
    h.version = _FRAME_VERSION
    h.type = ftype
    h.flags = flags
    h.resent = resent
    h.src_worker = src
    h.task_id = task_id
    h.body_len = body_len
    memcpy(dst, &h, _HEADER_SIZE)


cdef inline const char *check_header(const char *p, size_t avail, FrameHeader *h) noexcept nogil:
    # Reads the header at p into h; returns NULL when it is valid and complete, else why not.
    if avail < _HEADER_SIZE:
        return "truncated header"
    memcpy(h, p, _HEADER_SIZE)
    if h.magic != _FRAME_MAGIC:
        return "bad magic"
    if h.version != _FRAME_VERSION:
        return "unsupported frame version"
    if h.type == 0 or h.type > _FRAME_TYPE_MAX:
        return "unknown frame type"
    if <size_t>h.body_len > avail - _HEADER_SIZE:
        return "truncated body"
    return NULL
