"""Task: delivering task calls from a worker to the task workers (Swoft's Task::deliver)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Iterable, Sequence

from . import command, context, pipe
from ._core import TIMEOUT, Dispatcher, pack_envelope
from .errors import DeliveryError, ServerNotRunning, TaskError, TaskTimeout
from .events import Event, events
from .executor import trace_ids

__all__ = ["Task"]

log = logging.getLogger("pyswtask.task")

FinishCallback = Callable[[int, Any], Any]


class Task:
    """Delivers task calls. Every method is static: ``Task.deliver("name", "method", [args])``.

    ``type`` chooses how *delivery* behaves; the task itself always runs synchronously in a task
    worker:

    - ``TYPE_CO`` blocks the caller until the result (Swoole's taskCo / taskwait).
    - ``TYPE_ASYNC`` returns a task id at once; the result comes back as the FINISH_TASK event
      in this worker, and to ``callback(task_id, result)`` when given.
    """

    TYPE_CO = 1
    TYPE_ASYNC = 2

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
        """
        if context.current.role is None and (queue := command.client()) is not None:
            if type not in (Task.TYPE_CO, Task.TYPE_ASYNC):
                raise ValueError(f"type must be Task.TYPE_CO or Task.TYPE_ASYNC, not {type!r}")
            return queue.deliver(name, method, _pack(name, method, params, type), type,
                                 _check_timeout(timeout), dst_worker_id)
        dispatcher = _dispatcher("Task.deliver")
        body = _pack(name, method, params, type)
        if type == Task.TYPE_ASYNC:
            return dispatcher.submit(body, dst_worker_id, callback)
        if type != Task.TYPE_CO:
            raise ValueError(f"type must be Task.TYPE_CO or Task.TYPE_ASYNC, not {type!r}")
        result = dispatcher.call(body, dst_worker_id, _check_timeout(timeout))
        if result is TIMEOUT:
            raise TaskTimeout(f"task {name}.{method} gave no result within {timeout} s")
        if isinstance(result, TaskError):
            raise result
        return result

    @staticmethod
    def configure(message_queue_key: int | str | None = None, *,
                  exit_timeout: float = 3.0) -> None:
        """For a program outside the server (a script, a cron(8) job): deliver through the
        server's message queue on that key (default: the PYSWTASK_QUEUE_KEY environment
        variable). ``Task.deliver`` then works there too: ASYNC returns a task id at once (the
        task is written behind, at the latest when the program exits, waiting up to
        ``exit_timeout`` for room); CO waits for the result. No server on the key raises
        ServerNotRunning at the first delivery."""
        command.configure(message_queue_key, exit_timeout)

    @staticmethod
    def flush(timeout: float = 3.0) -> bool:
        """In a program delivering through the queue: writes out the ASYNC deliveries held
        back, waiting up to timeout seconds; True when nothing is left."""
        queue = command.client()
        return True if queue is None else queue.flush(_check_timeout(timeout))

    @staticmethod
    def deliver_batch(calls: Iterable[Sequence[Any]], timeout: float = 3.0, *,
                      dst_worker_id: int = -1) -> list[Any]:
        """Delivers many calls at once and waits for all of them under one timeout
        (Swoole's taskCo / taskWaitMulti, without its 1024 cap).

        ``calls`` holds ``(name, method)`` or ``(name, method, params)`` items. Returns one
        outcome per call, in order: its value, or a TaskError / TaskTimeout instance.
        """
        dispatcher = _dispatcher("Task.deliver_batch")
        bodies = [_pack_call(call, i) for i, call in enumerate(calls)]
        results = dispatcher.call_many(bodies, dst_worker_id, _check_timeout(timeout))
        for i, result in enumerate(results):
            if result is TIMEOUT:
                results[i] = TaskTimeout(f"batch item {i} gave no result within {timeout} s")
        return results

    @staticmethod
    def deliver_by_process(name: str, method: str, params: Sequence[Any] = (),
                           timeout: float = 3.0, worker_id: int = 0, type: int = TYPE_ASYNC, *,
                           callback: Callable[[int, Any], Any] | None = None) -> Any:
        """Delivers a task from a user process, through a worker (Swoft's deliverByProcess).

        A pipe message of type "task" goes to worker ``worker_id`` (-1: the one with the fewest
        tasks waiting for a result), whose built-in listener delivers it ASYNC. Blocks until
        the message is written (TimeoutError after ``timeout``). ASYNC returns a request id;
        ``callback(request_id, result)`` then runs when the process reads its messages
        (``process.read_messages()`` / ``process.sleep()``, or by itself in an async process).
        CO waits for the result and returns it, or raises TaskTimeout / TaskError.
        """
        return pipe.deliver_by_process(name, method, params, _check_timeout(timeout),
                                       worker_id, type, callback)

    @staticmethod
    async def co(name: str, method: str, params: Sequence[Any] = (), timeout: float = 3.0, *,
                 dst_worker_id: int = -1) -> Any:
        """CO delivery for asyncio code in a worker: awaits the result without blocking the
        worker's other coroutines. Raises as ``deliver`` does."""
        dispatcher = _dispatcher("Task.co")
        body = _pack(name, method, params, Task.TYPE_CO)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        task_id = dispatcher.submit_future(body, dst_worker_id, future)
        expiry = loop.call_later(_check_timeout(timeout), _expire, future,
                                 f"task {name}.{method} gave no result within {timeout} s")
        try:
            return await future
        finally:
            expiry.cancel()
            dispatcher.forget(task_id)

    @staticmethod
    async def co_batch(calls: Iterable[Sequence[Any]], timeout: float = 3.0, *,
                       dst_worker_id: int = -1) -> list[Any]:
        """``deliver_batch`` for asyncio code: one timeout, one outcome per call."""
        dispatcher = _dispatcher("Task.co_batch")
        bodies = [_pack_call(call, i) for i, call in enumerate(calls)]
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in bodies]
        ids = [dispatcher.submit_future(body, dst_worker_id, fut)
               for body, fut in zip(bodies, futures)]
        if futures:
            await asyncio.wait(futures, timeout=_check_timeout(timeout))
        outcomes: list[Any] = []
        for i, (task_id, fut) in enumerate(zip(ids, futures)):
            if not fut.done():
                dispatcher.forget(task_id)
                fut.cancel()
                outcomes.append(TaskTimeout(f"batch item {i} gave no result within {timeout} s"))
            elif fut.exception() is not None:
                outcomes.append(fut.exception())
            else:
                outcomes.append(fut.result())
        return outcomes


def _dispatcher(api: str) -> Dispatcher:
    ctx = context.current
    if ctx.role == context.WORKER:
        if ctx.dispatcher is None:
            raise DeliveryError(f"{api}: this server has no task workers (task_worker_num=0)")
        return ctx.dispatcher
    if ctx.role == context.TASK_WORKER:
        raise DeliveryError(f"{api} cannot be called from a task worker: task workers run one "
                            "task at a time, and waiting there on another task can deadlock; "
                            "return a value, or deliver from the worker that gets the result")
    if ctx.role == context.MASTER:
        raise DeliveryError(f"{api} cannot be called from the master process: deliver from a "
                            "worker (a worker_start hook, a timer or a listener)")
    raise ServerNotRunning(
        f"{api} works inside a worker of a running pyswtask server (a worker_start hook, a "
        "timer, a listener, or code they call); this process is not one. A separate program "
        "delivers through a server's message queue: Task.configure(message_queue_key=...) or "
        "PYSWTASK_QUEUE_KEY, then Task.deliver")


def _check_timeout(timeout: float) -> float:
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    return float(timeout)


def _pack(name: str, method: str, params: Sequence[Any], type: int) -> bytes:
    if not isinstance(name, str) or not isinstance(method, str):
        raise TypeError(f"task name and method must be strings, not {name!r} and {method!r}")
    logid, spanid = trace_ids.get()
    try:
        body = pack_envelope(name, method, params, type, logid, spanid)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError) as exc:
        raise params_error(name, method, params, exc) from None
    limit = context.current.package_max_length
    if limit and len(body) > limit:
        raise ValueError(f"params of {name}.{method} pack to {len(body)} bytes, above the "
                         f"server's package_max_length ({limit})")
    return body


def params_error(name: str, method: str, params: Any, exc: Exception) -> TypeError:
    """The TypeError for params msgpack refused, naming the value and where it sits."""
    return TypeError(f"params of {name}.{method} cannot be packed: "
                     f"{_describe_unpackable(params, exc)}")


def _pack_call(call: Sequence[Any], index: int) -> bytes:
    if isinstance(call, (str, bytes)) or not 2 <= len(call) <= 3:
        raise TypeError(f"batch item {index} must be (name, method) or (name, method, params), "
                        f"not {call!r:.100}")
    return _pack(call[0], call[1], call[2] if len(call) == 3 else (), Task.TYPE_CO)


def _describe_unpackable(params: Any, exc: Exception) -> str:
    """Names the first value msgpack refuses, with its path inside params."""
    if not isinstance(params, (list, tuple)):
        return str(exc)
    stack: list[tuple[str, Any]] = [(f"params[{i}]", v) for i, v in reversed(list(enumerate(params)))]
    while stack:
        path, value = stack.pop()
        if value is None or isinstance(value, (bool, int, float, str, bytes, bytearray, memoryview)):
            if isinstance(value, int) and not -(2 ** 63) <= value < 2 ** 64:
                return f"{path} = {value!r} is out of msgpack's integer range"
            continue
        if isinstance(value, (list, tuple)):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            for k, v in reversed(list(value.items())):
                stack.append((f"{path}[{k!r}]", v))
                stack.append((f"{path} key {k!r}", k))
        else:
            return f"{path} = {value!r:.100} ({type(value).__name__}) is not msgpack-able"
    return str(exc)


def _expire(future: asyncio.Future[Any], message: str) -> None:
    if not future.done():
        future.set_exception(TaskTimeout(message))


def fire_finish(task_id: int, result: Any, callback: FinishCallback | None) -> None:
    """The dispatcher's on_finish: the FINISH_TASK event, then the delivery's own callback."""
    if events.has_listeners(Event.FINISH_TASK):
        events.trigger(Event.FINISH_TASK, None, task_id, result)
    if callback is not None:
        try:
            callback(task_id, result)
        except Exception:
            log.exception("finish callback %r of task %d failed", callback, task_id)
