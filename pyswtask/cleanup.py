"""Finds and removes the SysV objects that servers killed outright (SIGKILL, a crash, a power cut
of the process) could not remove themselves.

A server's objects carry its master's pid: the crontab's segments were created by the master
(their creator pid) under a key derived from it, and the message queue's record names it. At
start, a master removes the objects of this user in pyswtask's key ranges whose master is gone
and which no process has attached, so that start/kill cycles leave nothing behind.
"""

from __future__ import annotations

import logging
import os

import sysv_ipc  # type: ignore[import-not-found]

from . import cron
from .transport import msgqueue

log = logging.getLogger("pyswtask.master")


def _table(path: str) -> list[list[str]]:
    try:
        with open(path) as f:
            return [line.split() for line in f.readlines()[1:]]
    except OSError:
        return []


def sweep() -> int:
    """Removes what dead servers of this user left in pyswtask's default key ranges; returns
    how many objects went."""
    uid = os.geteuid()
    removed = 0
    cron_lo, cron_hi = cron.DEFAULT_KEY_BASE, cron.DEFAULT_KEY_BASE + 0x10000
    q_lo, q_hi = msgqueue.PRIVATE_KEY_BASE, msgqueue.PRIVATE_KEY_BASE + 0x8000
    for fields in _table("/proc/sysvipc/shm"):
        try:
            key, shmid, cpid, nattch, owner = (int(fields[0]), int(fields[1]), int(fields[4]),
                                               int(fields[6]), int(fields[7]))
        except (IndexError, ValueError):
            continue
        if owner != uid or nattch or msgqueue.pid_alive(cpid):
            continue
        if cron_lo <= key < cron_hi:
            what = "crontab table"
        elif q_lo <= key < q_hi:
            what = "message queue record"
            removed += _remove_queue(key)
        else:
            continue
        try:
            sysv_ipc.remove_shared_memory(shmid)
        except sysv_ipc.Error:
            continue
        removed += 1
        log.warning("removed the %s 0x%x left by server pid %d, which is gone", what, key, cpid)
    return removed


def _remove_queue(key: int) -> int:
    try:
        mq = sysv_ipc.MessageQueue(key)
    except sysv_ipc.Error:
        return 0
    left = mq.current_messages
    mq.remove()
    log.warning("removed the message queue 0x%x (%d message(s) in it) left by a server that "
                "is gone", key, left)
    return 1
