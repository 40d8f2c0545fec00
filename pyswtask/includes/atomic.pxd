# GCC/Clang __atomic builtins for words in shared memory, which Cython cannot spell itself: the
# shared table's lock words and counters. Each is one instruction or a short CAS loop, inline.

from libc.stdint cimport int64_t, uint32_t, uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static inline int pyswt_cas32(uint32_t *w, uint32_t expected, uint32_t desired) {
        return __atomic_compare_exchange_n(w, &expected, desired, 0, __ATOMIC_ACQUIRE,
                                           __ATOMIC_RELAXED);
    }
    static inline uint32_t pyswt_load32(const uint32_t *w) {
        return __atomic_load_n(w, __ATOMIC_ACQUIRE);
    }
    static inline void pyswt_store32(uint32_t *w, uint32_t v) {
        __atomic_store_n(w, v, __ATOMIC_RELEASE);
    }
    static inline uint32_t pyswt_add32(uint32_t *w, int32_t v) {
        return __atomic_add_fetch(w, (uint32_t)v, __ATOMIC_RELAXED);
    }
    static inline uint64_t pyswt_add64(uint64_t *w, uint64_t v) {
        return __atomic_add_fetch(w, v, __ATOMIC_RELAXED);
    }
    static inline int64_t pyswt_addi64(int64_t *w, int64_t v) {
        /* Wraps like Swoole's incr on overflow instead of being undefined. */
        return (int64_t)__atomic_add_fetch((uint64_t *)w, (uint64_t)v, __ATOMIC_RELAXED);
    }
    static inline double pyswt_addf64(double *w, double v) {
        uint64_t old = __atomic_load_n((uint64_t *)w, __ATOMIC_RELAXED), new_;
        double d;
        do {
            memcpy(&d, &old, 8);
            d += v;
            memcpy(&new_, &d, 8);
        } while (!__atomic_compare_exchange_n((uint64_t *)w, &old, new_, 1, __ATOMIC_RELAXED,
                                              __ATOMIC_RELAXED));
        return d;
    }
    static inline void pyswt_pause(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #elif defined(__aarch64__)
        __asm__ __volatile__("yield");
    #endif
    }
    """
    bint pyswt_cas32(uint32_t *w, uint32_t expected, uint32_t desired) nogil
    uint32_t pyswt_load32(const uint32_t *w) nogil
    void pyswt_store32(uint32_t *w, uint32_t v) nogil
    uint32_t pyswt_add32(uint32_t *w, int v) nogil
    uint64_t pyswt_add64(uint64_t *w, uint64_t v) nogil
    int64_t pyswt_addi64(int64_t *w, int64_t v) nogil
    double pyswt_addf64(double *w, double v) nogil
    void pyswt_pause() nogil
