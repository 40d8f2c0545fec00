# Declarations of core/reply.pyx: a command's reassembler of its reply datagrams.


cdef class ReplyAssembler(RecordReader):
    cdef Channel chan               # where fragments are reassembled; its body_max bounds them
    cdef list results               # filled by on_frame during feed()
