from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from _redis import RedisServer
from _testbase import ServerRunner


def pytest_configure(config: pytest.Config) -> None:
    # Here, not in pyproject.toml: the suite also runs from a copy of tests/ against a wheel.
    config.addinivalue_line(
        "markers", "slow: a test that takes seconds to a minute (the soak, a whole-minute cron "
        "wait, 64 MiB payloads); the whole suite runs them, -m 'not slow' leaves them out")


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ServerRunner]:
    runner = ServerRunner(tmp_path)
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own on 127.0.0.1, stopped by pid at teardown."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
