"""The stats segment: one SysV shared-memory segment of counters, made by the master before it
forks, that every process of the server raises and any process (of the same user) can read.

Layout (little-endian, fixed; ``VERSION`` changes with it)::

    header    HEADER (512 bytes): magic "PYSWSTAT", version, the counts below, the master's
              pid and start time, the message queue's id, the crontab's key, respawns by cause,
              recycles
    slots     SLOT per child slot (workers, task workers, user processes): kind, pid, state,
              start time, respawns, name, counters
    busy      uint8 per task worker (1 while it runs tasks), padded to 8 bytes
    load      uint32 per worker (its tasks without a result), padded to 8 bytes
    sent      per worker, a uint64 per task worker: the tasks it delivered to each (in
              task_ipc_mode 3, all in the first: the queue picks the task worker)
    lost      per worker, a uint64 per task worker: its tasks that went down with each (as sent)
    timed out per worker, a uint64 per task worker: its tasks sent to each whose caller stopped
              waiting (as sent)
    rows      per task worker, TASK_ROWS ROW records (one per task method it ran: counts, the
              sum of run times, the duration histogram's buckets); its last row counts the
              methods that found no free row ("other")

One writer per field: the master writes the header and each slot's kind/pid/state/start time/
respawns; a child raises only its own slot's counters and rows (the busy flags, load and
a worker's sent, lost and timed out rows are the dispatchers' and task loops'). Readers take
int64 fields as they are: each is read whole, and fields are independent, so no lock is needed.
Counters of a slot go on across the respawns of its process.

This module owns the layout and the writing; what a snapshot shows is ``pyswtask.stats``'s.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import sysv_ipc  # type: ignore[import-not-found]

from ._core import TaskLoop
from .sysv import create_segment, stats_key

__all__ = ["StatsSegment", "HEADER", "SLOT", "ROW", "KINDS", "CAUSES", "TASK_ROWS", "VERSION",
           "MAGIC", "DURATION_BOUNDS", "stats_key", "StatsUnreadable"]

MAGIC = b"PYSWSTAT"
VERSION = 2
TASK_ROWS = 64
KINDS = ("worker", "task worker", "process")
# Why a child was respawned: killed by a signal, exited non-zero, exited 0 after it served
# (max_request, task_max_request), restarted by a reload, exited 0 before it served.
CAUSES = ("signal", "exit_code", "recycled", "reload", "exited")
DURATION_BOUNDS: tuple[float, ...] = TaskLoop.duration_bounds()

HEADER = np.dtype({
    "names": ["magic", "version", "nslots", "worker_num", "task_worker_num", "process_num",
              "task_rows", "master_pid", "started", "queue_msqid", "cron_key", "respawns",
              "max_request_recycles", "task_max_request_recycles", "timezone", "task_ipc_mode"],
    "formats": ["S8", "<u4", "<u4", "<u4", "<u4", "<u4", "<u4", "<i8", "<f8", "<i8", "<i8",
                ("<i8", (len(CAUSES),)), "<i8", "<i8", "S64", "<i8"],
    "offsets": [0, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 64 + 8 * len(CAUSES),
                72 + 8 * len(CAUSES), 192, 256],
    "itemsize": 512})

# tasks_run, tasks_failed and tasks_started stay side by side: the task loop counts into them
# as one block.
SLOT = np.dtype([("kind", "<i8"), ("pid", "<i8"), ("state", "<i8"), ("started", "<f8"),
                 ("respawns", "<i8"), ("name", "S32"), ("tasks_run", "<i8"),
                 ("tasks_failed", "<i8"), ("tasks_started", "<i8"), ("lost", "<i8"),
                 ("timed_out", "<i8"), ("cron_due", "<i8"), ("cron_late", "<i8"),
                 ("cron_skipped", "<i8")])

ROW = np.dtype([("name", "S96"), ("ok", "<i8"), ("failed", "<i8"), ("seconds", "<f8"),
                ("buckets", "<i8", (len(DURATION_BOUNDS) + 1,))])
assert ROW.itemsize == TaskLoop.stat_row_nbytes(), "ROW differs from the core's TaskStatRow"

STATE_DOWN, STATE_UP = 0, 1


def _field(dtype: np.dtype[Any], name: str) -> tuple[int, int]:
    """(offset, size) of a field of a record dtype."""
    assert dtype.fields is not None
    sub, offset = dtype.fields[name][:2]
    return int(offset), int(sub.itemsize)

class StatsUnreadable(RuntimeError):
    """A segment is there but cannot be read: no permission, or another layout."""


def _pad8(n: int) -> int:
    return (n + 7) & ~7


# The per-worker tables of a uint64 per task worker, in their order after load.
_PER_TW = ("sent", "lost", "timed_out")


def _offsets(nslots: int, task_worker_num: int, worker_num: int
             ) -> tuple[int, int, int, int, int]:
    slots = HEADER.itemsize
    busy = slots + nslots * SLOT.itemsize
    load = busy + _pad8(task_worker_num)
    sent = load + _pad8(4 * worker_num)
    rows = sent + len(_PER_TW) * 8 * worker_num * max(task_worker_num, 1)
    return slots, busy, load, sent, rows


def nbytes(nslots: int, task_worker_num: int, worker_num: int) -> int:
    """The size of a segment for that many slots, task workers and workers."""
    return _offsets(nslots, task_worker_num, worker_num)[4] + \
        task_worker_num * TASK_ROWS * ROW.itemsize


class StatsSegment:
    """One server's stats segment: created by the master (``create``), attached by a reader
    (``attach``); numpy views of its parts."""

    def __init__(self, shm: Any, owner: bool) -> None:
        self.shm = shm
        self.owner = owner
        self.buf = memoryview(shm)
        if len(self.buf) < HEADER.itemsize:
            raise StatsUnreadable("the segment is smaller than a stats header")
        self.header = np.frombuffer(self.buf, HEADER, 1)[0]
        if bytes(self.header["magic"]) != MAGIC or int(self.header["version"]) != VERSION:
            raise StatsUnreadable(f"the segment is not a version-{VERSION} pyswtask stats "
                                  f"segment (magic {bytes(self.header['magic'])!r}, version "
                                  f"{int(self.header['version'])})")
        h = self.header
        self.worker_num = int(h["worker_num"])
        self.task_worker_num = int(h["task_worker_num"])
        self.nslots = int(h["nslots"])
        slots, busy, load, sent, rows = _offsets(self.nslots, self.task_worker_num,
                                                 self.worker_num)
        if len(self.buf) < nbytes(self.nslots, self.task_worker_num, self.worker_num):
            raise StatsUnreadable("the segment is smaller than its header says")
        self._slots_at = slots
        self.slots = np.frombuffer(self.buf, SLOT, self.nslots, slots)
        self.busy = self.buf[busy:busy + max(self.task_worker_num, 1)]
        self.load_bytes = self.buf[load:load + 4 * self.worker_num]
        self.load = self.load_bytes.cast("I")
        self._sent_at = sent
        width = max(self.task_worker_num, 1)
        self._table_bytes = 8 * self.worker_num * width
        self.sent, self.lost, self.timed_out = (
            np.frombuffer(self.buf, "<u8", self.worker_num * width,
                          sent + k * self._table_bytes).reshape(self.worker_num, width)
            for k in range(len(_PER_TW)))
        self._rows_at = rows
        self.rows = np.frombuffer(self.buf, ROW, self.task_worker_num * TASK_ROWS, rows).reshape(
            self.task_worker_num, TASK_ROWS) if self.task_worker_num else np.zeros((0, 0), ROW)

    # -- the master -------------------------------------------------------------------------

    @classmethod
    def create(cls, key: int, *, worker_num: int, task_worker_num: int,
               process_names: list[str], master_pid: int) -> StatsSegment:
        """Creates and fills the segment (mode 0600), before the fork."""
        nslots = worker_num + task_worker_num + len(process_names)
        size = nbytes(nslots, task_worker_num, worker_num)
        shm = create_segment(key, size, setting="stats_shm_key", what="stats")
        buf = memoryview(shm)
        buf[:size] = bytes(size)
        header = np.frombuffer(buf, HEADER, 1)[0]
        header["magic"] = MAGIC
        header["version"] = VERSION
        header["nslots"] = nslots
        header["worker_num"] = worker_num
        header["task_worker_num"] = task_worker_num
        header["process_num"] = len(process_names)
        header["task_rows"] = TASK_ROWS
        header["master_pid"] = master_pid
        header["started"] = time.time()
        header["queue_msqid"] = -1
        header["cron_key"] = -1
        del header
        buf.release()
        seg = cls(shm, True)
        for i in range(nslots):
            slot = seg.slots[i]
            if i < worker_num:
                slot["kind"], slot["name"] = 0, f"worker {i}".encode()
            elif i < worker_num + task_worker_num:
                slot["kind"], slot["name"] = 1, f"task worker {i}".encode()
            else:
                slot["kind"] = 2
                slot["name"] = process_names[i - worker_num - task_worker_num].encode()[:32]
        return seg

    def describe(self, *, queue_msqid: int | None = None, cron_key: int | None = None,
                 timezone: str | None = None, task_ipc_mode: int | None = None) -> None:
        """Records where the message queue and the crontab's tables are, the zone of the
        cron rules and the ipc mode (the master)."""
        if task_ipc_mode is not None:
            self.header["task_ipc_mode"] = task_ipc_mode
        if timezone is not None:
            self.header["timezone"] = timezone.encode()[:64]
        if queue_msqid is not None:
            self.header["queue_msqid"] = queue_msqid
        if cron_key is not None:
            self.header["cron_key"] = cron_key

    def spawned(self, slot: int, pid: int) -> None:
        """A process now runs in the slot (the master, after fork)."""
        s = self.slots[slot]
        s["pid"] = pid
        s["started"] = time.time()
        s["state"] = STATE_UP

    def exited(self, slot: int) -> None:
        """The slot's process is gone (the master, once reaped)."""
        self.slots[slot]["state"] = STATE_DOWN

    def respawning(self, slot: int, cause: str, recycle: str | None = None) -> None:
        """Counts a respawn of the slot by cause (CAUSES), and a max_request or
        task_max_request recycle (``recycle`` names the setting)."""
        self.slots[slot]["respawns"] += 1
        self.header["respawns"][CAUSES.index(cause)] += 1
        if recycle is not None:
            self.header[f"{recycle}_recycles"] += 1

    def close(self) -> None:
        """Detaches; the creator also removes the segment."""
        for name in ("header", "slots", "rows", "busy", "load", "load_bytes", *_PER_TW):
            self.__dict__.pop(name, None)
        try:
            self.buf.release()
        except BufferError:
            pass
        try:
            self.shm.detach()
            if self.owner:
                self.shm.remove()
        except sysv_ipc.Error:
            pass

    # -- the children -----------------------------------------------------------------------

    def worker_row(self, worker: int, table: str) -> memoryview:
        """A worker's row of a per-task-worker table (``sent``, ``lost``, ``timed_out``), for
        its dispatcher to count into."""
        width = 8 * max(self.task_worker_num, 1)
        at = self._sent_at + _PER_TW.index(table) * self._table_bytes + worker * width
        return self.buf[at:at + width]

    def _slot_bytes(self, slot: int, field: str, size: int) -> memoryview:
        at = self._slots_at + slot * SLOT.itemsize + _field(SLOT, field)[0]
        return self.buf[at:at + size]

    def add(self, slot: int, field: str, n: int = 1) -> None:
        """Raises a counter of the slot (only from the slot's own process)."""
        self.slots[slot][field] += n

    def task_worker_counting(self, index: int, slot: int
                             ) -> tuple[memoryview, memoryview, dict[tuple[str, str], int],
                                        Callable[[str, str], int]]:
        """What TaskLoop.count_into takes for task worker index: its tasks_run, tasks_failed
        and tasks_started, its rows, the methods that have a row already (a predecessor's), and the
        function that gives a new method a row."""
        counts = self._slot_bytes(slot, "tasks_run", 24)
        start = self._rows_at + index * TASK_ROWS * ROW.itemsize
        rows_buf = self.buf[start:start + TASK_ROWS * ROW.itemsize]
        rows = self.rows[index]
        known: dict[tuple[str, str], int] = {}
        for i in range(TASK_ROWS - 1):
            name = bytes(rows[i]["name"]).decode(errors="replace")
            if not name:
                break
            task, _, method = name.rpartition(".")
            known[task, method] = i

        def new_row(task: str, method: str) -> int:
            used = len(known)
            if used >= TASK_ROWS - 1:
                return TASK_ROWS - 1
            # The name must fit whole: a cut one would merge methods.
            name = f"{task}.{method}".encode()
            if len(name) > _field(ROW, "name")[1]:
                return TASK_ROWS - 1
            rows[used]["name"] = name
            known[task, method] = used
            return used

        # The loop gets its own dict: known counts only the rows given names here.
        return counts, rows_buf, dict(known), new_row


def attach(key: int) -> StatsSegment:
    """The stats segment on that key, read-only in spirit: LookupError when there is none,
    StatsUnreadable when it cannot be read."""
    try:
        shm = sysv_ipc.SharedMemory(key)
    except sysv_ipc.ExistentialError:
        raise LookupError(f"no stats segment at SysV key 0x{key:x}") from None
    except sysv_ipc.PermissionsError as exc:
        raise StatsUnreadable(f"the stats segment at SysV key 0x{key:x} cannot be read: "
                              f"{exc}") from None
    try:
        return StatsSegment(shm, False)
    except StatsUnreadable:
        shm.detach()
        raise


def pid_of(pid_file: str) -> int:
    """The master's pid in a pid file; OSError or ValueError when it has none."""
    with open(pid_file) as f:
        return int(f.read().split()[0])
