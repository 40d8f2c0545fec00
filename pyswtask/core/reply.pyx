# A separate program's reply socket: the results of its CO tasks, written by a task worker and
# reassembled by the program. Nothing else speaks this format; the frames are the channels'.
#
# Each datagram is one record of whole frames, as on a channel: a result whose body fits one
# record is one RESULT (or ERROR) frame; a larger one is fragmented exactly as Channel.put does
# (FRAG_FIRST|FRAG_MORE, FRAG_MORE..., FRAG_LAST), one fragment per datagram. The reader drops,
# and reports, a fragment whose start it never saw and a body that grows past its max_body.
#
# Declarations in reply.pxd.

from libc.stdint cimport uint16_t, uint64_t

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
        cdef list out
        if n > _RECORD_MAX:
            self.bad_records += 1
            self.on_protocol_error(f"{self.who}: a datagram of {n} bytes, longer than a record, "
                                   "dropped")
            return []
        self.results = []
        try:
            if n:
                self.read_record(self.chan, <const char *>&view[0], n, _FRAME_RESULT)
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
