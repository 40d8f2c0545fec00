# Declarations of core/pack.pyx: the msgpack encoder that writes task envelopes and results
# straight into the memory they are sent from.

cdef enum:
    # Deeper values are left to msgpack (its own limit, 512, and its error), which also keeps
    # the C recursion here short.
    _MP_PACK_DEPTH_MAX = 64


cdef Py_ssize_t mp_packed_size(object o) except -2
cdef char *mp_pack_into(char *p, object o) noexcept
cdef bytes mp_packb(object o)
cdef bytes mp_packb_sized(object o, Py_ssize_t n)
