"""The message queue: task_ipc_mode 1/2/3, and delivery from separate programs (commands)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import msgpack
import pytest
import sysv_ipc
from _testbase import ServerProcess, ServerRunner, wait_for

from pyswtask._core import FLAG_ASYNC, FLAG_COMMAND, FRAME_TASK, pack_envelope, pack_frame

_keys = iter(range(0x7A100000 + (os.getpid() & 0xFFF) * 64, 0x7A100000 + (os.getpid() & 0xFFF) * 64 + 64))


def new_key() -> int:
    """A queue key of this test run only, so runs side by side never meet."""
    key = next(_keys)
    for remove in (lambda: sysv_ipc.MessageQueue(key).remove(),
                   lambda: sysv_ipc.SharedMemory(key).remove()):
        try:
            remove()
        except sysv_ipc.ExistentialError:
            pass
    return key


SERVER = '''
    KEY, MODE = int(sys.argv[1]), int(sys.argv[2])

    @task()
    class Note:
        def ran(self, value):
            emit(event="ran", value=value, pid=os.getpid())
            return value
        def big(self, i, pad):
            emit(event="big", i=i, size=len(pad))

    server = Server(worker_num=2, task_worker_num=2, task_ipc_mode=MODE, message_queue_key=KEY,
                    max_wait_time=2.0)
    server.on("task_worker_start", lambda s, wid: emit(event="tw_ready", wid=wid, pid=os.getpid()))
    if __name__ == "__main__":
        server.start()
'''


def start_server(servers: ServerRunner, key: int, mode: int, body: str = SERVER) -> ServerProcess:
    srv = servers.start(body, args=[str(key), str(mode)])
    wait_ready(srv, key)
    return srv


def wait_ready(srv: ServerProcess, key: int) -> None:
    def ready() -> bool:
        assert srv.proc.poll() is None, f"server exited early:\n{srv.proc.stderr.read()}"  # type: ignore[union-attr]
        return queue_exists(key)
    wait_for(ready, timeout=15)
    time.sleep(0.5)     # the task workers' readers are up shortly after the queue exists


def queue_exists(key: int) -> bool:
    try:
        sysv_ipc.MessageQueue(key)
    except sysv_ipc.ExistentialError:
        return False
    return True


def stop(srv: ServerProcess) -> ServerProcess:
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.wait(20)
    assert code == 0, f"server exited with {code}\n{srv.err}"
    return srv


def command(code: str, key: int | None, timeout: float = 30.0,
            env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Runs a separate Python program (not a child of the server) and returns its JSON lines."""
    prelude = textwrap.dedent('''
        import json, os, sys, time
        from pyswtask import Task, TaskError, TaskTimeout, ServerNotRunning, QueueFull
        def emit(**fields):
            print(json.dumps(fields, default=repr), flush=True)
    ''')
    if key is not None:
        prelude += f"Task.configure(message_queue_key={key})\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))
    assert proc.returncode == 0, f"command failed:\n{proc.stdout}\n{proc.stderr}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


COMMAND_WORK = '''
    emit(event="co", result=Task.deliver("Demo", "echo", ["hello", 2]))
    ids = [Task.deliver("Note", "ran", [f"async-{i}"], Task.TYPE_ASYNC) for i in range(50)]
    emit(event="ids", ids=ids)
    try:
        Task.deliver("Demo", "boom", ["from a command"])
    except TaskError as e:
        emit(event="error", type=e.remote_type, message=e.remote_message)
    try:
        Task.deliver("Demo", "sleep", [2.0], timeout=0.3)
    except TaskTimeout as e:
        emit(event="timeout", text=str(e))
    try:
        Task.deliver("Nope", "echo")
    except TaskError as e:
        emit(event="unknown", type=e.remote_type)
    emit(event="after_timeout", result=Task.deliver("Demo", "echo", ["again"], timeout=5))
    emit(event="pinned", pid=Task.deliver("Demo", "pid", dst_worker_id=1))
'''


@pytest.mark.parametrize("mode", [1, 2, 3])
def test_a_command_delivers_async_and_co_through_the_queue(servers: ServerRunner,
                                                           mode: int) -> None:
    key = new_key()
    srv = start_server(servers, key, mode)
    out = {r["event"]: r for r in command(COMMAND_WORK, key)}
    assert out["co"]["result"] == ["hello", 2]
    ids = out["ids"]["ids"]
    assert len(set(ids)) == 50 and all(isinstance(i, int) and i > 0 for i in ids)
    assert out["error"] == {"event": "error", "type": "ValueError", "message": "from a command"}
    assert "Demo.sleep gave no result within 0.3 s" in out["timeout"]["text"]
    assert out["unknown"]["type"] == "UnknownTask"
    # The late result of the timed-out call is not taken for the next call's.
    assert out["after_timeout"]["result"] == "again"
    stop(srv)
    ran = sorted(r["value"] for r in srv.by_event("ran"))
    assert ran == sorted(f"async-{i}" for i in range(50)), "an ASYNC task was lost or repeated"
    tw_pids = {r["wid"]: r["pid"] for r in srv.by_event("tw_ready")}
    if mode != 3:
        # dst_worker_id picks the task worker (worker ids follow the 2 workers).
        assert out["pinned"]["pid"] == tw_pids[3]
    assert not queue_exists(key), "the queue outlived its server"
    with pytest.raises(sysv_ipc.ExistentialError):
        sysv_ipc.SharedMemory(key)


def test_a_co_caller_polls_only_briefly_for_a_slow_result(servers: ServerRunner) -> None:
    """Task.configure(wait_spin=...): the poll before sleeping is bounded, so a program waiting
    half a second for a slow task spends little of it on the CPU; 0 turns it off; a bad value
    is refused by name."""
    key = new_key()
    srv = start_server(servers, key, 1)
    out = command(f'''
        for spin in (0.0002, 0.05, 0):
            Task.configure(message_queue_key={key}, wait_spin=spin)
            fast = [Task.deliver("Demo", "echo", [i]) for i in range(20)]
            cpu, wall = time.process_time(), time.monotonic()
            slow = Task.deliver("Demo", "sleep", [0.5, "slept"], timeout=5)
            emit(event="slow", spin=spin, fast=fast, slow=slow,
                 cpu=time.process_time() - cpu, wall=time.monotonic() - wall)
        try:
            Task.configure(message_queue_key={key}, wait_spin=-1)
        except ValueError as e:
            emit(event="bad", text=str(e))
    ''', None)
    slow = [r for r in out if r["event"] == "slow"]
    assert [r["spin"] for r in slow] == [0.0002, 0.05, 0]
    for r in slow:
        assert r["fast"] == list(range(20)) and r["slow"] == "slept"
        assert r["wall"] >= 0.45
        # Polling the whole half second would cost about 0.5 s of CPU.
        assert r["cpu"] < 0.25, r
    assert out[-1] == {"event": "bad",
                       "text": "wait_spin must be a non-negative number of seconds, not -1"}
    stop(srv)


SPIN_SERVER = '''
    KEY, MODE, SPIN = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    server = Server(worker_num=1, task_worker_num=2, task_ipc_mode=MODE, message_queue_key=KEY,
                    task_wait_spin=SPIN, max_wait_time=2.0)
    # Written where the test reads them while the server runs (its output comes at the end).
    server.on("task_worker_start",
              lambda s, wid: open(f"task-worker-{wid}.pid", "w").write(str(os.getpid())))
    server.start()
'''


def blocked_waits(pid: int) -> int:
    """How often the main thread of pid has slept (voluntary context switches): a task worker
    waiting in msgrcv for its next task counts one each time."""
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches for {pid}")


@pytest.mark.parametrize("mode", [2, 3])
def test_task_workers_poll_the_queue_for_a_program_calling_in_a_loop(servers: ServerRunner,
                                                                     mode: int) -> None:
    """After answering a program's CO task, a task worker that answered another one lately
    polls the queue for task_wait_spin before waiting in msgrcv: a program calling in a loop
    finds them awake, instead of waking one per call. task_wait_spin=0 turns it off."""
    n = 2000
    slept = {}
    for spin in (0.0002, 0.0):
        key = new_key()
        srv = servers.start(SPIN_SERVER, args=[str(key), str(mode), str(spin)])
        wait_ready(srv, key)
        files = [servers.tmp_path / f"task-worker-{wid}.pid" for wid in (1, 2)]
        wait_for(lambda files=files: all(f.exists() and f.read_text() for f in files),
                 timeout=10)
        pids = [int(f.read_text()) for f in files]
        for f in files:
            f.unlink()
        before = sum(blocked_waits(pid) for pid in pids)
        out = command(f'''
            results = [Task.deliver("Demo", "echo", [i]) for i in range({n})]
            emit(event="done", ok=results == list(range({n})))
        ''', key)
        slept[spin] = sum(blocked_waits(pid) for pid in pids) - before
        assert out == [{"event": "done", "ok": True}]
        stop(srv)
    # Off, each task is a wake-up of the task worker that takes it; on, nearly none is.
    assert slept[0.0] >= 0.9 * n, slept
    assert slept[0.0002] <= 0.5 * n, slept


WORKER_WORK = '''
    KEY, MODE = int(sys.argv[1]), int(sys.argv[2])
    server = Server(worker_num=2, task_worker_num=2, task_ipc_mode=MODE, max_wait_time=2.0,
                    message_queue_key=KEY if KEY else None)

    def go(server, wid):
        if wid != 0:
            return
        emit(event="co", result=Task.deliver("Demo", "echo", ["co", MODE]))
        got = []
        for i in range(300):
            Task.deliver("Demo", "echo", [i], Task.TYPE_ASYNC, callback=lambda t, r: got.append(r))
        emit(event="batch", results=Task.deliver_batch([("Demo", "echo", [i]) for i in range(100)]))
        big = "x" * 200_000
        emit(event="big", size=len(Task.deliver("Demo", "echo", [big], timeout=10)))
        try:
            emit(event="pinned", pid=Task.deliver("Demo", "pid", dst_worker_id=1))
        except ValueError as e:
            emit(event="pinned_error", text=str(e))
        def finish():
            emit(event="async", results=sorted(got))
            server.shutdown()
        server.after(1500, finish)
    server.on("worker_start", go)
    server.start()
'''


@pytest.mark.parametrize("mode,keyed", [(2, False), (3, True)])
def test_workers_deliver_through_the_queue_in_modes_2_and_3(servers: ServerRunner, mode: int,
                                                           keyed: bool) -> None:
    key = new_key() if keyed else 0
    srv = servers.run(WORKER_WORK, args=[str(key), str(mode)], timeout=40)
    out = {r["event"]: r for r in srv.records()}
    assert out["co"]["result"] == ["co", mode]
    assert out["async"]["results"] == list(range(300)), srv.err
    assert out["batch"]["results"] == list(range(100))
    assert out["big"]["size"] == 200_000
    if mode == 3:
        assert "cannot pick a task worker in task_ipc_mode 3" in out["pinned_error"]["text"]
    else:
        assert isinstance(out["pinned"]["pid"], int)
    if keyed:
        assert not queue_exists(key)


def test_no_server_on_the_key_fails_at_once_and_creates_nothing() -> None:
    key = new_key()
    started = time.monotonic()
    out = command('''
        for kind in (Task.TYPE_ASYNC, Task.TYPE_CO):
            try:
                Task.deliver("Demo", "echo", [1], kind)
            except ServerNotRunning as e:
                emit(event="refused", text=str(e))
    ''', key)
    assert time.monotonic() - started < 10
    assert [r["text"] for r in out] == [
        f"no server is running on message queue key 0x{key:x}: there is no such queue"] * 2
    assert not queue_exists(key), "the sender created the queue"


def test_no_queue_configured_names_the_ways_to_configure_one() -> None:
    out = command('''
        try:
            Task.deliver("Demo", "echo", [1])
        except ServerNotRunning as e:
            emit(text=str(e))
    ''', None, env={"PYSWTASK_QUEUE_KEY": ""})
    assert "Task.configure(message_queue_key=...) or PYSWTASK_QUEUE_KEY" in out[0]["text"]


def test_the_environment_names_the_queue(servers: ServerRunner) -> None:
    key = new_key()
    srv = start_server(servers, key, 1)
    out = command('emit(result=Task.deliver("Demo", "echo", ["env"]))', None,
                  env={"PYSWTASK_QUEUE_KEY": hex(key)})
    assert out == [{"result": "env"}]
    stop(srv)


# Up to 64 MiB (less the envelope, under the default package_max_length).
QUEUE_SIZES = (0, 8000, 8192, 100_000, 3_000_000, (64 << 20) - 64)


@pytest.mark.slow
def test_payloads_beyond_one_message_travel_in_parts(servers: ServerRunner) -> None:
    key = new_key()
    srv = start_server(servers, key, 3)
    out = command('''
        for size in SIZES:
            value = os.urandom(size)
            back = Task.deliver("Demo", "echo", [value], timeout=60)
            emit(size=size, same=back == value)
        for i in range(20):
            Task.deliver("Note", "big", [i, "p" * 50_000], Task.TYPE_ASYNC)
    '''.replace("SIZES", repr(QUEUE_SIZES)), key, timeout=120)
    assert out == [{"size": s, "same": True} for s in QUEUE_SIZES]
    stop(srv)
    assert sorted(r["i"] for r in srv.by_event("big") if r["size"] == 50_000) == list(range(20))


LIMITED = SERVER.replace("max_wait_time=2.0)", "max_wait_time=2.0, package_max_length=100_000)")


def test_a_payload_above_package_max_length_is_refused_by_name(servers: ServerRunner) -> None:
    key = new_key()
    srv = start_server(servers, key, 1, LIMITED)
    out = command('''
        try:
            Task.deliver("Demo", "echo", ["x" * 200_000])
        except ValueError as e:
            emit(text=str(e))
        emit(result=Task.deliver("Demo", "echo", ["small"]))
    ''', key)
    assert "above the server's package_max_length (100000)" in out[0]["text"]
    assert out[1]["result"] == "small"
    stop(srv)


FULL = SERVER.replace("task_worker_num=2", "task_worker_num=1")


@pytest.mark.slow
def test_a_full_queue_raises_queue_full_after_the_timeout_and_loses_nothing(
        servers: ServerRunner) -> None:
    key = new_key()
    srv = start_server(servers, key, 1, FULL)
    out = command('''
        Task.deliver("Demo", "sleep", [4.0], Task.TYPE_ASYNC)
        Task.flush()
        sent = 0
        started = time.monotonic()
        try:
            while True:
                Task.deliver("Note", "big", [sent, "y" * 60_000], Task.TYPE_ASYNC, timeout=0.5)
                sent += 1
        except QueueFull as e:
            emit(event="full", text=str(e), sent=sent, waited=time.monotonic() - started)
        # What deliver accepted is written out as the task worker drains the queue.
        emit(event="flushed", done=Task.flush(timeout=20))
    ''', key, timeout=60)
    full = out[0]
    assert out[1]["done"] is True
    assert 0.5 <= full["waited"] < 10
    assert full["text"].startswith(f"message queue 0x{key:x} is full: task Note.big was not sent "
                                   "within the timeout")
    assert full["sent"] > 0
    stop(srv)
    ran = sorted(r["i"] for r in srv.by_event("big") if r["size"] == 60_000)
    assert ran == list(range(full["sent"])), "a task the command was told was sent did not run"


def test_a_malformed_message_is_dropped_and_the_task_worker_serves_on(
        servers: ServerRunner) -> None:
    key = new_key()
    srv = start_server(servers, key, 1)
    mq = sysv_ipc.MessageQueue(key)
    for garbage in (b"not a frame at all", b"SW\x01\x01" + b"\xff" * 40,
                    pack_frame(FRAME_TASK, FLAG_COMMAND | FLAG_ASYNC, 5, 0, b"\xc1\xc1")):
        mq.send(garbage, type=3)
    out = command('emit(result=Task.deliver("Demo", "pid", dst_worker_id=0))', key)
    assert isinstance(out[0]["result"], int)
    stop(srv)
    assert srv.err.count("task worker 2: record on channel -1 dropped") >= 2, srv.err
    assert "not valid msgpack" in srv.err
    assert [r["wid"] for r in srv.by_event("tw_ready")].count(2) == 1, "the task worker restarted"


def test_a_queue_left_by_a_killed_server_is_adopted_and_its_tasks_run(
        servers: ServerRunner) -> None:
    key = new_key()
    srv = start_server(servers, key, 1)
    os.killpg(srv.pid, signal.SIGKILL)     # no process of the server gets to clean up
    srv.proc.wait(5)
    # A reader still blocked in msgrcv would take a message with it as it dies.
    assert not srv.group_alive(), "the killed server's children lingered"
    mq = sysv_ipc.MessageQueue(key)
    for i in range(3):
        body = pack_envelope("Note", "ran", [f"left-{i}"], 2)
        mq.send(pack_frame(FRAME_TASK, FLAG_COMMAND | FLAG_ASYNC, (1 << 32) | (i + 1), 0, body),
                type=3 + i % 2)
    srv2 = start_server(servers, key, 1)
    time.sleep(1.0)
    stop(srv2)
    assert sorted(r["value"] for r in srv2.by_event("ran")) == ["left-0", "left-1", "left-2"]
    assert f"was left by server pid {srv.pid}, which is gone: its 3 message(s) will run" \
        in srv2.err
    assert not queue_exists(key)


def test_a_second_server_on_a_key_in_use_refuses_to_start(servers: ServerRunner) -> None:
    key = new_key()
    srv = start_server(servers, key, 1)
    second = servers.start(SERVER, args=[str(key), "1"], name="second.py")
    assert second.wait(20) != 0
    assert f"message_queue_key 0x{key:x} is in use by a running server (master pid {srv.pid})" \
        in second.err
    assert queue_exists(key), "the refused server removed the running server's queue"
    stop(srv)


def test_the_cli_delivers_and_inspects_the_queue(servers: ServerRunner) -> None:
    key = new_key()
    srv = start_server(servers, key, 1)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pyswtask", *args], capture_output=True,
                              text=True, timeout=30)

    waited = cli("deliver", "Demo", "echo", '["hi", {"a": 1}]', "--key", hex(key), "--wait")
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout) == ["hi", {"a": 1}]
    fired = cli("deliver", "Note", "ran", '["from-cli"]', "--key", hex(key))
    assert fired.returncode == 0 and int(fired.stdout) > 0
    failed = cli("deliver", "Demo", "boom", '["cli"]', "--key", hex(key), "--wait")
    assert failed.returncode == 1 and "ValueError: cli" in failed.stderr
    bad = cli("deliver", "Demo", "echo", "[1,", "--key", hex(key))
    assert bad.returncode == 2 and "PARAMS_JSON" in bad.stderr
    stat = cli("queue", "stat", "--key", hex(key))
    assert stat.returncode == 0, stat.stderr
    info = json.loads(stat.stdout)
    assert info["messages"] == 0 and info["msgmax"] > 0 and info["server_pid"] == srv.pid
    stop(srv)
    assert "from-cli" in [r["value"] for r in srv.by_event("ran")]
    missing = cli("queue", "stat", "--key", hex(key))
    assert missing.returncode == 1 and "no message queue" in missing.stderr
    mq = sysv_ipc.MessageQueue(key, sysv_ipc.IPC_CREX, mode=0o600)
    try:
        mq.send(b"x", type=3)
        mq.send(b"y", type=4)
        purged = cli("queue", "purge", "--key", hex(key))
        assert purged.returncode == 0 and "2 message(s) discarded" in purged.stdout
        assert mq.current_messages == 0
    finally:
        mq.remove()


def test_bad_queue_settings_are_refused_by_name() -> None:
    from pyswtask import Server
    with pytest.raises(ValueError, match="task_ipc_mode must be 1 .* not 4"):
        Server(task_ipc_mode=4)
    with pytest.raises(ValueError, match="message_queue_key must be an int or a hex string"):
        Server(message_queue_key="zz")
    assert Server(message_queue_key="0x70001001").settings["message_queue_key"] == 0x70001001
    with pytest.raises(ValueError, match="package_max_length must be a positive int"):
        Server(package_max_length=0)


def test_envelope_of_a_queue_message_is_msgpack() -> None:
    # The wire format external producers write (documented in the README).
    body = pack_envelope("Demo", "echo", [1], 2)
    assert msgpack.unpackb(body) == ["Demo", "echo", [1], 2, "", 0]


def test_a_worker_delivery_above_package_max_length_is_refused_by_name(
        servers: ServerRunner) -> None:
    srv = servers.run('''
        server = Server(worker_num=1, task_worker_num=1, package_max_length=1000)

        def go(server, wid):
            try:
                Task.deliver("Demo", "echo", ["x" * 2000])
            except ValueError as e:
                emit(event="refused", text=str(e))
            emit(event="small", result=Task.deliver("Demo", "echo", ["x" * 900]) == "x" * 900)
            server.shutdown()
        server.on("worker_start", go)
        server.start()
    ''')
    out = {r["event"]: r for r in srv.records()}
    assert "above the server's package_max_length (1000)" in out["refused"]["text"]
    assert out["small"]["result"] is True
