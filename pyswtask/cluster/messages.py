"""What a cluster worker and its node's ``clusterBridge`` process say to each other: the
bridge's process name and the pipe messages between them. Apart from the bridge, so that the
worker's role needs only these names, not the bridge's code.
"""

from __future__ import annotations

__all__ = ["BRIDGE_PROCESS", "MSG_TASK", "MSG_RESULT", "MSG_STATE"]

BRIDGE_PROCESS = "clusterBridge"

MSG_TASK = "cluster.task"       # worker -> bridge: [pid, seq, queue, name, method, body, type, deadline]
MSG_RESULT = "cluster.result"   # bridge -> worker: [seq, pid, ok, packed value]
MSG_STATE = "cluster.state"     # bridge -> workers: [redis reachable]
