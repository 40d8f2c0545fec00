"""Runs real servers in subprocesses for the integration tests, and always stops them.

A test writes a small server script (``PRELUDE`` gives it the shared task classes and an
``emit(**fields)`` that prints one JSON line), starts it in a session of its own, and reads the
JSON lines it printed. Every process of that session is killed at teardown, pass or fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

PRELUDE = textwrap.dedent('''
    import asyncio, json, logging, os, sys, time
    from pyswtask import (Server, Task, task, listener, Event, events, TaskError, TaskTimeout,
                          DeliveryError)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(process)d %(name)s %(levelname)s %(message)s")

    def emit(**fields):
        # One write per line, so that lines of concurrent processes never interleave.
        os.write(1, (json.dumps(fields, default=repr) + "\\n").encode())

    @task()
    class Demo:
        def echo(self, *args):
            return args[0] if len(args) == 1 else list(args)
        def pid(self):
            return os.getpid()
        def sleep(self, seconds, value=None):
            time.sleep(seconds)
            return value if value is not None else seconds
        def boom(self, message="bad thing"):
            raise ValueError(message)
        def count(self):
            Demo.calls = getattr(Demo, "calls", 0) + 1
            return Demo.calls
        def _secret(self):
            return "must not be reachable"
        async def later(self, value):
            await asyncio.sleep(0.01)
            return value
''')


class ServerProcess:
    """One server script running in its own session."""

    def __init__(self, path: Path, proc: subprocess.Popen[str]) -> None:
        self.path = path
        self.proc = proc
        self.out = ""
        self.err = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float = 30.0) -> int:
        """Waits for the master to exit and collects its output; a hang fails the test."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"server did not exit within {timeout} s\nstdout:\n{out}\n"
                                 f"stderr:\n{err}") from None
        self.out += out
        self.err += err
        return self.proc.returncode

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines() if line.startswith("{")]

    def by_event(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == name]

    def group_alive(self) -> bool:
        """Whether any process of the server's session is still running."""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        # Zombies of an exited master's children are reaped by init; give it a moment.
        return _wait_group_gone(self.proc.pid, 2.0)

    def kill(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            if not _wait_group_gone(self.proc.pid, 3.0):
                return


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    """True if the group still has running processes after timeout. Zombies do not count:
    a killed master's children are reaped by the machine's init, on its own schedule, and a
    zombie runs nothing and holds nothing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        if not _running_in_group(pgid):
            return False
        time.sleep(0.02)
    return True


def _running_in_group(pgid: int) -> bool:
    """Whether a process of the group is anything but a zombie (from /proc/PID/stat)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: split after its end.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class ServerRunner:
    """The fixture object: starts scripts, and kills every one of them at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[ServerProcess] = []

    def start(self, body: str, name: str = "server_app.py", args: list[str] | None = None,
              prelude: bool = True) -> ServerProcess:
        path = self.tmp_path / name
        path.write_text((PRELUDE if prelude else "") + textwrap.dedent(body))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, str(path), *(args or [])], cwd=self.tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env=env)
        server = ServerProcess(path, proc)
        self.started.append(server)
        return server

    def run(self, body: str, timeout: float = 30.0, **kwargs: Any) -> ServerProcess:
        """Starts a script that stops by itself, waits for it, and checks it left nothing."""
        server = self.start(body, **kwargs)
        code = server.wait(timeout)
        assert code == 0, f"server exited with {code}\nstdout:\n{server.out}\nstderr:\n{server.err}"
        assert not server.group_alive(), "a child of the server outlived its master"
        return server

    def close(self) -> None:
        for server in self.started:
            server.kill()
            if server.proc.poll() is None:
                server.proc.wait(timeout=5)
            for stream in (server.proc.stdout, server.proc.stderr):
                if stream:
                    stream.close()


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Polls predicate until it returns something true; fails the test after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)
