"""Task workers that wait in msgrcv themselves (task_ipc_mode 2 and 3: tasks come only from the
queue): signals, timers, pipe messages and reloads still reach them at once while they idle
there, and a wake-up message left for a process that is gone does not circulate."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

import pytest
import sysv_ipc
from _testbase import ServerRunner, wait_for
from test_process import read_records
from test_queue import command, new_key, start_server, stop

from pyswtask._core import is_sentinel, sentinel, wake_message

# max_wait_time is long: a task worker that did not notice its stop signal would take that long.
IDLE = '''
    KEY, MODE = int(sys.argv[1]), int(sys.argv[2])

    @task()
    class Clock:
        def later(self, ms):
            server.after(ms, lambda: emit(event="after", at=time.monotonic()))
            return time.monotonic()

    def tw_start(s, wid):
        emit(event="tw_ready", wid=wid, pid=os.getpid(), at=time.monotonic())
        if wid == 2:
            s.tick(100, lambda timer_id: emit(event="tick", at=time.monotonic()))

    def worker_start(s, wid):
        s.after(1500, lambda: s.send_message("hello", 1, type="note"))

    @listener(Event.PIPE_MESSAGE)
    def on_message(event):
        mtype, data, src_id = event.params
        emit(event="message", data=data, src=src_id, at=time.monotonic())

    server = Server(worker_num=1, task_worker_num=2, task_ipc_mode=MODE, message_queue_key=KEY,
                    max_wait_time=30.0)
    server.on("task_worker_start", tw_start)
    server.on("worker_start", worker_start)
    server.on("task_worker_stop",
              lambda s, wid: emit(event="tw_stop", wid=wid, pid=os.getpid(), at=time.monotonic()))
    if __name__ == "__main__":
        server.start()
'''


def test_control_messages_are_not_tasks() -> None:
    assert is_sentinel(sentinel(1234)) and is_sentinel(wake_message(1234))
    assert wake_message(1234) != sentinel(1234) and len(wake_message(1234)) == 8
    assert not is_sentinel(b"SW\x01\x01\x00\x00\x00\x00")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", [2, 3])
def test_timers_messages_and_timers_set_by_a_task_run_while_the_task_worker_idles_in_msgrcv(
        servers: ServerRunner, mode: int) -> None:
    key = new_key()
    srv = start_server(servers, key, mode, IDLE)
    # A timer set by a task: due before anything the idle task worker waited for.
    out = command('''
        for _ in range(3):
            emit(returned=Task.deliver("Clock", "later", [300], timeout=10))
            time.sleep(0.8)
    ''', key)
    # Then no task at all for 4 s: only the watch can wake the task worker for its timers.
    idle_from = time.monotonic()
    time.sleep(4.0)
    idle_to = time.monotonic()
    stop(srv)
    ticks = [r["at"] for r in srv.by_event("tick")]
    # About 35 in that window; none if the timers waited for the next task. (A loaded machine
    # can stall a process for seconds: late ticks then run at once, still inside the window.)
    assert sum(idle_from + 0.5 <= t <= idle_to for t in ticks) >= 5, (idle_from, idle_to, ticks)
    afters = sorted(r["at"] for r in srv.by_event("after"))
    assert len(afters) == 3, srv.err
    for returned, fired in zip(sorted(r["returned"] for r in out), afters):
        # Never before its time; the last one has no later task to wake the task worker.
        assert 0.29 <= fired - returned < 3.0, (returned, fired)
    messages = srv.by_event("message")
    assert [(m["data"], m["src"]) for m in messages] == [("hello", 0)], srv.err


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", [2, 3])
def test_sigterm_and_a_reload_stop_task_workers_idle_in_msgrcv_at_once(
        servers: ServerRunner, mode: int) -> None:
    key = new_key()
    srv = servers.start(IDLE, args=[str(key), str(mode)])
    records: list[dict[str, Any]] = []

    def have(event: str, count: int) -> Any:
        return lambda got: sum(r.get("event") == event for r in got) >= count

    records += read_records(srv, have("tw_ready", 2), timeout=20)
    time.sleep(0.5)
    first = {r["wid"]: r["pid"] for r in records if r.get("event") == "tw_ready"}
    sent = time.monotonic()
    os.kill(first[2], signal.SIGTERM)
    records += read_records(srv, lambda got: have("tw_ready", 3)(records + got), timeout=20)
    stopped = [r for r in records if r.get("event") == "tw_stop" and r["pid"] == first[2]]
    # A stop that waited for a message would take max_wait_time (30 s).
    assert len(stopped) == 1 and stopped[0]["at"] - sent < 10.0, records
    # Its successor serves; then a reload of the task workers (SIGUSR2) replaces both.
    assert command('emit(r=Task.deliver("Demo", "echo", ["after"], timeout=10))', key) == [
        {"r": "after"}]
    sent = time.monotonic()
    os.kill(srv.pid, signal.SIGUSR2)
    records += read_records(srv, lambda got: have("tw_ready", 5)(records + got), timeout=40)
    ready = [r for r in records if r.get("event") == "tw_ready"]
    assert ready[-1]["at"] - sent < 20.0, records
    assert command('emit(r=Task.deliver("Demo", "echo", ["reloaded"], timeout=10))', key) == [
        {"r": "reloaded"}]
    sent = time.monotonic()
    stop(srv)
    assert time.monotonic() - sent < 15.0


@pytest.mark.timeout(60)
def test_a_wake_up_for_a_process_that_is_gone_is_dropped(servers: ServerRunner) -> None:
    key = new_key()
    srv = start_server(servers, key, 3, IDLE)
    gone = subprocess.Popen(["true"])
    gone.wait()
    mq = sysv_ipc.MessageQueue(key)
    # Task workers 1..2 read every type up to 3 (contention): one of them takes it.
    mq.send(wake_message(gone.pid), type=3)
    mq.send(sentinel(gone.pid), type=3)
    assert command('emit(r=Task.deliver("Demo", "echo", [1], timeout=10))', key) == [{"r": 1}]
    wait_for(lambda: mq.current_messages == 0, timeout=5)
    time.sleep(0.3)
    assert mq.current_messages == 0, "a control message for a gone process circulates"
    stop(srv)
