"""A task worker killed while it holds tasks it took from the message queue: its running task
fails with TaskWorkerLost at once, and the tasks its reader took but had not started run once,
on the task worker that replaces it (the socket path's guarantee, on the queue path)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from typing import Any

import pytest
import sysv_ipc
from _testbase import ServerRunner
from test_process import read_records
from test_queue import command, new_key, start_server, stop

SLOW = '''
    @task()
    class Slow:
        def nap(self, seconds, tag=""):
            emit(event="nap", pid=os.getpid(), tag=tag)
            time.sleep(seconds)
            return tag

    @task()
    class Note:
        def ran(self, value):
            emit(event="ran", value=value, pid=os.getpid())
            return value
'''

WORKER = SLOW + '''
    from pyswtask import TaskWorkerLost
    KEY, MODE = int(sys.argv[1]), int(sys.argv[2])
    DST = 0 if MODE == 2 else -1
    server = Server(worker_num=1, task_worker_num=2, task_ipc_mode=MODE, message_queue_key=KEY,
                    max_wait_time=2.0)

    def go(server, wid):
        try:
            Task.deliver("Slow", "nap", [20.0, "co"], timeout=30, dst_worker_id=DST)
        except TaskWorkerLost as e:
            emit(event="co_lost", at=time.time(), text=str(e))
        got = {}
        def done(tid, result):
            got[tid] = result
            if len(got) == 21:
                emit(event="async_done", lost=[str(v) for v in got.values()
                                               if isinstance(v, TaskWorkerLost)],
                     echoed=sorted(v for v in got.values() if isinstance(v, int)))
                server.shutdown()
        # One loop turn: the nap and the notes behind it leave in one message, which one
        # task worker's reader takes whole.
        Task.deliver("Slow", "nap", [20.0, "async"], Task.TYPE_ASYNC, callback=done,
                     dst_worker_id=DST)
        for i in range(20):
            Task.deliver("Note", "ran", [i], Task.TYPE_ASYNC, callback=done, dst_worker_id=DST)
    server.on("worker_start", go)
    server.start()
'''


def queue_stat_messages(key: int) -> int:
    return int(sysv_ipc.MessageQueue(key).current_messages)


def nap_started(srv: Any, tag: str) -> dict[str, Any]:
    recs = read_records(srv, lambda r: any(x.get("tag") == tag for x in r), timeout=30)
    return next(r for r in recs if r.get("tag") == tag)


@pytest.mark.parametrize("mode", [2, 3])
def test_a_worker_task_from_the_queue_is_lost_at_once_and_the_rest_run_once(
        servers: ServerRunner, mode: int) -> None:
    key = new_key()
    srv = start_server(servers, key, mode, WORKER)
    tw = nap_started(srv, "co")
    time.sleep(0.3)
    killed_at = time.time()
    os.kill(tw["pid"], signal.SIGKILL)
    recs = read_records(srv, lambda r: any(x["event"] == "co_lost" for x in r), timeout=40)
    co = next(r for r in recs if r["event"] == "co_lost")
    assert co["at"] - killed_at < 2.0, "TaskWorkerLost came later than 2 s after the kill"
    assert f"(pid {tw['pid']}) died with signal SIGKILL while running this task" in co["text"]
    tw2 = nap_started(srv, "async")
    time.sleep(0.5)     # the notes are in that task worker's hands, behind the nap
    os.kill(tw2["pid"], signal.SIGKILL)
    assert srv.wait(40) == 0, srv.err
    done = srv.by_event("async_done")
    assert done, f"the ASYNC callbacks did not all come\n{srv.err}"
    assert len(done[0]["lost"]) == 1 and "while running this task" in done[0]["lost"][0]
    assert done[0]["echoed"] == list(range(20)), "a task the dead task worker held was lost"
    ran = Counter(r["value"] for r in srv.by_event("ran"))
    assert ran == Counter(range(20)), f"tasks held by the dead task worker ran {ran}"
    assert all(r["pid"] != tw2["pid"] for r in srv.by_event("ran"))


COMMAND_SERVER = SLOW + '''
    KEY, MODE = int(sys.argv[1]), int(sys.argv[2])
    server = Server(worker_num=1, task_worker_num=2, task_ipc_mode=MODE, message_queue_key=KEY,
                    max_wait_time=2.0)
    server.start()
'''

COMMAND_CO = '''
    import json, sys, time
    from pyswtask import Task, TaskWorkerLost
    Task.configure(message_queue_key=int(sys.argv[1]))
    try:
        Task.deliver("Slow", "nap", [20.0, "co"], timeout=30, dst_worker_id=0)
        print(json.dumps({"event": "returned"}), flush=True)
    except TaskWorkerLost as e:
        print(json.dumps({"event": "lost", "at": time.time(), "text": str(e)}), flush=True)
'''


@pytest.mark.parametrize("mode", [1, 3])
def test_a_command_task_is_lost_at_once_and_the_tasks_behind_it_run_once(
        servers: ServerRunner, mode: int) -> None:
    key = new_key()
    srv = start_server(servers, key, mode, COMMAND_SERVER)
    waiter = subprocess.Popen([sys.executable, "-c", textwrap.dedent(COMMAND_CO), str(key)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        tw = nap_started(srv, "co")
        # Notes for the same task worker: its reader takes them while the nap runs.
        command('''
            for i in range(20):
                Task.deliver("Note", "ran", [i], Task.TYPE_ASYNC, dst_worker_id=DST)
            Task.flush(10)
        '''.replace("DST", "0" if mode == 1 else "-1"), key)
        deadline = time.monotonic() + 10
        while queue_stat_messages(key) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert queue_stat_messages(key) == 0, "the task workers' readers did not take the notes"
        assert not any(r.get("event") == "ran" for r in srv.records())
        time.sleep(0.3)
        killed_at = time.time()
        os.kill(tw["pid"], signal.SIGKILL)
        out, err = waiter.communicate(timeout=40)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert rows and rows[0]["event"] == "lost", f"{out}\n{err}"
    assert rows[0]["at"] - killed_at < 2.0, "TaskWorkerLost came later than 2 s after the kill"
    assert f"(pid {tw['pid']}) died with signal SIGKILL while running this task" \
        in rows[0]["text"]
    time.sleep(1.0)
    stop(srv)
    ran = Counter(r["value"] for r in srv.by_event("ran"))
    if mode == 3:
        # The other task worker may have taken some of the notes; none may be lost or repeated.
        assert ran == Counter(range(20)), f"the notes ran {ran}"
    else:
        assert ran == Counter(range(20)), f"tasks held by the dead task worker ran {ran}"
        assert all(r["pid"] != tw["pid"] for r in srv.by_event("ran"))


def test_a_lost_async_command_task_is_logged_by_the_master(servers: ServerRunner) -> None:
    key = new_key()
    srv = start_server(servers, key, 1, COMMAND_SERVER)
    out = command('''
        emit(task_id=Task.deliver("Slow", "nap", [20.0, "async"], Task.TYPE_ASYNC,
                                  dst_worker_id=0))
        Task.flush(10)
    ''', key)
    tw = nap_started(srv, "async")
    time.sleep(0.3)
    os.kill(tw["pid"], signal.SIGKILL)
    time.sleep(1.0)
    stop(srv)
    task_id = out[0]["task_id"]
    assert (f"ASYNC task {task_id} of command pid {task_id >> 32} lost: task worker 1 "
            f"(pid {tw['pid']}) died with signal SIGKILL while running it") in srv.err, srv.err
