"""uvicorn's server, embedded on a worker's event loop.

The only module that imports uvicorn, and only servers with an ``app`` import it (the ``[http]``
extra). The master builds one ``uvicorn.Config`` before it forks (the protocol classes and the app
loaded once); each worker runs its own ``uvicorn.Server`` on the inherited listening sockets, as
a task of the loop that also carries the task dispatcher, timers and pipe messages.

uvicorn must not own the worker's signals: ``Server.serve`` would replace the worker's SIGTERM
handler with its own (``capture_signals``) and raise the signal again when it returns. Here the
worker's handler stops the worker, and the worker sets ``should_exit``, which uvicorn reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any, Callable, Generator

import uvicorn

from .asgi import ASGIApp, TaskErrorMiddleware
from .turnwrites import coalescing

__all__ = ["StartupFailed", "make_config", "WorkerHttp"]

log = logging.getLogger("pyswtask.http")

# Settings that become Config arguments of their own, and arguments that only make sense for
# uvicorn running its own processes, loop or logging: refused in http_options.
RESERVED = frozenset({
    "app", "host", "port", "uds", "fd", "loop", "http", "workers", "reload", "reload_dirs",
    "reload_delay", "reload_includes", "reload_excludes", "log_config", "access_log", "backlog",
    "limit_concurrency", "timeout_graceful_shutdown", "env_file", "factory",
    "timeout_worker_healthcheck",
})


class StartupFailed(Exception):
    """The worker's HTTP server could not start: the app's lifespan startup failed, or
    uvicorn could not serve the sockets."""


def make_config(app: ASGIApp, settings: dict[str, Any]) -> uvicorn.Config:
    """The uvicorn configuration every worker serves with, loaded (protocol classes imported,
    the app wrapped as uvicorn wraps it, then in ``TaskErrorMiddleware``)."""
    options = dict(settings["http_options"])
    refused = sorted(RESERVED & set(options))
    if refused:
        raise ValueError(f"setting http_options: {', '.join(refused)} cannot be set there (they are "
                         "pyswtask settings, or uvicorn running its own processes)")
    options.setdefault("lifespan", "auto")
    try:
        config = uvicorn.Config(
            app, http=settings["http"], backlog=settings["backlog"],
            limit_concurrency=settings["limit_concurrency"], access_log=settings["access_log"],
            timeout_graceful_shutdown=settings["max_wait_time"],
            # The application's logging stays as it configured it: uvicorn's loggers propagate.
            log_config=None, **options)
    except TypeError as exc:
        raise ValueError(f"setting http_options: {exc}") from None
    config.load()
    config.loaded_app = TaskErrorMiddleware(config.loaded_app, _response_started)
    config.http_protocol_class = coalescing(config.http_protocol_class)
    return config


def _response_started(send: Any) -> bool:
    # uvicorn hands the app the bound send of its request's cycle (httptools and h11 alike),
    # which knows whether the response began: no wrapper of send on every request. Anything
    # else is taken as begun, and the failure goes on to uvicorn's own 500.
    return bool(getattr(getattr(send, "__self__", None), "response_started", True))


class _EmbeddedServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ready: asyncio.Future[None]) -> None:
        super().__init__(config)
        self._ready = ready

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        except SystemExit:
            # uvicorn exits the process when the lifespan startup fails; the worker decides.
            raise StartupFailed("the application's lifespan startup failed") from None
        if not self._ready.done():
            self._ready.set_result(None)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn closes every connection without a request in progress at once. In a worker
        # that stops while the others serve on, that drops requests: a connection accepted a
        # moment ago whose request is not read yet, and a keep-alive connection whose client
        # is sending its next request right now. So first stop accepting, then close a
        # connection only once it has stayed idle for IDLE_GRACE, and answer every request
        # that arrives meanwhile with "Connection: close": its client reconnects, to a worker
        # that serves on. uvicorn's own shutdown then waits for what is in flight.
        for server in self.servers:
            server.close()
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + (self.config.timeout_graceful_shutdown or 0.0)
        idle_since: dict[Any, tuple[Any, float]] = {}
        connection: Any
        while loop.time() < deadline:
            # Connections accepted just before the listeners closed appear within a few turns.
            now = loop.time()
            waiting = now - began < 0.05
            for connection in list(self.server_state.connections):
                if not hasattr(connection, "cycle"):
                    continue  # a WebSocket: uvicorn's shutdown closes it properly
                cycle = connection.cycle
                if cycle is not None and not cycle.response_complete:
                    cycle.keep_alive = False
                    idle_since.pop(connection, None)
                    continue
                seen = idle_since.get(connection)
                if seen is None or seen[0] is not cycle:
                    idle_since[connection] = (cycle, now)
                    waiting = True
                elif now - seen[1] >= IDLE_GRACE:
                    connection.shutdown()
                else:
                    waiting = True
            if not waiting:
                break
            await asyncio.sleep(0.01)
        await super().shutdown(sockets=sockets)


# How long a connection must stay without a request before a stopping worker closes it: far
# longer than a client takes between connecting (or a response) and sending its request.
IDLE_GRACE = 0.25


class WorkerHttp:
    """One worker's HTTP server: ``start`` runs the lifespan startup and begins accepting;
    ``stop`` stops accepting, lets requests in flight finish (``max_wait_time``), then runs the
    lifespan shutdown. ``on_exit`` is called when the server has ended, asked to or not (e.g.
    uvicorn's ``limit_max_requests``), so that the worker stops with it."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket],
                 on_exit: Callable[[], Any]) -> None:
        self.config = config
        self.sockets = sockets
        self.on_exit = on_exit
        self.server: _EmbeddedServer | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self.server = _EmbeddedServer(self.config, ready)
        self.task = task = loop.create_task(self.server.serve(sockets=self.sockets))
        task.add_done_callback(self._ended)
        await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            error = task.exception() if not task.cancelled() else None
            if isinstance(error, StartupFailed):
                raise error
            raise StartupFailed(f"the HTTP server ended before it served: {error!r}") from error

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None \
                and not isinstance(task.exception(), StartupFailed):
            log.error("the HTTP server failed", exc_info=task.exception())
        self.on_exit()

    @property
    def serving(self) -> bool:
        return self.task is not None and not self.task.done()

    async def stop(self) -> None:
        if self.server is None or self.task is None:
            return
        self.server.should_exit = True
        # uvicorn bounds the wait for requests in flight by timeout_graceful_shutdown, then
        # cancels them; the lifespan shutdown is the app's, and the master's deadline bounds it.
        await asyncio.wait([self.task])
