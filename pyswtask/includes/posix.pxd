# The POSIX calls the core needs that Cython's own posix/*.pxd do not declare: sockets, poll(2),
# strnlen, and Linux's recvmmsg. (close, read, write, usleep, clock_gettime and timeval come from posix.unistd and
# posix.time, cimported where used.) On Linux EWOULDBLOCK is EAGAIN, so only EAGAIN is checked.

cdef extern from "<sys/socket.h>" nogil:
    enum:
        SOL_SOCKET
        SO_RCVTIMEO
        MSG_DONTWAIT
        MSG_NOSIGNAL
        MSG_TRUNC
        AF_UNIX
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t sendto(int fd, const void *buf, size_t n, int flags, const void *addr,
                   unsigned int addrlen)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int setsockopt(int fd, int level, int name, const void *val, unsigned int n)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int recvmmsg(int fd, mmsghdr *vec, unsigned int vlen, int flags, void *timeout)

cdef extern from "<sys/un.h>" nogil:
    struct sockaddr_un:
        unsigned short sun_family
        char sun_path[108]

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    enum:
        POLLIN
        POLLOUT
    int poll(pollfd *fds, unsigned long nfds, int timeout)

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from "<string.h>" nogil:
    size_t strnlen(const char *s, size_t maxlen)
