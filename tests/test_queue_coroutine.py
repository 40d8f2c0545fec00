"""Coroutine tasks from the message queue (task_enable_coroutine): they run concurrently on a
task worker, as the channels' do, and a task worker killed while several run reports each of
them lost (TaskWorkerLost) and hands the tasks it had not started to its successor, once."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import pytest
from _testbase import ServerRunner
from test_process import read_records
from test_queue import command, new_key, start_server, stop

CO_TASKS = '''
    @task()
    class Co:
        async def nap(self, i):
            start = time.time()
            await asyncio.sleep(0.1)
            emit(event="napped", value=i * 2, start=start, end=time.time(), pid=os.getpid())
            return i * 2

        async def hold(self, tag):
            emit(event="hold", tag=tag, pid=os.getpid())
            await asyncio.sleep(30)
            emit(event="held_done", tag=tag)
            return tag

    @task()
    class Note:
        def block(self):
            emit(event="block", pid=os.getpid())
            time.sleep(30)

        def ran(self, value):
            emit(event="ran", value=value, pid=os.getpid())
            return value
'''

SERVER = CO_TASKS + '''
    KEY, MODE = int(sys.argv[1]), int(sys.argv[2])
    server = Server(worker_num=1, task_worker_num=1, task_ipc_mode=MODE, message_queue_key=KEY,
                    task_enable_coroutine=True, task_max_concurrency=100, max_wait_time=2.0)
    server.start()
'''


@pytest.mark.timeout(90)
def test_a_hundred_async_tasks_from_a_program_run_at_once(servers: ServerRunner) -> None:
    key = new_key()
    srv = start_server(servers, key, 1, SERVER)
    command('''
        for i in range(100):
            Task.deliver("Co", "nap", [i], Task.TYPE_ASYNC, dst_worker_id=0)
        Task.flush(10)
    ''', key)
    recs = read_records(srv, lambda r: len([x for x in r if x.get("event") == "napped"]) == 100,
                        timeout=40)
    stop(srv)
    naps = [r for r in recs if r.get("event") == "napped"]
    assert sorted(r["value"] for r in naps) == [i * 2 for i in range(100)]
    assert len({r["pid"] for r in naps}) == 1
    # One at a time, 100 naps of 0.1 s take 10 s; at once, a fraction of a second.
    took = max(r["end"] for r in naps) - min(r["start"] for r in naps)
    assert took < 5.0, took


WORKER_MODE3 = CO_TASKS + '''
    async def main(server):
        t = time.monotonic()
        results = await Task.co_batch([("Co", "nap", [i]) for i in range(100)], timeout=30)
        emit(event="naps", took=time.monotonic() - t, results=results)
        server.shutdown()

    def worker_start(server, wid):
        asyncio.get_event_loop().create_task(main(server))

    server = Server(worker_num=1, task_worker_num=1, task_ipc_mode=3,
                    message_queue_key=int(sys.argv[1]), task_enable_coroutine=True,
                    max_wait_time=2.0)
    server.on("worker_start", worker_start)
    server.start()
'''


@pytest.mark.timeout(90)
def test_a_hundred_async_tasks_from_a_worker_through_the_queue_run_at_once(
        servers: ServerRunner) -> None:
    srv = servers.run(WORKER_MODE3, args=[str(new_key())], timeout=60)
    naps = srv.by_event("naps")[0]
    assert naps["results"] == [i * 2 for i in range(100)]
    assert naps["took"] < 5.0, naps["took"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", [1, 3])
def test_killed_while_several_queue_coroutines_run_each_is_lost_and_the_rest_run_once(
        servers: ServerRunner, mode: int) -> None:
    key = new_key()
    srv = start_server(servers, key, mode, SERVER)
    out: list[dict[str, object]] = []

    def deliver(i: int) -> None:
        out.extend(command(f'''
            try:
                got = Task.deliver("Co", "hold", ["h{i}"], timeout=40, dst_worker_id=0)
                emit(result=["returned", "", str(got)])
            except TaskError as e:
                emit(result=[type(e).__name__, e.remote_type, str(e)])
        ''', key, timeout=60))

    recs: list[dict[str, object]] = []
    waiters = [threading.Thread(target=deliver, args=(i,)) for i in range(4)]
    for w in waiters:
        w.start()
    try:
        recs += read_records(srv, lambda r: len([x for x in r if x.get("event") == "hold"]) == 4,
                             timeout=30)
        pid = next(r["pid"] for r in recs if r.get("event") == "hold")
        # While the holds run, a blocking sync task with notes behind it in the same message:
        # the task worker takes them all, runs the block, and the notes are still unstarted.
        command('''
            Task.deliver("Note", "block", [], Task.TYPE_ASYNC, dst_worker_id=0)
            for i in range(20):
                Task.deliver("Note", "ran", [i], Task.TYPE_ASYNC, dst_worker_id=0)
            Task.flush(10)
        ''', key)
        recs += read_records(srv, lambda r: any(x.get("event") == "block" for x in r),
                             timeout=30)
        assert not any(r.get("event") == "ran" for r in recs)
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        for w in waiters:
            w.join(60)
        assert not any(w.is_alive() for w in waiters), "a CO caller never got its outcome"
        time.sleep(1.0)
    finally:
        stop(srv)
        for w in waiters:
            w.join(5)
    results = [row["result"] for row in out]
    assert len(results) == 4, out
    for kind, remote, text in results:
        assert (kind, remote) == ("TaskWorkerLost", "TaskWorkerLost"), results
        assert f"(pid {pid}) died with signal SIGKILL while running this task" in text, text
    everything = recs + srv.records()
    assert not [r for r in everything if r.get("event") == "held_done"], \
        "a lost coroutine task finished after all"
    holds = Counter(r["tag"] for r in everything if r.get("event") == "hold")
    assert holds == Counter(f"h{i}" for i in range(4)), f"a lost task ran again: {holds}"
    ran = Counter(r["value"] for r in everything if r.get("event") == "ran")
    assert ran == Counter(range(20)), f"the notes ran {ran}"
    assert all(r["pid"] != pid for r in everything if r.get("event") == "ran"), \
        "the dead task worker ran a note"
