"""The ASGI side of serving: finding the ``app`` setting's app, and answering a request whose
task failed.

``TaskErrorMiddleware`` turns a ``TaskError`` (``TaskWorkerLost`` included) or a ``TaskTimeout``
that escapes a request handler into a short error response, so that a task worker's death costs
the request a 500 at once rather than a bare "Internal Server Error" or a hang. Must not import
uvicorn: any ASGI server can run these.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Awaitable, Callable, MutableMapping

from ..errors import TaskError, TaskTimeout

__all__ = ["ASGIApp", "Scope", "Receive", "Send", "TaskErrorMiddleware", "load_app"]

log = logging.getLogger("pyswtask.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def load_app(spec: str | ASGIApp) -> ASGIApp:
    """The app named by ``"module:attribute"`` (the attribute may be dotted, as in
    ``"pkg.web:api.app"``), imported now; an app object is returned as it is. ImportError or
    ValueError naming the ``app`` setting when it cannot be found."""
    if not isinstance(spec, str):
        return spec
    module_name, _, attrs = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"setting app: cannot import module {module_name!r}: {exc}") from exc
    for attr in attrs.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise ValueError(f"setting app: module {module_name!r} has no attribute {attrs!r}") \
                from None
    if not callable(obj):
        raise ValueError(f"setting app: {spec} is a {type(obj).__name__}, not an ASGI app")
    return obj  # type: ignore[no-any-return]


class TaskErrorMiddleware:
    """Answers a request whose handler raised a task's failure, before it began its response:
    ``TaskTimeout`` with 504, any ``TaskError`` (``TaskWorkerLost``: the task worker died while
    running it) with 500; the body is one line naming the error's class, e.g.
    ``500 Internal Server Error: TaskWorkerLost``. The error is logged with its details, which
    the client does not see. Anything else, or a failure after the response began, goes on to
    the server as it would without this middleware.

    The workers wrap the ``app`` setting's app in it. Frameworks that turn every exception into
    their own 500 first (Starlette, FastAPI) need it inside them:
    ``app.add_middleware(TaskErrorMiddleware)``."""

    def __init__(self, app: ASGIApp,
                 response_started: Callable[[Send], bool] | None = None) -> None:
        """``response_started``: for a server whose ``send`` can tell, after a failure, whether
        the response began (the workers' uvicorn); then ``send`` goes to the app as it is,
        without a wrapper per request. Without it, every ``send`` passes through one."""
        self.app = app
        self.response_started = response_started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response_started = self.response_started
        if response_started is not None:
            try:
                await self.app(scope, receive, send)
            except (TaskError, TaskTimeout) as exc:
                if response_started(send):
                    raise
                await _answer_task_error(scope, send, exc)
            return
        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except (TaskError, TaskTimeout) as exc:
            if started:
                raise
            await _answer_task_error(scope, send, exc)


async def _answer_task_error(scope: Scope, send: Send, exc: TaskError | TaskTimeout) -> None:
    status, reason = (504, "Gateway Timeout") if isinstance(exc, TaskTimeout) \
        else (500, "Internal Server Error")
    log.error("%s %s: %s: %s", scope.get("method"), scope.get("path"), type(exc).__name__, exc)
    body = f"{status} {reason}: {type(exc).__name__}\n".encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
