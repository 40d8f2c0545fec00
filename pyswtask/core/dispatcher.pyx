# The worker's side: pick a task worker, queue task frames, match results to their callers.
# PendingTable holds the tasks waiting for a result and completes them; Dispatcher is the I/O
# loop around it (epoll over the channels, choosing a task worker, sending, waiting, scheduling
# on the event loop). Declarations in dispatcher.pxd.

import signal
import threading
import weakref
from collections import deque

from libc.errno cimport EINTR, errno
from libc.stdlib cimport calloc, free, realloc
from posix.unistd cimport close, read, usleep, write

from .includes.clock cimport monotonic
from .includes.epoll cimport (EPOLL_CLOEXEC, EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, epoll_create1,
                              epoll_event, epoll_wait)
from .includes.python cimport (PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE,
                               PyErr_CheckSignals)

# A task worker's byte in the shared busy flags (see dispatcher.pxd), for tests and tools.
TW_BUSY = _BUSY
TW_IDLE_QUICK = _IDLE_QUICK

# The high-water mark a worker's channels register their interest with: never reached, so a
# worker always reads results. Reading them sends nothing back, while a task worker whose
# results back up stops reading tasks (TaskLoop): a worker that also stopped reading while its
# tasks back up would deadlock with it (a flood of large ASYNC tasks did). The worker's own
# backpressure on sending is _flush_channel's, at self.high_water.
cdef size_t _READ_ALWAYS = <size_t>-1

# How long a quick task worker may be seen running before tasks stop piling up on it.
cdef double _PILE_FOR = 0.0002

# How long ASYNC frames may wait in the queue for the loop's flush before the flush watch sends
# them: once no task was delivered and no record left for a whole period (the delivering code
# went on with a blocking sleep or CPU work), or after _HOLD_MAX_PERIODS while deliveries go on
# but no record fills (a slow stream of them). A tight burst fills records faster than that.
cdef unsigned int _HOLD_PERIOD_US = 1000
cdef unsigned int _HOLD_MAX_PERIODS = 5
# After its last hold was released the watch goes on looking every period this many times before
# it sleeps on the eventfd: a busy worker (an HTTP server holds a frame or two in most loop turns)
# then costs it one timed wake-up per period instead of an eventfd write and two wake-ups per
# turn, and an idle worker still leaves it asleep.
cdef unsigned int _LINGER_PERIODS = 50
# Result bodies read from one channel in one go before the finish callbacks run: a batch of
# large results decoded at once are that many fresh objects alive together, whose memory malloc
# hands back to the system past its trim threshold and takes again, page by page, for the next.
# Callbacks run between batches free each result in time for the next one to reuse it.
cdef size_t _READ_BYTES = 4 << 20

cdef extern from "<sys/eventfd.h>" nogil:
    enum:
        EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)

cdef extern from *:
    # A full barrier, so that the watch and the dispatcher see each other's stores in order.
    void __sync_synchronize() nogil


cdef class _TimeoutMarker:
    def __repr__(self):
        return "<pyswtask._core.TIMEOUT>"

    def __reduce__(self):
        return "TIMEOUT"


TIMEOUT = _TimeoutMarker()


@cython.freelist(64)
cdef class _Pending:
    pass


cdef class _Batch:
    pass


cdef class PendingTable:
    """The tasks of one worker that wait for a result, by task id, and their completion: a CO
    call's value, a batch's slot, a future, or an ASYNC finish callback deferred to the loop.

    A task id carries the worker process's epoch (its pid) in the high 32 bits, so a result
    meant for an earlier process with the same worker id is never taken for one of ours, and
    ids are never reused, so a late result never reaches a later call. The number of entries is
    what back-pressure (max_pending) and the shared load slot count.
    """

    def __cinit__(self, *args, **kwargs):
        self.entries = {}
        self.deferred = []
        self.deadlines = NULL

    def __dealloc__(self):
        free(self.deadlines)

    def __init__(self, *, on_finish, make_error, make_lost, uint64_t epoch, load=None,
                 int slot=0, Py_ssize_t max_pending=65536):
        self.epoch = epoch & 0xFFFFFFFF
        self.on_finish = on_finish
        self.make_error = make_error
        self.make_lost = make_lost
        self.max_pending = max_pending
        self.slot = slot
        if load is not None:
            self.load = load
            self.has_load = True
            if self.load.shape[0] <= slot:
                raise ValueError("the load array has no slot for this worker")

    def __len__(self):
        return len(self.entries)

    cdef uint64_t new_id(self) noexcept:
        self.counter += 1
        if self.counter == 0:
            self.counter = 1
        return (self.epoch << 32) | self.counter

    cdef int add(self, uint64_t task_id, _Pending entry) except -1:
        self.entries[task_id] = entry
        self.update_load()
        return 0

    cdef int drop(self, uint64_t task_id) except -2:
        """Forgets a task (its caller gave up); a result that comes later is discarded. Returns
        the out channel it went to, -1 when it was not waiting."""
        cdef object found = self.entries.pop(task_id, None)
        self.update_load()
        return -1 if found is None else (<_Pending>found).tw

    cdef inline void update_load(self) noexcept:
        # What deliver_by_process(worker_id=-1) compares: this worker's tasks without a result.
        if self.has_load:
            self.load[self.slot] = <unsigned int>len(self.entries)

    cdef int on_result(self, uint64_t task_id, uint8_t ftype, const char *p, size_t n) except -1:
        cdef _Pending entry
        cdef object value
        cdef object found = self.entries.pop(task_id, None)
        if found is None:
            self.late_results += 1
            return 0
        self.update_load()
        if self.ndeadlines and self.deadlines[0].task_id == task_id:
            # Results mostly come in the order of their deadlines: the heap stays small.
            self.trim_deadlines()
        entry = <_Pending>found
        try:
            value = unpackb(p, n)
        except Exception as exc:
            ftype = _FRAME_ERROR
            value = ["ProtocolError", f"task result is not valid msgpack: {exc}", ""]
        if ftype == _FRAME_ERROR:
            value = self.make_error(value)
        return self.complete(task_id, entry, value, ftype == _FRAME_ERROR)

    cdef list take_lost(self, int tw, uint64_t running, uint64_t read_upto, object reason):
        """Task worker tw died: the last task of ours it started, and any it had run without
        its result reaching us, fail with make_lost's error; returns (task id, entry) of those
        it had read but not started, in order, to be sent to its successor again.

        running: the last task of ours it started (0: its last start was another worker's, so
        every record it read from us was run whole); read_upto: the last task of ours it read."""
        cdef uint64_t done_upto, task_id
        cdef _Pending entry
        # Ids of an earlier process of this worker say nothing about ours.
        if running >> 32 != self.epoch:
            running = 0
        if read_upto >> 32 != self.epoch:
            read_upto = 0
        done_upto = running if running else read_upto
        lost = []
        again = []
        for key, value in self.entries.items():
            task_id = key
            entry = <_Pending>value
            if entry.tw != tw or task_id >> 32 != self.epoch or entry.held:
                continue
            if task_id <= done_upto:
                lost.append(task_id)
            elif running and task_id <= read_upto:
                again.append(task_id)
        # The arena blocks of those tasks: taken off the socket by the dead task worker, they
        # can be reused, up to the last of them (in the channel's order: not a task sent again,
        # whose block came after others still unread).
        self.lost_arena_end = 0
        for task_id in lost + again:
            entry = <_Pending>self.entries[task_id]
            if not entry.resent and entry.arena_end > self.lost_arena_end:
                self.lost_arena_end = entry.arena_end
        for task_id in lost:
            entry = <_Pending>self.entries.pop(task_id)
            if self.stat_lost != NULL:
                self.stat_lost[entry.tw] += 1
            what = "while running this task or sending its result" if task_id == running else (
                "after running this task; its result was lost")
            self.complete(task_id, entry, self.make_lost(f"{reason} {what}"), True)
        self.update_load()
        return [(task_id, self.entries[task_id]) for task_id in sorted(again)]

    cdef int fail_lost(self, uint64_t task_id, object message) except -1:
        """Fails one waiting task with make_lost(message)."""
        cdef _Pending entry = <_Pending>self.entries.pop(task_id)
        if self.stat_lost != NULL:
            self.stat_lost[entry.tw] += 1
        self.update_load()
        return self.complete(task_id, entry, self.make_lost(message), True)

    cdef int take_lost_ids(self, uint64_t running, list ran, object reason) except -1:
        """Fails the task that task worker was running and those it ran whose results did not
        come (a result that came first already completed its task)."""
        cdef _Pending entry
        for task_id in [running] + ran:
            found = self.entries.pop(task_id, None) if task_id >> 32 == self.epoch else None
            if found is None:
                continue
            entry = <_Pending>found
            if self.stat_lost != NULL:
                self.stat_lost[entry.tw] += 1
            what = "while running this task or sending its result" if task_id == running else (
                "after running this task; its result was lost")
            self.complete(task_id, entry, self.make_lost(f"{reason} {what}"), True)
        self.update_load()
        return 0

    cdef int complete(self, uint64_t task_id, _Pending entry, object value,
                      bint failed) except -1:
        entry.body = None
        if entry.kind == _P_SYNC:
            entry.done = True
            entry.value = value
        elif entry.kind == _P_BATCH:
            (<_Batch>entry.obj).results[entry.index] = value
            (<_Batch>entry.obj).remaining -= 1
        elif entry.kind == _P_FUTURE:
            if not entry.obj.done():
                if failed:
                    entry.obj.set_exception(value)
                else:
                    entry.obj.set_result(value)
        else:
            # Never run user code here: it may deliver again and reuse the scratch buffer.
            self.deferred.append((task_id, value, entry.obj))
        return 0

    cdef int run_deferred(self) except -1:
        cdef list items
        cdef tuple item
        while self.deferred:
            items = self.deferred
            self.deferred = []
            for item in items:
                self.on_finish(item[0], item[1], item[2])
        return 0

    # -- deadlines: one timer for all the futures, not one per call -------------------------------

    cdef int push_deadline(self, double at, uint64_t task_id) except -1:
        cdef Py_ssize_t i, parent, cap
        cdef _Deadline *grown
        if self.ndeadlines == self.deadlines_cap:
            cap = self.deadlines_cap * 2 if self.deadlines_cap else 256
            grown = <_Deadline *>realloc(self.deadlines, cap * sizeof(_Deadline))
            if grown == NULL:
                raise MemoryError()
            self.deadlines = grown
            self.deadlines_cap = cap
        i = self.ndeadlines
        self.ndeadlines += 1
        # With one timeout for every call the new deadline is the latest: no sift at all.
        while i > 0:
            parent = (i - 1) >> 1
            if self.deadlines[parent].at <= at:
                break
            self.deadlines[i] = self.deadlines[parent]
            i = parent
        self.deadlines[i].at = at
        self.deadlines[i].task_id = task_id
        return 0

    cdef void pop_deadline(self) noexcept:
        cdef Py_ssize_t i = 0, child, n
        cdef _Deadline last
        self.ndeadlines -= 1
        n = self.ndeadlines
        if n == 0:
            return
        last = self.deadlines[n]
        while True:
            child = 2 * i + 1
            if child >= n:
                break
            if child + 1 < n and self.deadlines[child + 1].at < self.deadlines[child].at:
                child += 1
            if last.at <= self.deadlines[child].at:
                break
            self.deadlines[i] = self.deadlines[child]
            i = child
        self.deadlines[i] = last

    cdef int trim_deadlines(self) except -1:
        """Drops the deadlines at the top whose tasks no longer wait."""
        while self.ndeadlines and self.deadlines[0].task_id not in self.entries:
            self.pop_deadline()
        return 0

    cdef list take_due(self, double now):
        """The futures whose deadline passed, taken off the table (their tasks then count as
        timed out with their out channel), as (out channel, future) pairs."""
        cdef list due = []
        cdef _Pending entry
        cdef uint64_t task_id
        while self.ndeadlines:
            task_id = self.deadlines[0].task_id
            found = self.entries.get(task_id)
            if found is not None:
                if self.deadlines[0].at > now:
                    break
                del self.entries[task_id]
                entry = <_Pending>found
                entry.body = None
                due.append((entry.tw, entry.obj))
            self.pop_deadline()
        if due:
            self.update_load()
        return due


cdef class _FlushWatch:
    """The thread that bounds how long coalesced ASYNC frames wait for the loop's flush.

    It sleeps on an eventfd until the dispatcher reports frames waiting (a counter and a
    barrier; a system call only to wake it). Then it looks every period, without the GIL: when
    frames are due (_HOLD_PERIOD_US) it sends them under the GIL by _flush_held, which only
    sends (it never reads or waits, so it cannot race the loop's reading of results). While the
    loop keeps flushing, or a burst keeps filling records, it never takes the GIL."""

    def __cinit__(self, owner):
        self.efd = -1
        self.owner = weakref.ref(owner)
        self.efd = eventfd(0, EFD_CLOEXEC)
        if self.efd < 0:
            raise OSError(errno, "eventfd failed")

    def __dealloc__(self):
        if self.efd >= 0:
            close(self.efd)

    def run(self):
        """The thread's body; returns when the dispatcher is gone."""
        cdef int due
        while True:
            with nogil:
                due = self._wait()
            if not due:
                return
            owner = self.owner()
            if owner is None:
                return
            try:
                sent = (<Dispatcher>owner)._flush_held()
            except Exception:
                # A send that fails here fails the same way for the loop's flush, which raises it
                # where the deliveries are made; the watch only retries later.
                sent = 0
            if sent:
                # All sent, or some: a backlog drains as its task worker takes bodies.
                self.backoff = 0
            elif self.backoff < 6:
                # The sockets are full: the task workers have work, and EPOLLOUT brings the loop
                # back to the rest; retry less often so as not to take the GIL every period.
                self.backoff += 1
            owner = None

    cdef int _wait(self) noexcept nogil:
        """1 once queued frames are due (see _HOLD_PERIOD_US); 0 when the dispatcher has gone."""
        cdef uint64_t one, held, sent, held0 = 0, sent0 = 0
        cdef unsigned int stale = 0, idle = 0
        cdef bint was_held = False
        while not self.stop:
            held = self.held
            sent = self.sent
            if held == sent and idle < _LINGER_PERIODS:
                idle += 1
                was_held = False
                usleep(_HOLD_PERIOD_US)
                continue
            if held == sent:
                idle = 0
                self.sleeping = 1
                __sync_synchronize()
                # Checked again after announcing sleep: a hold in between wrote efd, or is seen.
                if self.held == self.sent and not self.stop:
                    read(self.efd, &one, 8)
                self.sleeping = 0
                was_held = False
                continue
            idle = 0
            if was_held:
                stale = stale + 1 if sent == sent0 else 0
                if (held == held0 and sent == sent0) or stale >= _HOLD_MAX_PERIODS:
                    return 1
            else:
                stale = 0
            was_held = True
            held0 = held
            sent0 = sent
            usleep(_HOLD_PERIOD_US << self.backoff)
        return 0


cdef object _frozen(tuple env):
    """env, with its params as a tuple, when each param is an exact immutable scalar: packed
    later, it packs to the bytes it packs to now. None when a param could still change."""
    cdef object params = env[2]
    for x in params:
        t = type(x)
        if not (x is None or t is str or t is bytes or t is int or t is float or t is bool):
            return None
    if type(params) is tuple:
        return env
    return env[:2] + (tuple(params),) + env[3:]


cdef class Dispatcher(RecordReader):
    """Delivers task frames from one worker to the task workers and routes results back to
    the callers waiting in its PendingTable.

    ASYNC delivery inside an event loop (set_scheduler) writes through and coalesces a burst:
    the first task of a loop turn is sent at once, as Swoole's task() writes at once; tasks
    delivered after it in the same turn are queued and leave together, one record (64 KiB,
    ~600 small tasks) per send, when a record fills or when the loop runs the flush scheduled
    for the end of the turn; a task whose body went to the arena is no exception (its
    reference is one frame of the record). They never wait for the loop itself: when the code
    that delivered them goes on synchronously (a blocking sleep, CPU work), a flush watch thread
    sends them within 1-2 ms of the last delivery, or within ~6 ms while slow deliveries go on
    without filling a record (plus a GIL switch interval, 5 ms, under CPU-bound Python code);
    see _FlushWatch. Tasks whose result resolves a future (submit_future: a coroutine awaits it
    next) are neither written through nor watched: all of a turn's leave in one record at its
    flush. Without a loop every task is sent at once. Either way, large ASYNC tasks given as
    their fields (submit) wait in the worker beyond their task worker's window in its arena
    (_ARENA_WINDOW), in order, and leave as its results are read (with a loop, also from the
    watch while the delivering code blocks)."""

    def __cinit__(self, *args, **kwargs):
        self.epfd = -1
        self.busy_seen = NULL

    def __init__(self, int worker_id, fds, busy, *, on_finish, make_error, make_lost,
                 on_protocol_error, uint64_t epoch, double spin=0.0, size_t high_water=4 << 20,
                 load=None, outs=None, Py_ssize_t max_pending=65536, size_t max_body=0,
                 arenas=None):
        cdef Channel ch
        self.worker_id = worker_id
        self.who = f"worker {worker_id}"
        self.table = PendingTable(on_finish=on_finish, make_error=make_error, make_lost=make_lost,
                                  epoch=epoch, load=load, slot=worker_id, max_pending=max_pending)
        self.busy = busy
        self.nchan = len(fds)
        if self.nchan == 0:
            raise ValueError("a dispatcher needs at least one task worker channel")
        if self.busy.shape[0] < self.nchan:
            raise ValueError("busy flags are fewer than the channels")
        self.busy_seen = <double *>calloc(self.nchan, sizeof(double))
        if self.busy_seen == NULL:
            raise MemoryError()
        self.on_protocol_error = on_protocol_error
        self.spin = spin
        self.high_water = high_water
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self.channels = []
        for i, fd in enumerate(fds):
            ch = Channel(fd, i)
            ch.body_max = max_body
            if arenas is not None:
                # (tasks, results) of each task worker; tasks leave through the arena only on
                # this channel, not through a message queue.
                if outs is None:
                    ch.tx_arena = arenas[i][0]
                ch.rx_arena = arenas[i][1]
            ch.update_interest(self.epfd, _READ_ALWAYS)
            self.channels.append(ch)
        self.outs = self.channels if outs is None else list(outs)
        self.nout = len(self.outs)
        self.via_queue = outs is not None
        if arenas is not None and outs is None:
            self.backlog = [deque() for _ in range(self.nout)]
        if self.nout == 0 or self.nout > self.nchan:
            raise ValueError("a dispatcher needs one out channel per task worker, or one queue")

    def __dealloc__(self):
        cdef uint64_t one = 1
        free(self.busy_seen)
        if self.epfd >= 0:
            close(self.epfd)
        if self.watch is not None:
            self.watch.stop = 1
            __sync_synchronize()
            write(self.watch.efd, &one, 8)

    def fileno(self):
        """The epoll descriptor: readable whenever a result or send space is waiting."""
        return self.epfd

    def set_scheduler(self, schedule, schedule_later=None, schedule_timer=None):
        """Gives the dispatcher loop.call_soon, so that ASYNC frames delivered after the first
        of a loop turn go out together (one send per record, not per task) and finish callbacks
        run from the loop. schedule_later(callback) runs callback a little later: with a message
        queue, which has no descriptor to wait on, it retries what a full queue refused.
        schedule_timer(delay, callback) is loop.call_later: the deadlines of submit_future."""
        self.schedule = schedule
        self.schedule_later = schedule_later
        self.schedule_timer = schedule_timer

    @property
    def arena_used(self):
        """Bytes held in this worker's arenas, the tasks' and the results' of every channel:
        bodies not read yet, or read by a process that died before it could say so."""
        cdef Channel ch
        cdef size_t used = 0
        for ch in self.channels:
            if ch.tx_arena is not None:
                used += ch.tx_arena.used
            if ch.rx_arena is not None:
                used += ch.rx_arena.used
        return used

    @property
    def arena_counts(self):
        """(task bodies sent by reference, task bodies for the arena sent through the socket
        because it had no room), since this process started."""
        cdef Channel ch
        cdef uint64_t sent = 0, full = 0
        for ch in self.channels:
            sent += ch.arena_sent
            full += ch.arena_full
        return sent, full

    @property
    def backlog_count(self):
        """Tasks waiting in this worker for room in their task worker's arena window."""
        return self.nbacklog

    @property
    def pending_count(self):
        return len(self.table.entries)

    @property
    def late_results(self):
        """Results that matched no waiting task (it timed out, or was an earlier process's)."""
        return self.table.late_results

    @property
    def max_pending(self):
        """task_queue_size: deliveries beyond this many tasks without a result wait."""
        return self.table.max_pending

    @max_pending.setter
    def max_pending(self, Py_ssize_t value):
        self.table.max_pending = value

    # -- choosing a task worker ---------------------------------------------------------------

    cdef int _pick(self, int dst, bint pile) except -1:
        cdef int k, j
        if dst >= 0:
            if dst >= self.nchan:
                raise ValueError(f"dst_worker_id {dst} is out of range: there are "
                                 f"{self.nchan} task workers (0..{self.nchan - 1})")
            if self.nout != self.nchan:
                raise ValueError("dst_worker_id cannot pick a task worker in task_ipc_mode 3, "
                                 "where the task workers take tasks from one queue in turn")
            return dst
        if self.nout == 1:
            return 0
        if pile:
            j = self._pick_quick()
            if j >= 0:
                return j
        # Otherwise an idle task worker first, starting after the last one picked; round-robin
        # when every one is busy.
        j = self.rr
        for k in range(self.nchan):
            if not self.busy[j] & _BUSY:
                break
            j += 1
            if j == self.nchan:
                j = 0
        else:
            j = self.rr
        self.rr = j + 1
        if self.rr == self.nchan:
            self.rr = 0
        return j

    def pick_for_burst(self):
        """The task worker the next of a burst of ASYNC tasks would go to (an idle one first,
        see _pick), for tasks that must all go to one; -1 where tasks cannot be sent to a
        chosen one (task_ipc_mode 3: the task workers take them from one queue in turn)."""
        if self.nout != self.nchan:
            return -1
        return self._pick(-1, False)

    cdef int _pick_quick(self) noexcept:
        """For a call awaited on its own (a CO call, a coroutine's Task.co): the first task
        worker in order whose tasks are quick, idle or running, or -1. A turn's calls (an HTTP
        worker's requests) then leave in one record, a running task worker reads it without a
        wake-up when it ends the ones it has, and the others sleep on while it keeps up; a
        wake-up costs more than such a task. One seen running for longer than _PILE_FOR runs
        something slow after all: the next calls go elsewhere. Bursts (ASYNC deliveries,
        batches) do not come here, as their tasks may be slower than the last ones."""
        cdef int j
        cdef unsigned char flag
        cdef double now = 0.0
        for j in range(self.nchan):
            flag = self.busy[j]
            if not flag & _IDLE_QUICK:
                continue
            if not flag & _BUSY:
                self.busy_seen[j] = 0.0
                return j
            if now == 0.0:
                now = monotonic()
            if self.busy_seen[j] == 0.0:
                self.busy_seen[j] = now
                return j
            if now - self.busy_seen[j] < _PILE_FOR:
                return j
        return -1

    cdef uint64_t _submit(self, object body, int dst, uint8_t flags, _Pending entry,
                          bint pile) except? 0:
        # body: the packed envelope (bytes), or its fields (a tuple, sized by the caller's
        # check): those are packed where they leave from, the arena block of a large body.
        cdef int j
        cdef size_t n
        cdef Channel ch
        cdef uint64_t task_id
        if len(self.table.entries) >= self.table.max_pending:
            self._wait_for_room()
        j = self._pick(dst, pile)
        ch = <Channel>self.outs[j]
        entry.tw = j
        # The channel the result will come back on, when known (not in contention mode).
        self.last = <Channel>self.channels[j] if self.nout == self.nchan else None
        task_id = self.table.new_id()
        self.delivered += 1
        if self.stat_sent != NULL:
            self.stat_sent[j] += 1
        if self.backlog is not None:
            q = self.backlog[j]
            if q or type(body) is tuple and self._window_full(ch, mp_packed_size(body)):
                # Behind the others waiting (a channel keeps its order), or the task worker
                # has a window of bodies to run already: this one waits in the worker, its
                # fields kept unpacked when nothing in them can change until it is packed.
                if type(body) is tuple:
                    held = _frozen(<tuple>body)
                    body = held if held is not None else mp_packb(body)
                entry.held = True
                q.append((task_id, entry, body, flags))
                self.nbacklog += 1
                self.table.add(task_id, entry)
                return task_id
        if type(body) is bytes:
            n = <size_t>PyBytes_GET_SIZE(body)
            if n >= _ARENA_MIN_BODY and ch.tx_arena is not None:
                n = _ARENA_REF_SIZE
            if ch.queued() and ch.queued() + _HEADER_SIZE + n > _RECORD_MAX:
                # A full record goes now, before the frame that would overflow it: one send per
                # record, where flushing after the put also sent that one frame alone.
                self._sent_record(ch)
        self._put(ch, task_id, flags, entry, body)
        self.table.add(task_id, entry)
        if ch.queued() >= _RECORD_MAX:
            # A reference to a body in the arena waits for the record, as any frame does: a send
            # and the task worker's wake-up cost about what writing a 64 KiB body does, and the
            # window (_window_full) already keeps a burst from filling the arena.
            self._sent_record(ch)
        return task_id

    cdef int _put(self, Channel ch, uint64_t task_id, uint8_t flags, _Pending entry,
                  object body) except -1:
        """Queues the task's frame on ch, and keeps what sending it again would need: its
        arena block, or its body. Sends nothing: the watch's flush calls it too."""
        cdef Py_ssize_t n
        cdef char *p
        if type(body) is tuple:
            n = mp_packed_size(body)
            p = ch.put_space(_FRAME_TASK, flags, task_id, self.worker_id, <size_t>n,
                             entry.resent)
            if p != NULL:
                mp_pack_into(p, body)
                entry.arena_end = ch.spilled
                if ch.spilled:
                    entry.body = None
                    entry.arena_pos = ch.spilled_at
                    entry.arena_len = <uint32_t>n
                else:
                    # No room in the arena: a copy from the queue, to send it again.
                    entry.body = PyBytes_FromStringAndSize(p, n)
                return 0
            # Over one record, and no room in the arena.
            body = mp_packb(body)
            ch.put_fragments(_FRAME_TASK, flags, task_id, self.worker_id,
                             PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body), entry.resent)
            entry.arena_end = 0
            entry.body = body
            return 0
        ch.put(_FRAME_TASK, flags, task_id, self.worker_id, PyBytes_AS_STRING(body),
               PyBytes_GET_SIZE(body), entry.resent)
        entry.arena_end = ch.spilled
        if ch.spilled:
            # The body stays in the arena block until a task worker starts the task, which is
            # as long as a copy would be needed: none is kept (nor faulted in, for each of a
            # burst of large bodies).
            entry.body = None
            entry.arena_pos = ch.spilled_at
            entry.arena_len = <uint32_t>PyBytes_GET_SIZE(body)
        else:
            entry.body = body
        return 0

    cdef bint _window_full(self, Channel ch, Py_ssize_t n) noexcept:
        # A body of n bytes would go beyond the channel's window in its arena.
        cdef uint64_t held
        if n < _ARENA_MIN_BODY or ch.tx_arena is None:
            return False
        held = ch.tx_arena.held()
        return held > 0 and held + <uint64_t>n > _ARENA_WINDOW

    cdef int _drain(self, Channel ch) except -1:
        """Sends the tasks waiting in ch's backlog, in order, as far as its window goes."""
        cdef object q = self.backlog[ch.peer]
        cdef _Pending entry
        cdef bint sent = False
        while q:
            task_id, entry, body, flags = q[0]
            if self.table.entries.get(task_id) is not entry:
                # Its caller stopped waiting (forget, a timeout): it is never sent.
                q.popleft()
                self.nbacklog -= 1
                continue
            if self._window_full(ch, mp_packed_size(body) if type(body) is tuple
                                 else PyBytes_GET_SIZE(body)):
                break
            self._put(ch, task_id, flags, entry, body)
            entry.held = False
            q.popleft()
            self.nbacklog -= 1
            if ch.queued() >= _RECORD_MAX:
                ch.flush()
                sent = True
        if ch.queued():
            ch.flush()
            sent = True
        if sent:
            ch.update_interest(self.epfd, _READ_ALWAYS)
        return 0

    cdef int _drain_all(self) except -1:
        cdef Channel ch
        if self.nbacklog:
            for ch in self.outs:
                if self.backlog[ch.peer]:
                    self._drain(ch)
        return 0

    cdef bint _unsent(self) noexcept:
        # Frames queued, or tasks waiting in a backlog.
        return self.nbacklog > 0 or any_queued(self.outs)

    cdef int _sent_record(self, Channel ch) except -1:
        self._flush_channel(ch)
        # A record leaving is progress for the watch, which would otherwise take the GIL in the
        # middle of a long burst to send a partial one; the caller holds again if any is left.
        return self._release()

    # -- delivering -----------------------------------------------------------------------------

    def submit(self, body, int dst=-1, callback=None, bint together=False):
        """Sends an ASYNC task; returns its id. The first task of a loop turn (every task
        without a loop) is written at once; later ones are coalesced and leave when a record
        fills, at the end of the turn, or a millisecond or two after the deliveries stop,
        whichever comes first. together: one of many handed over at once (a user process's
        or the crontab's "tasks" message), which all leave at the end of the turn, the first
        not apart from the rest: a task worker then runs them as one record, with no send
        and no wake-up between them. The result comes back through on_finish.

        body: the packed envelope, or its fields as pack_envelope packs them (from
        envelope_to_submit): a large one is then packed straight into its arena block, or,
        while the task worker has a window of bodies there to run, waits unpacked in the
        worker (see _ARENA_WINDOW)."""
        cdef _Pending entry = _Pending.__new__(_Pending)
        entry.kind = _P_ASYNC
        entry.obj = callback
        cdef uint64_t task_id = self._submit(body, dst, _FLAG_ASYNC, entry, False)
        self._schedule_flush(not together)
        return task_id

    def submit_future(self, bytes body, int dst, future, double timeout=-1.0, bint batch=False):
        """Queues a task whose result resolves future (an asyncio future of this loop): its
        value, or the error as the future's exception. With a timeout (seconds, >= 0; it needs
        set_scheduler's schedule_timer), a task still without a result then is dropped, counted
        as timed out, and its future's result is TIMEOUT. batch: one of many delivered
        together (co_batch), spread over the task workers as a burst is."""
        cdef _Pending entry = _Pending.__new__(_Pending)
        cdef double at
        entry.kind = _P_FUTURE
        entry.obj = future
        if timeout >= 0 and self.schedule_timer is None:
            raise ValueError("submit_future with a timeout needs set_scheduler(..., "
                             "schedule_timer)")
        cdef uint64_t task_id = self._submit(body, dst, 0, entry, not batch)
        if timeout >= 0:
            at = monotonic() + timeout
            self.table.push_deadline(at, task_id)
            if self.timer is None or at < self.timer_at:
                self._arm(at)
        # Not written through: the caller awaits its future next, so the loop soon reaches the
        # flush, which then sends every task its turn delivered in one record (a send per task
        # would wake the task worker per task, the costliest part of a request doing one). Nor
        # watched: the caller cannot go on before the loop comes back anyway, and the watch's
        # periodic looks would cost a thread wake-up per millisecond of a busy HTTP worker.
        self._schedule_flush(False)
        return task_id

    cdef int _arm(self, double at) except -1:
        # One timer, for the earliest deadline: a timer per call cost more than the rest of
        # delivering a task from a coroutine.
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = at
        self.timer = self.schedule_timer(max(at - monotonic(), 0.0), self._expire_due)
        return 0

    def _expire_due(self):
        """The timer: the futures whose deadline passed get TIMEOUT."""
        cdef tuple item
        self.timer = None
        for item in self.table.take_due(monotonic()):
            self._timed_out(<int>item[0])
            if not item[1].done():
                item[1].set_result(TIMEOUT)
        if self.table.ndeadlines:
            self._arm(self.table.deadlines[0].at)

    def call(self, bytes body, int dst, double timeout):
        """Sends a task and blocks until its result: the value, an error instance from
        make_error, or TIMEOUT. Other results arriving meanwhile are kept for the loop."""
        cdef _Pending entry = _Pending.__new__(_Pending)
        entry.kind = _P_SYNC
        cdef uint64_t task_id = self._submit(body, dst, 0, entry, True)
        cdef Channel ch = self.last
        cdef double started = monotonic()
        self._flush_all()
        if ch is not None and not any_queued(self.outs) and not entry.held:
            self._wait_on(ch, entry, started + timeout)
        else:
            self._wait(entry, None, started + timeout)
        if entry.done:
            self.rtt = self.rtt * 0.9 + (monotonic() - started) * 0.1
            return entry.value
        self._timed_out(self.table.drop(task_id))
        return TIMEOUT

    def call_many(self, list bodies, int dst, double timeout):
        """Sends every task at once and waits for all under one timeout; returns one outcome
        per task, in order: the value, an error instance, or TIMEOUT."""
        cdef Py_ssize_t i, n = len(bodies)
        cdef _Batch batch = _Batch.__new__(_Batch)
        cdef _Pending entry
        cdef list ids = []
        batch.results = [TIMEOUT] * n
        batch.remaining = n
        for i in range(n):
            entry = _Pending.__new__(_Pending)
            entry.kind = _P_BATCH
            entry.obj = batch
            entry.index = i
            ids.append(self._submit(<bytes>bodies[i], dst, 0, entry, False))
        self._flush_all()
        self._wait(None, batch, monotonic() + timeout)
        if batch.remaining:
            for task_id in ids:
                self._timed_out(self.table.drop(task_id))
        return batch.results

    cdef void _timed_out(self, int tw) noexcept:
        # tw: where a task whose caller stopped waiting went (-1: its result came first).
        if tw >= 0 and self.stat_timed_out != NULL:
            self.stat_timed_out[tw] += 1

    cdef int _wait_for_room(self) except -1:
        """Backpressure: task_queue_size tasks are waiting for results. Send what is queued and
        read results until some room is free, then run the finish callbacks of what came, so
        that a burst delivered in one loop turn holds at most task_queue_size tasks and results
        (a callback that delivers and waits again leaves its results to the loop)."""
        cdef Py_ssize_t room = self.table.max_pending - (self.table.max_pending >> 4)
        self._flush_all()
        while len(self.table.entries) >= room:
            self._poll(100)
            if self.via_queue:
                self._flush_all()
        if self.table.deferred and not self.in_wait_callbacks:
            self.in_wait_callbacks = True
            try:
                self.run_deferred()
            finally:
                self.in_wait_callbacks = False
        return self._schedule_deferred()

    def count_into(self, counters, lost=None, timed_out=None):
        """Counts every delivery from now on in counters (shared memory: a uint64 per out
        channel, the task worker's index in modes 1 and 2), which a successor in the same slot
        goes on raising; and, when given, in rows of the same shape the tasks lost with their
        task worker and those whose caller stopped waiting (call, call_many, forget with
        timed_out)."""
        cdef unsigned char[:] c = counters
        cdef unsigned char[:] l
        cdef unsigned char[:] t
        if c.shape[0] < 8 * self.nout:
            raise ValueError("stats buffer too small")
        if lost is not None:
            l = lost
            if l.shape[0] < 8 * self.nout:
                raise ValueError("stats buffer too small (lost)")
        if timed_out is not None:
            t = timed_out
            if t.shape[0] < 8 * self.nout:
                raise ValueError("stats buffer too small (timed_out)")
        self.stat_view = c
        self.stat_sent = <uint64_t *>&c[0]
        self.stat_more = (lost, timed_out)
        self.table.stat_lost = <uint64_t *>&l[0] if lost is not None else NULL
        self.stat_timed_out = <uint64_t *>&t[0] if timed_out is not None else NULL

    def forget(self, uint64_t task_id, bint timed_out=False):
        """Drops a pending task (its caller gave up); a result that comes later is discarded.
        True when it was still waiting; timed_out: count it as timed out (count_into)."""
        cdef int tw = self.table.drop(task_id)
        if timed_out:
            self._timed_out(tw)
        return tw >= 0

    # -- sending --------------------------------------------------------------------------------

    cdef int _schedule_flush(self, bint eager=True) except -1:
        """eager=False: the caller yields to the loop next (it awaits a future), so its frame
        waits for the turn's flush, neither written through nor watched."""
        if self.schedule is None:
            self._flush_all()
            return 0
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.schedule(self._scheduled_flush)
            if eager:
                # The first task since the loop last flushed: nothing of this turn is queued
                # before it, so writing it through costs one send and no task waits for the turn
                # to end.
                self._flush_all()
            return 0
        if not eager:
            return 0
        if self.holding:
            # A delivery: the watch waits while they go on (see _HOLD_PERIOD_US).
            self.watch.held += 1
        elif self._unsent():
            self._hold()
        return 0

    cdef int _hold(self) except -1:
        """Frames now wait for the scheduled flush: the watch sends them if the loop does not
        come back to it in time."""
        cdef uint64_t one = 1
        cdef _FlushWatch w = self.watch
        if w is None:
            w = self.watch = _FlushWatch(self)
            # Started with every signal blocked, so that it inherits that mask: a signal for the
            # worker must interrupt the main thread's waits, not the watch's sleep.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
            try:
                threading.Thread(target=w.run, name="pyswtask-flush", daemon=True).start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.holding = True
        w.held += 1
        __sync_synchronize()
        if w.sleeping:
            w.sleeping = 0
            write(w.efd, &one, 8)
        return 0

    cdef int _release(self) except -1:
        # Nothing is queued any more: the watch goes back to sleep.
        if self.holding:
            self.holding = False
            self.watch.sent = self.watch.held
        return 0

    def _flush_held(self):
        """The watch's flush: sends what the sockets and the arenas' windows take now, and
        never waits or reads (the loop may be in the middle of reading a record). 1 when
        nothing is left to send, 2 when some was sent and more waits, 0 when none could be."""
        cdef Channel ch
        cdef Py_ssize_t waiting = self.nbacklog
        self._drain_all()
        for ch in self.outs:
            if ch.queued():
                ch.flush()
                ch.update_interest(self.epfd, _READ_ALWAYS)
        if self._unsent():
            return 2 if self.nbacklog < waiting else 0
        self._release()
        return 1

    cdef int _schedule_deferred(self) except -1:
        # Finish callbacks of results read while waiting run from the loop, not from the wait.
        if self.table.deferred and self.schedule is not None and not self.deferred_scheduled:
            self.deferred_scheduled = True
            self.schedule(self.run_deferred)
        return 0

    def _scheduled_flush(self):
        self.flush_scheduled = False
        self._flush_all()
        if self.via_queue and self.schedule_later is not None and any_queued(self.outs):
            self.flush_scheduled = True
            self.schedule_later(self._scheduled_flush)

    def flush(self):
        """Sends what is queued on every channel, as far as the sockets take it."""
        self._flush_all()

    cdef int _flush_all(self) except -1:
        cdef Channel ch
        self._drain_all()
        for ch in self.outs:
            if ch.queued():
                self._flush_channel(ch)
        if self.holding and not self._unsent():
            self._release()
        return 0

    @property
    def queued(self):
        """Bytes of task frames not sent yet."""
        return queued_bytes(self.outs)

    cdef int _flush_channel(self, Channel ch) except -1:
        ch.flush()
        ch.update_interest(self.epfd, _READ_ALWAYS)
        if ch.queued() >= self.high_water:
            # Backpressure: the task worker is not keeping up. Wait for room, reading results
            # meanwhile (a task worker blocked on sending us results would otherwise never read).
            # A queue signals no room, so it is retried every millisecond.
            while ch.queued() >= self.high_water // 2:
                self._poll(1 if self.via_queue else 100)
                if self.via_queue:
                    ch.flush()
        return 0

    # -- receiving ------------------------------------------------------------------------------

    cdef double _spin_until(self) noexcept:
        """Until when a CO caller polls for its result (0: it does not): only while results
        usually come within twice the spin, since with slow tasks it would burn CPU for nothing
        (an adaptive spin, as in adaptive mutexes)."""
        if self.spin > 0 and self.rtt <= 2 * self.spin:
            return monotonic() + self.spin
        return 0.0

    cdef int _wait_on(self, Channel ch, _Pending entry, double deadline) except -1:
        """Waits for one CO result on the channel it will come from, reading that channel only;
        results on other channels wait for the loop."""
        cdef double now, spin_until = self._spin_until()
        cdef ssize_t r
        while not entry.done:
            now = monotonic()
            if now >= deadline:
                break
            if now < spin_until:
                r = recv_record(ch.fd, self.scratch)
            else:
                r = recv_record_blocking(ch, self.scratch, deadline - now)
            if r > 0:
                self.read_record(ch, self.scratch, <size_t>r, _FRAME_RESULT)
        return self._schedule_deferred()

    cdef int _wait(self, _Pending entry, _Batch batch, double deadline) except -1:
        cdef double now, spin_until = 0.0
        cdef int timeout_ms
        # A batch does not poll: it takes longer than a spin, and polling would take a CPU from
        # the task workers running it.
        if entry is not None:
            spin_until = self._spin_until()
        while True:
            if entry is not None and entry.done:
                break
            if batch is not None and batch.remaining == 0:
                break
            now = monotonic()
            if now >= deadline:
                break
            if now < spin_until:
                timeout_ms = 0
            else:
                timeout_ms = <int>((deadline - now) * 1000.0) + 1
            if self.via_queue and any_queued(self.outs):
                self._flush_all()
                if any_queued(self.outs):
                    timeout_ms = 1
            self._poll(timeout_ms)
        return self._schedule_deferred()

    def on_readable(self):
        """The event loop's reader callback for fileno(): handles whatever is ready, then runs
        the finish callbacks due."""
        self._poll(0)
        if self.table.deferred:
            self.run_deferred()

    def run_deferred(self):
        """Runs the finish callbacks of ASYNC tasks whose results have come."""
        self.deferred_scheduled = False
        self.table.run_deferred()

    cdef int _poll(self, int timeout_ms) except -1:
        cdef epoll_event evs[_EVENTS_MAX]
        cdef int n, i
        cdef Channel ch
        if timeout_ms == 0:
            n = epoll_wait(self.epfd, evs, _EVENTS_MAX, 0)
        else:
            with nogil:
                n = epoll_wait(self.epfd, evs, _EVENTS_MAX, timeout_ms)
        if n < 0:
            if errno == EINTR:
                PyErr_CheckSignals()
                return 0
            raise OSError(errno, "epoll_wait failed")
        for i in range(n):
            ch = <Channel>self.channels[evs[i].data.u32]
            if evs[i].events & EPOLLOUT:
                ch.flush()
                ch.update_interest(self.epfd, _READ_ALWAYS)
            if evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP):
                self._read(ch)
        return n

    cdef int _read(self, Channel ch) except -1:
        cdef int got, k, i
        self.read_bytes = 0
        for k in range(_READ_BUDGET // 2):
            got = self.recv_two(ch.fd)
            for i in range(got):
                self.read_record(ch, self.records[i], self.record_len[i], _FRAME_RESULT)
            if got < 2 or self.read_bytes >= _READ_BYTES:
                # Nothing more waiting, or the rest waits for the next turn (epoll is
                # level-triggered).
                break
        if self.nbacklog and self.backlog[ch.peer]:
            # Results: the task worker took their bodies, which makes room in its window.
            self._drain(ch)
        return 0

    cdef int on_frame(self, Channel ch, FrameHeader *h, const char *body, size_t n) except -1:
        if h.type == _FRAME_LOST:
            return self._on_lost(ch, body, n)
        self.read_bytes += n
        return self.table.on_result(h.task_id, h.type, body, n)

    cdef int _on_lost(self, Channel ch, const char *p, size_t n) except -1:
        """A task worker died (the master tells us on its end of the channel, body
        [running, read_upto, reason]): the table fails what went down with it, and what it had
        read but not started goes to its successor (same channel) again."""
        cdef uint64_t running, read_upto
        cdef _Pending entry
        cdef Channel out
        try:
            notice = unpackb(p, n)
            if len(notice) == 4:
                # From the message queue: the task ids themselves, as the tasks of one queue
                # may have gone to any task worker.
                self.table.take_lost_ids(notice[0], notice[3], notice[2])
                return 0
            running, read_upto, reason = notice
        except Exception as exc:
            self.on_protocol_error(f"{self.who}: malformed lost-task notice dropped: {exc}")
            return 0
        again = self.table.take_lost(ch.peer, running, read_upto, reason)
        # The bodies of those in the arena are read back before anything is written there.
        bodies = []
        for task_id, value in again:
            entry = <_Pending>value
            body = entry.body
            if body is None:
                body = (<Channel>self.outs[entry.tw]).tx_arena.copy_out(entry.arena_pos,
                                                                       entry.arena_len)
                if body is None:
                    # More than a whole arena of bodies was written after it before the
                    # notice came: its body is gone, as with its task worker.
                    self.table.fail_lost(task_id, f"{reason} before it started this task, "
                                         "whose body was overwritten in the task arena before "
                                         "it could be sent again")
                    continue
            bodies.append((task_id, entry, body))
        if self.table.lost_arena_end and ch.tx_arena is not None:
            ch.tx_arena.consumed(self.table.lost_arena_end)
        for task_id, entry, body in bodies:
            out = <Channel>self.outs[entry.tw]
            if entry.resent < 255:
                entry.resent += 1
            out.put(_FRAME_TASK, _FLAG_ASYNC if entry.kind == _P_ASYNC else 0, task_id,
                    self.worker_id, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body),
                    entry.resent)
            entry.arena_end = out.spilled
            if out.spilled:
                entry.body = None
                entry.arena_pos = out.spilled_at
                entry.arena_len = <uint32_t>PyBytes_GET_SIZE(body)
            else:
                entry.body = body
        if again:
            self._schedule_flush()
        return 0
