"""The listening sockets of an HTTP server: parsing ``bind``, opening them, closing them.

The master opens them before it forks, so every worker inherits the same sockets and accepts on
them: a worker that stops, dies or is reloaded closes only its own copy, and connections keep
queueing in the kernel's backlog for the others and for its successor. Must not accept, read or
write a connection: that is the workers' HTTP server's.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Bind", "Listeners", "parse_bind", "parse_binds"]

log = logging.getLogger("pyswtask.http")

UNIX_PREFIX = "unix:"


@dataclass(frozen=True)
class Bind:
    """One parsed ``bind`` entry: a TCP host and port, or a unix socket path."""

    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return bool(self.path)


def parse_bind(value: str) -> Bind:
    """``"host:port"`` (``"[::1]:8000"`` for IPv6; port 0: the kernel picks one) or
    ``"unix:/path"``; ValueError saying what is wrong otherwise."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"a bind address is a non-empty str, not {value!r}")
    if value.startswith(UNIX_PREFIX):
        path = value[len(UNIX_PREFIX):]
        if not path:
            raise ValueError(f"{value!r} names no socket path (unix:/path/to/socket)")
        return Bind(path=path)
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is neither host:port nor unix:/path")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 address in brackets, [::1]:8000")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: the port must be 0..65535 (0: the kernel picks one)")
    return Bind(host=host, port=int(port_text))


def parse_binds(value: str | list[str] | tuple[str, ...]) -> list[Bind]:
    """The ``bind`` setting: one address or a list of them, at least one."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"expected an address or a non-empty list of them, not {value!r}")
    return [parse_bind(item) for item in items]


@dataclass
class Listeners:
    """The sockets the master opened, and the addresses they are bound to (with the port the
    kernel picked for port 0): ``"127.0.0.1:54321"``, ``"[::1]:8000"``, ``"unix:/run/app.sock"``."""

    sockets: list[socket.socket] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    _unix_paths: list[tuple[str, int]] = field(default_factory=list)  # (path, inode) to unlink

    @classmethod
    def open(cls, binds: list[Bind], backlog: int) -> Listeners:
        """Binds and listens on every address; closes what it opened if one fails."""
        listeners = cls()
        try:
            for bind in binds:
                if bind.is_unix:
                    listeners._open_unix(bind.path, backlog)
                else:
                    listeners._open_tcp(bind.host, bind.port, backlog)
        except BaseException:
            listeners.close()
            raise
        return listeners

    def _open_tcp(self, host: str, port: int, backlog: int) -> None:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        # A restarted server binds again while connections of the last one sit in TIME_WAIT.
        options = [(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)]
        if family == socket.AF_INET6:
            options.append((socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1))
        self._listen(sock, addr, backlog, options)
        bound_host, bound_port = sock.getsockname()[:2]
        self.addresses.append(f"[{bound_host}]:{bound_port}" if family == socket.AF_INET6
                              else f"{bound_host}:{bound_port}")

    def _listen(self, sock: socket.socket, addr: Any, backlog: int,
                options: list[tuple[int, int, int]]) -> None:
        """Binds and listens, or closes the socket and raises; keeps it on success."""
        try:
            for level, name, value in options:
                sock.setsockopt(level, name, value)
            sock.bind(addr)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        self.sockets.append(sock)

    def _open_unix(self, path: str, backlog: int) -> None:
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listen(sock, path, backlog, [])
        self.addresses.append(UNIX_PREFIX + path)
        self._unix_paths.append((path, os.stat(path).st_ino))

    def urls(self) -> list[str]:
        """The addresses as a client names them (for the log)."""
        return [a if a.startswith(UNIX_PREFIX) else f"http://{a}" for a in self.addresses]

    def close_copies(self) -> None:
        """Closes this process's copies only (a child that serves no HTTP): the sockets stay
        open in the master and the workers, and unix socket files stay."""
        for sock in self.sockets:
            sock.close()

    def close(self) -> None:
        """Closes the sockets and removes the unix socket files this server made (the
        master, once every worker has stopped)."""
        self.close_copies()
        for path, inode in self._unix_paths:
            try:
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
            except FileNotFoundError:
                pass
        self._unix_paths.clear()


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a server that was killed is removed; one a live server accepts on,
    or a file that is no socket, is refused."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        log.info("removing the stale unix socket %s", path)
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "a server is already accepting on this unix socket", path)
