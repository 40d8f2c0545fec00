# SysV message queues: the server's queue, read by the task workers' reader threads and written
# by workers (task_ipc_mode 2 and 3) and by separate programs. Removal is reported as EIDRM or
# EINVAL (libc.errno).

cdef extern from "<sys/msg.h>" nogil:
    enum:
        IPC_NOWAIT
    int msgsnd(int msqid, const void *msgp, size_t msgsz, int msgflg)
    ssize_t msgrcv(int msqid, void *msgp, size_t msgsz, long msgtyp, int msgflg)
