"""The event bus, in one process."""

from __future__ import annotations

import logging

import pytest

from pyswtask.events import EventManager, EventObject


def test_listeners_run_by_priority_then_registration_order() -> None:
    bus = EventManager()
    seen: list[str] = []
    bus.listen("e", lambda ev: seen.append("a"))
    bus.listen("e", lambda ev: seen.append("b"))
    bus.listen("e", lambda ev: seen.append("high"), priority=10)
    bus.listen("e", lambda ev: seen.append("low"), priority=-1)
    event = bus.trigger("e", "target", 1, 2)
    assert seen == ["high", "a", "b", "low"]
    assert isinstance(event, EventObject)
    assert (event.name, event.target, event.params) == ("e", "target", (1, 2))


def test_a_failing_listener_is_logged_and_the_others_still_run(
        caplog: pytest.LogCaptureFixture) -> None:
    bus = EventManager()
    seen: list[int] = []

    def broken(ev: EventObject) -> None:
        raise RuntimeError("listener broke")

    bus.listen("e", broken)
    bus.listen("e", lambda ev: seen.append(ev.params[0]))
    with caplog.at_level(logging.ERROR, logger="pyswtask.events"):
        bus.trigger("e", None, 42)
    assert seen == [42]
    assert "listener broke" in caplog.text and "'e'" in caplog.text


def test_remove_and_bad_registrations() -> None:
    bus = EventManager()
    fn = lambda ev: None  # noqa: E731
    bus.listen("e", fn)
    assert bus.has_listeners("e")
    assert bus.remove("e", fn) and not bus.remove("e", fn)
    assert not bus.has_listeners("e")
    with pytest.raises(TypeError, match="not callable"):
        bus.listen("e", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty string"):
        bus.listen("", fn)


def test_listener_decorator_takes_functions_and_classes() -> None:
    from pyswtask import events, listener

    seen: list[tuple[str, object]] = []

    @listener("test.app.event")
    def on_fn(ev: EventObject) -> None:
        seen.append(("fn", ev.params))

    @listener("test.app.event", priority=5)
    class OnClass:
        def handle(self, ev: EventObject) -> None:
            seen.append(("cls", ev.params))

    events.trigger("test.app.event", None, "x")
    assert seen == [("cls", ("x",)), ("fn", ("x",))]
    with pytest.raises(TypeError, match="no handle"):
        listener("test.app.event")(type("NoHandle", (), {}))
