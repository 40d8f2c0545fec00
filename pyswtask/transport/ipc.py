"""The IPC a server needs, created by the master before it forks, so every child inherits it.

- task channels: one SOCK_SEQPACKET pair per (worker, task worker), and for each two arenas,
  shared-memory rings that bodies of 16 KiB and more go through (the tasks', the results');
- inboxes: one SOCK_SEQPACKET pair per child and one for the master, for pipe messages (every
  child holds every write end, and the read end of its own; the master's takes control
  messages only);
- busy flags: one byte per task worker, shared memory;
- load: one uint32 per worker (its tasks without a result yet), shared memory;
- task worker state: per task worker, the task it is running, that task's worker, and the last
  task id it read from each worker (uint64 each), so that when it dies the master can tell
  each worker which of its tasks went down with it; and a hand-over area, where one recycled by
  task_max_request inside a record leaves the rest of it to its successor.

The master keeps every end open for the life of the server, so a respawned child inherits the
same sockets (and what is queued in them) as the process it replaces. This module makes and
hands out the IPC; it must not read or write what travels on it, which is the roles' (through
the core).
"""

from __future__ import annotations

import logging
import mmap
import socket
from typing import NamedTuple

from .._core import Arena, TaskWorkerStates

log = logging.getLogger("pyswtask.master")


class ChildIpc(NamedTuple):
    """What one child keeps. Ids are global: workers, then task workers, then user processes."""

    task_fds: list[int]         # worker: to each task worker; task worker: from each worker
    busy: mmap.mmap | memoryview
    load: memoryview            # uint32 per worker
    inbox_fd: int
    out_fds: list[int]          # the write end of every inbox, by global id
    tw_state: TaskWorkerStates
    arenas: list[tuple[Arena, Arena]] | None   # by task_fds: (tasks, results); None: no arenas


class ServerIpc:
    def __init__(self, worker_num: int, task_worker_num: int, process_num: int,
                 busy: memoryview | None = None, load: memoryview | None = None,
                 arena_size: int = 0) -> None:
        self.worker_num = worker_num
        self.task_worker_num = task_worker_num
        # Blocking at the file level: the core passes MSG_DONTWAIT on every call that must not
        # block, and a CO caller waits in a plain recv.
        self.pairs = [[socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                       for _ in range(task_worker_num)] for _ in range(worker_num)]
        # Address space only until bodies are written: the pages are taken as they are used.
        try:
            self.arenas = [[(Arena(arena_size), Arena(arena_size))
                            for _ in range(task_worker_num)]
                           for _ in range(worker_num)] if arena_size else None
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror}: cannot map the task arenas, "
                          f"2 x {worker_num} x {task_worker_num} of task_arena_size "
                          f"({arena_size} bytes); lower the setting, or 0 turns them off") from None
        # The last inbox is the master's.
        self.master_id = worker_num + task_worker_num + process_num
        self.inboxes = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                        for _ in range(self.master_id + 1)]
        self._own = busy is None
        self.busy: mmap.mmap | memoryview = mmap.mmap(-1, max(task_worker_num, 1)) \
            if busy is None else busy
        self._load: mmap.mmap | memoryview = mmap.mmap(-1, 4 * worker_num) if load is None \
            else load
        self._tw_state = mmap.mmap(-1, TaskWorkerStates.nbytes(worker_num, task_worker_num))
        self._tw_handover = mmap.mmap(-1, TaskWorkerStates.handover_nbytes(task_worker_num))
        self.tw_state = TaskWorkerStates(self._tw_state, worker_num, task_worker_num,
                                         self._tw_handover)

    def for_child(self, kind: str, global_id: int, index: int) -> ChildIpc:
        """In a freshly forked child: closes what it does not use, returns what it keeps."""
        arenas = None
        if kind == "worker":
            task = [row_pair[0] for row_pair in self.pairs[index]]
            if self.arenas is not None:
                arenas = self.arenas[index]
        elif kind == "task worker":
            task = [row[index][1] for row in self.pairs]
            if self.arenas is not None:
                arenas = [row[index] for row in self.arenas]
        else:
            task = []
        keep = {s.fileno() for s in task} | {w.fileno() for w, _ in self.inboxes}
        keep.add(self.inboxes[global_id][1].fileno())
        for s in self._sockets():
            if s.fileno() not in keep:
                s.close()
        load = self._load if isinstance(self._load, memoryview) else memoryview(self._load)
        return ChildIpc([s.fileno() for s in task], self.busy, load.cast("I"),
                        self.inboxes[global_id][1].fileno(), [w.fileno() for w, _ in self.inboxes],
                        self.tw_state, arenas)

    def report_lost(self, index: int, reason: str) -> None:
        """After task worker index died: tells each worker, on the dead end of their channel
        (read by the worker like a result), which of its tasks the task worker had taken."""
        for w, frame in self.tw_state.lost_reports(index, self.worker_num + index, reason):
            self.send_lost(w, index, frame)

    def send_lost(self, w: int, index: int, frame: bytes) -> None:
        """Sends worker w a LOST frame on the dead task worker index's end of their channel."""
        try:
            self.pairs[w][index][1].send(frame, socket.MSG_DONTWAIT)
        except OSError as exc:
            log.error("worker %d not told of its tasks lost with task worker %d: %s", w,
                      self.worker_num + index, exc)

    def master_inbox(self) -> tuple[int, list[int]]:
        """The master's inbox read end and every write end."""
        return self.inboxes[self.master_id][1].fileno(), [w.fileno() for w, _ in self.inboxes]

    def _sockets(self) -> list[socket.socket]:
        out = [s for row in self.pairs for pair in row for s in pair]
        return out + [s for pair in self.inboxes for s in pair]

    def close(self) -> None:
        self.arenas = None
        for s in self._sockets():
            s.close()
        if self._own:
            self.busy.close()      # type: ignore[union-attr]
            self._load.close()     # type: ignore[union-attr]
        self.tw_state.release()
        self._tw_state.close()
        self._tw_handover.close()
