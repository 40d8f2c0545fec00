"""The server's SysV message queue (Swoole's ``message_queue_key`` / ``task_ipc_mode``).

The master creates the queue (mode 0600) before it forks and removes it when the server stops.
Task workers read it with ``QueueReader`` (in modes 2 and 3 in msgrcv on their own thread, else
on a reader thread); message type ``worker_num + 1 + i`` is task worker ``i``'s, as in Swoole.
In task_ipc_mode 2 the workers send their tasks there too, by type; in mode 3 every task worker
reads every task type (contention).
Results always come back on the worker's unix socket channel, or, for a separate program (a
"command"), on that program's reply socket.

A keyed queue is announced by a small shared-memory record under the same key, holding what a
command needs: the master's pid, the process counts, the per-message limit. A command that
finds no record, or a record whose master is gone, knows no server is running.

A task worker's reader receives into a hold in shared memory (``hold_size``), one per task
worker index, which the master maps before it forks. When a task worker dies, the master reads
its hold (``ServerQueue.take_back``): what it had not started goes back on the queue (to be run
once, by its successor or, in mode 3, by any task worker); the tasks it was running (one, or
several coroutine tasks run concurrently) fail with
TaskWorkerLost for its caller (a worker, on the channel from that task worker; a command, on its
reply socket; a command's ASYNC task has nobody to tell, so the master logs it), as do the
workers' tasks it ran whose results had not left it.

A queue left by a server that died without removing it is adopted at the next start: its
messages run, as they would under Swoole, and the log says how many. ``pyswtask queue purge``
discards them first when that is not wanted. The queue's message and hold formats are the core's
(core/msgqueue.pyx); this module owns the queue's life and never parses a message itself.
"""

from __future__ import annotations

import collections
import enum
import logging
import mmap
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped]
import sysv_ipc  # type: ignore[import-not-found]

from .._core import (
    PART_TYPE_BASE,
    RECORD_MAX,
    ReplyWriter,
    hold_size,
    is_last_part,
    is_sentinel,
    queue_lost_frame,
    queue_receive,
    queue_send,
    recover_hold,
    reply_records,
    sentinel,
)
from ..sysv import pid_alive, private_queue_key

__all__ = ["ServerQueue", "QueueInfo", "read_info", "parse_key", "system_msgmax",
           "reply_address", "reply_prefix", "queue_stat", "ReplySender", "IPC_MODES", "IpcMode"]

log = logging.getLogger("pyswtask.queue")

class IpcMode(enum.IntEnum):
    """``task_ipc_mode``: how workers send tasks to task workers, as in Swoole."""

    SOCKETS = 1             # unix socket channels; the queue serves separate programs only
    QUEUE = 2               # the queue, one message type per task worker
    QUEUE_CONTENTION = 3    # the queue, any idle task worker taking the next task


IPC_MODES = tuple(IpcMode)
_INFO_MAGIC = "pyswtask-queue"
_INFO_SIZE = 4096


def parse_key(value: Any, what: str = "message_queue_key") -> int:
    """A SysV key from an int or a string such as "0x70001001"."""
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise ValueError(f"{what} must be an int or a hex string such as 0x70001001, not "
                             f"{value!r}") from None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**31:
        raise ValueError(f"{what} must be a positive int below 2**31, not {value!r}")
    return value


def system_msgmax() -> int:
    """The kernel's per-message limit (msgmax), capped at one record."""
    try:
        with open("/proc/sys/kernel/msgmax") as f:
            value = int(f.read())
    except (OSError, ValueError):
        value = 8192
    return min(value, RECORD_MAX)


def reply_address(msqid: int, pid: int) -> bytes:
    """The abstract unix socket a command reads its CO results on."""
    return reply_prefix(msqid) + b"%d" % pid


def reply_prefix(msqid: int) -> bytes:
    """The reply sockets' addresses of one queue, up to the command's pid."""
    return b"\0pyswtask-reply/%d/" % msqid


@dataclass(frozen=True)
class QueueInfo:
    """What a server publishes beside its keyed queue."""

    pid: int
    worker_num: int
    task_worker_num: int
    mode: int
    msgmax: int
    msqid: int
    package_max_length: int

    def alive(self) -> bool:
        return pid_alive(self.pid)


def read_info(key: int) -> QueueInfo | None:
    """The record of the server on that key, or None when there is none."""
    try:
        shm = sysv_ipc.SharedMemory(key)
    except sysv_ipc.ExistentialError:
        return None
    try:
        raw = shm.read(_INFO_SIZE)
    finally:
        shm.detach()
    try:
        size = int.from_bytes(raw[:4], "little")
        data = msgpack.unpackb(raw[4:4 + size])
        if data.pop("magic") != _INFO_MAGIC:
            return None
        return QueueInfo(**data)
    except Exception:
        return None


def queue_stat(key: int) -> dict[str, Any] | None:
    """Messages and bytes waiting in the queue on that key, its limits and last users; None
    when there is no such queue."""
    try:
        mq = sysv_ipc.MessageQueue(key)
    except sysv_ipc.ExistentialError:
        return None
    cbytes = None
    try:
        with open("/proc/sysvipc/msg") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1]) == mq.id:
                    cbytes = int(fields[3])
    except (OSError, ValueError, IndexError):
        pass
    return {"key": f"0x{key:08x}", "msqid": mq.id, "messages": mq.current_messages,
            "bytes": cbytes, "max_bytes": mq.max_size, "msgmax": system_msgmax(),
            "mode": oct(mq.mode), "last_send_pid": mq.last_send_pid,
            "last_receive_pid": mq.last_receive_pid}


def purge(key: int) -> int:
    """Discards every message waiting on that key; returns how many."""
    mq = sysv_ipc.MessageQueue(key, max_message_size=system_msgmax())
    count = 0
    while True:
        try:
            mq.receive(block=False)
        except sysv_ipc.BusyError:
            return count
        count += 1


class ServerQueue:
    """The master's handle of the queue: creates or adopts it, publishes it, removes it."""

    def __init__(self, key: int | None, mode: int, worker_num: int, task_worker_num: int,
                 package_max_length: int) -> None:
        self.key = key
        self.mode = mode
        self.worker_num = worker_num
        self.task_worker_num = task_worker_num
        self.package_max_length = package_max_length
        self.msgmax = system_msgmax()
        self.mq: sysv_ipc.MessageQueue | None = None
        self.info_shm: sysv_ipc.SharedMemory | None = None
        self.info_key: int | None = None
        self.msqid = -1
        # One hold per task worker: what its reader took from the queue and it did not finish.
        self.holds = [mmap.mmap(-1, hold_size(self.msgmax)) for _ in range(task_worker_num)]
        # Messages taken back from dead task workers, waiting for room in the queue.
        self.backlog: collections.deque[tuple[int, bytes]] = collections.deque()
        self.replies: socket.socket | None = None

    def task_type(self, index: int) -> int:
        """The message type of task worker index's tasks."""
        return self.worker_num + 1 + index

    def reader_type(self, index: int) -> int:
        """What task worker index passes to msgrcv: its own type, or in contention mode every
        task type (the lowest waiting first)."""
        if self.mode == IpcMode.QUEUE_CONTENTION:
            return -(self.worker_num + self.task_worker_num)
        return self.task_type(index)

    def open(self, master_pid: int) -> None:
        if self.key is None:
            derived = private_queue_key(master_pid)
            try:
                self.mq = sysv_ipc.MessageQueue(derived, sysv_ipc.IPC_CREX, mode=0o600)
                self.info_key = derived
            except sysv_ipc.ExistentialError:
                # Another live server's pid maps to the same key: go without one.
                self.mq = sysv_ipc.MessageQueue(sysv_ipc.IPC_PRIVATE, sysv_ipc.IPC_CREX,
                                                mode=0o600)
        else:
            self.mq = self._open_keyed(self.key)
            self.info_key = self.key
        self.msqid = self.mq.id
        if self.info_key is not None:
            self._publish(self.info_key, master_pid)

    def _open_keyed(self, key: int) -> sysv_ipc.MessageQueue:
        info = read_info(key)
        if info is not None and info.alive() and info.pid != os.getpid():
            raise RuntimeError(f"message_queue_key 0x{key:x} is in use by a running server "
                               f"(master pid {info.pid}); choose another key")
        try:
            return sysv_ipc.MessageQueue(key, sysv_ipc.IPC_CREX, mode=0o600)
        except sysv_ipc.ExistentialError:
            pass
        mq = sysv_ipc.MessageQueue(key)
        if mq.uid != os.geteuid():
            raise RuntimeError(f"message_queue_key 0x{key:x} names a queue of another user "
                               f"(uid {mq.uid}); choose another key")
        mq.mode = 0o600
        left = mq.current_messages
        who = f"server pid {info.pid}, which is gone" if info else "another program"
        if left:
            log.warning("message queue 0x%x was left by %s: its %d message(s) will run, as "
                        "under Swoole (run `pyswtask queue purge --key 0x%x` before starting "
                        "to discard them)", key, who, left, key)
            self._requeue(mq)
        else:
            log.info("message queue 0x%x left by %s adopted (empty)", key, who)
        return mq

    def _requeue(self, mq: sysv_ipc.MessageQueue) -> None:
        """Moves the old tasks to this server's task types (the old server may have had other
        process counts); drops old stop sentinels. Later parts of bodies keep their types."""
        old: list[bytes] = []
        while (text := queue_receive(mq.id, -(PART_TYPE_BASE - 1), self.msgmax)) is not None:
            if is_sentinel(text):
                continue
            old.append(text)
        for i, text in enumerate(old):
            if not queue_send(mq.id, self.task_type(i % self.task_worker_num), text):
                log.error("message queue full while moving old messages: %d dropped",
                          len(old) - i)
                break

    def _publish(self, key: int, master_pid: int) -> None:
        try:
            sysv_ipc.SharedMemory(key).remove()
        except sysv_ipc.ExistentialError:
            pass
        body = msgpack.packb({
            "magic": _INFO_MAGIC, "pid": master_pid, "worker_num": self.worker_num,
            "task_worker_num": self.task_worker_num, "mode": self.mode, "msgmax": self.msgmax,
            "msqid": self.msqid, "package_max_length": self.package_max_length})
        shm = sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, mode=0o600, size=_INFO_SIZE)
        shm.write(len(body).to_bytes(4, "little") + body)
        shm.detach()
        self.info_shm = shm

    def remove(self) -> None:
        """Removes the queue and its record; says how many messages it still held."""
        if self.info_shm is not None:
            try:
                self.info_shm.remove()
            except sysv_ipc.ExistentialError:
                pass
            self.info_shm = None
        if self.replies is not None:
            self.replies.close()
            self.replies = None
        for hold in self.holds:
            hold.close()
        self.holds = []
        if self.mq is None:
            return
        try:
            left = self.mq.current_messages
            self.mq.remove()
        except sysv_ipc.ExistentialError:
            left = 0
        if left:
            log.warning("message queue %s removed with %d message(s) not run before the "
                        "stop deadline (max_wait_time)",
                        f"0x{self.key:x}" if self.key else f"id {self.msqid}", left)
        self.mq = None

    def take_back(self, index: int, worker_id: int, reason: str,
                  tell_worker: Callable[[int, bytes], None]) -> None:
        """After task worker index (worker id worker_id) died: puts back on the queue what its
        reader held and it had not started, and reports the tasks that died with it (reason
        says how it died). tell_worker(worker, frame) sends a LOST frame to a worker."""
        put_back, running, ran, gone, open_part = recover_hold(self.holds[index], self.msgmax)
        if open_part:
            put_back += self._parts_left(open_part)
        self.backlog.extend(put_back)
        if put_back:
            log.info("%d message(s) task worker %d had taken from the queue put back",
                     len(put_back), worker_id)
        ran_by: dict[int, list[int]] = {}
        for task_id, src, _, _ in ran:
            ran_by.setdefault(src, []).append(task_id)
        for src, ids in ran_by.items():
            if src < self.worker_num:
                tell_worker(src, queue_lost_frame(worker_id, 0, ids, reason))
        lost = [(task, "while running") for task in running]
        if gone is not None:
            lost.append((gone, "before it started (its body was larger than the reader could "
                               "hold) with"))
        for task, what in lost:
            task_id, src, from_command, is_async = task
            if task is gone:
                self._parts_left(PART_TYPE_BASE | (task_id & (PART_TYPE_BASE - 1)))
            if from_command:
                self._command_lost(task_id, is_async, worker_id, reason, what)
            elif src < self.worker_num:
                tell_worker(src, queue_lost_frame(worker_id, task_id, [], reason))
        self.send_backlog()

    def _command_lost(self, task_id: int, is_async: bool, worker_id: int, reason: str,
                      what: str) -> None:
        pid = task_id >> 32
        if is_async:
            # Nobody waits for it: the log is all there is to tell.
            log.error("ASYNC task %d of command pid %d lost: %s %s it", task_id, pid, reason,
                      what)
            return
        if self.replies is None:
            self.replies = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.replies.setblocking(False)
        body = msgpack.packb(["TaskWorkerLost", f"{reason} {what} this task", ""])
        try:
            for record in reply_records(task_id, False, worker_id, body):
                self.replies.sendto(record, reply_address(self.msqid, pid))
        except OSError as exc:
            log.info("command pid %d not told that its task %d was lost: %s", pid, task_id, exc)

    def _parts_left(self, ptype: int, wait: float = 2.0) -> list[tuple[int, bytes]]:
        """Takes the parts of a body still in the queue, up to its last one (its sender may
        still be writing them): they must follow the ones put back, not come before them."""
        parts: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + wait
        while True:
            text = queue_receive(self.msqid, ptype, self.msgmax)
            if text is not None:
                parts.append((ptype, text))
                if is_last_part(text):
                    return parts
            elif time.monotonic() >= deadline:
                log.error("the rest of a body in the queue never came (%d part(s) taken)",
                          len(parts))
                return parts
            else:
                time.sleep(0.001)

    def send_backlog(self) -> bool:
        """Sends what was taken back, as far as the queue takes it; True when all went."""
        while self.backlog:
            mtype, text = self.backlog[0]
            try:
                if not queue_send(self.msqid, mtype, text):
                    return False
            except OSError as exc:
                log.error("%d message(s) taken back from a task worker dropped: %s",
                          len(self.backlog), exc)
                self.backlog.clear()
                return True
            self.backlog.popleft()
        return True

    def stop_reader(self, index: int, pid: int, timeout: float) -> bool:
        """Asks task worker index's reader thread (in process pid) to finish: a sentinel
        queued behind the messages already waiting for it."""
        mtype = abs(self.reader_type(index))
        deadline = time.monotonic() + timeout
        while not queue_send(self.msqid, mtype, sentinel(pid)):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True


class ReplySender:
    """A task worker's side of the reply sockets: results of CO tasks from commands. ``send``
    is the core's writer itself (no Python call per result); only a result it could not
    deliver comes back here, to be logged."""

    def __init__(self, msqid: int, worker_id: int) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # A command that does not read its replies must not hold up the task worker for long:
        # SO_SNDTIMEO on a blocking socket (settimeout would make the core's sends fail at once
        # on a full socket).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("@ll", 1, 0))
        self.send = ReplyWriter(sock, reply_prefix(msqid), worker_id, _reply_dropped).send


def _reply_dropped(task_id: int, gone: bool) -> None:
    if gone:
        log.info("result of task %d dropped: its command (pid %d) is gone", task_id,
                 task_id >> 32)
    else:
        log.warning("result of task %d dropped: its command (pid %d) does not read its "
                    "replies", task_id, task_id >> 32)
