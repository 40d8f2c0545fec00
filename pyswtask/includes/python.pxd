# The CPython calls the core makes directly. Declared here rather than cimported from
# cpython.bytes, whose PyBytes_FromStringAndSize takes a non-const char * and so refuses the
# const buffers the core reads from.

cdef extern from "Python.h":
    int PyErr_CheckSignals() except -1
    bytes PyBytes_FromStringAndSize(const char *v, Py_ssize_t n)
    char *PyBytes_AS_STRING(object o)
    Py_ssize_t PyBytes_GET_SIZE(object o)
    # What core/unpack.pyx builds values with. The *_SET_ITEM macros steal a reference to the
    # item: the caller increfs it first.
    ctypedef struct PyObject
    void Py_INCREF(object o)
    void Py_DECREF(object o)
    object PyUnicode_DecodeUTF8(const char *s, Py_ssize_t size, const char *errors)
    object PyUnicode_New(Py_ssize_t size, unsigned int maxchar)
    void *PyUnicode_DATA(object o)
    void PyUnicode_InternInPlace(PyObject **p)
    object PyLong_FromLong(long v)
    object PyLong_FromLongLong(long long v)
    object PyLong_FromUnsignedLongLong(unsigned long long v)
    object PyFloat_FromDouble(double v)
    list PyList_New(Py_ssize_t n)
    void PyList_SET_ITEM(object l, Py_ssize_t i, object o)
    tuple PyTuple_New(Py_ssize_t n)
    void PyTuple_SET_ITEM(object t, Py_ssize_t i, object o)
    Py_ssize_t PyTuple_GET_SIZE(object t)
    tuple PyTuple_GetSlice(object t, Py_ssize_t low, Py_ssize_t high)
    dict PyDict_New()
    int PyDict_SetItem(object d, object k, object v) except -1
