# The task worker's side: read task frames from every worker, run each synchronously, reply.
# Declarations in taskloop.pxd.

from libc.errno cimport EINTR, errno
from posix.unistd cimport close, read, write

from .includes.clock cimport monotonic
from .includes.posix cimport sched_yield
from .includes.epoll cimport (EPOLL_CLOEXEC, EPOLL_CTL_DEL, EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT,
                              epoll_create1, epoll_ctl, epoll_event, epoll_wait)

from .includes.python cimport (PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE,
                               PyErr_CheckSignals, PyTuple_GET_SIZE, PyTuple_GetSlice)

cdef enum:
    _STOP_TAG = 0xFFFFFFFF
    _INBOX_TAG = 0xFFFFFFFE
    _QUEUE_TAG = 0xFFFFFFFD
    _TICK_TAG = 0xFFFFFFFC
    _WATCH_TAG = 0xFFFFFFFB
    _DURATIONS_MAX = 4096

# TaskLoop.qopen when no body is open, and once an open body's parts were released.
cdef uint64_t _NO_OPEN = <uint64_t>-1
cdef uint64_t _GAVE_UP = <uint64_t>-2


cdef inline bint _starts_with_later_part(const char *text, size_t n) noexcept:
    cdef FrameHeader h
    return check_header(text, n, &h) == NULL and is_later_part(&h)


# A method whose runs average more than this is "slow": results already queued are sent before
# it starts, so a fast task's result never waits behind a slow one that shared its record.
cdef double _SLOW_TASK = 0.0002
# The longest a task worker polls the queue for a program's next CO task (queue_spin): a stop
# or a timer waits for the poll to end.
cdef double _QUEUE_SPIN_MAX = 0.001
# Tasks quicker than this on average mark their task worker _IDLE_QUICK while it waits: about
# what waking a sleeping process costs here (tens of microseconds across CPUs).
cdef double _QUICK_TASK = 0.00005

# Upper bounds (seconds) of the task-duration histogram's buckets; +Inf follows.
cdef double _DURATION_BOUND[DURATION_BOUNDS]
_DURATION_BOUND[:] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                      0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


@cython.final
cdef class _DeferredMarker:
    def __repr__(self):
        return "DEFERRED"


# What execute returns as its value for a task whose result comes later, through finish().
cdef object _DEFERRED = _DeferredMarker()
DEFERRED = _DEFERRED


cdef class TaskLoop(RecordReader):
    """Serves task frames from every worker's channel until a stop signal arrives.

    execute(envelope, task_id, src_worker) runs one task and returns (ok, value): value is the
    result when ok, else [exception type, message, traceback text]. It must not raise.
    While tasks run, this worker's busy flag is 1, so dispatchers prefer an idle task worker.

    max_body (package_max_length): a task body reassembled past it is dropped, and a result
    that packs past it is answered with an error instead (the worker would drop it).

    Between tasks it can run an asyncio loop in slices (set_ticker): timers, and coroutine
    tasks whose results are sent later (execute returns (True, DEFERRED), then finish()).

    max_tasks (task_max_request): after that many tasks it stops, and reads no more records.
    With a hand-over area in state, it stops inside a record too, leaving the rest there for its
    successor, which runs it first; the one exception are records the queue reader already took
    from the message queue, which it runs whole. Without one, it runs the record it is in whole.
    """

    def __cinit__(self, *args, **kwargs):
        self.epfd = -1
        self.tick_fd = -1
        self.watch_fd = -1
        self.cur_peer = -1
        self.qdeferred = {}

    def __init__(self, int worker_id, int index, fds, busy, int stop_fd, *, execute, on_signal,
                 on_protocol_error, int inbox_fd=-1, on_inbox=None, size_t high_water=4 << 20,
                 QueueReader reader=None, int queue_fd=-1, on_reply=None, on_stopping=None,
                 double queue_spin=0.0, TaskWorkerStates state=None, uint64_t max_tasks=0,
                 size_t max_body=0, arenas=None):
        cdef Channel ch
        self.worker_id = worker_id
        self.who = f"task worker {worker_id}"
        self.index = index
        self.busy = busy
        self.stop_fd = stop_fd
        self.execute = execute
        self.on_signal = on_signal
        self.on_protocol_error = on_protocol_error
        self.high_water = high_water
        self.durations = {}
        self.run_avg = -1.0
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self.channels = []
        self.body_max = max_body
        for i, fd in enumerate(fds):
            ch = Channel(fd, i)
            ch.body_max = max_body
            if arenas is not None:
                # (tasks, results) of each worker's channel.
                ch.rx_arena = arenas[i][0]
                ch.tx_arena = arenas[i][1]
            ch.update_interest(self.epfd, self.high_water)
            self.channels.append(ch)
        add_readable(self.epfd, stop_fd, _STOP_TAG, "the stop descriptor")
        self.on_inbox = on_inbox
        if inbox_fd >= 0:
            add_readable(self.epfd, inbox_fd, _INBOX_TAG, "the inbox")
        self.max_tasks = self.limit = max_tasks
        if state is not None:
            state.check(index, len(self.channels))
        self.state = state
        self.stop_in_record = max_tasks != 0 and state is not None and state.has_handover
        self.reader = reader
        self.queue_fd = queue_fd
        self.qchan = Channel(-1, -1)
        self.qchan.body_max = max_body
        self.qopen = _NO_OPEN
        self.on_reply = on_reply
        # Only a loop that waits in msgrcv itself polls the queue.
        self.queue_spin = (min(max(queue_spin, 0.0), _QUEUE_SPIN_MAX)
                           if reader is not None and reader.direct else 0.0)
        self.on_stopping = on_stopping
        if reader is not None and reader.direct:
            # This thread waits in msgrcv; the reader's watch thread waits on this epoll.
            reader.watch_loop(self.epfd)
        elif reader is not None:
            add_readable(self.epfd, queue_fd, _QUEUE_TAG, "the queue's wake descriptor")

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)

    @staticmethod
    def duration_bounds():
        """The finite upper bounds (seconds) of the task-duration histogram's buckets."""
        return tuple(_DURATION_BOUND[i] for i in range(DURATION_BOUNDS))

    @staticmethod
    def stat_row_nbytes():
        """The size of one task method's counters (TaskStatRow)."""
        return sizeof(TaskStatRow)

    def count_into(self, counts, rows, dict index, new_row):
        """Counts every task from now on in shared memory: counts (24 bytes, three int64: tasks
        run, tasks failed, tasks from workers started) and rows (TaskStatRow records, one per task method: index maps
        (name, method) to a row; new_row(name, method) gives the row of one not in it yet, and
        writes its name there). Increments only, so a successor in the same slot counts on."""
        cdef unsigned char[:] c = counts
        cdef unsigned char[:] r = rows
        if c.shape[0] < 24 or r.shape[0] < <Py_ssize_t>sizeof(TaskStatRow):
            raise ValueError("stats buffers too small")
        self.stat_views = (c, r)
        self.stat_counts = <int64_t *>&c[0]
        self.stat_rows = <TaskStatRow *>&r[0]
        self.stat_index = index
        self.stat_new_row = new_row

    def run(self, double max_wait):
        """Serves until on_signal says stop (1: drain what the workers already sent, for at
        most max_wait seconds; 2: hand over, reading nothing more from the channels, whose
        content waits for the successor) or max_tasks ran; returns the number of tasks run."""
        cdef epoll_event evs[_EVENTS_MAX]
        cdef int n, i, timeout_ms = -1, wait_ms
        cdef double left
        cdef bint tick, watched
        cdef bint stopping = False
        cdef bint recycling = False
        cdef double deadline = 0.0
        cdef Channel ch
        cdef char sigbuf[64]
        cdef ssize_t r
        cdef int how
        self._take_over()
        while True:
            if self.limit and self.tasks_done >= self.limit and not stopping:
                # Recycled (task_max_request): read nothing more from the channels (what is
                # there waits for the task worker that replaces this one), send the replies,
                # finish what the queue reader took, then exit.
                stopping = recycling = self.recycling = True
                deadline = monotonic() + max_wait
                timeout_ms = 20
                for ch in self.channels:
                    ch.update_interest(self.epfd, 0)
                if self.on_stopping is not None:
                    self.on_stopping()
            wait_ms = timeout_ms
            if self.on_tick is not None:
                if self.tick_due:
                    self._tick()
                if self.next_due > 0:
                    left = (self.next_due - monotonic()) * 1000.0
                    left = 0 if left <= 0 else left + 1
                    if wait_ms < 0 or left < wait_ms:
                        wait_ms = <int>left
            if self.watch_due > 0:
                left = (self.watch_due - monotonic()) * 1000.0
                left = 0 if left <= 0 else left + 1
                if wait_ms < 0 or left < wait_ms:
                    wait_ms = <int>left
            # At task_max_concurrency it counts as busy: dispatchers prefer another.
            self.busy[self.index] = self._idle_flag()
            if self.reader is not None and self.reader.direct and not self.reader.finished:
                n = self._wait_direct(evs, wait_ms)
            else:
                with nogil:
                    n = epoll_wait(self.epfd, evs, _EVENTS_MAX, wait_ms)
            if n < 0:
                if errno == EINTR:
                    PyErr_CheckSignals()
                    continue
                raise OSError(errno, "epoll_wait failed")
            self.busy[self.index] = self._running_flag()
            tick = watched = False
            for i in range(n):
                if evs[i].data.u32 == _STOP_TAG:
                    r = read(self.stop_fd, sigbuf, sizeof(sigbuf))
                    how = self.on_signal(sigbuf[:r]) if r > 0 and not stopping else 0
                    if how:
                        stopping = True
                        recycling = self.recycling = how == 2
                        if not recycling:
                            # No successor comes to take a rest: run all the workers sent.
                            self.limit = 0
                            self.stop_in_record = False
                        deadline = monotonic() + max_wait
                        # Poll briefly from now on: exit as soon as nothing is left to serve.
                        timeout_ms = 20
                        if recycling:
                            for ch in self.channels:
                                ch.update_interest(self.epfd, 0)
                        if self.on_stopping is not None:
                            self.on_stopping()
                    continue
                if evs[i].data.u32 == _INBOX_TAG:
                    self.on_inbox()
                    continue
                if evs[i].data.u32 == _QUEUE_TAG:
                    read(self.queue_fd, sigbuf, 8)
                    self._read_queue()
                    continue
                if evs[i].data.u32 == _TICK_TAG:
                    tick = True
                    continue
                if evs[i].data.u32 == _WATCH_TAG:
                    watched = True
                    continue
                ch = <Channel>self.channels[evs[i].data.u32]
                if evs[i].events & EPOLLOUT:
                    ch.flush()
                if evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP) and not recycling:
                    self._read(ch)
                ch.update_interest(self.epfd, self._interest())
            if self.on_tick is not None and (tick or self.tick_due or (
                    self.next_due > 0 and monotonic() >= self.next_due)):
                self._tick()
            if self.on_watch is not None and (watched or (
                    self.watch_due > 0 and monotonic() >= self.watch_due)):
                self._watched()
            if stopping:
                if monotonic() >= deadline:
                    break
                if n == 0 and self.pending == 0 and not any_queued(self.channels) and (
                        self.reader is None or (self.reader.finished and self.reader.used == 0)):
                    break
        if self.reader is not None:
            self._release_queue()
            if self.reader.direct:
                self.reader.end_watch()
        self.busy[self.index] = 0
        return self.tasks_done

    cdef int _wait_direct(self, epoll_event *evs, int wait_ms) except? -2:
        """The wait of a loop whose reader is direct: in msgrcv, for the next message (run
        here, at once), until the watch or a signal ends it (the channels' and other events
        are then polled), or wait_ms (< 0: no limit). As epoll_wait, returns the events."""
        cdef int r, poll_ms = 0
        cdef double deadline = 0.0, until
        if self.reader.used:
            self._read_queue()      # more than one turn's budget was waiting
        else:
            r = RECV_EMPTY
            if self.spin_next:
                self.spin_next = False
                if wait_ms != 0:
                    until = self.last_reply + self.queue_spin
                    if wait_ms > 0:
                        until = min(until, monotonic() + wait_ms * 1e-3)
                    with nogil:
                        r = self._spin_direct(until)
            if r == RECV_EMPTY:
                if wait_ms > 0:
                    deadline = monotonic() + wait_ms * 1e-3
                with nogil:
                    r = self.reader.receive(deadline, wait_ms != 0)
            if r == RECV_RECORD:
                self.busy[self.index] = self._running_flag()
                self._read_queue()
                if not self.reader.fired:
                    return 0
            elif r == RECV_INTERRUPTED:
                PyErr_CheckSignals()
            elif r == RECV_NO_ROOM:
                # Room comes back as results leave (EPOLLOUT) or deferred tasks end.
                poll_ms = 10 if wait_ms < 0 or wait_ms > 10 else wait_ms
            elif r == RECV_PARTS_WAIT:
                poll_ms = 1 if wait_ms != 0 else 0
        with nogil:
            return epoll_wait(self.epfd, evs, _EVENTS_MAX, poll_ms)

    cdef int _spin_direct(self, double until) noexcept nogil:
        # Polls the queue until then, yielding the CPU between polls: a program's next
        # CO task is taken without a wake-up of this process, and the process a wake-up puts
        # on this CPU meanwhile (the other task worker, the program) runs at once. With every
        # task worker that answered lately polling, none waits in msgrcv to be handed it.
        cdef int r
        while True:
            r = self.reader.receive(0, False)
            if r != RECV_EMPTY or monotonic() >= until:
                return r
            sched_yield()

    cdef void _spin_after_reply(self) noexcept:
        # Adaptive, as a CO caller's spin is: only while this task worker's answers to programs
        # come within twice the spin of each other (a program calling in a loop), so a lone call
        # costs no polling.
        cdef double now
        if self.queue_spin <= 0:
            return
        now = monotonic()
        self.spin_next = now - self.last_reply <= 2 * self.queue_spin
        self.last_reply = now

    cdef int _read(self, Channel ch) except -1:
        # One record per wake-up: epoll is level-triggered, so a channel with more waiting comes
        # straight back, the channels take turns, and no recv is spent finding the queue empty.
        cdef ssize_t r
        if ch.queued() >= self.high_water or (self.limit and self.tasks_done >= self.limit):
            return 0
        r = recv_record(ch.fd, self.scratch)
        if r > 0:
            if self.state is not None:
                self.state.read_upto(self.index, ch.peer, last_task_id(self.scratch, <size_t>r))
            self._serve(ch, <size_t>r)
            # Idle before the replies leave: a caller that sends its next task as soon as it has
            # this reply must already see this task worker as idle.
            self.busy[self.index] = self._idle_flag()
            # The replies to one record go out together: one send for many small results.
            ch.flush()
        return 0

    cdef int _serve(self, Channel ch, size_t n) except -1:
        # Runs the record in scratch; a rest left unread at the limit goes to the successor.
        cdef Py_ssize_t off = self.read_record(ch, self.scratch, n, _FRAME_TASK)
        if <size_t>off < n:
            self.state.hand_over(self.index, ch.peer, self.scratch + off, n - <size_t>off)
        return 0

    cdef int _take_over(self) except -1:
        """Runs what a predecessor stopped by task_max_request left of its last record, before
        anything newer on that channel."""
        cdef int peer = -1
        cdef size_t n
        cdef Channel ch
        if self.state is None:
            return 0
        n = self.state.take_over(self.index, self.scratch, &peer)
        if n == 0:
            return 0
        if not 0 <= peer < len(self.channels):
            self.on_protocol_error(f"{self.who}: the rest of a record handed over from worker "
                                   f"{peer}, which has no channel here, dropped")
            return 0
        ch = <Channel>self.channels[peer]
        self.busy[self.index] = _BUSY
        self._serve(ch, n)
        self.busy[self.index] = self._idle_flag()
        ch.flush()
        ch.update_interest(self.epfd, self._interest())
        return 0

    cdef int _read_queue(self) except -1:
        # Records are run where the reader received them, in its hold; they stay held until
        # their results have left (see _release_queue), so that the master can tell, if this
        # process dies, which tasks ran and put back the ones that did not start.
        cdef ssize_t n
        cdef int k
        cdef Channel ch
        cdef uint64_t one = 1
        cdef char *text
        self._release_queue()
        for k in range(_READ_BUDGET):
            n = self.reader.take(&text, &self.qpos)
            if n < 0:
                break
            self.qrec = text
            self.qlen = <size_t>n
            if self.qchan.frags and not _starts_with_later_part(text, <size_t>n):
                # The reader gave up on the rest of that body (its sender died mid-body).
                self.qchan.frags.clear()
            self.read_record(self.qchan, text, <size_t>n, _FRAME_TASK)
            self.reader.taken()
            self._track_open_body(text, <size_t>n)
        else:
            # More is waiting: come back after the channels had their turn.
            if self.queue_fd >= 0:
                write(self.queue_fd, &one, 8)
        self.busy[self.index] = self._idle_flag()
        for ch in self.channels:
            if ch.queued():
                ch.flush()
                ch.update_interest(self.epfd, self._interest())
        self._release_queue()
        return 0

    cdef int _track_open_body(self, const char *text, size_t n) except -1:
        """Holds the parts of a body not run yet (they go back to the queue if this process
        dies), unless they outgrow half the hold: then they are released, and the body can
        only be reported lost."""
        cdef FrameHeader h
        cdef size_t off = 0
        if not self.qchan.frags:
            if self.qopen != _NO_OPEN:
                self.qopen = _NO_OPEN
                self.reader.give_up(0, 0)
            return 0
        if self.qopen == _NO_OPEN:
            self.qopen = self.qpos
            memset(&h, 0, sizeof(h))    # the loop sets it (the record has a frame); gcc can't tell
            while off < n and check_header(text + off, n - off, &h) == NULL:
                off += _HEADER_SIZE + h.body_len
            self.qopen_task = h.task_id
            self.qopen_sf = (<uint32_t>h.flags << 16) | h.src_worker
        elif self.qopen != _GAVE_UP and self.qpos - self.qopen > self.reader.cap // 2:
            self.reader.give_up(self.qopen_task, self.qopen_sf)
            self.qopen = _GAVE_UP
        return 0

    cdef int _release_queue(self) except -1:
        cdef Channel ch
        cdef uint64_t upto
        for ch in self.channels:
            if ch.queued():
                return 0
        self.qfinished = False
        upto = self.qopen if self.qopen < _GAVE_UP else <uint64_t>-1
        if self.qdeferred:
            # Not past the record of a deferred task still running.
            for rec_pos, _, _ in self.qdeferred.values():
                if <uint64_t>rec_pos < upto:
                    upto = <uint64_t>rec_pos
        self.reader.release(upto)
        return 0

    cdef uint64_t _frame_pos(self, FrameHeader *h, const char *p) noexcept:
        """The hold position of the frame whose task runs: body p lies in the current record,
        or was reassembled, and its task runs at its last part."""
        cdef size_t off = 0
        cdef FrameHeader f
        if self.qrec <= p < self.qrec + self.qlen:
            return self.qpos + _REC_HEADER + <size_t>(p - self.qrec) - _HEADER_SIZE
        while off < self.qlen and check_header(self.qrec + off, self.qlen - off, &f) == NULL:
            if f.task_id == h.task_id and (f.flags & _FLAG_FRAG_LAST):
                break
            off += _HEADER_SIZE + f.body_len
        return self.qpos + _REC_HEADER + off

    cdef int on_frame(self, Channel ch, FrameHeader *h, const char *body, size_t n) except -1:
        self._run_task(ch, h, body, n)
        return self.stop_in_record and self.tasks_done >= self.limit and ch is not self.qchan

    cdef int _run_task(self, Channel ch, FrameHeader *h, const char *p, size_t n) except -1:
        cdef uint64_t task_id = h.task_id
        cdef uint16_t src = h.src_worker
        cdef bint ok
        cdef double started
        cdef object expected
        cdef object envelope = None
        cdef uint64_t fpos = 0
        if self.stat_counts != NULL and not (h.flags & _FLAG_COMMAND):
            # Started, before it runs: what the workers sent less this is what waits for it.
            self.stat_counts[2] += 1
        try:
            envelope = unpack_envelope_c(p, n)
        except ProtocolError as exc:
            self.release_arena()
            self.on_protocol_error(f"{self.who}: task {task_id} from worker {src} on channel "
                                   f"{ch.peer} refused: {exc}")
            ok, value = False, ["ProtocolError", str(exc), ""]
            if self.stat_counts != NULL:
                self._count(None, False, 0.0)
        else:
            # Read: the body's block may take the next body while this task runs.
            self.release_arena()
            key = (envelope[0], envelope[1])
            expected = self.durations.get(key)
            if ch.queued() and (expected is None or <double>expected > _SLOW_TASK):
                ch.flush()
            if expected is None or <double>expected >= _QUICK_TASK:
                # Not known to be quick: dispatchers stop adding calls behind it at once.
                self.busy[self.index] = _BUSY
            if self.state is not None and ch is not self.qchan:
                self.state.started(self.index, task_id, src)
            if ch is self.qchan:
                fpos = self._frame_pos(h, p)
                # Marked before it starts, unmarked if it finished here: a coroutine task
                # deferred stays marked, so that its loss is reported even once others ran.
                self.reader.mark_running(fpos, True)
                self.reader.running(fpos)
                self.cur_fpos = fpos
            ok, value = self._execute(envelope, key, task_id, src, h.flags, 1 + h.resent,
                                      -1 if ch is self.qchan else ch.peer, &started)
            if ch is self.qchan:
                if value is _DEFERRED:
                    self.qdeferred[fpos] = (self.qpos, h.flags & ~_FLAG_HELD_RUNNING, src)
                else:
                    self.reader.mark_running(fpos, False)
                self.reader.ran(fpos)
            if expected is None:
                if len(self.durations) >= _DURATIONS_MAX:
                    self.durations.clear()
                self.durations[key] = started
            else:
                self.durations[key] = <double>expected * 0.8 + started * 0.2
        self.tasks_done += 1
        if self.stat_counts != NULL:
            self.stat_counts[0] += 1
        if value is _DEFERRED:
            self.pending += 1
            if self.pending_max and self.pending >= self.pending_max and not self.paused:
                self._pause(True)
            return 0
        return self._reply(ch, task_id, h.flags, src, ok, value, envelope)

    cdef object _execute(self, object envelope, object key, uint64_t task_id, int src,
                         uint8_t flags, uint32_t attempt, int peer, double *seconds):
        # The one way a task runs, from a channel or taken by the role itself: Task.current()
        # answers from the cur_ fields while it runs, and its run time is counted under key.
        cdef bint ok
        cdef double started
        self.cur_envelope = envelope
        self.cur_id = task_id
        self.cur_src = src
        self.cur_flags = flags
        self.cur_attempt = attempt
        self.cur_peer = peer
        self.cur_uncounted = 0.0
        started = monotonic()
        try:
            # execute gets the call's six fields; the extra ones are Task.current()'s.
            res = self.execute(envelope if PyTuple_GET_SIZE(envelope) == 6
                               else PyTuple_GetSlice(envelope, 0, 6), task_id, src)
        finally:
            self.cur_envelope = None
        seconds[0] = monotonic() - started - self.cur_uncounted
        if seconds[0] < 0:
            seconds[0] = 0.0
        if self.run_avg < 0:
            self.run_avg = seconds[0]
        else:
            self.run_avg = self.run_avg * 0.8 + seconds[0] * 0.2
        ok, _ = res
        if self.stat_counts != NULL:
            self._count(key, ok, seconds[0])
        return res

    cdef int _reply(self, Channel ch, uint64_t task_id, uint8_t flags, uint16_t src, bint ok,
                    object value, object envelope) except -1:
        # The result is packed where it leaves from, the frame queue or its arena block, when
        # the core's encoder covers it (no copy of it at all); out holds the bytes otherwise:
        # a value msgpack packs, or the error that takes the result's place.
        cdef bytes out = None
        cdef Py_ssize_t n = -1
        cdef char *p
        cdef uint8_t ftype
        if ch is self.qchan and (flags & _FLAG_COMMAND) and (flags & _FLAG_ASYNC):
            return 0        # a command's ASYNC task: nobody takes its result
        if ok:
            n = mp_packed_size(value)
            if n < 0:
                try:
                    out = mp_packb(value)
                except Exception as exc:
                    ok = False
                    value = ["TypeError", f"the result of the task cannot be packed: {exc}", ""]
        if not ok:
            out = packb(value)
        if out is not None:
            n = PyBytes_GET_SIZE(out)
        if self.body_max and <size_t>n > self.body_max:
            what = f"{envelope[0]}.{envelope[1]}" if envelope is not None else "the task"
            ok = False
            out = packb(["ValueError", f"the result of {what} packs to {n} bytes, "
                         f"above the server's package_max_length ({self.body_max})", ""])
        if ch is self.qchan:
            # From the queue: a command's task answers to the command (unless ASYNC); a
            # worker's (ipc modes 2 and 3) on the channel back to that worker.
            if flags & _FLAG_COMMAND:
                if not (flags & _FLAG_ASYNC) and self.on_reply is not None:
                    self.on_reply(task_id, ok,
                                  out if out is not None else mp_packb_sized(value, n))
                    self._spin_after_reply()
                return 0
            if src >= len(self.channels):
                self.on_protocol_error(f"{self.who}: a queued task names worker {src}, "
                                       "which does not exist; its result dropped")
                return 0
            ch = <Channel>self.channels[src]
        ftype = _FRAME_RESULT if ok else _FRAME_ERROR
        if out is not None:
            ch.put(ftype, 0, task_id, self.worker_id, PyBytes_AS_STRING(out),
                   PyBytes_GET_SIZE(out))
        else:
            p = ch.put_space(ftype, 0, task_id, self.worker_id, <size_t>n)
            if p == NULL:
                # Over one record, and no room in the arena: in fragments.
                out = mp_packb_sized(value, n)
                ch.put_fragments(ftype, 0, task_id, self.worker_id, PyBytes_AS_STRING(out),
                                 PyBytes_GET_SIZE(out))
            else:
                mp_pack_into(p, value)
        # A result in the arena leaves with the rest of the record's, as any result does: one
        # send per result cost the worker a read and a wake-up each, about what copying a 64 KiB
        # body does. A slow task still sends what is queued before it starts (_run_task).
        return 0

    cdef int _count(self, object key, bint ok, double seconds) except -1:
        cdef TaskStatRow *r
        cdef int b = 0
        cdef object row
        if not ok:
            self.stat_counts[1] += 1
        if key is None:
            return 0
        row = self.stat_index.get(key)
        if row is None:
            row = self.stat_index[key] = self.stat_new_row(key[0], key[1])
        r = self.stat_rows + <Py_ssize_t>row
        if ok:
            r.ok += 1
        else:
            r.failed += 1
        r.seconds += seconds
        while b < DURATION_BOUNDS and seconds > _DURATION_BOUND[b]:
            b += 1
        r.buckets[b] += 1
        return 0

    # -- between tasks: the slices of an asyncio loop -------------------------------------------

    def set_ticker(self, on_tick, int fd, Py_ssize_t max_pending=0):
        """Runs on_tick() between tasks: when fd is readable, when the time it returned last
        (seconds from then; < 0: none) has come, and when tick_due was set. max_pending
        (task_max_concurrency): at that many deferred tasks the channels are not read until one
        finishes, and this task worker counts as busy."""
        if self.on_tick is not None:
            raise RuntimeError("the task loop already has a ticker")
        if fd >= 0:
            add_readable(self.epfd, fd, _TICK_TAG, "the ticker's descriptor")
        self.tick_fd = fd
        self.on_tick = on_tick
        self.pending_max = max_pending
        self.tick_due = True

    cdef int _tick(self) except -1:
        cdef double due
        cdef Channel ch
        self.tick_due = False
        due = self.on_tick()
        self.next_due = monotonic() + due if due >= 0 else 0.0
        for ch in self.channels:
            if ch.queued():
                ch.flush()
                ch.update_interest(self.epfd, self._interest())
        if self.qfinished:
            # Coroutine tasks from the queue ended: their records may be released now.
            self._release_queue()
        return 0

    def watch(self, int fd, on_ready):
        """Runs on_ready() between tasks when fd is readable, and when the time it returned
        last (seconds from then; < 0: none) has come. A later call replaces the descriptor
        (fd -1: none, on_ready still called when due); on_ready None stops it all."""
        cdef epoll_event ev
        if self.watch_fd >= 0:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, self.watch_fd, &ev)   # closed already: fine
            self.watch_fd = -1
        self.on_watch = on_ready
        if on_ready is None:
            self.watch_due = 0.0
            return
        if fd >= 0:
            add_readable(self.epfd, fd, _WATCH_TAG, "a watched descriptor")
            self.watch_fd = fd

    def watch_after(self, double seconds):
        """Calls the watcher at the latest after seconds (< 0: only when its descriptor is
        readable), as if it had returned that."""
        self.watch_due = monotonic() + seconds if seconds >= 0 else 0.0

    cdef int _watched(self) except -1:
        cdef double due
        self.watch_due = 0.0
        due = self.on_watch()
        if self.on_watch is not None:
            self.watch_due = monotonic() + due if due >= 0 else 0.0
        return 0

    def run_own(self, tuple envelope, uint32_t attempt):
        """Runs a task the role took itself (not read from a channel: a cluster task) as a
        channel's task runs, and counts it so; returns execute's (ok, value). While it runs,
        current() gives it as one from a separate program: task id 0, source -1, channel -1,
        attempt as given."""
        cdef double seconds
        self.cur_fpos = 0
        res = self._execute(envelope, (envelope[0], envelope[1]), 0, -1, _FLAG_COMMAND, attempt,
                            -1, &seconds)
        self.tasks_done += 1
        if self.stat_counts != NULL:
            self.stat_counts[0] += 1
        return res

    def finish(self, int peer, uint64_t task_id, bint ok, value, envelope=None,
               uint64_t at=0):
        """The result of a task execute deferred, for the channel it came on (peer; -1: the
        queue, at the hold position current() gave for it): sent with the next flush (after
        the current slice). ok False: value is [type, message, traceback]."""
        cdef tuple held
        if peer == -1 and self.reader is not None:
            held = self.qdeferred.pop(at, None)
            if held is None:
                raise ValueError(f"no deferred task from the queue at {at}")
            self.reader.mark_running(at, False)
            self.qfinished = True
            if self.pending > 0:
                self.pending -= 1
            if self.paused and self.pending <= self.pending_max // 2:
                self._pause(False)
            self._reply(self.qchan, task_id, <uint8_t>held[1], <uint16_t>held[2], ok, value,
                        envelope)
            return
        if not 0 <= peer < len(self.channels):
            raise ValueError(f"no channel {peer}")
        if self.pending > 0:
            self.pending -= 1
        # Read again once half the room is back, not at each result: a pause and a resume
        # cost a system call each.
        if self.paused and self.pending <= self.pending_max // 2:
            self._pause(False)
        self._reply(<Channel>self.channels[peer], task_id, 0, <uint16_t>peer, ok, value, envelope)

    cdef unsigned char _idle_flag(self) noexcept:
        """The busy byte while waiting: _BUSY when paused (dispatchers prefer another), else
        _IDLE_QUICK when recent tasks ran faster than a wake-up, else 0."""
        if self.paused:
            return _BUSY
        if 0 <= self.run_avg < _QUICK_TASK:
            return _IDLE_QUICK
        return 0

    cdef unsigned char _running_flag(self) noexcept:
        """The busy byte while running tasks: _BUSY, with _IDLE_QUICK kept when they are quick
        (a record sent now is read when they end, without a wake-up)."""
        return _BUSY | (self._idle_flag() & _IDLE_QUICK)

    cdef int _pause(self, bint on) except -1:
        cdef Channel ch
        self.paused = on
        for ch in self.channels:
            ch.update_interest(self.epfd, self._interest())
        return 0

    cdef size_t _interest(self) noexcept:
        return 0 if self.paused or self.recycling else self.high_water

    def flush(self):
        """Sends what the channels hold (results finished after run returned), as far as the
        sockets take it now."""
        cdef Channel ch
        for ch in self.channels:
            if ch.queued():
                ch.flush()

    def not_counted(self, double seconds):
        """The running task waited this long on purpose (the crontab's runner, for its due
        second): left out of its run time, which also decides whether it counts as quick (its
        task worker _IDLE_QUICK, results of its record held until the record ends)."""
        if self.cur_envelope is not None and seconds > 0:
            self.cur_uncounted += seconds

    def current(self):
        """(envelope, task id, source worker, from a separate program, attempt, channel) of the
        task running now (the attempt is 1 + the times it was sent again; channel -1: the
        queue, or none: run_own's), with, for a task from the queue, its hold position
        (finish's at; else 0); None between tasks."""
        if self.cur_envelope is None:
            return None
        return (self.cur_envelope, self.cur_id, self.cur_src,
                (self.cur_flags & _FLAG_COMMAND) != 0, self.cur_attempt, self.cur_peer,
                self.cur_fpos if self.cur_peer == -1 else 0)
