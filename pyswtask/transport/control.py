"""Control messages from any process of a server to its master, through the master's inbox.

The master's id (``server.master_id``, after every child's) takes these only; any other message
sent there is logged and dropped. Senders pass in their own ``send`` (a role's send_message):
this module owns the message types and their reading, not how a process writes.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from .._core import Mailbox
from ..errors import ServerNotRunning
from .pipe import receive_messages

__all__ = ["START_PROCESS", "READY", "request_start", "announce_ready", "read_control"]

log = logging.getLogger("pyswtask.master")

START_PROCESS = "pyswtask.start_process"
READY = "pyswtask.ready"

Send = Callable[[Any, int, str], None]


def request_start(send: Send, master_id: int | None, process_ids: dict[str, int],
                  name: str) -> None:
    """Asks the master to start the boot=False user process ``name``."""
    if master_id is None:
        raise ServerNotRunning("start_process works in the processes of a running server")
    if name not in process_ids:
        known = ", ".join(sorted(process_ids)) or "none"
        raise ValueError(f"this server has no user process named {name!r} (processes: {known})")
    send(name, master_id, START_PROCESS)


def announce_ready(send: Send, master_id: int | None, pid: int) -> None:
    """Tells the master this worker or task worker is serving (its start hooks ran): a reload
    moves on to the next process only then."""
    if master_id is None:
        return
    try:
        send(pid, master_id, READY)
    except Exception as exc:
        log.warning("process %d could not tell the master it is ready: %s", pid, exc)


def read_control(mailbox: Mailbox) -> tuple[list[str], list[int]]:
    """The messages waiting in the master's inbox: the names of the processes asked for, and
    the pids of the children that said they are ready."""
    names: list[str] = []
    ready: list[int] = []
    for src, mtype, data in receive_messages(mailbox, "master: message"):
        if mtype == START_PROCESS and isinstance(data, str):
            names.append(data)
        elif mtype == READY and isinstance(data, int):
            ready.append(data)
        else:
            log.warning("master: message %r from process %d dropped: the master takes control "
                        "messages only", mtype, src)
    return names, ready
