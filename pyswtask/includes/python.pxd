# The CPython calls the core makes directly. Declared here rather than cimported from
# cpython.bytes, whose PyBytes_FromStringAndSize takes a non-const char * and so refuses the
# const buffers the core reads from.

cdef extern from "Python.h":
    int PyErr_CheckSignals() except -1
    bytes PyBytes_FromStringAndSize(const char *v, Py_ssize_t n)
    char *PyBytes_AS_STRING(object o)
    Py_ssize_t PyBytes_GET_SIZE(object o)
