"""pyswtask: Swoole-style task workers and a second-precision crontab for Python servers.

    from pyswtask import Server, Task, task

    @task()
    class Mailer:
        def send(self, to, body):
            ...

    server = Server(worker_num=2, task_worker_num=2)
    server.on("worker_start", lambda srv, wid: Task.deliver("Mailer", "send", ["a@b", "hi"]))
    server.start()
"""

import sys

if not sys.platform.startswith("linux"):
    raise ImportError(
        f"pyswtask runs on Linux only (it is built on epoll, SOCK_SEQPACKET and SysV IPC); "
        f"this is {sys.platform}")
if sys.byteorder != "little":
    raise ImportError("pyswtask's wire format is little-endian; this machine is big-endian")

from ._version import __version__
from .context import TaskContext, TaskOrigin
from .cron import CronRuleError, scheduled
from .delivery import Task
from .errors import (
    ClusterUnavailable,
    DeliveryError,
    NoTaskRunning,
    ProtocolError,
    PyswtaskError,
    QueueFull,
    ServerNotRunning,
    TaskError,
    TaskTimeout,
    TaskWorkerLost,
    UnknownMethod,
    UnknownTask,
)
from .events import Event, EventObject, events, listener
from .process import process
from .registry import task
from .roles import Process
from .server import Server
from .table import Table, TableFull

__all__ = [
    "__version__",
    "Server",
    "Task",
    "TaskContext",
    "TaskOrigin",
    "task",
    "process",
    "Process",
    "scheduled",
    "CronRuleError",
    "Table",
    "TableFull",
    "Event",
    "EventObject",
    "events",
    "listener",
    "PyswtaskError",
    "TaskError",
    "TaskTimeout",
    "TaskWorkerLost",
    "DeliveryError",
    "NoTaskRunning",
    "QueueFull",
    "ClusterUnavailable",
    "ServerNotRunning",
    "UnknownTask",
    "UnknownMethod",
    "ProtocolError",
]
