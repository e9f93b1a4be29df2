"""subscribe() refuses what could never work, at once, and names subscriptions
stably."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

import eventbus.dispatch._handler
from eventbus import Bus, Context, Event, Message, SubscriptionError

pytestmark = pytest.mark.anyio


def plain(event: Event[int], ctx: Context) -> None:
    pass


async def reversed_annotated(ctx: Context, event: Event[int]) -> None:
    pass


async def reversed_by_name(ctx, event):  # type: ignore[no-untyped-def]
    pass


async def reversed_batch(ctx: Context, events: list[Event[int]]) -> None:
    pass


async def three(event: Event[int], ctx: Context, extra: int) -> None:
    pass


async def one(event: Event[int]) -> None:
    pass


async def keyword_only(*, event: Event[int], ctx: Context) -> None:
    pass


class SyncCallable:
    def __call__(self, event: Event[int], ctx: Context) -> None:
        pass


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (plain, "declare it with async def"),
        (lambda event, ctx: None, "declare it with async def"),
        (SyncCallable(), "declare it with async def"),
        (reversed_annotated, "reversed order"),
        (reversed_by_name, "reversed order"),
        (reversed_batch, "reversed order"),
        (three, "two positional parameters"),
        (one, "two positional parameters"),
        (keyword_only, "two positional parameters"),
        ("not a function", "must be async def"),
    ],
)
async def test_a_handler_of_the_wrong_shape_is_refused_at_subscribe(
    handler: Callable[..., object], message: str
) -> None:
    # Regression: these registered, then every event failed with TypeError into the
    # dead letters.
    async with Bus.open(":memory:") as bus:
        with pytest.raises(SubscriptionError, match=message):
            bus.subscribe("t", name="s")(handler)  # type: ignore[arg-type]
        assert bus.metrics().subscriptions == {}
        await bus.publish("t", 1)


class AsyncCallable:
    async def __call__(self, event: Event[int], ctx: Context) -> None:
        pass


class Service:
    async def handle(self, event: Event[int], ctx: Context) -> None:
        pass


async def with_default(event: Event[int], ctx: Context, retries: int = 3) -> None:
    pass


async def two(event: Event[int], ctx: Context, /) -> None:
    pass


@pytest.mark.parametrize(
    "handler",
    [
        AsyncCallable(),
        Service().handle,
        functools.partial(with_default, retries=1),
        with_default,
        two,
    ],
)
async def test_async_callables_that_take_event_and_ctx_are_accepted(
    handler: Callable[..., object],
) -> None:
    async with Bus.open(":memory:") as bus:
        bus.subscribe("t", name="s")(handler)  # type: ignore[arg-type]
        await bus.publish("t", 1)
        await bus.drain(timeout=10)
        assert bus.metrics().subscriptions["s"].handled == 1


async def test_the_decorator_without_parentheses_is_refused_clearly() -> None:
    # Regression: @bus.subscribe on a function raised "'function' object is not iterable".
    async with Bus.open(":memory:") as bus:
        with pytest.raises(SubscriptionError, match=r"@bus.subscribe needs parentheses"):

            @bus.subscribe  # type: ignore[arg-type]
            async def billing(event: Event[int], ctx: Context) -> None:
                pass


@pytest.mark.parametrize("topic", [5, None, b"orders", [1], [], "", ["a", ""]])
async def test_a_topic_that_is_not_a_name_or_names_is_refused(topic: object) -> None:
    # Regression: subscribe(5) raised a raw "TypeError: 'int' object is not iterable".
    async with Bus.open(":memory:") as bus:
        with pytest.raises(SubscriptionError, match="topic"):
            bus.subscribe(topic, name="s")  # type: ignore[arg-type]


async def test_start_and_name_must_be_valid() -> None:
    async with Bus.open(":memory:") as bus:
        with pytest.raises(SubscriptionError, match="start"):
            bus.subscribe("t", start="beginning")  # type: ignore[arg-type]
        with pytest.raises(SubscriptionError, match="name must be"):
            bus.subscribe("t", name=3)(with_default)  # type: ignore[arg-type]


def define_billing(seen: list[int]) -> Callable[..., object]:
    async def billing(event: Event[int], ctx: Context) -> None:
        seen.append(event.payload)

    return billing


async def test_the_default_name_is_the_function_name_wherever_it_is_defined(
    log_path: Path,
) -> None:
    # Regression: the default was module.qualname ("__main__.main.<locals>.billing"),
    # which changes under python -m, a move or a nesting, and a new name replays the
    # whole log.
    first: list[int] = []
    async with Bus.open(log_path) as bus:
        bus.subscribe("orders")(define_billing(first))  # type: ignore[arg-type]
        assert list(bus.metrics().subscriptions) == ["billing"]
        await bus.publish_many([Message("orders", i) for i in range(3)])
        await bus.drain(timeout=10)
    again: list[int] = []
    async with Bus.open(log_path) as bus:

        @bus.subscribe("orders")
        async def billing(event: Event[int], ctx: Context) -> None:  # defined elsewhere
            again.append(event.payload)

        await bus.publish("orders", 3)
        await bus.drain(timeout=10)
    assert (first, again) == ([0, 1, 2], [3])


async def test_a_handler_without_a_plain_name_needs_name() -> None:
    async with Bus.open(":memory:") as bus:
        with pytest.raises(SubscriptionError, match="pass name="):
            bus.subscribe("t")(functools.partial(with_default, retries=1))  # type: ignore[arg-type]
        with pytest.raises(SubscriptionError, match="pass name="):
            bus.subscribe("t")(AsyncCallable())  # type: ignore[arg-type]


async def test_a_log_keeps_a_subscription_under_its_earlier_qualified_default_name(
    log_path: Path,
) -> None:
    seen: list[int] = []
    handler = define_billing(seen)
    old_default = f"{handler.__module__}.{handler.__qualname__}"
    async with Bus.open(log_path) as bus:
        bus.subscribe("orders", name=old_default)(handler)  # type: ignore[arg-type]
        await bus.publish("orders", 1)
        await bus.drain(timeout=10)
    async with Bus.open(log_path) as bus:
        bus.subscribe("orders")(handler)  # type: ignore[arg-type]
        assert list(bus.metrics().subscriptions) == [old_default]
        await bus.publish("orders", 2)
        await bus.drain(timeout=10)
    assert seen == [1, 2]


async def test_a_new_subscription_that_would_replay_a_long_log_warns(
    log_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eventbus.dispatch._handler, "REPLAY_WARNING", 20)
    async with Bus.open(log_path) as bus:
        await bus.publish_many([Message("orders", i) for i in range(25)])

        @bus.subscribe("orders", name="known")
        async def known(event: Event[int], ctx: Context) -> None:
            pass

        await bus.drain(timeout=10)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        async with Bus.open(log_path) as bus:
            bus.subscribe("orders", name="known")(with_default)  # known: no warning
            bus.subscribe("orders", name="fresh", start="latest")(with_default)  # no replay
            assert not caplog.records
            bus.subscribe("orders", name="renamed")(with_default)
    (record,) = caplog.records
    assert "'renamed' is new to this log" in record.getMessage()
    assert "up to 25 events" in record.getMessage()
