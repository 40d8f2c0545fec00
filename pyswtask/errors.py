"""The exceptions pyswtask raises to its users.

Every layer may raise these, so this module must import nothing of the package but the core's
own ``ProtocolError``; it maps an error body from the wire back to the right class
(``TaskError.from_wire``) and holds no other behaviour."""

from __future__ import annotations

from typing import Any

from ._core import ProtocolError, brief_repr

__all__ = [
    "PyswtaskError",
    "NoTaskRunning",
    "TaskError",
    "TaskTimeout",
    "DeliveryError",
    "ServerNotRunning",
    "QueueFull",
    "ClusterUnavailable",
    "TaskWorkerLost",
    "UnknownTask",
    "UnknownMethod",
    "ProtocolError",
]


class PyswtaskError(Exception):
    """Base class of the errors raised by pyswtask."""


class TaskError(PyswtaskError):
    """A task failed in its task worker, or could not be run there (unknown task or method).

    ``remote_type`` is the name of the exception raised remotely, ``remote_message`` its text and
    ``remote_traceback`` the formatted traceback (empty when the task never started).
    """

    def __init__(self, remote_type: str, remote_message: str, remote_traceback: str = "") -> None:
        super().__init__(remote_type, remote_message, remote_traceback)
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"{self.remote_type}: {self.remote_message}"

    @classmethod
    def from_wire(cls, body: Any) -> TaskError:
        """Builds the error from an ERROR frame body: [type, message, traceback]."""
        if (isinstance(body, list) and len(body) == 3
                and all(isinstance(part, str) for part in body)):
            if body[0] == "TaskWorkerLost":
                return TaskWorkerLost(body[0], body[1], body[2])
            return cls(body[0], body[1], body[2])
        return cls("ProtocolError", f"malformed error reply: {brief_repr(body)}", "")


class TaskWorkerLost(TaskError):
    """The task worker running the task died (killed, crashed): the task may have run, in part
    or whole, and is not run again (at most once). Tasks it had not started are run by the
    task worker that replaces it."""

    @classmethod
    def lost(cls, message: str) -> TaskWorkerLost:
        """The error of a task that went down with its task worker (message says how)."""
        return cls("TaskWorkerLost", message, "")


class TaskTimeout(PyswtaskError, TimeoutError):
    """No result came within the timeout; a result that comes later is discarded."""

    @classmethod
    def after(cls, what: str, timeout: float) -> TaskTimeout:
        """The error of every delivery path: ``what`` is "task Mailer.send" or "batch item 3"."""
        return cls(f"{what} gave no result within {timeout} s")


class DeliveryError(PyswtaskError):
    """A task cannot be delivered from this process, or to this destination."""


class ServerNotRunning(DeliveryError):
    """There is no running server to deliver to."""


class QueueFull(DeliveryError, TimeoutError):
    """The server's message queue stayed full for the whole timeout; the task was not sent."""


class ClusterUnavailable(DeliveryError):
    """The cluster's Redis cannot be reached (or stalls past the timeout); the message names
    its URL. Local tasks are not affected."""


class NoTaskRunning(PyswtaskError, RuntimeError):
    """``Task.current()`` outside a task method: no task runs in this process now."""


class UnknownTask(LookupError):
    """No task is registered under that name (raised in the task worker, sent back as
    a TaskError with remote_type 'UnknownTask')."""


class UnknownMethod(LookupError):
    """The task has no public method of that name."""
