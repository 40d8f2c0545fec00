"""server.stats(), pyswtask.stats.read, `pyswtask status` and /metrics, in real servers: exact
counts after a known workload."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest
import sysv_ipc  # type: ignore[import-not-found]
from _testbase import ServerRunner, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_process import read_records

from pyswtask import ServerNotRunning, stats, sysv
from pyswtask.counters import VERSION

pytestmark = pytest.mark.timeout(120)

WORKLOAD = '''
    server = Server(worker_num=1, task_worker_num=2, task_max_request=20, max_wait_time=2.0,
                    metrics_bind="127.0.0.1:0")

    def go(server, wid):
        # 45 CO echoes and 5 failing CO tasks on task worker 0, 30 ASYNC echoes on 1.
        for i in range(45):
            assert Task.deliver("Demo", "echo", [i], Task.TYPE_CO, 10, dst_worker_id=0) == i
        for i in range(5):
            try:
                Task.deliver("Demo", "boom", [], Task.TYPE_CO, 10, dst_worker_id=0)
            except TaskError:
                pass
        done = []
        def finished(task_id, result):
            done.append(result)
            if len(done) == 30:
                inside = server.stats()
                emit(event="phase1", metrics=server.metrics_address,
                     run=inside["tasks"]["run"], delivered=inside["delivered"])
                server.after(10, phase2)
        for i in range(30):
            Task.deliver("Demo", "echo", [i], Task.TYPE_ASYNC, callback=finished,
                         dst_worker_id=1)

    def phase2():
        try:
            Task.deliver("Demo", "sleep", [1.0], Task.TYPE_CO, 0.2, dst_worker_id=0)
        except TaskTimeout:
            emit(event="timed_out")
        emit(event="tw1", pid=Task.deliver("Demo", "pid", [], Task.TYPE_CO, 10, dst_worker_id=1))
        try:
            Task.deliver("Demo", "sleep", [30.0], Task.TYPE_CO, 60, dst_worker_id=1)
        except TaskError as exc:
            emit(event="lost", kind=type(exc).__name__)
    server.on("worker_start", go)
    sys.exit(server.start())
'''


def _status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyswtask", "status", *args],
                          capture_output=True, text=True, timeout=30)


def _metrics(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def test_counts_after_a_known_workload_inside_outside_status_and_metrics(
        servers: ServerRunner) -> None:
    srv = servers.start(WORKLOAD)
    recs = read_records(srv, lambda r: any(x["event"] == "phase1" for x in r), timeout=60)
    phase1 = next(r for r in recs if r["event"] == "phase1")
    # Inside the server, from the worker: every task ran before its result came back.
    assert phase1["run"] == 80 and phase1["delivered"] == 80
    recs += read_records(srv, lambda r: any(x["event"] == "lost" for x in r) or
                         any(x["event"] == "tw1" for x in r), timeout=30)
    tw1 = next(r["pid"] for r in recs if r["event"] == "tw1")
    time.sleep(0.3)                     # into the 30 s sleep
    os.kill(tw1, signal.SIGKILL)
    recs += read_records(srv, lambda r: any(x["event"] == "lost" for x in r), timeout=30)
    assert [r["kind"] for r in recs if r["event"] == "lost"] == ["TaskWorkerLost"]
    assert any(r["event"] == "timed_out" for r in recs)

    # From outside, by the master's pid; the timed-out sleep has finished by now or soon.
    # (A task is counted as run just before its task worker turns idle: wait for both.)
    snap = wait_for(lambda: (s := stats.read(pid=srv.pid))["tasks"]["run"] == 82
                    and s["idle_task_workers"] == 2 and s["task_workers"][1]["state"] == "up"
                    and s["task_workers"][1]["pid"] != tw1 and s, timeout=20)
    assert snap["master_pid"] == srv.pid and snap["running"]
    assert (snap["worker_num"], snap["task_worker_num"]) == (1, 2)
    # 80 + the timed-out sleep + the pid call; the sleep that was killed never finished.
    assert snap["tasks"] == {"run": 82, "failed": 5, "lost": 1, "timed_out": 1}
    assert snap["delivered"] == 83
    tw0, tw1s = snap["task_workers"]
    assert (tw0["run"], tw0["failed"]) == (51, 5)
    assert (tw1s["run"], tw1s["failed"]) == (31, 0)
    assert snap["workers"][0]["delivered"] == 83
    assert snap["workers"][0]["lost"] == 1 and snap["workers"][0]["timed_out"] == 1
    # The sleep that timed out went to task worker 0, the one killed to task worker 1.
    assert (tw0["lost"], tw0["timed_out"]) == (0, 1)
    assert (tw1s["lost"], tw1s["timed_out"]) == (1, 0)
    # task_max_request=20: task worker 0 ran 51 (recycled at 20 and 40), 1 ran 31 (at 20).
    assert snap["task_max_request_recycles"] == 3
    assert snap["respawns"] == {"signal": 1, "exit_code": 0, "recycled": 3, "reload": 0,
                                "exited": 0}
    assert tw0["respawns"] == 2 and tw1s["respawns"] == 2
    assert snap["max_request_recycles"] == 0
    methods = snap["task_methods"]
    assert set(methods) == {"Demo.echo", "Demo.boom", "Demo.sleep", "Demo.pid"}
    assert (methods["Demo.echo"]["ok"], methods["Demo.echo"]["failed"]) == (75, 0)
    assert (methods["Demo.boom"]["ok"], methods["Demo.boom"]["failed"]) == (0, 5)
    sleep = methods["Demo.sleep"]
    assert sleep["ok"] == 1 and 1.0 <= sleep["seconds"] < 10.0
    bounds = snap["duration_buckets"]
    # The one-second sleep is in no bucket below 1 s and in every one from 2.5 s up.
    assert sleep["buckets"][bounds.index(0.5)] == 0 and sleep["buckets"][bounds.index(2.5)] == 1
    assert methods["Demo.echo"]["buckets"][-1] == 75
    assert all(a <= b for a, b in zip(methods["Demo.echo"]["buckets"],
                                       methods["Demo.echo"]["buckets"][1:]))
    assert snap["waiting"] == 0
    # Every task sent to a task worker was started (the killed one's by it, before it died).
    assert [tw["waiting"] for tw in snap["task_workers"]] == [0, 0]
    assert snap["queue"] is None and snap["cron"] is None
    assert all(p["rss"] and p["rss"] > 1 << 20 for p in snap["workers"] + snap["task_workers"])

    # pyswtask status --json, by pid file-less means: --pid and --key.
    for args in (["--pid", str(srv.pid)], ["--key", hex(sysv.stats_key(srv.pid))]):
        done = _status(*args, "--json")
        assert done.returncode == 0, done.stderr
        cli = json.loads(done.stdout)
        assert cli["tasks"] == snap["tasks"] and cli["task_methods"].keys() == methods.keys()
        assert [tw["pid"] for tw in cli["task_workers"]] == [tw0["pid"], tw1s["pid"]]

    # /metrics, parsed with prometheus-client's own parser.
    m = _metrics(phase1["metrics"])
    assert m["pyswtask_tasks_total", (("status", "ok"), ("task", "Demo.echo"))] == 75
    assert m["pyswtask_tasks_total", (("status", "failed"), ("task", "Demo.boom"))] == 5
    assert m["pyswtask_tasks_total", (("status", "ok"), ("task", "Demo.boom"))] == 0
    assert m["pyswtask_task_duration_seconds_count", (("task", "Demo.echo"),)] == 75
    assert m["pyswtask_task_duration_seconds_bucket", (("le", "+Inf"), ("task", "Demo.sleep"))] == 1
    assert m["pyswtask_task_duration_seconds_bucket", (("le", "0.5"), ("task", "Demo.sleep"))] == 0
    assert 1.0 <= m["pyswtask_task_duration_seconds_sum", (("task", "Demo.sleep"),)] < 10.0
    assert m["pyswtask_respawns_total", (("cause", "signal"),)] == 1
    assert m["pyswtask_respawns_total", (("cause", "recycled"),)] == 3
    assert m["pyswtask_recycles_total", (("setting", "task_max_request"),)] == 3
    assert m["pyswtask_deliveries_total", (("worker", "0"),)] == 83
    assert m["pyswtask_tasks_lost_total", (("worker", "0"),)] == 1
    assert m["pyswtask_tasks_timed_out_total", (("worker", "0"),)] == 1
    assert m["pyswtask_task_worker_tasks_total", (("status", "failed"), ("task_worker", "1"))] == 5
    assert m["pyswtask_task_workers_idle", ()] == 2
    assert m["pyswtask_task_worker_tasks_waiting", (("task_worker", "1"),)] == 0
    assert m["pyswtask_task_worker_tasks_lost_total", (("task_worker", "1"),)] == 0
    assert m["pyswtask_task_worker_tasks_lost_total", (("task_worker", "2"),)] == 1
    assert m["pyswtask_task_worker_tasks_timed_out_total", (("task_worker", "1"),)] == 1
    assert m["pyswtask_task_worker_tasks_timed_out_total", (("task_worker", "2"),)] == 0
    assert m["pyswtask_process_up", (("id", "2"), ("role", "task_worker"))] == 1
    assert m["pyswtask_process_resident_memory_bytes", (("id", "0"), ("role", "worker"))] > 1 << 20

    master = srv.pid
    os.kill(master, signal.SIGTERM)
    assert srv.wait(30) == 0, srv.err
    # Stopped: status says so (exit 1), the segment is gone, and so is the metrics port.
    done = _status("--pid", str(master), "--json")
    assert done.returncode == 1 and "not running" in done.stderr and not done.stdout
    with pytest.raises(ServerNotRunning):
        stats.read(pid=master)
    with pytest.raises(sysv_ipc.ExistentialError):
        sysv_ipc.SharedMemory(sysv.stats_key(master))
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{phase1['metrics']}/metrics", timeout=5)


@pytest.mark.parametrize("mode", [1, 2])
def test_timeouts_per_task_worker_from_batch_co_and_co_batch(servers: ServerRunner,
                                                             mode: int) -> None:
    # Mode 2 goes through the message queue, by type: the task worker is still known.
    srv = servers.start(f'''
        server = Server(worker_num=1, task_worker_num=2, task_ipc_mode={mode})

        def go(server, wid):
            # Two on task worker 0 (a blocking batch), three on 1 (a CO await and a CO batch).
            sync = Task.deliver_batch([("Demo", "sleep", [1.0])] * 2, 0.3, dst_worker_id=0)
            return awaiting(sync)

        async def awaiting(sync):
            try:
                await Task.co("Demo", "sleep", [1.0], 0.2, dst_worker_id=1)
                co = "no timeout"
            except TaskTimeout:
                co = "TaskTimeout"
            batch = await Task.co_batch([("Demo", "sleep", [1.0])] * 2, 0.3, dst_worker_id=1)
            emit(event="done", kinds=[type(o).__name__ for o in sync + batch] + [co])
        server.on("worker_start", go)
        sys.exit(server.start())
    ''')
    done = read_records(srv, lambda r: any(x["event"] == "done" for x in r), timeout=30)
    assert done[0]["kinds"] == ["TaskTimeout"] * 5
    # Counted when the caller gives up, whether or not the sleeps have finished since.
    snap = wait_for(lambda: (s := stats.read(pid=srv.pid))["tasks"]["run"] == 5 and s,
                    timeout=20)
    assert snap["tasks"]["timed_out"] == 5 and snap["workers"][0]["timed_out"] == 5
    assert [(tw["timed_out"], tw["lost"]) for tw in snap["task_workers"]] == [(2, 0), (3, 0)]
    os.kill(srv.pid, signal.SIGTERM)
    assert srv.wait(30) == 0, srv.err


def test_waiting_tasks_per_worker_and_per_task_worker_while_one_runs(
        servers: ServerRunner) -> None:
    srv = servers.start('''
        server = Server(worker_num=1, task_worker_num=1)

        def go(server, wid):
            # One loop turn: the sleep and five echoes leave together.
            Task.deliver("Demo", "sleep", [3.0], Task.TYPE_ASYNC)
            for i in range(5):
                Task.deliver("Demo", "echo", [i], Task.TYPE_ASYNC)
            emit(event="sent")
        server.on("worker_start", go)
        sys.exit(server.start())
    ''')
    read_records(srv, lambda r: any(x["event"] == "sent" for x in r), timeout=30)
    busy = wait_for(lambda: (s := stats.read(pid=srv.pid))["task_workers"][0]["run"] == 0
                    and not s["task_workers"][0]["idle"] and s, timeout=10)
    # While the sleep runs: six without a result for the worker, five not started yet.
    assert busy["idle_task_workers"] == 0
    assert busy["workers"][0]["waiting"] == 6 and busy["waiting"] == 6
    assert busy["task_workers"][0]["waiting"] == 5 and busy["delivered"] == 6
    done = wait_for(lambda: (s := stats.read(pid=srv.pid))["tasks"]["run"] == 6
                    and s["idle_task_workers"] == 1 and s, timeout=20)
    assert done["waiting"] == 0 and done["task_workers"][0]["waiting"] == 0
    os.kill(srv.pid, signal.SIGTERM)
    assert srv.wait(30) == 0, srv.err


def test_queue_depth_and_no_per_task_worker_waiting_in_contention_mode(
        servers: ServerRunner) -> None:
    key = 0x7A200000 + (os.getpid() & 0xFFFF)
    srv = servers.start(f'''
        server = Server(worker_num=1, task_worker_num=2, task_ipc_mode=3,
                        message_queue_key={key})
        server.on("worker_start", lambda s, w: emit(event="ready",
                  got=Task.deliver("Demo", "echo", [7], Task.TYPE_CO, 10)))
        sys.exit(server.start())
    ''')
    assert read_records(srv, lambda r: any(x["event"] == "ready" for x in r))[0]["got"] == 7
    snap = stats.read(pid=srv.pid)
    queue = sysv_ipc.MessageQueue(key)
    assert snap["queue"] == {"msqid": queue.id, "messages": 0, "bytes": 0}
    assert [tw["waiting"] for tw in snap["task_workers"]] == [None, None]
    # The queue picks the task worker: what each lost, or held while its caller gave up,
    # is not known (the per-worker totals are).
    assert [(tw["lost"], tw["timed_out"]) for tw in snap["task_workers"]] == [(None, None)] * 2
    assert snap["delivered"] == 1 and snap["tasks"]["run"] == 1
    # Two messages of a type no reader of the server takes: they stay, and are counted.
    queue.send(b"abc", type=0x7FFF0000)
    queue.send(b"defgh", type=0x7FFF0000)
    snap = stats.read(pid=srv.pid)
    assert snap["queue"] == {"msqid": queue.id, "messages": 2, "bytes": 8}
    os.kill(srv.pid, signal.SIGTERM)
    assert srv.wait(30) == 0, srv.err


def test_max_request_recycles_and_deliveries_count_on_across_respawns(
        servers: ServerRunner, tmp_path: Any) -> None:
    marker = tmp_path / "lives"
    srv = servers.start(f'''
        server = Server(worker_num=1, task_worker_num=1, max_request=10, pid_file="server.pid")

        def go(server, wid):
            # The first two workers deliver 10 tasks each and are recycled; the third idles.
            with open({str(marker)!r}, "a+") as f:
                f.write("x")
                f.seek(0)
                life = len(f.read())
            if life <= 2:
                for i in range(10):
                    Task.deliver("Demo", "echo", [i], Task.TYPE_CO, 10)
            else:
                emit(event="third", stats=server.stats())
        server.on("worker_start", go)
        sys.exit(server.start())
    ''')
    recs = read_records(srv, lambda r: any(x["event"] == "third" for x in r), timeout=60)
    inside = next(r["stats"] for r in recs if r["event"] == "third")
    assert inside["max_request_recycles"] == 2
    assert inside["respawns"]["recycled"] == 2 and sum(inside["respawns"].values()) == 2
    assert inside["workers"][0]["respawns"] == 2
    assert inside["workers"][0]["delivered"] == 20 and inside["tasks"]["run"] == 20
    # By pid file, from the command line.
    done = _status("--pid-file", str(tmp_path / "server.pid"), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["max_request_recycles"] == 2
    os.kill(srv.pid, signal.SIGTERM)
    assert srv.wait(30) == 0, srv.err
    done = _status("--pid-file", str(tmp_path / "server.pid"), "--json")
    assert done.returncode == 1 and "not running" in done.stderr


def test_cron_counters_after_a_few_seconds_of_every_second_rules(servers: ServerRunner) -> None:
    srv = servers.start('''
        from pyswtask import scheduled

        @task()
        class Jobs:
            @scheduled(cron="* * * * * *")
            def fine(self):
                return 1

            @scheduled(cron="* * * * * *")
            def broken(self):
                raise RuntimeError("no")

        server = Server(worker_num=1, task_worker_num=2, cron=True)
        sys.exit(server.start())
    ''')

    def settled(due: int) -> Any:
        def check() -> dict[str, Any] | None:
            try:
                snap = stats.read(pid=srv.pid)
            except ServerNotRunning:
                return None
            cron = snap["cron"]
            # None while the master starts: it opens the crontab after the stats segment.
            if cron is None or cron["due"] < due or cron["run"] != cron["due"]:
                return None
            return snap     # every due run has finished
        return check

    snap = wait_for(settled(8), timeout=30, interval=0.05)
    cron = snap["cron"]
    jobs = {j["method"]: j for j in cron["jobs"]}
    # A loaded machine may make a run late; one within cron_grace is never skipped.
    assert 0 <= cron["late"] <= cron["due"] and cron["skipped"] == 0
    assert jobs["broken"]["failures"] == jobs["broken"]["runs"] >= 4
    assert jobs["fine"]["failures"] == 0 and jobs["fine"]["runs"] >= 4
    assert cron["failed"] == jobs["broken"]["runs"]
    assert cron["run"] == jobs["fine"]["runs"] + jobs["broken"]["runs"] == cron["due"]
    assert jobs["fine"]["last_status"] == "DONE" and jobs["broken"]["last_status"] == "FAILED"
    assert jobs["fine"]["next"] > time.time() - 1
    # cronTimer and cronExec are the two user processes, both up.
    assert [p["name"] for p in snap["processes"]] == ["cronTimer", "cronExec"]
    assert all(p["state"] == "up" for p in snap["processes"])
    # cronExec stopped for 3.5 s: at least two seconds of each rule are claimed 1 s late or
    # more when it goes on, and still run (cron_grace is 60 s).
    exec_pid = snap["processes"][1]["pid"]
    os.kill(exec_pid, signal.SIGSTOP)
    try:
        time.sleep(3.5)
    finally:
        os.kill(exec_pid, signal.SIGCONT)
    after = wait_for(settled(cron["due"] + 6), timeout=30, interval=0.05)["cron"]
    assert after["late"] - cron["late"] >= 4 and after["skipped"] == 0
    assert after["run"] == after["due"] and after["failed"] * 2 in (after["run"] - 1,
                                                                    after["run"],
                                                                    after["run"] + 1)
    os.kill(srv.pid, signal.SIGTERM)
    assert srv.wait(30) == 0, srv.err


def test_status_tells_not_running_from_cannot_read(tmp_path: Any) -> None:
    done = _status("--pid-file", str(tmp_path / "none.pid"), "--json")
    assert done.returncode == 1
    assert f"no pid file {tmp_path / 'none.pid'}: the server is not running" in done.stderr
    # A segment on the key that is no pyswtask stats segment: there, but unreadable.
    key = 0x7005FFF0
    shm = sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, mode=0o600, size=4096)
    try:
        shm.write(b"not stats")
        done = _status("--key", hex(key), "--json")
        assert done.returncode == 2, done.stderr
        assert "cannot read the server's stats" in done.stderr and f"version-{VERSION}" in done.stderr
        with pytest.raises(stats.StatsUnreadable):
            stats.read(key=key)
    finally:
        shm.detach()
        shm.remove()
    with pytest.raises(ValueError, match="exactly one of pid_file, pid and key"):
        stats.read(pid=1, key=2)


def test_metrics_bind_is_checked() -> None:
    from pyswtask import Server

    with pytest.raises(ValueError, match='setting metrics_bind must be "host:port"'):
        Server(metrics_bind="9108")
    with pytest.raises(ValueError, match="setting metrics_bind"):
        Server(metrics_bind="127.0.0.1:70000")
