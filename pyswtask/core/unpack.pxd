# Declarations of core/unpack.pyx: the msgpack decoder the core reads bodies with.

cdef enum:
    # msgpack's own unpacker holds at most 1024 open arrays and maps (its stack): the same bound
    # here keeps every input that decodes there decoding here, and caps the C recursion.
    _MP_DEPTH_MAX = 1024


ctypedef struct MpReader:
    const unsigned char *base       # for the offsets in error messages
    const unsigned char *p          # the next byte to read
    const unsigned char *end


cdef object mp_unpack(const char *p, Py_ssize_t n)
cdef tuple mp_unpack_envelope(const char *p, Py_ssize_t n)
