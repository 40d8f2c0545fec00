"""The checks every delivery path makes before a task or a message leaves its process.

A worker's ``Task.deliver``, a user process's ``deliver_by_process``, a pipe message and a
separate program's delivery all refuse the same bad input with the same words: a task name or
method that is not a string, a delivery type that is neither CO nor ASYNC, params msgpack cannot
pack (naming the value and where it sits), a body above the server's ``package_max_length``.
The bytes themselves are the core's business (``pack_envelope``; ``envelope_to_submit`` for a
worker's ASYNC task, whose large body the dispatcher packs into its arena block); this module
owns only the checks and what every envelope carries besides the call: the trace ids, the
deadline of a CO delivery, and the origin of a task a worker delivers on another process's
behalf (its pid and one of the ``ORIGIN_*`` roles). It must not import a role or a transport.
"""

from __future__ import annotations

import contextvars
import time
from typing import Any, Sequence

from ._core import envelope_to_submit, pack_envelope, packed_size

__all__ = ["TYPE_CO", "TYPE_ASYNC", "ORIGIN_WORKER", "ORIGIN_USER_PROCESS", "ORIGIN_CRON",
           "ORIGIN_PROGRAM", "ORIGIN_NAMES", "trace_ids", "pack_task", "task_to_submit",
           "pack_call", "check_type", "check_timeout", "check_length", "deadline_after",
           "params_error", "describe_unpackable"]

TYPE_CO = 1
TYPE_ASYNC = 2

# Who delivered a task (Task.current().origin_role): on the wire, a small int. A worker's own
# task and a separate program's carry none (the frame tells them apart, and the task id holds
# their pid); a worker delivering for a user process or the crontab names that process.
ORIGIN_WORKER = 1
ORIGIN_USER_PROCESS = 2
ORIGIN_CRON = 3
ORIGIN_PROGRAM = 4
ORIGIN_NAMES = {ORIGIN_WORKER: "worker", ORIGIN_USER_PROCESS: "user_process",
                ORIGIN_CRON: "cron", ORIGIN_PROGRAM: "program"}

trace_ids: contextvars.ContextVar[tuple[str, int]] = contextvars.ContextVar(
    "pyswtask_trace_ids", default=("", 0))
"""(logid, spanid) of the current request or task; carried in every envelope."""


def check_type(type: int) -> int:
    """The delivery type, or ValueError when it is neither CO nor ASYNC."""
    if type not in (TYPE_CO, TYPE_ASYNC):
        raise ValueError(f"type must be Task.TYPE_CO or Task.TYPE_ASYNC, not {type!r}")
    return type


def check_timeout(timeout: float) -> float:
    """A timeout in seconds, or ValueError when it is not a positive number."""
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    return float(timeout)


def check_length(what: str, size: int, limit: int) -> None:
    """ValueError when a packed body is above package_max_length (``limit``; 0: none).
    ``what`` starts the message: "params of Mailer.send pack", "pipe message 'x' packs"."""
    if limit and size > limit:
        raise ValueError(f"{what} to {size} bytes, above the server's package_max_length "
                         f"({limit})")


def deadline_after(timeout: Any) -> float | None:
    """The unix time a CO delivery with this timeout gives up; None for a timeout that is not
    a positive number (check_timeout names it)."""
    try:
        return time.time() + timeout if timeout > 0 else None
    except TypeError:
        return None


def pack_task(name: str, method: str, params: Sequence[Any], type: int, limit: int,
              deadline: float | None = None, origin: tuple[int, int] | None = None) -> bytes:
    """The envelope of one call, checked: TypeError for names or params that cannot be sent,
    ValueError above ``limit`` bytes (0: no limit). ``deadline``: when a CO caller gives up
    (unix time); ``origin``: (pid, ORIGIN_*) of the process a worker delivers it for."""
    _check_names(name, method)
    logid, spanid = trace_ids.get()
    try:
        if origin is None and deadline is None:
            body = pack_envelope(name, method, params, type, logid, spanid)  # type: ignore[arg-type]
        elif origin is None:
            body = pack_envelope(name, method, params, type, logid, spanid,  # type: ignore[arg-type]
                                 deadline)
        else:
            body = pack_envelope(name, method, params, type, logid, spanid,  # type: ignore[arg-type]
                                 deadline, origin[0], origin[1])
    except (TypeError, ValueError, OverflowError) as exc:
        raise params_error(name, method, params, exc) from None
    if limit and len(body) > limit:
        check_length(f"params of {name}.{method} pack", len(body), limit)
    return body


def task_to_submit(name: str, method: str, params: Sequence[Any], type: int,
                   limit: int) -> bytes | tuple[Any, ...]:
    """pack_task for a worker's ASYNC delivery, checked the same way: its bytes, or for a large
    body the envelope's fields, which the dispatcher packs where the body leaves from."""
    _check_names(name, method)
    logid, spanid = trace_ids.get()
    try:
        body = envelope_to_submit(name, method, params, type, logid, spanid)  # type: ignore[arg-type]
        size = len(body) if body.__class__ is bytes else packed_size(body)
    except (TypeError, ValueError, OverflowError) as exc:
        raise params_error(name, method, params, exc) from None
    if limit and size > limit:
        check_length(f"params of {name}.{method} pack", size, limit)
    return body


def _check_names(name: Any, method: Any) -> None:
    if not isinstance(name, str) or not isinstance(method, str):
        raise TypeError(f"task name and method must be strings, not {name!r} and {method!r}")


def pack_call(call: Sequence[Any], index: int, limit: int, deadline: float | None = None) -> bytes:
    """One item of a batch, ``(name, method)`` or ``(name, method, params)``, packed CO."""
    if isinstance(call, (str, bytes)) or not 2 <= len(call) <= 3:
        raise TypeError(f"batch item {index} must be (name, method) or (name, method, params), "
                        f"not {call!r:.100}")
    return pack_task(call[0], call[1], call[2] if len(call) == 3 else (), TYPE_CO, limit,
                     deadline)


def params_error(name: str, method: str, params: Any, exc: Exception) -> TypeError:
    """The TypeError for params msgpack refused, naming the value and where it sits."""
    return TypeError(f"params of {name}.{method} cannot be packed: "
                     f"{describe_unpackable(params, exc)}")


def describe_unpackable(params: Any, exc: Exception) -> str:
    """Names the first value msgpack refuses, with its path inside params."""
    if not isinstance(params, (list, tuple)):
        return str(exc)
    stack: list[tuple[str, Any]] = [(f"params[{i}]", v) for i, v in reversed(list(enumerate(params)))]
    while stack:
        path, value = stack.pop()
        if value is None or isinstance(value, (bool, int, float, str, bytes, bytearray, memoryview)):
            if isinstance(value, int) and not -(2 ** 63) <= value < 2 ** 64:
                return f"{path} = {value!r} is out of msgpack's integer range"
            continue
        if isinstance(value, (list, tuple)):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            for k, v in reversed(list(value.items())):
                stack.append((f"{path}[{k!r}]", v))
                stack.append((f"{path} key {k!r}", k))
        else:
            return f"{path} = {value!r:.100} ({type(value).__name__}) is not msgpack-able"
    return str(exc)
