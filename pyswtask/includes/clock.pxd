# The one clock the loops read for deadlines and spins: CLOCK_MONOTONIC in seconds, with no
# Python call (time.monotonic would cost one per check).

from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9
