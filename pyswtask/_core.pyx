# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled core of pyswtask: the wire format and the loops on the per-task path.

Channels
--------
Every worker has one AF_UNIX SOCK_SEQPACKET socket pair to every task worker, created by the
master before it forks. SEQPACKET keeps record boundaries: a record is read whole or not at
all, so when a process dies and its successor inherits the socket (the master holds both ends),
the stream never needs resynchronising; at worst a fragmented body lost its start, and its
remaining fragments are recognised and dropped. Sends are non-blocking: what the socket does not
take stays queued and goes out on EPOLLOUT.

Inboxes
-------
Pipe messages travel apart from tasks: every process has an inbox, the read end of one more
SEQPACKET pair whose write end every process of the server holds. Concurrent senders cannot
interleave inside a record; fragments of different senders are told apart by the message id,
which is made like a task id.

Record
------
One ``send``: one or more whole frames, at most RECORD_MAX (65,536) bytes. Many small frames
queued in one loop turn share a record, so a burst costs one syscall per ~600 tasks.

Frame (little-endian, 20-byte header + body)
--------------------------------------------
::

     0       2     3     4     5     6          8                      16          20
     +-------+-----+-----+-----+-----+----------+----------------------+-----------+-------
     | magic | ver |type |flags|resnt| src wid  |       task id        | body len  | body
     | "SW"  |  1  | u8  | u8  | u8  |   u16    |         u64          |    u32    | ...
     +-------+-----+-----+-----+-----+----------+----------------------+-----------+-------

- type: 1 TASK (worker -> task worker), 2 RESULT, 3 ERROR (task worker -> worker), 4 PIPE (a
  pipe message, into any process's inbox), 5 LOST (master -> worker, on a dead task worker's
  end of the channel: which of the worker's tasks it had taken; body
  ``[running task id, last task id read, reason]``).
- flags: 0x01 ASYNC delivery. A body larger than one record (RECORD_MAX - 20 bytes) travels as
  fragments, each a frame with the same type and task id: 0x02 FRAG_FIRST on the first, 0x04
  FRAG_MORE on the ones between, 0x08 FRAG_LAST on the last. 0x10 COMMAND: a task from a
  separate program through the message queue; its result goes to that program's reply
  socket, not to a worker. 0x20 ARENA: the body lies in the sender's arena for this channel
  (core/arena.pyx), and the frame's 16-byte body says where: ``u64 position, u32 length,
  u32 0``; the reader takes it from there and frees its block. Task, result and error bodies
  of ARENA_MIN_BODY (16 KiB) and more go so on a worker <-> task worker channel when the
  arena has room, else as any other body.
- resent: how many times a TASK frame was sent again because the task worker holding it died
  before starting it (a worker's resend, or the master putting a queue message back); 0 the
  first time, and in every other frame. The task sees it as its attempt (1 + resent). Readers
  from before it existed saw this byte as reserved and ignored it: the version stays 1.
- src wid: the worker id that sent a task, or the task worker id that sent a result.
- task id: (epoch << 32) | counter; the epoch is the delivering process's pid, so ids are not
  reused across a respawn and a stale result is recognised.
- body len: < 4 GiB per frame; a whole body is limited only by memory (the server caps it with
  its package_max_length setting).

Bodies are msgpack. A TASK body is the envelope ``[name, method, params, type, logid, spanid]``
(Swoft's TaskHelper::pack fields, in that order), followed, only when they are not the
defaults, by ``deadline`` (a CO delivery's, unix time as a float, or nil) and then
``origin pid, origin role`` (the user process or cron process a worker delivers for): 6, 7 or
9 fields, so that the common task costs no byte more than before; a RESULT body is the return value; an ERROR
body is ``[exception type, message, traceback text]``; a PIPE body is ``[type, data]``. The core
reads bodies with its own decoder (core/unpack.pyx): what msgpack.unpackb returns, without a
copy of the body.

Other formats built on frames
-----------------------------
Each is defined, with its layout, in the file that alone builds and reads it:

- SysV queue messages (core/msgqueue.pyx): a message's text is a record; the later fragments
  of a body travel under a type of their own (PART_TYPE_BASE and up). The stop sentinel is
  8 bytes, four zero bytes then the pid (u32) of the process whose reader must stop
  (``sentinel``, ``is_sentinel``); a record never starts with zero bytes. The wake-up, four
  0xFF bytes then a pid, ends that process's task loop's msgrcv (``wake_message``).
- Reply datagrams (core/reply.pyx): a command's CO results on its reply socket, one record per
  datagram (``reply_records``; ``ReplyWriter`` sends them, ``ReplyAssembler`` reads them).
- Task-worker state (core/state.pyx): per task worker, uint64 slots [running task, its worker,
  last task id read from each worker] in shared memory, and the LOST frames the master makes
  from them (``TaskWorkerStates``).
- Task counters (core/taskloop.pxd ``TaskStatRow``): a task worker's per-method counts and
  duration buckets in the stats segment, whose whole layout pyswtask/counters.py draws.
"""

cimport cython

# One extension built from included files (as uvloop's loop.pyx): one .so and no calls across
# modules. Each file owns one job; their shapes are declared in _core.pxd and core/*.pxd.
include "core/frame.pyx"
include "core/unpack.pyx"
include "core/pack.pyx"
include "core/arena.pyx"
include "core/channel.pyx"
include "core/msgqueue.pyx"
include "core/dispatcher.pyx"
include "core/state.pyx"
include "core/taskloop.pyx"
include "core/mailbox.pyx"
include "core/reply.pyx"
include "core/crontable.pyx"
include "core/table.pyx"
