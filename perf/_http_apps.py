"""The ASGI apps perf/bench_http.py loads with wrk: the same two routes on every side.

    GET /       "Hello, world!"
    GET /task   one echo of a 103-byte task payload in another process, then "ok"

``app`` is pyswtask's (``await Task.co`` to a task worker); ``uvicorn_app`` is plain uvicorn's
(``loop.run_in_executor`` on a ``ProcessPoolExecutor(2)`` per worker process); ``celery_app`` is
uvicorn with Celery on Redis: ``echo.delay(...).get()`` in a thread of a pool of
``CELERY_THREADS`` per worker process, the Celery app and its worker being perf/_brokers.py's
(``BENCH_BROKER=celery``, ``BENCH_REDIS_URL``).
"""

from __future__ import annotations

import asyncio
import os
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dispatch import payload_params  # noqa: E402

from pyswtask import Task, task  # noqa: E402

PARAMS = payload_params(103)
HELLO = b"Hello, world!"
HEADERS = [(b"content-type", b"text/plain")]


@task("demo")
class Demo:
    def echo(self, *params: Any) -> list[Any]:
        return list(params)


async def _answer(send: Any, body: bytes) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": HEADERS + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/task":
        result = await Task.co("demo", "echo", PARAMS)
        await _answer(send, b"ok" if result == PARAMS else b"bad")
    else:
        await _answer(send, HELLO)


def echo(params: list[Any]) -> list[Any]:
    return params


_pool: ProcessPoolExecutor | None = None


async def uvicorn_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _pool
    if scope["type"] != "http":
        return
    if scope["path"] == "/task":
        if _pool is None:
            _pool = ProcessPoolExecutor(2)
        result = await asyncio.get_running_loop().run_in_executor(_pool, echo, PARAMS)
        await _answer(send, b"ok" if result == PARAMS else b"bad")
    else:
        await _answer(send, HELLO)


# Threads blocked in result.get() at once, per uvicorn worker: the requests in flight beyond
# them wait for a thread.
CELERY_THREADS = 32
_threads: ThreadPoolExecutor | None = None


def _celery_echo() -> Any:
    import _brokers

    return _brokers.echo.delay(*PARAMS).get(timeout=30)


async def celery_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _threads
    if scope["type"] != "http":
        return
    if scope["path"] == "/task":
        if _threads is None:
            _threads = ThreadPoolExecutor(CELERY_THREADS)
        result = await asyncio.get_running_loop().run_in_executor(_threads, _celery_echo)
        await _answer(send, b"ok" if list(result) == PARAMS else b"bad")
    else:
        await _answer(send, HELLO)
