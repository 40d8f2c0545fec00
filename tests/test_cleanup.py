"""What servers killed outright leave in SysV shared memory and queues is removed by the next."""

from __future__ import annotations

import os
import signal
import time

from _testbase import ServerRunner

from pyswtask import sysv

SERVER = '''
    @task()
    class Jobs:
        from pyswtask import scheduled
        @scheduled(cron="* * * * * *")
        def tick(self):
            pass

    server = Server(worker_num=1, task_worker_num=1, cron=True, task_ipc_mode=2,
                    pid_file="server.pid", max_wait_time=1.0)
    server.on("task_worker_start", lambda s, w: emit(event="ready", pid=os.getppid()))
    server.start()
'''


def sysv_keys() -> set[int]:
    keys = set()
    for path in ("/proc/sysvipc/shm", "/proc/sysvipc/msg"):
        with open(path) as f:
            keys |= {int(line.split()[0]) for line in f.readlines()[1:]}
    return keys


def left_by(pid: int) -> set[int]:
    cron_key = sysv.default_key(pid)
    return {cron_key, cron_key + 1, sysv.private_queue_key(pid), sysv.stats_key(pid)} & sysv_keys()


def test_twenty_start_kill_cycles_leave_nothing_behind(servers: ServerRunner) -> None:
    masters = []
    left_behind = 0
    for cycle in range(20):
        srv = servers.start(SERVER)
        assert srv.proc.stdout is not None
        line = srv.proc.stdout.readline()
        assert '"ready"' in line, f"cycle {cycle}: {line!r}\n{srv.proc.stderr.read()}"  # type: ignore[union-attr]
        assert left_by(srv.pid), "the server made no SysV objects to leave behind"
        os.killpg(srv.pid, signal.SIGKILL)
        srv.proc.wait(10)
        assert not srv.group_alive(), "a child of the killed server lingered"
        masters.append(srv.pid)
        # (A server of another test run starting now would sweep them too: count, not require.)
        left_behind += bool(left_by(srv.pid))
    assert left_behind, "SIGKILL let the masters clean up after all"
    last = servers.start(SERVER)
    assert last.proc.stdout is not None and '"ready"' in last.proc.stdout.readline()
    time.sleep(0.2)
    last.proc.send_signal(signal.SIGTERM)
    assert last.wait(20) == 0, last.err
    leaks = {pid: left_by(pid) for pid in masters + [last.pid] if left_by(pid)}
    assert not leaks, f"SysV objects left: { {p: [hex(k) for k in v] for p, v in leaks.items()} }"
    assert "which is gone" in last.err or left_behind < 20
    assert not (servers.tmp_path / "server.pid").exists()


def test_a_second_server_on_a_live_pid_file_refuses_to_start(servers: ServerRunner) -> None:
    first = servers.start(SERVER)
    assert first.proc.stdout is not None and '"ready"' in first.proc.stdout.readline()
    second = servers.start(SERVER, name="second.py")
    assert second.wait(20) != 0
    assert f"a server is already running with pid file server.pid (master pid {first.pid})" \
        in second.err
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait(20) == 0
