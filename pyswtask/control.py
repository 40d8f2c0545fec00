"""Control messages from any process of a server to its master, through the master's inbox.

The master's id (``server.master_id``, after every child's) takes these only; any other message
sent there is logged and dropped.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import context, pipe
from ._core import Mailbox
from .errors import ServerNotRunning

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("pyswtask.master")

START_PROCESS = "pyswtask.start_process"
READY = "pyswtask.ready"


def request_start(server: Server, name: str) -> None:
    """Asks the master to start the boot=False user process ``name``."""
    if server.master_pid is None or server.master_id is None:
        raise ServerNotRunning("start_process works in the processes of a running server")
    if name not in server.process_ids:
        known = ", ".join(sorted(server.process_ids)) or "none"
        raise ValueError(f"this server has no user process named {name!r} (processes: {known})")
    assert context.current.mailbox is not None
    pipe.send_message(name, server.master_id, type=START_PROCESS)


def announce_ready(server: Server, pid: int) -> None:
    """Tells the master this worker or task worker is serving (its start hooks ran): a reload
    moves on to the next process only then."""
    if server.master_id is None:
        return
    try:
        pipe.send_message(pid, server.master_id, type=READY)
    except Exception as exc:
        log.warning("process %d could not tell the master it is ready: %s", pid, exc)


def read_control(mailbox: Mailbox) -> tuple[list[str], list[int]]:
    """The messages waiting in the master's inbox: the names of the processes asked for, and
    the pids of the children that said they are ready."""
    names: list[str] = []
    ready: list[int] = []
    for src, _msg_id, body in mailbox.receive():
        try:
            mtype, data = pipe.unpack_message(body)
        except ValueError as exc:
            log.error("master: message from process %d dropped: %s", src, exc)
            continue
        if mtype == START_PROCESS and isinstance(data, str):
            names.append(data)
        elif mtype == READY and isinstance(data, int):
            ready.append(data)
        else:
            log.warning("master: message %r from process %d dropped: the master takes control "
                        "messages only", mtype, src)
    return names, ready
