"""pyswtask.Table: typed rows in SysV shared memory, from one process, from several forked ones
at once (one of them killed while it holds a lock), from a separate program, and in a server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Callable, Iterator

import numpy as np
import pytest
from _testbase import ServerRunner, wait_for

from pyswtask import Table, TableFull, sysv

COLUMNS = {"hits": int, "avg": float, "name": (str, 16), "blob": (bytes, 8)}


def shm_keys() -> set[int]:
    with open("/proc/sysvipc/shm") as f:
        return {int(line.split()[0]) for line in f.readlines()[1:]}


@pytest.fixture
def table() -> Iterator[Table]:
    t = Table(64, COLUMNS, key_width=16, name="t").create()
    try:
        yield t
    finally:
        t.destroy()


class Children:
    """Forked children of a test: each runs fn and exits 0, or 1 on an exception; all are
    killed and reaped at teardown, pass or fail."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def fork(self, fn: Callable[[], None]) -> int:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fn()
                code = 0
            except BaseException as exc:
                os.write(2, f"child {os.getpid()}: {exc!r}\n".encode())
            finally:
                os._exit(code)
        self.pids.append(pid)
        return pid

    def join(self, pid: int, timeout: float) -> int:
        """The child's exit code; fails the test if it is still running after timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.pids.remove(pid)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        raise AssertionError(f"child {pid} still runs after {timeout} s")

    def close(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


@pytest.fixture
def children() -> Iterator[Children]:
    c = Children()
    try:
        yield c
    finally:
        c.close()


# -- one process ----------------------------------------------------------------------------


def test_columns_round_trip_with_their_types(table: Table) -> None:
    assert table.set("a", {"hits": 7, "avg": 1.25, "name": "héllo", "blob": b"\x00\x01\xff"})
    assert table.get("a") == {"hits": 7, "avg": 1.25, "name": "héllo", "blob": b"\x00\x01\xff"}
    assert table.get("a", "name") == "héllo"
    assert table.get("a", "blob") == b"\x00\x01\xff"
    # Only the columns given change; a new row starts all zero.
    table.set("a", dict(hits=-3))
    table.set("b", {"name": "x" * 16})
    assert table.get("a") == {"hits": -3, "avg": 1.25, "name": "héllo", "blob": b"\x00\x01\xff"}
    assert table.get("b") == {"hits": 0, "avg": 0.0, "name": "x" * 16, "blob": b""}
    assert table["b"]["name"] == "x" * 16
    table["c"] = {"avg": 2}                  # an int is a float for a float column
    assert table.get("c", "avg") == 2.0 and isinstance(table.get("c", "avg"), float)
    assert table.get("missing") is None and table.get("missing", "hits") is None
    assert table.set("d", {"hits": 2**63 - 1}) and table.get("d", "hits") == 2**63 - 1


def test_bad_values_are_refused_naming_the_column_and_nothing_is_written(table: Table) -> None:
    table.set("k", {"hits": 1, "name": "ok"})
    with pytest.raises(TypeError, match="column 'hits' holds int, not str"):
        table.set("k", {"hits": "1"})
    with pytest.raises(TypeError, match="column 'hits' holds int, not float"):
        table.set("k", dict(hits=1.5))
    with pytest.raises(TypeError, match="column 'name' holds str, not bytes"):
        table.set("k", dict(name=b"x"))
    with pytest.raises(TypeError, match="column 'blob' holds bytes, not str"):
        table.set("k", dict(blob="x"))
    with pytest.raises(ValueError, match=r"value of column 'name' is 17 bytes, longer than its "
                                         r"width \(16 bytes\)"):
        table.set("k", {"hits": 5, "name": "y" * 17})
    with pytest.raises(KeyError, match="table 't' has no column 'nope' \\(columns: hits, avg, "
                                       "name, blob\\)"):
        table.set("k", dict(nope=1))
    with pytest.raises(KeyError, match="no column 'nope'"):
        table.get("k", "nope")
    with pytest.raises(TypeError, match="set\\(\\) takes the row as a dict, not list"):
        table.set("k", [1])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        table.set("k", hits=1)  # type: ignore[call-arg]
    with pytest.raises(OverflowError):
        table.set("k", dict(hits=2**63))
    assert table.get("k") == {"hits": 1, "avg": 0.0, "name": "ok", "blob": b""}


def test_a_key_longer_than_the_key_width_is_refused_not_truncated(table: Table) -> None:
    assert table.set("k" * 16, dict(hits=1))
    with pytest.raises(ValueError, match=r"key is 17 bytes, longer than table 't''s key width "
                                         r"\(16 bytes\)"):
        table.set("k" * 17, dict(hits=1))
    # The width is in UTF-8 bytes: 8 two-byte characters fit, 9 do not.
    assert table.set("é" * 8, dict(hits=2)) and table.get("é" * 8, "hits") == 2
    for op in (lambda: table.get("é" * 9), lambda: table.incr("é" * 9, "hits"),
               lambda: table.delete("é" * 9), lambda: table.exists("é" * 9)):
        with pytest.raises(ValueError, match="key is 18 bytes, longer than"):
            op()
    with pytest.raises(TypeError, match="table keys are str, not int"):
        table.get(5)  # type: ignore[arg-type]
    assert sorted(table.keys()) == sorted(["k" * 16, "é" * 8])


@pytest.mark.parametrize("size", [16, 1024])
def test_a_full_table_raises_naming_its_size_whatever_the_hashes(size: int) -> None:
    # Every one of size keys fits, however they collide, and the next one is refused with an
    # exception. (Swoole\Table(1024) keeps 639 of these 1,024 keys: from the 468th on, set()
    # returns false with a warning.)
    with Table(size, {"n": int}, name="small") as t:
        for i in range(size):
            assert t.set(f"key-{i}", dict(n=i))
        assert len(t) == size
        assert sorted(t.keys()) == sorted(f"key-{i}" for i in range(size))
        with pytest.raises(TableFull, match=rf"table 'small' is full \({size} rows\)"):
            t.set("one-more", dict(n=1))
        with pytest.raises(TableFull, match=rf"table 'small' is full \({size} rows\)"):
            t.incr("one-more", "n")
        assert "one-more" not in t and len(t) == size
        t.set("key-3", dict(n=33))           # rows that exist still change
        assert t.incr("key-3", "n") == 34
        assert t.delete("key-0")
        t.set("one-more", dict(n=1))         # a freed row is used again
        assert t.get("one-more", "n") == 1 and len(t) == size
        assert t.stats()["refused_full"] == 2


def test_incr_and_decr_are_numeric_and_create_the_row(table: Table) -> None:
    assert table.incr("n", "hits") == 1
    assert table.incr("n", "hits", 41) == 42
    assert table.decr("n", "hits", 50) == -8
    assert table.incr("n", "avg", 0.5) == 0.5
    assert table.incr("n", "avg", 2) == 2.5
    assert table.decr("n", "avg") == 1.5
    assert table.get("n") == {"hits": -8, "avg": 1.5, "name": "", "blob": b""}
    with pytest.raises(TypeError, match="only int and float columns can be incremented"):
        table.incr("n", "name")
    with pytest.raises(TypeError, match="column 'hits' holds int: incr by an int, not float"):
        table.incr("n", "hits", 0.5)
    table.set("n", dict(hits=2**63 - 1))
    assert table.incr("n", "hits") == -2**63          # wraps as int64 does (and Swoole)
    with pytest.raises(OverflowError):
        table.incr("n", "hits", 2**63)


def test_delete_exists_len_and_iteration(table: Table) -> None:
    rows = {f"k{i}": {"hits": i, "avg": i / 4, "name": f"n{i}", "blob": bytes([i])}
            for i in range(40)}
    for key, row in rows.items():
        table.set(key, row)
    assert len(table) == 40
    assert dict(iter(table)) == rows
    assert dict(table.items()) == rows
    assert sorted(table.keys()) == sorted(rows)
    assert table.delete("k5") and not table.delete("k5")
    assert "k5" not in table and not table.exists("k5") and "k6" in table
    del table["k6"]
    with pytest.raises(KeyError):
        del table["k6"]
    with pytest.raises(KeyError):
        table["k6"]
    assert len(table) == 38
    assert dict(table) == {k: v for k, v in rows.items() if k not in ("k5", "k6")}


def test_numpy_views_are_live_and_read_only(table: Table) -> None:
    hits = table.column_view("hits")
    avg = table.column_view("avg")
    assert hits.shape == (64,) and hits.dtype == np.int64 and avg.dtype == np.float64
    for i in range(10):
        table.set(f"k{i}", dict(hits=i, avg=i * 0.5))
    assert int(hits.sum()) == 45 and float(avg.sum()) == 22.5
    used = table.used_mask()
    assert used.dtype == bool and int(used.sum()) == 10
    assert sorted(hits[used].tolist()) == list(range(10))
    table.incr("k9", "hits", 100)
    assert int(hits.sum()) == 145            # the same memory, no copy
    with pytest.raises(ValueError, match="read-only"):
        hits[0] = 1
    with pytest.raises(TypeError, match="column 'name' is not numeric"):
        table.column_view("name")
    with pytest.raises(KeyError, match="no column 'nope'"):
        table.column_view("nope")


def test_declaration_errors_name_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="a table's size is its number of rows"):
        Table(0, {"n": int})
    with pytest.raises(ValueError, match="key_width must be an int from 1 to 1024"):
        Table(8, {"n": int}, key_width=2000)
    with pytest.raises(TypeError, match="column 'n': the types are int, float, str and bytes"):
        Table(8, {"n": list})
    with pytest.raises(ValueError, match="column 's': a str column needs a width from 1"):
        Table(8, {"s": str})
    with pytest.raises(ValueError, match="column 'n': an int column takes no width"):
        Table(8).column("n", int, 8)
    with pytest.raises(ValueError, match="a column name is a str of 1 to 31 bytes"):
        Table(8, {"x" * 32: int})
    t = Table(8, name="later").column("n", int).column("s", str, 4)
    assert t.columns == {"n": int, "s": (str, 4)} and not t.created
    with pytest.raises(RuntimeError, match="table 'later' is not created"):
        t.get("k")
    with t:
        t.set("k", dict(n=1, s="abcd"))
        assert t.get("k") == {"n": 1, "s": "abcd"}
        with pytest.raises(RuntimeError, match="table 'later' is created already"):
            t.column("m", int)
        key = t.key
        assert key in shm_keys()
    assert key not in shm_keys() and not t.created
    with pytest.raises(RuntimeError, match="not created"):
        t.set("k", dict(n=2))


def test_a_separate_program_attaches_by_key(table: Table) -> None:
    table.set("shared", dict(hits=1, name="from parent"))
    code = textwrap.dedent(f"""
        from pyswtask import Table
        t = Table.attach({table.key})
        print(t.name, t.size, t.key_width, sorted(t.columns), t.get("shared"))
        t.incr("shared", "hits", 10)
        t.set("child", dict(name="hi"))
        t.detach()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("t 64 16 ['avg', 'blob', 'hits', 'name'] {'hits': 1, "
                                  "'avg': 0.0, 'name': 'from parent', 'blob': b''}")
    assert table.get("shared", "hits") == 11 and table.get("child", "name") == "hi"
    with pytest.raises(LookupError, match="no table at SysV key"):
        Table.attach(0x7FFFFFF0)


# -- several processes ----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_incr_from_four_processes_at_once_loses_nothing(table: Table,
                                                        children: Children) -> None:
    def work() -> None:
        for i in range(10_000):
            table.incr("total", "hits")
            table.incr("total", "avg", 0.5)
            table.incr(f"own-{os.getpid() % 7}", "hits")
            if i % 100 == 0:
                table.set("last", dict(name=str(os.getpid())))
    pids = [children.fork(work) for _ in range(4)]
    assert [children.join(pid, 90) for pid in pids] == [0, 0, 0, 0]
    assert table.get("total", "hits") == 40_000
    assert table.get("total", "avg") == 20_000.0
    assert sum(row["hits"] for key, row in table if key.startswith("own-")) == 40_000
    assert int(table.column_view("hits").sum()) == 80_000
    assert table.stats()["lock_recoveries"] == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
def test_a_process_killed_holding_a_lock_does_not_stop_the_others(
        table: Table, children: Children, reap: bool) -> None:
    table.set("hot", dict(hits=0))
    ready_r, ready_w = os.pipe()

    def hold() -> None:
        table._hold_lock("hot")
        os.write(ready_w, b"x")
        time.sleep(600)
    holder = children.fork(hold)
    assert os.read(ready_r, 1) == b"x"
    assert table._lock_owner("hot") == holder
    os.kill(holder, signal.SIGKILL)
    if reap:
        assert children.join(holder, 10) == -signal.SIGKILL
    # else: a zombie until the end of the test (kill(pid, 0) still finds it)

    def work() -> None:
        for _ in range(1000):
            table.incr("hot", "hits")
    started = time.monotonic()
    pids = [children.fork(work) for _ in range(3)]
    assert [children.join(pid, 60) for pid in pids] == [0, 0, 0]
    assert time.monotonic() - started < 60
    assert table.get("hot", "hits") == 3000
    assert table.stats()["lock_recoveries"] == 1
    assert table._lock_owner("hot") == 0
    os.close(ready_r)
    os.close(ready_w)


@pytest.mark.timeout(60)
def test_a_lock_held_by_a_live_process_times_out_with_a_clear_error(
        table: Table, children: Children) -> None:
    table._hold_lock("busy")
    try:
        err_r, err_w = os.pipe()

        def wait() -> None:
            table.lock_timeout = 0.5
            try:
                table.get("busy")
            except TimeoutError as exc:
                os.write(err_w, str(exc).encode())
        pid = children.fork(wait)
        assert children.join(pid, 30) == 0
        assert os.read(err_r, 1000).decode() == (
            f"table 't': a lock has been held by pid {os.getpid()} for more than 0.5 s")
    finally:
        table._release_lock("busy")
    assert table.get("busy") is None


# -- in a server ----------------------------------------------------------------------------

SERVER = '''
    from pyswtask import Table

    @task()
    class Count:
        def add(self, n):
            return hits.incr("tasks", "n", n)

    def on_worker_start(server, worker_id):
        hits.incr("starts", "n")
        if worker_id == 0:
            for i in range(100):
                Task.deliver("Count", "add", [1], timeout=10)
            server.after(50, lambda: report(server, time.monotonic() + 20))

    def report(server, deadline):
        # Every process counts its start: wait for all five (a loaded machine is slow to fork).
        if hits.get("starts", "n") < 5 and time.monotonic() < deadline:
            server.after(50, lambda: report(server, deadline))
            return
        emit(event="rows", rows=dict(hits.items()), key=hits.key, keys=list(server.tables),
             stats=hits.stats())
        server.shutdown()

    def proc(server, process):
        hits.incr("starts", "n")
        while True:
            time.sleep(1)

    server = Server(worker_num=2, task_worker_num=2, max_wait_time=2.0)
    hits = server.table("hits", 128, {"n": int, "who": (str, 8)}, key_width=32)
    server.on("task_worker_start", lambda s, w: hits.incr("starts", "n"))
    server.on("worker_start", on_worker_start)
    server.add_process(proc, name="p")
    server.start()
'''


@pytest.mark.timeout(90)
def test_a_server_table_is_shared_by_every_process_and_removed_at_stop(
        servers: ServerRunner) -> None:
    srv = servers.run(SERVER, timeout=60)
    [rec] = srv.by_event("rows")
    # 2 workers + 2 task workers + 1 user process started; 100 tasks ran in the task workers.
    assert rec["rows"]["tasks"] == {"n": 100, "who": ""}
    assert rec["rows"]["starts"]["n"] == 5
    assert rec["keys"] == ["hits"] and rec["stats"]["size"] == 128
    assert rec["key"] == sysv.table_key(srv.pid, 0)
    assert rec["key"] not in shm_keys()
    assert "table 'hits': 128 rows" in srv.err


@pytest.mark.timeout(90)
def test_a_table_left_by_a_killed_server_is_swept_by_the_next(servers: ServerRunner) -> None:
    body = '''
        server = Server(worker_num=1, task_worker_num=0)
        t = server.table("left", 8, {"n": int})
        server.on("worker_start", lambda s, w: emit(event="ready", key=t.key))
        server.start()
    '''
    first = servers.start(body)
    assert first.proc.stdout is not None
    line = first.proc.stdout.readline()
    key = sysv.table_key(first.pid, 0)
    assert f'"key": {key}' in line
    os.killpg(first.pid, signal.SIGKILL)
    first.proc.wait(10)
    wait_for(lambda: not first.group_alive(), 10)
    second = servers.start(body, name="second.py")
    assert second.proc.stdout is not None and '"ready"' in second.proc.stdout.readline()
    # Removed by this server's sweep, or by another server started meanwhile on the machine.
    assert key not in shm_keys()
    second.proc.send_signal(signal.SIGTERM)
    assert second.wait(20) == 0
    assert sysv.table_key(second.pid, 0) not in shm_keys()
