# Declarations of core/taskloop.pyx: the task worker's loop.

from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t

from .includes.epoll cimport epoll_event

# Buckets of the task-duration histogram: DURATION_BOUNDS finite upper bounds, then +Inf.
cdef enum:
    DURATION_BOUNDS = 16

# One task method's counters in a task worker's area of the stats segment (pyswtask.counters
# declares the same 256 bytes as its ROW dtype): written by that task worker only.
cdef struct TaskStatRow:
    char name[96]                   # "name.method", UTF-8, NUL-padded; written once
    int64_t ok
    int64_t failed
    double seconds                  # sum of run times
    int64_t buckets[DURATION_BOUNDS + 1]    # runs per bucket, not cumulative


cdef class TaskLoop(RecordReader):
    cdef int epfd
    cdef int stop_fd
    cdef list channels
    cdef unsigned char[:] busy
    cdef int index
    cdef uint16_t worker_id
    cdef object execute
    cdef object on_signal           # on_signal(bytes of signal numbers) -> True to stop
    cdef object on_inbox            # on_inbox(): reads this process's pipe messages
    cdef dict durations             # (name, method) -> moving average of run time, seconds
    cdef QueueReader reader         # the message queue's reader, or None
    cdef int queue_fd               # its wake descriptor (-1: it is direct, read here)
    cdef Channel qchan              # stands for the queue: where its fragments are reassembled
    cdef const char *qrec           # the queue record being run, in the reader's hold
    cdef size_t qlen
    cdef uint64_t qpos              # its position there
    cdef uint64_t qopen             # position of the record that opened a body not run yet
    cdef uint64_t qopen_task        # that body's task id, and its flags << 16 | worker
    cdef uint32_t qopen_sf
    cdef object on_reply            # on_reply(task_id, ok, body): results for commands
    cdef double queue_spin          # (direct) how long to poll the queue after answering a program
    cdef double last_reply          # monotonic time of the last answer to a program's CO task
    cdef bint spin_next             # poll until last_reply + queue_spin before msgrcv blocks
    cdef object on_stopping         # on_stopping(): tells the reader thread to finish
    cdef TaskWorkerStates state     # read by the master if this process dies, or None
    cdef readonly uint64_t max_tasks  # stop after this many tasks (0: never)
    cdef uint64_t limit             # max_tasks, until a stop for good lifts it
    cdef bint stop_in_record        # at the limit, hand the rest of a record over (state has room)
    cdef readonly uint64_t tasks_done
    cdef public size_t high_water
    cdef size_t body_max            # package_max_length (0: none): tasks and results above it
    cdef int64_t *stat_counts       # [run, failed, started from workers] in the stats segment
    cdef TaskStatRow *stat_rows     # this task worker's rows there
    cdef dict stat_index            # (name, method) -> its row
    cdef object stat_new_row        # stat_new_row(name, method) -> row for a method not seen yet
    cdef tuple stat_views           # the buffers the pointers above point into, kept alive
    # Between tasks: an asyncio loop run in slices (timers, coroutine tasks), when set.
    cdef object on_tick             # on_tick() -> seconds until it is due again (< 0: never)
    cdef int tick_fd                # readable when the slices have I/O to handle
    cdef double next_due            # monotonic time on_tick is due (0: not)
    cdef public bint tick_due       # set from Python: on_tick runs at the next turn
    # Between tasks: one more descriptor of the role's own (a cluster consumer's Redis socket).
    cdef object on_watch            # on_watch() -> seconds until it is due again (< 0: never)
    cdef int watch_fd
    cdef double watch_due           # monotonic time on_watch is due (0: not)
    cdef readonly Py_ssize_t pending  # tasks whose result comes later, through finish()
    cdef Py_ssize_t pending_max     # task_max_concurrency: the channels pause at it
    cdef bint paused
    cdef double run_avg             # moving average of every task's run time (< 0: none yet)
    cdef bint recycling             # reading nothing more from the channels: a successor will
    # The task running now, for Task.current(): its envelope (None between tasks), header, and
    # channel (-1: the queue, or none: a task the role took itself, whose source is -1).
    cdef object cur_envelope
    cdef double cur_uncounted       # what it waited on purpose (not_counted), not its run time
    cdef uint64_t cur_id
    cdef int cur_src
    cdef uint8_t cur_flags
    cdef uint32_t cur_attempt
    cdef int cur_peer
    cdef uint64_t cur_fpos          # its frame's hold position (from the queue)
    # Deferred tasks from the queue: frame hold position -> (its record's position, flags,
    # worker); their records stay held until they finish.
    cdef dict qdeferred
    cdef bint qfinished             # one of them finished since the hold was last released

    cdef int _read(self, Channel ch) except -1
    cdef int _serve(self, Channel ch, size_t n) except -1
    cdef int _take_over(self) except -1
    cdef int _read_queue(self) except -1
    cdef int _wait_direct(self, epoll_event *evs, int wait_ms) except? -2
    cdef int _spin_direct(self, double until) noexcept nogil
    cdef void _spin_after_reply(self) noexcept
    cdef int _track_open_body(self, const char *text, size_t n) except -1
    cdef int _release_queue(self) except -1
    cdef uint64_t _frame_pos(self, FrameHeader *h, const char *p) noexcept
    cdef int _run_task(self, Channel ch, FrameHeader *h, const char *p, size_t n) except -1
    cdef object _execute(self, object envelope, object key, uint64_t task_id, int src,
                         uint8_t flags, uint32_t attempt, int peer, double *seconds)
    cdef int _count(self, object key, bint ok, double seconds) except -1
    cdef int _reply(self, Channel ch, uint64_t task_id, uint8_t flags, uint16_t src, bint ok,
                    object value, object envelope) except -1
    cdef int _tick(self) except -1
    cdef int _watched(self) except -1
    cdef unsigned char _idle_flag(self) noexcept
    cdef unsigned char _running_flag(self) noexcept
    cdef int _pause(self, bint on) except -1
    cdef size_t _interest(self) noexcept
