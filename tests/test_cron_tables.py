"""The crontab's shared-memory tables (compiled core) and rule handling, in one process."""

from __future__ import annotations

import mmap
import os
import time
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from pyswtask import CronRuleError, scheduled, task
from pyswtask._core import (
    LAYOUT_VERSION,
    ORIGIN_FIELDS,
    RUN_FIELDS,
    TABLE_HEADER,
    OriginTable,
    RunStatus,
    RunTable,
    TableFull,
)
from pyswtask.cron import due_seconds, next_times, normalize_rule
from pyswtask.cron.exec import PILE_BUDGET, QUICK_RUN, CronExec


def origin(capacity: int = 4) -> OriginTable:
    return OriginTable(mmap.mmap(-1, OriginTable.nbytes(capacity)), create=True, capacity=capacity)


def runs(capacity: int = 8) -> RunTable:
    return RunTable(mmap.mmap(-1, RunTable.nbytes(capacity)), create=True, capacity=capacity)


@pytest.mark.parametrize("table,fields", [(OriginTable, ORIGIN_FIELDS), (RunTable, RUN_FIELDS)])
def test_record_layout_is_packed_and_matches_its_numpy_dtype(table: type, fields: tuple) -> None:
    dtype = table.dtype
    assert dtype.names == tuple(name for name, _ in fields)
    offset = 0
    for name, _ in fields:  # packed: each field starts where the previous one ends
        assert dtype.fields[name][1] == offset, name
        offset += dtype.fields[name][0].itemsize
    assert dtype.itemsize == offset
    assert table.nbytes(10) == TABLE_HEADER + 10 * dtype.itemsize
    assert LAYOUT_VERSION == 1


def test_origin_rows_round_trip_and_count_outcomes() -> None:
    t = origin()
    job = t.add("*/5 * * * * *", "Reports", "daily", 1_700_000_000, overlap=False)
    row = t.get(job)
    assert (row["rule"], row["task"], row["method"], row["add_time"]) == (
        "*/5 * * * * *", "Reports", "daily", 1_700_000_000)
    assert row["overlap"] is False and row["last_due"] == -1 and row["run_count"] == 0
    assert t.begin(job) and not t.begin(job)      # overlap=False: one in flight at most
    t.finish(job, 1_700_000_005, RunStatus.FAILED, 0.25)
    assert t.begin(job)
    t.finish(job, 1_700_000_010, RunStatus.DONE, 0.5)
    row = t.get(job)
    assert (row["run_count"], row["fail_count"], row["last_status"], row["last_due"],
            row["last_duration"], row["inflight"]) == (2, 1, RunStatus.DONE, 1_700_000_010, 0.5, 0)
    view = t.to_numpy()
    assert view[job]["task"] == b"Reports" and view[job]["run_count"] == 2
    assert view.shape == (4,) and int(view["used"].sum()) == 1
    assert t.last_duration(job) == 0.5
    assert t.last_duration(t.add("* * * * * *", "Reports", "hourly", 1_700_000_000)) is None


def test_quick_runs_pile_up_to_a_budget_and_the_others_spread() -> None:
    t = origin(16)
    took = [None, 0.00015, 0.0006, 0.00018, 0.00016, 0.0005, 0.00019, 0.00019, 0.00019, 0.00002]
    for i, d in enumerate(took):
        job = t.add("* * * * * *", "Jobs", f"m{i}", 0)
        if d is not None:
            t.finish(job, 0, RunStatus.DONE, d)
    lease = t.add("* * * * * *", "Jobs", "clustered", 0)
    t.finish(lease, 0, RunStatus.DONE, 0.00001)
    going = [(100 + job, job, 1_700_000_000, None) for job in range(len(took))]
    going.append((200, lease, 1_700_000_000, "node:1"))
    piles, spread = CronExec._piles(t, going)
    # Never run yet, as slow as QUICK_RUN or slower, and the cluster's run: spread.
    assert [job for _row, job, _sec, _lease in spread] == [0, 2, 5, lease]
    # The quick ones in their order, a new pile once a pile's last run times would pass
    # PILE_BUDGET (1 ms).
    assert [[job for _row, job, _sec, _lease in pile] for pile in piles] == [
        [1, 3, 4, 6, 7], [8, 9]]
    assert all(sum(took[run[1]] for run in pile) <= PILE_BUDGET for pile in piles)
    assert all(took[run[1]] < QUICK_RUN for pile in piles for run in pile)


def test_widths_are_enforced_not_truncated() -> None:
    t = origin()
    with pytest.raises(ValueError, match="rule is 101 bytes, longer than its 100-byte column"):
        t.add("x" * 101, "T", "m", 0)
    with pytest.raises(ValueError, match="task name is 256 bytes"):
        t.add("* * * * * *", "T" * 256, "m", 0)
    assert t.used == 0
    t.add("r" * 100, "é" * 127, "m" * 255, 0)   # exactly full columns are fine
    assert t.get(0)["task"] == "é" * 127 and t.get(0)["rule"] == "r" * 100


def test_a_full_origin_table_is_an_error_and_a_full_run_table_is_counted() -> None:
    t = origin(2)
    t.add("* * * * * *", "A", "a", 0)
    t.add("* * * * * *", "B", "b", 0)
    with pytest.raises(TableFull, match="origin table is full \\(2 rows\\)"):
        t.add("* * * * * *", "C", "c", 0)
    r = runs(2)
    assert r.insert(0, "A", "a", "202601010000", 100) == 0
    assert r.insert(0, "A", "a", "202601010000", 100) == -2      # the same run twice: once
    assert r.insert(0, "A", "a", "202601010000", 101) == 1
    assert r.insert(0, "A", "a", "202601010000", 102) == -1
    assert r.insert(1, "B", "b", "202601010000", 102) == -1
    assert (r.used, r.dropped) == (2, 2)


def test_due_rows_are_claimed_once_and_late_ones_skipped() -> None:
    r = runs()
    for sec in (100, 140, 159, 160, 161):
        r.insert(0, "A", "a", "m", sec)
    assert r.next_due() == 100
    due, skipped = r.claim_due(160, 20)
    assert [d[2] for d in due] == [140, 159, 160] and [s[2] for s in skipped] == [100]
    assert r.claim_due(160, 20) == ([], [])
    assert r.next_due() == 161
    statuses = {row["sec"]: row["status"] for row in r.rows()}
    assert statuses == {100: RunStatus.SKIPPED, 140: RunStatus.DELIVERING,
                        159: RunStatus.DELIVERING, 160: RunStatus.DELIVERING,
                        161: RunStatus.PENDING}


def test_clean_frees_finished_rows_and_reports_stale_ones() -> None:
    r = runs()
    rows = {sec: r.insert(0, "A", "a", "m", sec) for sec in (10, 20, 30, 40)}
    r.claim_due(40, 100)
    r.set_status(rows[10], RunStatus.DONE, duration=0.1)
    r.set_status(rows[20], RunStatus.DELIVERED, when=time.time())
    r.set_status(rows[30], RunStatus.RUNNING, when=time.time())
    r.set_status(rows[40], RunStatus.FAILED, duration=0.2)
    stale = r.clean(finished_before=35, stale_before=25)
    assert [(s[2], s[3]) for s in stale] == [(20, RunStatus.DELIVERED)]
    assert sorted(row["sec"] for row in r.rows()) == [30, 40] and r.used == 2
    with pytest.raises(IndexError, match="outside the table"):
        r.set_status(99, RunStatus.DONE)


def test_two_processes_writing_at_once_lose_nothing() -> None:
    buf = mmap.mmap(-1, RunTable.nbytes(4000))
    r = RunTable(buf, create=True, capacity=4000)
    pid = os.fork()
    if pid == 0:
        try:
            child = RunTable(buf)
            for sec in range(0, 3000, 2):
                child.insert(1, "A", "a", "m", sec)
        finally:
            os._exit(0)
    for sec in range(1, 3000, 2):
        r.insert(2, "B", "b", "m", sec)
    for sec in range(0, 300, 2):             # duplicates of the child's rows: refused
        r.insert(1, "A", "a", "m", sec)
    os.waitpid(pid, 0)
    view = r.to_numpy()
    used = view[view["used"] == 1]
    assert len(used) == r.used == 3000
    assert sorted(used["sec"].tolist()) == list(range(3000))


def test_attaching_checks_the_kind_of_table() -> None:
    buf = mmap.mmap(-1, RunTable.nbytes(4))
    RunTable(buf, create=True, capacity=4)
    with pytest.raises(ValueError, match="does not hold a table of this kind"):
        OriginTable(buf)
    with pytest.raises(ValueError, match="cannot hold 100 rows"):
        RunTable(mmap.mmap(-1, 1000), create=True, capacity=100)


@pytest.mark.parametrize("size", [0, 1, 64, TABLE_HEADER - 1])
@pytest.mark.parametrize("table", [OriginTable, RunTable])
def test_attaching_a_segment_too_small_for_a_header_is_refused(table: type, size: int) -> None:
    # The header is checked before it is read: a short segment never reads past its end.
    with pytest.raises(ValueError, match=f"a segment of {size} bytes is too small for a table "
                                         f"header \\({TABLE_HEADER} bytes\\)"):
        table(bytearray(size))


# -- rules ------------------------------------------------------------------------------------


def test_rules_have_six_fields_seconds_first_or_five_meaning_second_zero() -> None:
    assert normalize_rule("*/5 * * * * *") == "*/5 * * * * *"
    assert normalize_rule("30 2 * * MON") == "0 30 2 * * MON"
    start = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()
    minute = int(start)
    assert due_seconds("0 * * * * *", minute, timezone.utc) == [minute]
    assert due_seconds(normalize_rule("* * * * *"), minute, timezone.utc) == [minute]
    assert due_seconds("*/15 * * * * *", minute, timezone.utc) == [minute + s for s in (0, 15, 30, 45)]
    assert len(due_seconds("* * * * * *", minute, timezone.utc)) == 60
    assert due_seconds("0 5 * * * *", minute, timezone.utc) == []


@pytest.mark.parametrize("rule,message", [
    ("* * * *", "has 4 fields; it needs 6"),
    ("* * * * * * *", "has 7 fields"),
    ("60 * * * * *", "is invalid"),
    ("* * 24 * * *", "is invalid"),
    ("* * * 32 * *", "is invalid"),
    ("* * * * 13 *", "is invalid"),
    ("* * * * * FUNDAY", "is invalid"),
    ("a b c d e f", "is invalid"),
])
def test_bad_rules_fail_when_declared_naming_rule_class_and_method(rule: str, message: str) -> None:
    with pytest.raises(CronRuleError, match=message) as info:
        class Broken:
            @scheduled(cron=rule)
            def nightly(self) -> None: ...
    assert repr(rule) in str(info.value)
    assert "test_bad_rules_fail_when_declared_naming_rule_class_and_method.<locals>.Broken.nightly" \
        in str(info.value)


def test_scheduled_methods_take_no_arguments() -> None:
    with pytest.raises(TypeError, match="must be callable without arguments"):
        @task()
        class NeedsArgs:
            @scheduled(cron="* * * * * *")
            def run(self, when: int) -> None: ...


def test_names_ranges_lists_and_vixie_day_or() -> None:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()  # a Thursday
    times = next_times("0 0 9 1 * MON", 4, "UTC", start)             # 1st of month OR Monday
    # Thursday the 1st counts (day-of-month), and so do the Mondays: OR, not AND.
    assert [t.strftime("%a %d") for t in times] == ["Thu 01", "Mon 05", "Mon 12", "Mon 19"]
    times = next_times("0 0 9 1 JAN-MAR *", 3, "UTC", start)
    assert [t.strftime("%m-%d") for t in times] == ["01-01", "02-01", "03-01"]
    times = next_times("10,20 0 0 * * *", 3, "UTC", start)
    assert [t.strftime("%H:%M:%S") for t in times] == ["00:00:10", "00:00:20", "00:00:10"]


def test_time_zones_and_daylight_saving() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    # 2026-03-29 02:00 CET does not exist (clocks jump to 03:00): the run moves, never doubles.
    start = datetime(2026, 3, 28, 12, 0, tzinfo=berlin).timestamp()
    times = next_times("0 0 2 * * *", 3, "Europe/Berlin", start)
    stamps = [t.timestamp() for t in times]
    assert stamps == sorted(set(stamps))
    assert all(t.tzinfo is not None and t.utcoffset() is not None for t in times)
    assert [t.strftime("%m-%d %H:%M %Z") for t in times] == [
        "03-29 03:00 CEST", "03-30 02:00 CEST", "03-31 02:00 CEST"]
    with pytest.raises(ValueError, match="not an IANA time zone name"):
        next_times("* * * * * *", 1, "Mars/Olympus")


def test_numpy_views_are_live() -> None:
    r = runs(3)
    view = r.to_numpy()
    assert not view["used"].any()
    r.insert(5, "A", "a", "202601010000", 42)
    assert view["used"].tolist() == [1, 0, 0] and int(view[0]["sec"]) == 42
    assert view.dtype == np.dtype(RunTable.dtype)
