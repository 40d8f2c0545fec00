# POSIX threads' mutexes: the queue reader's ring buffer (a plain mutex between two threads) and
# the cron tables' header (process-shared and robust, in shared memory).

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    enum:
        PTHREAD_PROCESS_SHARED
        PTHREAD_MUTEX_ROBUST
    int pthread_mutexattr_init(pthread_mutexattr_t *attr)
    int pthread_mutexattr_setpshared(pthread_mutexattr_t *attr, int pshared)
    int pthread_mutexattr_setrobust(pthread_mutexattr_t *attr, int robust)
    int pthread_mutex_init(pthread_mutex_t *m, const pthread_mutexattr_t *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_mutex_consistent(pthread_mutex_t *m)

# What pthread_mutex_lock returns when the holder of a robust mutex died holding it.
cdef extern from "<errno.h>" nogil:
    enum:
        EOWNERDEAD
