"""Shared-memory table operations from their own language: pyswtask's cron tables from Python
against Swoole\\Table from PHP (perf/swoole/table.php).

    python perf/bench_table.py [--quick] [--runs N] [--ops N]

pyswtask has no general-purpose table (no Swoole\\Table equivalent with string keys and
user-defined columns): its shared-memory tables are the crontab's OriginTable and RunTable
(pyswtask/core/crontable.pyx), fixed-width records in SysV shared memory behind a process-shared
robust mutex, addressed by row index. This measures what their API offers, 1,024 used rows
(in tables of 2,048, as table.php sizes Swoole's), cycling over the rows:

- table_set:  RunTable.set_status(row, RUNNING, when): one row's status and timestamp, locked;
- table_get:  RunTable.get(row): the whole row, locked, as a dict (strings decoded); also,
  not compared, a lock-free read of one field through the live numpy view (to_numpy());
- table_incr: OriginTable.begin(job): the job's in-flight counter + 1, locked.

Swoole's side: set($key, [int, 32-byte string]), get($key), incr($key, 'i', 1) on string keys.
Prints one JSON line per result (medians over interleaved rounds), then one per ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _summary  # noqa: E402
import _swoole  # noqa: E402

ROWS = 1024


def _shm(size: int) -> Any:
    import sysv_ipc

    return sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, mode=0o600, size=size)


def pyswtask_table(ops: int, rows: int = ROWS) -> list[dict[str, Any]]:
    """The three operations on fresh tables in SysV shared memory (removed afterwards)."""
    from pyswtask._core import OriginTable, RunStatus, RunTable

    mask = rows - 1
    if rows & mask:
        raise ValueError("rows must be a power of two")
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
                                elapsed, ok, op="RunTable.set_status(row, RUNNING, when)"))

        get = runs.get
        t = clock()
        for i in range(ops):
            row = get(i & mask)
        elapsed = clock() - t
        out.append(_summary_row("table_get", "pyswtask (cron RunTable)", ops / elapsed, extras,
                                elapsed, row["method"] == "echo", op="RunTable.get(row) -> dict"))

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
                                elapsed, total == ops, op="OriginTable.begin(job): inflight + 1"))
        del runs, origin, status
    finally:
        for shm in segments:
            try:
                shm.detach()
            except Exception:  # a view may still hold it: remove() below frees it at exit
                pass
            shm.remove()
    return out


def _summary_row(workload: str, system: str, value: float, extras: dict[str, Any], elapsed: float,
                 ok: bool, ours: bool = True, **more: Any) -> dict[str, Any]:
    return {"workload": workload, "system": system, "value": round(value, 1), "unit": "ops/s",
            "n": extras["ops"], **extras, "elapsed_s": round(elapsed, 4), "ok": bool(ok),
            "ours": ours, **more}


def swoole_table(ops: int, rows: int = ROWS) -> list[dict[str, Any]]:
    return _swoole.run("table.php", "--ops", str(ops), "--rows", str(rows))


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
