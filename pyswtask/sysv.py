"""pyswtask's SysV IPC namespace: its key ranges, the pid check, and the sweep of what dead
servers left behind.

Owns the default key ranges (the crontab's shared-memory tables, the message queue's
private queue and record, the stats segment, the server's Tables), all derived from the master's
pid so that a server killed outright (SIGKILL, a crash) leaves objects the next master can
attribute and remove. Also owns the "create a segment, removing one left by a dead server" step.

It must not import ``cron`` or ``msgqueue``: they import their keys from here, not the other way
round. It knows the objects only by key range, never their layout.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import sysv_ipc  # type: ignore[import-not-found]

__all__ = ["DEFAULT_KEY_BASE", "PRIVATE_KEY_BASE", "STATS_KEY_BASE", "TABLE_KEY_BASE",
           "MAX_SERVER_TABLES", "default_key", "private_queue_key", "stats_key", "table_key",
           "pid_alive", "create_segment", "sweep"]

# Both the sweep and create_segment run in the master at start-up.
log = logging.getLogger("pyswtask.master")

# The crontab's two tables: key base + 2 * (master pid % 0x8000), and one more.
DEFAULT_KEY_BASE = 0x70030000
_CRON_SPAN = 0x10000
# Modes 2 and 3 without message_queue_key: a key derived from the master's pid, so that a queue
# left by a killed server can be found and removed (sweep); no program delivers there.
PRIVATE_KEY_BASE = 0x70040000
_QUEUE_SPAN = 0x8000
# The stats segment (pyswtask.counters) without stats_shm_key: one key per master pid.
STATS_KEY_BASE = 0x70050000
_STATS_SPAN = 0x8000

# A server's Tables (Server.table): key base + 32 * (master pid % 0x8000) + the table's index.
TABLE_KEY_BASE = 0x70100000
MAX_SERVER_TABLES = 32
_TABLE_SPAN = MAX_SERVER_TABLES * 0x8000


def default_key(master_pid: int) -> int:
    """The SysV key of a server's crontab origin table (the run-time table's is one more)."""
    return DEFAULT_KEY_BASE + 2 * (master_pid % 0x8000)


def private_queue_key(master_pid: int) -> int:
    """The SysV key of a server's message queue and its record when no key is set."""
    return PRIVATE_KEY_BASE + master_pid % _QUEUE_SPAN


def stats_key(master_pid: int) -> int:
    """The SysV key of a server's stats segment when no stats_shm_key is set."""
    return STATS_KEY_BASE + master_pid % _STATS_SPAN


def table_key(master_pid: int, index: int) -> int:
    """The SysV key of a server's index-th Table (0 <= index < MAX_SERVER_TABLES)."""
    if not 0 <= index < MAX_SERVER_TABLES:
        raise ValueError(f"a server has at most {MAX_SERVER_TABLES} tables")
    return TABLE_KEY_BASE + MAX_SERVER_TABLES * (master_pid % 0x8000) + index


def pid_alive(pid: int) -> bool:
    """Whether a process of that pid exists (of any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_segment(key: int, size: int, *, setting: str, what: str,
                   logger: logging.Logger = log) -> Any:
    """Creates a shared-memory segment (mode 0600) under key; one left there by a server that is
    gone (no process attached) is removed first. RuntimeError, naming the setting to change,
    when a running process holds the key."""
    try:
        return sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, mode=0o600, size=size)
    except sysv_ipc.ExistentialError:
        old = sysv_ipc.SharedMemory(key)
        old.detach()
        if old.number_attached > 0:
            raise RuntimeError(f"SysV shared memory key 0x{key:x} is in use by a running "
                               f"process (pid {old.creator_pid}): set {setting} to another "
                               "key") from None
        logger.warning("%s: removed shared memory 0x%x left by a server that is gone (pid %d)",
                       what, key, old.creator_pid)
        old.remove()
        return sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, mode=0o600, size=size)


def _table(path: str) -> list[list[str]]:
    try:
        with open(path) as f:
            return [line.split() for line in f.readlines()[1:]]
    except OSError:
        return []


def sweep() -> int:
    """Removes what dead servers of this user left in pyswtask's default key ranges; returns
    how many objects went.

    A server's objects carry its master's pid: the crontab's and the Tables' segments were
    created by the master (their creator pid) under a key derived from it, and the message
    queue's record names it. At start, a master removes the objects of this user in these ranges
    whose master is gone and which no process has attached, so that start/kill cycles leave
    nothing behind.
    """
    uid = os.geteuid()
    removed = 0
    cron_lo, cron_hi = DEFAULT_KEY_BASE, DEFAULT_KEY_BASE + _CRON_SPAN
    q_lo, q_hi = PRIVATE_KEY_BASE, PRIVATE_KEY_BASE + _QUEUE_SPAN
    s_lo, s_hi = STATS_KEY_BASE, STATS_KEY_BASE + _STATS_SPAN
    t_lo, t_hi = TABLE_KEY_BASE, TABLE_KEY_BASE + _TABLE_SPAN
    for fields in _table("/proc/sysvipc/shm"):
        try:
            key, shmid, cpid, nattch, owner = (int(fields[0]), int(fields[1]), int(fields[4]),
                                               int(fields[6]), int(fields[7]))
        except (IndexError, ValueError):
            continue
        if owner != uid or nattch or pid_alive(cpid):
            continue
        if cron_lo <= key < cron_hi:
            what = "crontab table"
        elif t_lo <= key < t_hi:
            what = "table"
        elif q_lo <= key < q_hi:
            what = "message queue record"
            removed += _remove_queue(key)
        elif s_lo <= key < s_hi:
            what = "stats segment"
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
