"""@task registration and the lookup task workers use."""

from __future__ import annotations

import pytest

from pyswtask import UnknownMethod, UnknownTask, task
from pyswtask.registry import registered, resolve


@task
class PlainRegistered:
    def ping(self) -> str:
        return "pong"


@task("custom-name")
class Renamed:
    def ping(self) -> str:
        return "renamed"

    def _private(self) -> str:
        return "hidden"

    async def later(self) -> int:
        return 1


@task(name="kw-name", coroutine=True)
class Keyword:
    def go(self) -> int:
        return 2


def test_names_default_to_the_class_name_or_are_given() -> None:
    assert {"PlainRegistered", "custom-name", "kw-name"} <= set(registered())
    fn, on_loop = resolve("PlainRegistered", "ping")
    assert fn() == "pong" and on_loop is False
    assert resolve("custom-name", "ping")[0]() == "renamed"
    assert resolve("custom-name", "later")[1] is True
    assert resolve("kw-name", "go")[1] is True


@pytest.mark.parametrize("method", ["_private", "__class__", "__init__", "nope", "__dict__"])
def test_only_public_methods_are_reachable(method: str) -> None:
    with pytest.raises(UnknownMethod, match=f"no public method '{method}'"):
        resolve("custom-name", method)


def test_unknown_task_names_the_registered_ones() -> None:
    with pytest.raises(UnknownTask, match="'Missing' is not registered.*PlainRegistered"):
        resolve("Missing", "x")


def test_bad_declarations_fail_at_decoration_time() -> None:
    with pytest.raises(ValueError, match="taken by"):
        @task("custom-name")
        class Other:
            def x(self) -> None: ...
    with pytest.raises(ValueError, match="no public methods"):
        @task()
        class Empty:
            pass
    with pytest.raises(TypeError, match="decorates classes"):
        task("fn")(lambda: None)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="non-empty string"):
        task(3)  # type: ignore[call-overload]
