"""The transports: how bytes move between the processes of a server and from outside it.

- ``ipc``: the channels, inboxes and shared memory the master creates before it forks;
- ``pipe``: pipe messages (``[type, data]`` into a process's inbox) and their dispatch;
- ``relay``: tasks a user process delivers through a worker, both ends;
- ``control``: control messages to the master;
- ``msgqueue``: the server's SysV message queue (task_ipc_mode 2/3, separate programs);
- ``command``: a separate program's client of that queue;
- ``writebehind``: the flusher thread of the senders that return before their bytes are out.

Transports know no roles: a process that sends passes in its mailbox, its limits and how it
waits. Frames, fragments and records are the compiled core's; nothing here builds frame bytes.
"""
