"""Write-behind: a helper thread that writes out what a sender queued while its peer was full.

Both senders that return before their bytes are written use it: a user process's ASYNC
deliveries to a worker's inbox (``relay``) and a separate program's ASYNC deliveries to the
message queue (``command``). The sender queues under ``lock`` and calls ``wake()``; the thread
flushes under the same lock, so it never interleaves with a sender's own write, and waits for
room outside it. It owns no bytes and knows no transport: ``flush`` and ``wait`` are the
sender's.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

__all__ = ["WriteBehind"]


class WriteBehind:
    """One sender's flusher thread, started on the first ``wake()``.

    ``flush()`` writes what it can and returns True when nothing is left queued; ``wait()``
    blocks briefly until the peer may take more. With ``linger`` > 0 the thread first lets a
    burst finish: it writes only once ``activity()`` (a count of the sender's queuing calls) has
    not moved for ``linger`` seconds, so that a partial batch fills up while deliveries keep
    coming and the sender's own writes carry them.
    """

    __slots__ = ("name", "lock", "pending", "armed", "closed", "_flush", "_wait", "_linger",
                 "_activity", "_thread")

    def __init__(self, name: str, flush: Callable[[], bool], wait: Callable[[], None], *,
                 linger: float = 0.0, activity: Callable[[], int] | None = None) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.pending = threading.Event()        # set while something is queued unsent
        # pending, read without a call: wake() runs once per queued delivery of a burst. The
        # thread clears both under lock after a flush that left nothing, and a sender queues
        # under lock before waking, so a True read late belongs to a flush that took its bytes.
        self.armed = False
        self.closed = False
        self._flush = flush
        self._wait = wait
        self._linger = linger
        self._activity = activity
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        """Tells the thread that something is queued (starting it the first time)."""
        if self.armed:
            return
        self.armed = True
        self.pending.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Lets the thread end; what is still queued stays the sender's."""
        self.closed = True
        self.pending.set()

    def _run(self) -> None:
        seen = -1
        while not self.closed:
            self.pending.wait()
            if self.closed:
                return
            if self._linger:
                time.sleep(self._linger)
                if self._activity is not None:
                    count = self._activity()
                    if count != seen:
                        seen = count
                        continue
            with self.lock:
                if self._flush():
                    self.armed = False
                    self.pending.clear()
                    continue
            self._wait()
