"""Server settings: the declarations, their checks, and the README's table of them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from pyswtask import settings
from pyswtask.server import DEFAULT_SETTINGS, Server

README = Path(__file__).resolve().parent.parent / "README.md"

# One refused value per checked setting; a new setting needs one here (see the test below).
BAD_VALUES: dict[str, Any] = {
    "task_enable_coroutine": "yes",
    "task_max_concurrency": 0,
    "max_wait_time": -1,
    "task_wait_spin": "0.1",
    "respawn_backoff_max": None,
    "cron": "yes",
    "timezone": "Nowhere/City",
    "cron_task_capacity": 0,
    "cron_run_capacity": 2**31,
    "cron_grace": -0.5,
    "cron_shm_key": 2**31 - 1,
    "stats_shm_key": 0,
    "metrics_bind": "localhost",
    "task_ipc_mode": 4,
    "message_queue_key": "zz",
    "task_max_request": -1,
    "task_arena_size": -1,
    "max_request": 1.5,
    "task_queue_size": 0,
    "package_max_length": True,
    "app": "no_colon",
    "bind": "localhost",
    "backlog": 0,
    "limit_concurrency": 0,
    "access_log": 1,
    "http": "h2",
    "event_loop": "trio",
    "http_options": [("lifespan", "on")],
    "cluster": "http://127.0.0.1:6379",
    "node": "",
    "cluster_queues": [3],
    "cluster_visibility_timeout": 0,
    "cluster_max_deliveries": 0,
    "cluster_prefetch": 0,
    "cluster_hold_max": 0,
    "cluster_hold_timeout": -1,
    "cron_cluster": "yes",
}


def readme_rows() -> list[tuple[str, str, str]]:
    """The rows of the README's settings table: (name, default, meaning)."""
    text = README.read_text()
    section = text[text.index("\n### Settings\n"):]
    section = section[:section.index("\n#", 1)]
    rows = []
    for line in section.splitlines():
        match = re.fullmatch(r"\| `(\w+)` \| (.*?) \| (.*) \|", line)
        if match:
            rows.append((match[1], match[2], match[3]))
    return rows


@pytest.mark.skipif(not README.is_file(), reason="no README.md next to the tests")
def test_the_readme_table_lists_the_declarations() -> None:
    declared = [(s.name, s.default_text(), s.doc) for s in settings.SETTINGS]
    assert readme_rows() == declared


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_a_bad_value_is_refused_naming_the_setting(name: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        settings.validate({name: BAD_VALUES[name]})


def test_every_checked_setting_has_a_bad_value_above() -> None:
    checked = {s.name for s in settings.SETTINGS if s.check is not None}
    assert set(BAD_VALUES) == checked


def test_the_defaults_validate_to_themselves() -> None:
    assert settings.validate({}) == settings.DEFAULTS
    assert settings.validate(settings.DEFAULTS) == settings.DEFAULTS
    assert list(settings.DEFAULTS) == [s.name for s in settings.SETTINGS]
    assert DEFAULT_SETTINGS == settings.DEFAULTS
    assert Server().settings == settings.DEFAULTS


def test_validate_normalizes_and_does_not_change_its_argument() -> None:
    given = {"message_queue_key": "0x70001001", "cron": True}
    out = settings.validate(given)
    assert out["message_queue_key"] == 0x70001001 and out["cron"] is True
    assert given == {"message_queue_key": "0x70001001", "cron": True}
    assert out["max_wait_time"] == 3.0


def test_an_unknown_setting_is_a_type_error_listing_the_known_ones() -> None:
    with pytest.raises(TypeError, match="unknown server setting.*max_wiat_time.*known: .*max_wait_time"):
        settings.validate({"max_wiat_time": 3})


def test_the_first_bad_setting_in_declaration_order_is_named() -> None:
    with pytest.raises(ValueError, match="max_wait_time"):
        settings.validate({"package_max_length": 0, "max_wait_time": -1})


def test_defaults_are_shown_as_the_readme_writes_them() -> None:
    shown = {s.name: s.default_text() for s in settings.SETTINGS}
    assert shown["task_wait_spin"] == "0.0002"
    assert shown["max_wait_time"] == "3.0"
    assert shown["package_max_length"] == "64 MiB"
    assert shown["pid_file"] == "None" and shown["cron"] == "False"


def test_a_separate_programs_co_poll_defaults_to_the_servers() -> None:
    # Two literals, since settings sits above the transports: they must not drift apart.
    from pyswtask.transport import command

    assert command.WAIT_SPIN == settings.DEFAULTS["task_wait_spin"]
