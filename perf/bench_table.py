"""Shared-memory table operations from their own language: pyswtask.Table from Python against
Swoole\\Table from PHP (perf/swoole/table.php), the same shape on both sides.

    python perf/bench_table.py [--quick] [--runs N] [--ops N]

Both tables have room for 2,048 rows, an int column ``i`` and a 32-byte string column ``s``;
1,024 string keys (``row0`` ...) are cycled over, each operation hashing its key:

- table_set:  ``table.set(key, {"i": i, "s": s32})`` (Swoole: ``$table->set($key, [...])``);
- table_get:  ``table.get(key)`` -> the whole row as a dict (Swoole: an array);
- table_incr: ``table.incr(key, "i", 1)``, atomic.

Each operation runs ``ops`` times in 5 equal chunks, timed apart; the value is, on both sides,
the operations per second of CPU time (user + system: getrusage / process_time) in the fastest
chunk, so that the time other processes of a shared machine hold the CPU decides no ratio. On
an idle machine that equals wall-clock throughput, which is kept as ``wall_ops_s`` (fastest
chunk) and ``mean_ops_s`` (all chunks). The crontab's rows (below) are timed by wall clock.

Also measured, not compared (``ours: false``): the crontab's own tables (pyswtask/core/
crontable.pyx), fixed-width records addressed by row index behind one robust mutex:
RunTable.set_status, RunTable.get and OriginTable.begin, and a lock-free read of one field
through a numpy view, for Table (``column_view``) and the RunTable (``to_numpy``).

Prints one JSON line per result (medians over interleaved rounds), then one per ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _summary  # noqa: E402
import _swoole  # noqa: E402

ROWS = 1024
# Each operation is timed in CHUNKS equal parts and the fastest counts, on both sides.
CHUNKS = 5


def _shm(size: int) -> Any:
    import sysv_ipc

    return sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, mode=0o600, size=size)


def _chunked(loop: Callable[[int, int], Any], ops: int,
             chunks: int) -> tuple[float, dict[str, float]]:
    """Runs loop(start, end) over ops in equal chunks: ops per second of CPU time in the
    fastest chunk, and as extras wall_ops_s (wall clock, fastest chunk), mean_ops_s (wall
    clock, all chunks) and elapsed_s. table.php times Swoole's side the same way."""
    per = ops // chunks
    cpu, wall = [], []
    for c in range(chunks):
        c0, t0 = time.process_time(), time.perf_counter()
        loop(c * per, (c + 1) * per)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return per / max(min(cpu), 1e-9), {"wall_ops_s": round(per / min(wall), 1),
                                       "mean_ops_s": round(per * chunks / sum(wall), 1),
                                       "elapsed_s": round(sum(wall), 4)}


def pyswtask_table(ops: int, rows: int = ROWS, chunks: int = CHUNKS) -> list[dict[str, Any]]:
    """pyswtask.Table's three operations (the compared rows), then the cron tables'."""
    from pyswtask import Table

    mask = rows - 1
    if rows & mask:
        raise ValueError("rows must be a power of two")
    ops = ops // chunks * chunks
    size = 2 * rows
    out = []
    extras = {"ops": ops, "rows": rows, "table_size": size, "chunks": chunks}
    keys = [f"row{k}" for k in range(rows)]
    s32 = "s" * 32
    with Table(size, {"i": int, "s": (str, 32)}, name="bench").create() as table:
        set_, get, incr = table.set, table.get, table.incr
        views = [table.column_view("i")]     # cleared before the table goes
        last: list[Any] = [None]

        def sets(start: int, end: int) -> None:
            for i in range(start, end):
                set_(keys[i & mask], {"i": i, "s": s32})

        def gets(start: int, end: int) -> None:
            for i in range(start, end):
                row = get(keys[i & mask])
            last[0] = row

        def view_reads(start: int, end: int) -> None:
            view = views[0]
            for i in range(start, end):
                value = view[i & mask]
            last[0] = value

        def incrs(start: int, end: int) -> None:
            for i in range(start, end):
                incr(keys[i & mask], "i", 1)

        best, more = _chunked(sets, ops, chunks)
        ok = len(table) == rows and table.get(keys[(ops - 1) & mask]) == {"i": ops - 1, "s": s32}
        out.append(_summary_row("table_set", "pyswtask", best, extras, more, ok,
                                op='Table.set(key, {"i": i, "s": s32})'))

        best, more = _chunked(gets, ops, chunks)
        ok = last[0] is not None and last[0]["s"] == s32
        out.append(_summary_row("table_get", "pyswtask", best, extras, more, ok,
                                op="Table.get(key) -> dict"))

        best, more = _chunked(view_reads, ops, chunks)
        out.append(_summary_row("table_get", "pyswtask (Table.column_view, no lock)", best,
                                extras, more, last[0] is not None, ours=False,
                                op="Table.column_view('i')[slot]"))

        before = int(views[0].sum())
        best, more = _chunked(incrs, ops, chunks)
        ok = int(views[0].sum()) - before == ops
        out.append(_summary_row("table_incr", "pyswtask", best, extras, more, ok,
                                op='Table.incr(key, "i", 1)'))
        views.clear()
    return out + cron_tables(ops, rows)


def cron_tables(ops: int, rows: int = ROWS) -> list[dict[str, Any]]:
    """The crontab's tables, addressed by row index: reported, not compared."""
    from pyswtask._core import OriginTable, RunStatus, RunTable

    mask = rows - 1
    capacity = 2 * rows
    segments = [_shm(RunTable.nbytes(capacity)), _shm(OriginTable.nbytes(capacity))]
    clock = time.perf_counter
    out = []
    extras = {"ops": ops, "rows": rows, "table_size": capacity}
    try:
        runs = RunTable(memoryview(segments[0]), create=True, capacity=capacity)
        origin = OriginTable(memoryview(segments[1]), create=True, capacity=capacity)
        for i in range(rows):
            runs.insert(i, "demo", "echo", "202601010000", 1_767_225_600 + i)
            origin.add("* * * * * *", "demo", "echo", 1_767_225_600)
        running = int(RunStatus.RUNNING)

        set_status = runs.set_status
        t = clock()
        for i in range(ops):
            set_status(i & mask, running, 1.5)
        elapsed = clock() - t
        ok = runs.get(mask)["status"] == running and runs.get(mask)["started_at"] == 1.5
        out.append(_summary_row("table_set", "pyswtask (cron RunTable)", ops / elapsed, extras,
                                elapsed, ok, ours=False,
                                op="RunTable.set_status(row, RUNNING, when)"))

        get = runs.get
        t = clock()
        for i in range(ops):
            row = get(i & mask)
        elapsed = clock() - t
        out.append(_summary_row("table_get", "pyswtask (cron RunTable)", ops / elapsed, extras,
                                elapsed, row["method"] == "echo", ours=False,
                                op="RunTable.get(row) -> dict"))

        status = runs.to_numpy()["status"]
        t = clock()
        for i in range(ops):
            value = status[i & mask]
        elapsed = clock() - t
        out.append(_summary_row("table_get", "pyswtask (cron RunTable.to_numpy, no lock)",
                                ops / elapsed, extras, elapsed, value == running, ours=False,
                                op="RunTable.to_numpy()['status'][row]"))

        begin = origin.begin
        t = clock()
        for i in range(ops):
            begin(i & mask)
        elapsed = clock() - t
        total = int(origin.to_numpy()["inflight"].sum())
        out.append(_summary_row("table_incr", "pyswtask (cron OriginTable)", ops / elapsed, extras,
                                elapsed, total == ops, ours=False,
                                op="OriginTable.begin(job): inflight + 1"))
        del runs, origin, status
    finally:
        for shm in segments:
            try:
                shm.detach()
            except Exception:  # a view may still hold it: remove() below frees it at exit
                pass
            shm.remove()
    return out


def _summary_row(workload: str, system: str, value: float, extras: dict[str, Any],
                 elapsed: float | dict[str, float], ok: bool, ours: bool = True,
                 **more: Any) -> dict[str, Any]:
    times = elapsed if isinstance(elapsed, dict) else {"elapsed_s": round(elapsed, 4)}
    return {"workload": workload, "system": system, "value": round(value, 1), "unit": "ops/s",
            "n": extras["ops"], **extras, **times, "ok": bool(ok), "ours": ours, **more}


def swoole_table(ops: int, rows: int = ROWS, chunks: int = CHUNKS) -> list[dict[str, Any]]:
    return _swoole.run("table.php", "--ops", str(ops), "--rows", str(rows), "--chunks",
                       str(chunks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5x fewer operations")
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds (median kept)")
    parser.add_argument("--ops", type=int, default=1_000_000, help="operations of each kind")
    args = parser.parse_args()
    ops = args.ops // 5 if args.quick else args.ops
    rounds = [pyswtask_table(ops) + swoole_table(ops) for _ in range(args.runs)]
    rows = _summary.medians(rounds)
    for row in rows + _summary.ratios(rounds, rows):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
