"""Pipe messages between the processes of a server (Swoole's sendMessage / onPipeMessage).

A message is ``[type, data]`` (Swoft's ``PipeMessage::pack(type, data)``) in a PIPE frame, sent to
the inbox of a process by its global id: workers 0..N-1, task workers N..N+M-1, user processes
after them, the master's inbox last. Arriving messages fire ``Event.PIPE_MESSAGE`` with params
``(type, data, src_id)``. Any msgpack-able data, any size: the core's ``Mailbox`` frames and
fragments the body, never through temp files.

This module owns the message body and its dispatch only: which process may send how (blocking,
or behind a worker's loop) is the sending role's business, and the framing is the core's.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import msgpack  # type: ignore[import-untyped]

from .._core import Mailbox, brief_repr
from ..envelope import check_length, describe_unpackable
from ..events import Event, events

__all__ = ["pack_message", "unpack_message", "receive_messages", "dispatch_messages",
           "describe_ids"]

log = logging.getLogger("pyswtask.pipe")

_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack

Intercept = Callable[[str, Any, int], bool]


def pack_message(type: str, data: Any, limit: int = 0) -> bytes:
    """A pipe message body; TypeError naming the value msgpack cannot pack, ValueError above
    ``limit`` bytes (the server's package_max_length; 0: none)."""
    if not isinstance(type, str) or not type:
        raise TypeError(f"a pipe message type must be a non-empty string, not {type!r}")
    try:
        body: bytes = _packb((type, data))
    except (TypeError, ValueError, OverflowError) as exc:
        what = describe_unpackable([data], exc).replace("params[0]", "data")
        raise TypeError(f"pipe message {type!r} cannot be packed: {what}") from None
    if limit and len(body) > limit:     # the message's name is built only for the error
        check_length(f"pipe message {type!r} packs", len(body), limit)
    return body


def pack_raw(type: str, data: Any) -> bytes:
    """A pipe message body without the checks, for callers that make their own (the relay
    names the task, not the message, in its errors)."""
    return _packb((type, data))  # type: ignore[no-any-return]


def unpack_message(body: bytes) -> tuple[str, Any]:
    """(type, data) from a pipe message body; ValueError if it is not one."""
    try:
        obj = msgpack.unpackb(body, strict_map_key=False)
    except Exception as exc:
        raise ValueError(f"pipe message is not valid msgpack: {exc}") from None
    if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], str)):
        raise ValueError(f"pipe message is not [type, data]: {brief_repr(obj, 100)}")
    return obj[0], obj[1]


def receive_messages(mailbox: Mailbox, what: str = "pipe message"
                     ) -> Iterator[tuple[int, str, Any]]:
    """(src, type, data) of every message waiting; one that is not a pipe message is logged
    (``what`` starts the line) and skipped."""
    for src, _msg_id, body in mailbox.receive():
        try:
            mtype, data = unpack_message(body)
        except ValueError as exc:
            log.error("%s from process %d dropped: %s", what, src, exc)
            continue
        yield src, mtype, data


def dispatch_messages(mailbox: Mailbox, target: Any, intercept: Intercept | None = None) -> int:
    """Fires PIPE_MESSAGE (with ``target``, the server) for every message waiting; returns how
    many there were. intercept, when given, sees each message first and returns True to take it
    out of the event."""
    count = 0
    for src, mtype, data in receive_messages(mailbox):
        count += 1
        if intercept is not None and intercept(mtype, data, src):
            continue
        # Checked first: a user process's task messages come by the thousand, mostly unheard.
        if events.has_listeners(Event.PIPE_MESSAGE):
            events.trigger(Event.PIPE_MESSAGE, target, mtype, data, src)
    return count


def describe_ids(worker_num: int, task_worker_num: int, inboxes: int) -> str:
    """The ids a message can go to, for an out-of-range error (the last inbox: the master's)."""
    n, m = worker_num, task_worker_num
    p = inboxes - 1 - n - m
    return (f"this server has {n} worker(s) (ids 0..{n - 1}), {m} task worker(s) "
            f"(ids {n}..{n + m - 1}) and {p} user process(es) (ids {n + m}..{n + m + p - 1})")
