"""The stream entries of the cluster: a task on a queue's stream, a result on a reply stream.

A task entry's fields (all bytes in Redis):

    id        the task's cluster-wide id, "<node>/<pid>/<seq>" of the delivering process
    task      the task's name            method    the method to call
    body      name, method, params, type and trace ids, packed by the core's pack_envelope
    type      1 CO, 2 ASYNC
    reply     the reply stream's node name ("" for an ASYNC task of a separate program:
              nobody reads its result)
    worker    the delivering worker's id on that node (-1: a separate program)
    pid, seq  the delivering process and its sequence number, which the result carries back
    deadline  unix time after which nobody waits for the result (0: none)

A result entry: ``id``, ``worker``, ``pid``, ``seq``, ``ok`` (b"1"/b"0") and ``value``, the
method's return value (ok) or ``[type, message, traceback]`` of its error, packed with msgpack.

It must not talk to Redis: it builds and reads field maps.
"""

from __future__ import annotations

from typing import Any

import msgpack  # type: ignore[import-untyped]

from ..errors import ClusterUnavailable, DeliveryError, TaskError

__all__ = ["error_from_wire", "TaskEntry", "task_fields", "result_fields", "error_value", "parse_result",
           "pack_value", "unpack_value"]

_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def pack_value(value: Any) -> bytes:
    return _packb(value)  # type: ignore[no-any-return]


def unpack_value(data: bytes) -> Any:
    return msgpack.unpackb(data, strict_map_key=False)


def task_fields(task_id: str, name: str, method: str, body: bytes, type: int, reply: str,
                worker: int, pid: int, seq: int, deadline: float) -> dict[bytes, Any]:
    return {b"id": task_id, b"task": name, b"method": method, b"body": body, b"type": type,
            b"reply": reply, b"worker": worker, b"pid": pid, b"seq": seq,
            b"deadline": f"{deadline:.3f}"}


class TaskEntry:
    """One task read from a queue's stream: its entry id there and its fields."""

    __slots__ = ("queue", "entry_id", "fields", "id", "task", "method", "body", "reply",
                 "deliveries")

    def __init__(self, queue: str, entry_id: bytes, fields: dict[bytes, bytes],
                 deliveries: int = 1) -> None:
        self.queue = queue
        self.entry_id = entry_id
        self.fields = fields
        self.id = fields.get(b"id", b"?").decode()
        self.task = fields.get(b"task", b"?").decode()
        self.method = fields.get(b"method", b"?").decode()
        self.body = fields.get(b"body", b"")
        self.reply = fields.get(b"reply", b"").decode()
        self.deliveries = deliveries

    def describe(self) -> str:
        return f"cluster task {self.id} ({self.task}.{self.method}) of queue {self.queue!r}"


def error_value(error: BaseException) -> list[str]:
    """[type, message, traceback] of an error, as a TaskError travels."""
    if isinstance(error, TaskError):
        return [error.remote_type, error.remote_message, error.remote_traceback]
    return [type(error).__name__, str(error), ""]


def result_fields(entry: TaskEntry, ok: bool, value: Any) -> dict[bytes, Any]:
    """The reply of a task: ``value`` is its result, or its error when not ok."""
    f = entry.fields
    try:
        packed = pack_value(value if ok else error_value(value))
    except (TypeError, ValueError, OverflowError) as exc:
        ok, packed = False, pack_value(["TypeError", f"the result of {entry.task}.{entry.method} "
                                        f"cannot be packed: {exc}", ""])
    return {b"id": f.get(b"id", b""), b"worker": f.get(b"worker", b"-1"),
            b"pid": f.get(b"pid", b"0"), b"seq": f.get(b"seq", b"0"),
            b"ok": b"1" if ok else b"0", b"value": packed}


def parse_result(fields: dict[bytes, bytes]) -> tuple[str, int, int, int, bool, bytes]:
    """(id, worker, pid, seq, ok, packed value) of a result entry; ValueError if malformed."""
    try:
        return (fields[b"id"].decode(), int(fields[b"worker"]), int(fields[b"pid"]),
                int(fields[b"seq"]), fields[b"ok"] == b"1", fields[b"value"])
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed result entry: {exc!r}") from None


def error_from_wire(value: Any) -> Exception:
    """The exception of an error result: a TaskError (TaskWorkerLost when a task was lost),
    or ClusterUnavailable / DeliveryError when the task never reached Redis."""
    error = TaskError.from_wire(value)
    if error.remote_type == "ClusterUnavailable":
        return ClusterUnavailable(error.remote_message)
    if error.remote_type == "DeliveryError":
        return DeliveryError(error.remote_message)
    return error
