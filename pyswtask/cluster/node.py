"""The master's handle of the cluster (``Server(cluster=...)``): the node's name, the queues it
serves, the check that Redis is there before anything forks, and the ``clusterBridge``
process the master forks and supervises like the crontab's processes.

It must not hold a connection across the fork: the bridge opens its own.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .. import registry
from ..process import ProcessSpec
from .bridge import Bridge
from .connection import connect
from .messages import BRIDGE_PROCESS

if TYPE_CHECKING:
    from ..roles import ServerHandle

__all__ = ["ClusterNode", "node_name"]


def node_name(settings: Mapping[str, Any], master_pid: int) -> str:
    """A node's name: the ``node`` setting, or ``hostname:pid`` of its master (unique in a
    cluster, as names must be). The crontab's leases name their holder with it too."""
    return str(settings.get("node") or f"{socket.gethostname()}:{master_pid}")


class ClusterNode:
    """Built by the master when the ``cluster`` setting is set; inherited by every child as
    ``server.cluster``."""

    def __init__(self, server: ServerHandle) -> None:
        settings = server.settings
        self.url: str = settings["cluster"]
        given = settings["cluster_queues"]
        # By default a node serves every queue of its tasks, if it has task workers to run them.
        default = registry.queues() if server.task_worker_num else []
        self.queues: list[str] = list(given) if given is not None else default
        self.name: str = settings["node"] or ""
        self.bridge = Bridge(self.url, self.queues, settings)

    def open(self, master_pid: int) -> None:
        """Names the node (``hostname:pid`` unless the ``node`` setting did) and proves Redis
        answers: ClusterUnavailable naming the URL when it does not."""
        if not self.name:
            self.name = node_name({}, master_pid)
        self.bridge.node = self.name
        connect(self.url).close()

    def processes(self) -> list[ProcessSpec]:
        """The bridge process, for the master to fork and supervise."""
        return [ProcessSpec(self.bridge.main, BRIDGE_PROCESS)]
