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


def request_start(server: Server, name: str) -> None:
    """Asks the master to start the boot=False user process ``name``."""
    if server.master_pid is None or server.master_id is None:
        raise ServerNotRunning("start_process works in the processes of a running server")
    if name not in server.process_ids:
        known = ", ".join(sorted(server.process_ids)) or "none"
        raise ValueError(f"this server has no user process named {name!r} (processes: {known})")
    assert context.current.mailbox is not None
    pipe.send_message(name, server.master_id, type=START_PROCESS)


def requested_starts(mailbox: Mailbox) -> list[str]:
    """The names of the processes asked for in the messages waiting in the master's inbox."""
    names = []
    for src, _msg_id, body in mailbox.receive():
        try:
            mtype, data = pipe.unpack_message(body)
        except ValueError as exc:
            log.error("master: message from process %d dropped: %s", src, exc)
            continue
        if mtype == START_PROCESS and isinstance(data, str):
            names.append(data)
        else:
            log.warning("master: message %r from process %d dropped: the master takes control "
                        "messages only", mtype, src)
    return names
