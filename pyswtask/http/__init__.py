"""Workers that serve HTTP: an ASGI app run by uvicorn on each worker's event loop.

- ``listeners``: the ``bind`` addresses and the listening sockets the master opens before it
  forks (they outlive any one worker, so a reload never closes the port);
- ``asgi``: loading the ``app`` setting's app, and ``TaskErrorMiddleware``;
- ``service``: ``HttpService``, what the master prepares and the children inherit;
- ``embed``: uvicorn's ``Config`` and ``Server`` on a worker's loop (the only module importing
  uvicorn, imported only when a server has an ``app``);
- ``turnwrites``: one write per connection and loop turn under uvicorn's HTTP protocol (a
  response's head and body in one segment).

This package sits below the roles (the worker runs it) and above the shared parts; it must not
import the roles, the master or the server, and must not import uvicorn at import time.
"""

from .asgi import ASGIApp, TaskErrorMiddleware, load_app
from .listeners import Bind, Listeners, parse_bind, parse_binds
from .service import HttpService

__all__ = ["ASGIApp", "TaskErrorMiddleware", "load_app", "Bind", "Listeners", "parse_bind",
           "parse_binds", "HttpService"]
