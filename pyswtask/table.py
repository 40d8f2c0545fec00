"""Table: Swoole\\Table for Python, a hash table of typed rows in SysV shared memory.

Declared with a fixed row count and typed columns, created once, then used from every process
that maps it (a server's workers, task workers and user processes inherit it; a separate program
attaches by key)::

    hits = Table(1024, {"count": int, "avg": float, "name": (str, 32)}, key_width=64)
    hits.create()                         # or: server.table("hits", 1024, {...}) before start()
    hits.set("home", {"name": "Home"})    # only the columns given; a new row starts at zero
    hits.incr("home", "count")            # atomic from any process; returns the new value
    hits.get("home")                      # {"count": 1, "avg": 0.0, "name": "Home"}

Owns the declaration and validation of columns, the table's segment (create, attach, detach,
remove) and the numpy views; rows, hashing and locking are the compiled core's
(``core/table.pyx``, whose header comment gives the layout and the locking).

It must not know the server: the master creates a server's tables through ``create_segment``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping, Union

import sysv_ipc  # type: ignore[import-not-found]

from ._core import (
    COLUMN_BYTES,
    COLUMN_FLOAT,
    COLUMN_INT,
    COLUMN_STR,
    MAX_COLUMN_WIDTH,
    MAX_COLUMNS,
    MAX_KEY_WIDTH,
    SharedTable,
    TableFull,
)
from .sysv import create_segment

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Table", "TableFull", "ColumnSpec"]

log = logging.getLogger("pyswtask.table")

# int, float, (str, width) or (bytes, width); a width is in UTF-8 bytes for str.
ColumnSpec = Union[type, tuple[type, int]]

_CODES = {int: COLUMN_INT, float: COLUMN_FLOAT, str: COLUMN_STR, bytes: COLUMN_BYTES}
_TYPES = {code: t for t, code in _CODES.items()}
_NAME_BYTES = 31


class Table(SharedTable):
    """A fixed number of rows, each a key (str, at most ``key_width`` UTF-8 bytes) and typed
    columns: ``int`` (int64), ``float`` (float64), ``(str, width)``, ``(bytes, width)``.

    Operations (from any process that has the table): ``set(key, {...})`` (sets the
    columns given; a new row starts all zero), ``table[key] = {...}``,
    ``get(key)`` -> dict or None, ``get(key, column)`` -> value or None,
    ``incr(key, column, by=1)`` / ``decr`` (atomic, on int and float columns; creates the row
    as Swoole does; returns the new value), ``delete(key)`` -> bool, ``exists(key)`` and
    ``key in table``, ``len(table)``, ``table[key]``, iteration over ``(key, row)`` pairs,
    ``column_view(column)`` for numpy.

    A full table raises ``TableFull`` naming its size; a key longer than ``key_width`` and a
    str or bytes value longer than its column raise ValueError: nothing is truncated. Each
    operation locks the key's bucket for a few memory accesses; a process killed while
    holding a lock does not block the others (its lock is taken over). A lock held by a live
    process for ``lock_timeout`` seconds (30; a stopped process) raises TimeoutError naming it.
    """

    TYPE_INT = int
    TYPE_FLOAT = float
    TYPE_STRING = str
    TYPE_BYTES = bytes

    def __init__(self, size: int, columns: Mapping[str, ColumnSpec] | None = None, *,
                 key_width: int = 64, name: str = "table") -> None:
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size < 2**31:
            raise ValueError(f"a table's size is its number of rows, an int from 1 to 2**31-1, "
                             f"not {size!r}")
        if (not isinstance(key_width, int) or isinstance(key_width, bool)
                or not 1 <= key_width <= MAX_KEY_WIDTH):
            raise ValueError(f"key_width must be an int from 1 to {MAX_KEY_WIDTH} (bytes), "
                             f"not {key_width!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"a table's name must be a non-empty str, not {name!r}")
        self._size = size
        self._key_width = key_width
        self._name = name
        self._columns: dict[str, tuple[int, int]] = {}
        self._segment: Any = None
        self._view: memoryview | None = None
        self._owner = False
        self.server_key: int | None = None     # set by Server.table(..., key=)
        self._set_name(name)
        for column, spec in (columns or {}).items():
            if isinstance(spec, tuple):
                if len(spec) != 2:
                    raise ValueError(f"column {column!r}: a sized column is (str, width) or "
                                     f"(bytes, width), not {spec!r}")
                self.column(column, spec[0], spec[1])
            else:
                self.column(column, spec)

    def column(self, name: str, type: type, size: int = 0) -> Table:
        """Declares one more column (before create()), as Swoole's ``$table->column()``:
        ``int``, ``float``, or ``str`` / ``bytes`` with their width in bytes. Returns the
        table, so that declarations chain."""
        if self.created:
            raise RuntimeError(f"table {self._name!r} is created already: declare its columns "
                               "before")
        if not isinstance(name, str) or not name or len(name.encode()) > _NAME_BYTES:
            raise ValueError(f"a column name is a str of 1 to {_NAME_BYTES} bytes, not {name!r}")
        if name in self._columns:
            raise ValueError(f"table {self._name!r} already has a column {name!r}")
        if len(self._columns) >= MAX_COLUMNS:
            raise ValueError(f"a table has at most {MAX_COLUMNS} columns")
        code = _CODES.get(type)
        if code is None:
            raise TypeError(f"column {name!r}: the types are int, float, str and bytes, "
                            f"not {type!r}")
        if code in (COLUMN_STR, COLUMN_BYTES):
            if (not isinstance(size, int) or isinstance(size, bool)
                    or not 1 <= size <= MAX_COLUMN_WIDTH):
                raise ValueError(f"column {name!r}: a {type.__name__} column needs a width from "
                                 f"1 to {MAX_COLUMN_WIDTH} bytes, not {size!r}")
        elif size:
            raise ValueError(f"column {name!r}: an {type.__name__} column takes no width")
        self._columns[name] = (code, size)
        return self

    # -- what it is -----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        """Rows the table holds at most."""
        return self._size

    @property
    def key_width(self) -> int:
        """The longest key, in UTF-8 bytes."""
        return self._key_width

    @property
    def columns(self) -> dict[str, ColumnSpec]:
        """The columns as declared: ``{"hits": int, "name": (str, 32)}``."""
        return {n: (_TYPES[c] if c in (COLUMN_INT, COLUMN_FLOAT) else (_TYPES[c], w))
                for n, (c, w) in self._columns.items()}

    @property
    def created(self) -> bool:
        """Whether the table is in shared memory (created or attached) in this process."""
        return self._view is not None

    @property
    def key(self) -> int | None:
        """The SysV key of its segment (for ``Table.attach``); None before create()."""
        return None if self._segment is None else int(self._segment.key)

    @property
    def memory_size(self) -> int:
        """Bytes of shared memory the table takes."""
        return int(SharedTable._layout(self._size, self._key_width, self._column_list())[0])

    def stats(self) -> dict[str, Any]:
        """name, size, used rows, key width, memory size, lock_recoveries (locks taken over
        from a process that died holding them), refused_full (inserts refused: full)."""
        return dict(self._stats())

    def __repr__(self) -> str:
        state = f"key=0x{self.key:x}" if self.key is not None else "not created"
        return f"<Table {self._name!r} size={self._size} columns={self.columns} {state}>"

    # -- the segment ----------------------------------------------------------------------------

    def create(self, key: int | None = None) -> Table:
        """Creates the table in a new SysV segment (mode 0600): a private one, or under key
        (one left there by a process that is gone is removed first). destroy() removes it;
        ``with table.create():`` does that at the end of the block. Returns the table."""
        if key is None:
            segment = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, mode=0o600,
                                            size=self.memory_size)
        else:
            segment = create_segment(key, self.memory_size, setting="the table's key",
                                     what=f"table {self._name!r}", logger=log)
        self._adopt(segment, create=True)
        return self

    def _create_segment(self, key: int, setting: str, logger: logging.Logger) -> None:
        """Creates the table under key for a server (the master, before it forks)."""
        segment = create_segment(key, self.memory_size, setting=setting,
                                 what=f"table {self._name!r}", logger=logger)
        self._adopt(segment, create=True)

    @classmethod
    def attach(cls, key: int) -> Table:
        """The table another process created under key (a running server's, whose master
        logs the keys, or one created with ``create(key)``); detach() when done."""
        try:
            segment = sysv_ipc.SharedMemory(key)
        except sysv_ipc.ExistentialError:
            raise LookupError(f"no table at SysV key 0x{key:x}") from None
        view = memoryview(segment)
        table = cls.__new__(cls)
        try:
            table._bind(view)
        except ValueError as exc:
            view.release()
            segment.detach()
            raise ValueError(f"SysV key 0x{key:x}: {exc}") from None
        stats = table._stats()
        table._size = stats["size"]
        table._key_width = stats["key_width"]
        table._name = stats["name"]
        table._columns = {n: (code, width) for n, code, width, _, _ in table._columns_laid()}
        table._segment = segment
        table._view = view
        table._owner = False
        table.server_key = None
        return table

    def _adopt(self, segment: Any, create: bool) -> None:
        view = memoryview(segment)
        try:
            self._bind(view, create, self._name, self._size, self._key_width, self._column_list())
        except BaseException:
            view.release()
            segment.detach()
            if create:
                segment.remove()
            raise
        self._segment, self._view, self._owner = segment, view, create

    def detach(self) -> None:
        """Unmaps the table in this process (its rows stay for the others)."""
        self._close(remove=False)

    def destroy(self) -> None:
        """Removes the table: its segment goes once every process has detached or exited."""
        self._close(remove=True)

    def _close(self, remove: bool) -> None:
        segment, view = self._segment, self._view
        self._segment = self._view = None
        self._unbind()
        if segment is None:
            return
        if remove:
            try:
                segment.remove()
            except sysv_ipc.ExistentialError:
                pass
        try:
            assert view is not None
            view.release()
            segment.detach()
        except (BufferError, sysv_ipc.Error):
            pass    # a numpy view still maps it: the mapping goes with the process

    def __enter__(self) -> Table:
        if not self.created:
            self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owner:
            self.destroy()
        else:
            self.detach()

    # -- numpy ----------------------------------------------------------------------------------

    def column_view(self, column: str) -> np.ndarray[Any, np.dtype[Any]]:
        """A read-only numpy view (no copy) of an int or float column over every row slot
        (``size`` of them, in slot order, not key order): free slots read 0, so sums and
        maxima of counters need no mask; ``used_mask()`` tells which slots hold a key. Reads
        take no lock: a value being written is seen before or after, never torn."""
        import numpy

        code, _ = self._columns.get(column, (None, 0))
        if code is None:
            raise KeyError(f"table {self._name!r} has no column {column!r}")
        if code not in (COLUMN_INT, COLUMN_FLOAT):
            raise TypeError(f"column {column!r} is not numeric: only int and float columns "
                            "have numpy views")
        offset = next(off for n, _, _, off, _ in self._columns_laid() if n == column)
        rows_offset, row_size, _ = self._view_layout()
        arr = numpy.ndarray((self._size,), dtype="<i8" if code == COLUMN_INT else "<f8",
                            buffer=self._buffer(), offset=rows_offset + offset,
                            strides=(row_size,))
        arr.flags.writeable = False
        return arr

    def used_mask(self) -> np.ndarray[Any, np.dtype[Any]]:
        """A bool array (a copy) over the row slots: True where a slot holds a key."""
        import numpy

        rows_offset, row_size, used_at = self._view_layout()
        used = numpy.ndarray((self._size,), dtype="u1", buffer=self._buffer(),
                             offset=rows_offset + used_at, strides=(row_size,))
        return used.astype(bool)

    # -- helpers --------------------------------------------------------------------------------

    def _column_list(self) -> list[tuple[str, int, int]]:
        return [(n, code, width) for n, (code, width) in self._columns.items()]

    def _columns_laid(self) -> list[tuple[str, int, int, int, int]]:
        return list(self._layout_columns())
