"""One write per connection and loop turn for uvicorn's HTTP/1.1 protocols.

uvicorn writes a response's head at ``http.response.start`` and its body at
``http.response.body``: two ``write`` calls, two TCP segments, and a client that wakes up twice
for one response. Here a connection's transport holds what is written during one turn of the
event loop and hands it to the socket as one write at the start of the next turn, as servers
that buffer the head until the first body write do (Go's net/http, Node's http).

Nothing waits longer than the turn it was written in: a streaming response's head leaves at
the end of the turn that started it, even when the body comes turns later. Past ``FLUSH_AT``
bytes held, a write goes out at once, so that a large body meets uvicorn's flow control as
it would without this. ``close`` writes what is held first; ``abort`` drops it. WebSocket
upgrades get the socket's own transport.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["FLUSH_AT", "coalescing", "TurnWriter"]

# Bytes held past which a write goes to the socket at once: uvicorn's own HIGH_WATER_LIMIT.
FLUSH_AT = 65536

_PROTOCOL_MODULES = frozenset({"uvicorn.protocols.http.httptools_impl",
                               "uvicorn.protocols.http.h11_impl"})


class _Turn:
    """The connections of one loop with writes held in the current turn: one ``call_soon``
    per turn flushes them all."""

    __slots__ = ("loop", "writers", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.writers: list[TurnWriter] = []
        self.scheduled = False

    def hold(self, writer: TurnWriter) -> None:
        self.writers.append(writer)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        writers, self.writers = self.writers, []
        for writer in writers:
            writer.flush()


class TurnWriter:
    """A connection's transport, as uvicorn's HTTP protocol sees it: writes are held until the
    end of the loop turn; everything else is the socket transport's."""

    __slots__ = ("transport", "_turn", "_held", "_size")

    def __init__(self, transport: asyncio.Transport, turn: _Turn) -> None:
        self.transport = transport
        self._turn = turn
        self._held: list[bytes] | None = None
        self._size = 0

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None:
            if len(data) >= FLUSH_AT:
                self.transport.write(data)
                return
            self._held = [data]
            self._size = len(data)
            self._turn.hold(self)
            return
        held.append(data)
        self._size += len(data)
        if self._size >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Writes what is held, if the connection is still open."""
        held = self._held
        if held is None:
            return
        self._held = None
        if not self.transport.is_closing():
            self.transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self._held = None
        self.transport.abort()

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() + self._size * (self._held is not None)

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def coalescing(protocol_class: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """uvicorn's httptools or h11 protocol class, with a ``TurnWriter`` for each connection's
    transport; any other protocol class as it is (it may not write through ``self.transport``)."""
    if protocol_class.__module__ not in _PROTOCOL_MODULES:
        return protocol_class
    base: Any = protocol_class

    class Coalescing(base):  # type: ignore[misc]
        _turn: _Turn | None = None
        transport: Any
        loop: asyncio.AbstractEventLoop

        def connection_made(self, transport: asyncio.Transport) -> None:
            turn = Coalescing._turn
            if turn is None or turn.loop is not self.loop:
                turn = Coalescing._turn = _Turn(self.loop)
            super().connection_made(TurnWriter(transport, turn))

        def handle_websocket_upgrade(self, *args: Any) -> None:
            # The WebSocket protocol gets the socket's transport: it frames its own writes.
            writer = self.transport
            if isinstance(writer, TurnWriter):
                writer.flush()
                self.transport = writer.transport
            super().handle_websocket_upgrade(*args)

    Coalescing.__name__ = Coalescing.__qualname__ = "Coalescing" + protocol_class.__name__
    return Coalescing
