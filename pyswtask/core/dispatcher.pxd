# Declarations of core/dispatcher.pyx: the worker's side of the channels, as two types: the
# table of tasks waiting for a result, and the I/O loop that sends tasks and reads results.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    # Bodies in a channel's arena not yet taken by its task worker, beyond which large ASYNC
    # tasks wait in the worker's backlog, unpacked when nothing in them can change (see
    # Dispatcher._submit): the task worker always has this much to run, and the ring's pages
    # in use stay few and warm, in the caches of the two processes that write and read them.
    # Measured with perf/bench_dispatch.py's ASYNC workload: 64 KiB tasks ran as fast with
    # 256 or 512 KiB, 0.9x with 1 MiB and 0.6x with 2 MiB; against 256 KiB, 512 KiB ran 16 KiB
    # tasks at 0.9x and 128-256 KiB ones at 1.1-1.2x. A body larger than the window goes
    # alone, also the fastest for 1 MiB ones (two or four at a time: 0.8x, 0.55x).
    _ARENA_WINDOW = 512 << 10

cdef enum:
    _P_ASYNC = 0
    _P_SYNC = 1
    _P_FUTURE = 2
    _P_BATCH = 3


cdef class _TimeoutMarker:
    pass


@cython.final
cdef class _Pending:
    cdef int kind
    cdef bint done
    cdef object obj             # ASYNC: callback or None; FUTURE: future; BATCH: _Batch
    cdef object value
    cdef Py_ssize_t index
    cdef int tw                 # the out channel it went to
    cdef bytes body             # kept to send again if a dead task worker never started it
                                #   (None while the body is in the arena: it is read back)
    cdef uint64_t arena_end     # the end of its body's block in the channel's arena (0: none)
    cdef uint64_t arena_pos     # and where it starts,
    cdef uint32_t arena_len     # and the body's length
    cdef uint8_t resent         # how often that happened (the frame header carries it)
    cdef bint held              # waits in its channel's backlog, not sent yet


cdef struct _Deadline:
    double at                       # monotonic seconds
    uint64_t task_id


@cython.final
cdef class _Batch:
    cdef list results
    cdef Py_ssize_t remaining


@cython.final
cdef class PendingTable:
    cdef dict entries               # task id -> _Pending
    cdef list deferred              # (task id, value, callback) of ASYNC results, for the loop
    cdef uint64_t epoch
    cdef uint32_t counter
    cdef unsigned int[:] load       # tasks without a result, per worker (shared memory)
    cdef bint has_load
    cdef int slot                   # this worker's index in load
    cdef Py_ssize_t max_pending     # task_queue_size: more deliveries wait for results
    cdef object on_finish           # on_finish(task_id, result, callback): user code
    cdef object make_error          # make_error(unpacked error body) -> exception instance
    cdef object make_lost           # make_lost(message) -> the error of a task lost with its
                                    #   task worker
    cdef readonly uint64_t late_results
    cdef uint64_t lost_arena_end    # set by take_lost: the blocks of the tasks the dead one took
    cdef uint64_t *stat_lost        # lost tasks per out channel (stats), or NULL
    cdef _Deadline *deadlines       # a min-heap of the deadlines of futures (submit_future with
    cdef Py_ssize_t ndeadlines      #   a timeout); an entry whose task is no longer waiting
    cdef Py_ssize_t deadlines_cap   #   stays until it reaches the top

    cdef uint64_t new_id(self) noexcept
    cdef int add(self, uint64_t task_id, _Pending entry) except -1
    cdef int drop(self, uint64_t task_id) except -2
    cdef void update_load(self) noexcept
    cdef int on_result(self, uint64_t task_id, uint8_t ftype, const char *p, size_t n) except -1
    cdef list take_lost(self, int tw, uint64_t running, uint64_t read_upto, object reason)
    cdef int take_lost_ids(self, uint64_t running, list ran, object reason) except -1
    cdef int fail_lost(self, uint64_t task_id, object message) except -1
    cdef int complete(self, uint64_t task_id, _Pending entry, object value,
                      bint failed) except -1
    cdef int run_deferred(self) except -1
    cdef int push_deadline(self, double at, uint64_t task_id) except -1
    cdef void pop_deadline(self) noexcept
    cdef int trim_deadlines(self) except -1
    cdef list take_due(self, double now)


# A task worker's byte in the shared busy flags, written by it, read by the dispatchers: 0 or
# _IDLE_QUICK while it waits for tasks, _BUSY while it runs them or takes none (paused).
# _IDLE_QUICK: its recent tasks ran in less than a wake-up costs (_QUICK_TASK seconds), so
# that a record sent to it now is read soon without waking it, even while it runs.
cdef enum:
    _BUSY = 1
    _IDLE_QUICK = 2             # also while it runs (_BUSY | _IDLE_QUICK)


@cython.final
cdef class _FlushWatch:
    cdef object owner               # a weak reference to the Dispatcher
    cdef int efd                    # eventfd: wakes the thread when it sleeps without a deadline
    cdef uint64_t held              # raised by each delivery whose frame waits in the queue
    cdef uint64_t sent              # set to held when a flush leaves nothing queued
    cdef int sleeping               # 1 while the thread waits on efd
    cdef int stop
    cdef unsigned int backoff       # doubles the period while the sockets are full

    cdef int _wait(self) noexcept nogil


cdef class Dispatcher(RecordReader):
    cdef object __weakref__
    cdef PendingTable table
    cdef int epfd
    cdef list channels              # results come in here, one channel per task worker
    cdef int nchan
    cdef list outs                  # tasks go out here: the channels, or queue channels
    cdef int nout
    cdef bint via_queue             # task_ipc_mode 2/3: outs are QueueChannels
    cdef unsigned char[:] busy      # per task worker, _BUSY while it runs tasks (shared)
    cdef int rr
    cdef double *busy_seen          # per task worker: when a pick first saw it running
    cdef uint16_t worker_id
    cdef Channel last               # where the last task's result comes back (None: any)
    cdef object schedule            # loop.call_soon, or None outside an event loop
    cdef object schedule_later      # loop.call_later-like: retries sends the queue refused
    cdef object schedule_timer      # loop.call_later: the futures' deadlines (None: no loop)
    cdef object timer               # the timer handle armed for the earliest deadline, or None
    cdef double timer_at            # when it is due (monotonic)
    cdef bint flush_scheduled
    cdef bint deferred_scheduled
    cdef bint in_wait_callbacks     # finish callbacks running from _wait_for_room
    cdef bint holding               # frames wait for the scheduled flush (the watch knows)
    cdef _FlushWatch watch          # None until frames first wait
    cdef readonly uint64_t delivered
    cdef size_t read_bytes          # bodies of results read by the current _read
    cdef uint64_t *stat_sent        # this worker's deliveries per out channel (stats), or NULL
    cdef object stat_view           # the buffer it points into, kept alive
    cdef uint64_t *stat_timed_out   # tasks whose caller stopped waiting, per out channel, or NULL
    cdef object stat_more           # the buffers of stat_timed_out and the table's stat_lost
    cdef public double spin
    cdef readonly double rtt        # moving average of CO round trips, seconds
    cdef public size_t high_water
    cdef list backlog               # per out channel, a deque of (task id, entry, body, flags)
                                    #   waiting for room in its arena; None without arenas
    cdef Py_ssize_t nbacklog        # tasks in those deques

    cdef int _pick(self, int dst, bint pile) except -1
    cdef int _pick_quick(self) noexcept
    cdef uint64_t _submit(self, object body, int dst, uint8_t flags, _Pending entry,
                          bint pile) except? 0
    cdef int _put(self, Channel ch, uint64_t task_id, uint8_t flags, _Pending entry,
                  object body) except -1
    cdef bint _window_full(self, Channel ch, Py_ssize_t n) noexcept
    cdef int _drain(self, Channel ch) except -1
    cdef int _drain_all(self) except -1
    cdef bint _unsent(self) noexcept
    cdef int _wait_for_room(self) except -1
    cdef int _sent_record(self, Channel ch) except -1
    cdef void _timed_out(self, int tw) noexcept
    cdef int _schedule_flush(self, bint eager=*) except -1
    cdef int _hold(self) except -1
    cdef int _release(self) except -1
    cdef int _schedule_deferred(self) except -1
    cdef int _arm(self, double at) except -1
    cdef int _flush_all(self) except -1
    cdef int _flush_channel(self, Channel ch) except -1
    cdef double _spin_until(self) noexcept
    cdef int _wait_on(self, Channel ch, _Pending entry, double deadline) except -1
    cdef int _wait(self, _Pending entry, _Batch batch, double deadline) except -1
    cdef int _poll(self, int timeout_ms) except -1
    cdef int _read(self, Channel ch) except -1
    cdef int _on_lost(self, Channel ch, const char *p, size_t n) except -1
