from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from _testbase import ServerRunner


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ServerRunner]:
    runner = ServerRunner(tmp_path)
    try:
        yield runner
    finally:
        runner.close()
