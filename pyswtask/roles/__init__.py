"""The roles a process plays in a server, as objects: ``current()`` is this process's.

- ``base``: ``Role`` and the roles without a loop of tasks (``Outside``, ``MasterRole``), the
  child start-up every forked role shares (``ChildRole.init_process``);
- ``worker``: ``Worker``, the asyncio loop that delivers tasks and gets their results;
- ``clusterworker``: ``ClusterWorker``, a worker of a node in a cluster, which also sends
  cluster tasks (``@task(queue=...)``) to the node's bridge process;
- ``taskworker``: ``TaskWorker``, which runs tasks one at a time;
- ``userprocess``: ``UserProcess``, the user's long-running helpers, and their ``Process`` handle.

Roles sit above the transports and below the master, the Task facade and the server: they may
use any transport, and none of them imports the master or the server at run time.
"""

from .base import (
    EXIT_BOOT_ERROR,
    ChildRole,
    MasterRole,
    Outside,
    Role,
    ServerHandle,
    current,
    enter,
    leave,
)
from .clusterworker import ClusterWorker
from .taskworker import TaskWorker
from .userprocess import Process, UserProcess
from .worker import Worker

__all__ = ["EXIT_BOOT_ERROR", "Role", "Outside", "MasterRole", "ChildRole", "Worker", "ClusterWorker",
           "TaskWorker", "UserProcess", "Process", "ServerHandle", "current", "enter", "leave"]
