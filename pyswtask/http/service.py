"""What the master prepares before it forks, for workers that serve an ASGI app.

``HttpService.prepare`` imports the app (so that importing it registers its ``@task`` classes in
every process, task workers included), builds uvicorn's configuration once, and opens the
listening sockets; the children inherit all three. A worker asks it for its own server
(``for_worker``); the other children close their copies of the sockets. Must not accept
connections or run the app: that happens in the workers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from .asgi import load_app
from .listeners import Listeners, parse_binds

if TYPE_CHECKING:
    import uvicorn

    from .embed import WorkerHttp

__all__ = ["HttpService"]


class HttpService:
    """The app, uvicorn's configuration and the listening sockets of one server."""

    def __init__(self, config: uvicorn.Config, listeners: Listeners) -> None:
        self.config = config
        self.listeners = listeners

    @classmethod
    def prepare(cls, settings: dict[str, Any]) -> HttpService:
        """Imports the app and uvicorn, then listens on every ``bind`` address. Raises
        ImportError / ValueError naming the setting, or OSError from bind (an address in use)."""
        app = load_app(settings["app"])
        try:
            from . import embed
        except ImportError as exc:
            raise ImportError(f"setting app: serving HTTP needs uvicorn: pip install "
                              f"'pyswtask[http]' ({exc})") from exc
        config = embed.make_config(app, settings)
        listeners = Listeners.open(parse_binds(settings["bind"]), settings["backlog"])
        return cls(config, listeners)

    @property
    def addresses(self) -> list[str]:
        """Where the server accepts: ``"127.0.0.1:54321"`` (the port the kernel picked for
        port 0), ``"[::1]:8000"``, ``"unix:/path"``."""
        return list(self.listeners.addresses)

    def for_worker(self, on_exit: Callable[[], Any]) -> WorkerHttp:
        """A worker's own HTTP server on the inherited sockets."""
        from .embed import WorkerHttp

        return WorkerHttp(self.config, self.listeners.sockets, on_exit)

    def close_copies(self) -> None:
        """In a child that serves no HTTP: closes its copies of the sockets."""
        self.listeners.close_copies()

    def close(self) -> None:
        """In the master, once the workers stopped: closes the sockets, removes unix socket
        files."""
        self.listeners.close()
