"""Task: the facade of task delivery (Swoft's Task::deliver).

Every method is a static one-liner that asks the current process's role to do it: a worker
delivers through its channels, a user process through a worker, a separate program through the
server's message queue, and the master or a task worker refuses, saying why. This module holds
the public signatures and their documentation only.
"""

from __future__ import annotations

from typing import Any, Callable, Coroutine, Iterable, Sequence

from . import roles
from .cluster import client as cluster_client
from .context import TaskContext
from .envelope import TYPE_ASYNC, TYPE_CO, check_timeout
from .transport import command

__all__ = ["Task"]

FinishCallback = Callable[[int, Any], Any]


class Task:
    """Delivers task calls. Every method is static: ``Task.deliver("name", "method", [args])``.

    ``type`` chooses how *delivery* behaves; the task itself runs synchronously in a task
    worker (an ``async def`` one concurrently with others under ``task_enable_coroutine``):

    - ``TYPE_CO`` blocks the caller until the result (Swoole's taskCo / taskwait).
    - ``TYPE_ASYNC`` returns a task id at once; the result comes back as the FINISH_TASK event
      in this worker, and to ``callback(task_id, result)`` when given.
    """

    TYPE_CO = TYPE_CO
    TYPE_ASYNC = TYPE_ASYNC

    @staticmethod
    def deliver(name: str, method: str, params: Sequence[Any] = (), type: int = TYPE_CO,
                timeout: float = 3.0, *, callback: FinishCallback | None = None,
                dst_worker_id: int = -1) -> Any:
        """Delivers one call of ``name.method(*params)`` to a task worker.

        CO returns the method's return value, raises TaskTimeout after ``timeout`` seconds, or
        TaskError when the task raised or is unknown. ASYNC returns the int task id.
        ``dst_worker_id`` picks a task worker by index (0..task_worker_num-1); by default an
        idle one, round-robin when all are busy. Params must be msgpack-able: a value that is
        not raises TypeError naming it, and nothing is sent.

        CO inside a coroutine of a worker (an ``async def`` request handler, a coroutine
        hook) raises DeliveryError: it would block every other coroutine and request of the
        worker until the result. There, ``await Task.co(...)``.
        """
        return roles.current().deliver(name, method, params, type, timeout, callback,
                                       dst_worker_id)

    @staticmethod
    def current() -> TaskContext:
        """The task running now, inside a task method: its id, name and method, type (CO or
        ASYNC), the process that delivered it (``origin_pid``, ``origin_role``: ``"worker"``,
        ``"user_process"``, ``"cron"`` or ``"program"``), the CO deadline, the attempt and the
        workers involved (``TaskContext``). In a coroutine task it is that task's own.

        Outside a task method (another process, or a hook, timer or listener of a task worker
        between tasks) it raises ``NoTaskRunning`` (a RuntimeError): code that may run either
        way catches it."""
        return roles.current().task_context()

    @staticmethod
    def configure(message_queue_key: int | str | None = None, *,
                  exit_timeout: float = 3.0, cluster: str | None = None,
                  wait_spin: float = command.WAIT_SPIN) -> None:
        """For a program outside the server (a script, a cron(8) job): deliver through the
        server's message queue on that key (default: the PYSWTASK_QUEUE_KEY environment
        variable). ``Task.deliver`` then works there too: ASYNC returns a task id at once (the
        task is written behind, at the latest when the program exits, waiting up to
        ``exit_timeout`` for room); CO waits for the result, polling for it ``wait_spin``
        seconds before sleeping while round trips average under twice that (the server's
        ``task_wait_spin``; 0 turns it off). No server on the key raises ServerNotRunning at the
        first delivery.

        ``cluster="redis://..."``: cluster tasks (``@task(queue=...)``, declared in a module
        this program imports) go to their queue's stream in that Redis, no local server
        needed; ASYNC is written behind the same way, CO waits for the result. Redis not
        answering raises ClusterUnavailable."""
        cluster_client.configure(cluster, exit_timeout)      # first: it checks the URL
        command.configure(message_queue_key, exit_timeout, wait_spin)

    @staticmethod
    def flush(timeout: float = 3.0) -> bool:
        """In a program delivering through the queue: writes out the ASYNC deliveries held
        back, waiting up to timeout seconds; True when nothing is left."""
        timeout = check_timeout(timeout)
        queue, cluster = command.client(), cluster_client.client()
        return ((queue is None or queue.flush(timeout))
                and (cluster is None or cluster.flush(timeout)))

    @staticmethod
    def deliver_batch(calls: Iterable[Sequence[Any]], timeout: float = 3.0, *,
                      dst_worker_id: int = -1) -> list[Any]:
        """Delivers many calls at once and waits for all of them under one timeout
        (Swoole's taskCo / taskWaitMulti, without its 1024 cap).

        ``calls`` holds ``(name, method)`` or ``(name, method, params)`` items. Returns one
        outcome per call, in order: its value, or a TaskError / TaskTimeout instance. Refused
        inside a coroutine of a worker, as CO ``deliver`` is: there, ``await Task.co_batch``.
        """
        return roles.current().deliver_batch(calls, timeout, dst_worker_id)

    @staticmethod
    def deliver_by_process(name: str, method: str, params: Sequence[Any] = (),
                           timeout: float = 3.0, worker_id: int = 0, type: int = TYPE_ASYNC, *,
                           callback: Callable[[int, Any], Any] | None = None) -> Any:
        """Delivers a task from a user process, through a worker (Swoft's deliverByProcess).

        A pipe message of type "task" goes to worker ``worker_id`` (-1: the one with the fewest
        tasks waiting for a result), which delivers it ASYNC on the process's behalf. Blocks until
        the message is written (TimeoutError after ``timeout``), except a fire-and-forget ASYNC
        one (no callback), which may be queued to leave with the rest of its burst within a
        millisecond or so (see the README). ASYNC returns a request id;
        ``callback(request_id, result)`` then runs when the process reads its messages
        (``process.read_messages()`` / ``process.sleep()``, or by itself in an async process).
        CO waits for the result and returns it, or raises TaskTimeout / TaskError.
        """
        return roles.current().deliver_by_process(name, method, params, check_timeout(timeout),
                                                  worker_id, type, callback)

    @staticmethod
    def co(name: str, method: str, params: Sequence[Any] = (), timeout: float = 3.0, *,
           dst_worker_id: int = -1) -> Coroutine[Any, Any, Any]:
        """CO delivery for asyncio code in a worker: ``await Task.co(...)`` awaits the result
        without blocking the worker's other coroutines. Raises as ``deliver`` does.

        Returns the coroutine of the process's role itself, not one wrapping it: a coroutine
        less to create and resume on every request of an HTTP handler that delivers."""
        return roles.current().co(name, method, params, timeout, dst_worker_id)

    @staticmethod
    async def co_batch(calls: Iterable[Sequence[Any]], timeout: float = 3.0, *,
                       dst_worker_id: int = -1) -> list[Any]:
        """``deliver_batch`` for asyncio code: one timeout, one outcome per call."""
        return await roles.current().co_batch(calls, timeout, dst_worker_id)
