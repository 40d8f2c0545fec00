"""A plain ASGI app served by pyswtask's workers, its handlers handing work to task workers.

    pyswtask run examples.http_app:server               # Server(app=app, bind=...) below
    pyswtask serve examples.http_app:app --bind 127.0.0.1:8000 --workers 2 --task-workers 2

    curl http://127.0.0.1:8000/                   # hello, world: no task
    curl 'http://127.0.0.1:8000/echo?hi'          # await Task.co: one task, awaited
    curl http://127.0.0.1:8000/batch              # await Task.co_batch: five tasks at once
    curl http://127.0.0.1:8000/async              # Task.deliver ASYNC, the result by callback

Every worker runs the app's lifespan startup and shutdown once. A handler never calls the
blocking ``Task.deliver`` (CO): inside a coroutine it is refused, since it would stall every
other request of the worker until its result.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from pyswtask import Server, Task, task
from pyswtask.http.asgi import Receive, Scope, Send


@task()
class Echo:
    def echo(self, text: str) -> str:
        return text

    def upper(self, text: str) -> str:
        return text.upper()


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            print(f"[worker pid {os.getpid()}] app started", flush=True)
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            print(f"[worker pid {os.getpid()}] app stopped", flush=True)
            await send({"type": "lifespan.shutdown.complete"})
            return


async def respond(send: Send, status: int, payload: Any) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    path, query = scope["path"], scope["query_string"].decode()
    if path == "/":
        await respond(send, 200, "hello, world")
    elif path == "/echo":
        await respond(send, 200, await Task.co("Echo", "echo", [query]))
    elif path == "/batch":
        outcomes = await Task.co_batch([("Echo", "upper", [f"item {i}"]) for i in range(5)])
        await respond(send, 200, outcomes)
    elif path == "/async":
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        task_id = Task.deliver("Echo", "upper", ["async"], Task.TYPE_ASYNC,
                               callback=lambda _id, result: done.set_result(result))
        await respond(send, 200, {"task_id": task_id, "result": await done})
    else:
        await respond(send, 404, "not found")


server = Server(worker_num=2, task_worker_num=2, app=app,
                bind=os.environ.get("PYSWTASK_BIND", "127.0.0.1:8000"))

if __name__ == "__main__":
    server.start()
