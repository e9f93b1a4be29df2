"""Where the bus logs: every logger under ``eventbus``, records about one event with
structured fields."""

from __future__ import annotations

import importlib
import logging
import pkgutil

import pytest

import eventbus
import eventbus.backpressure as backpressure
import eventbus.storage as storage
from eventbus import BreakerPolicy, Bus, BusConfig, Context, Event, Message, RetryPolicy
from eventbus._logging import EVENT_FIELDS, LOGGERS, event_fields, get_logger


def module_loggers() -> dict[str, str]:
    """Every module of the three packages that has a module-level ``logger``:
    module name -> logger name."""
    found: dict[str, str] = {}
    for package in (eventbus, storage, backpressure):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            module = importlib.import_module(info.name)
            logger = getattr(module, "logger", None)
            if isinstance(logger, logging.Logger):
                found[info.name] = logger.name
    return found


def test_every_logger_of_the_library_sits_under_eventbus() -> None:
    # Regression: the SQLite log wrote to "storage._sqlite", outside the namespace an
    # application configures with logging.getLogger("eventbus").
    found = module_loggers()
    assert found["eventbus.storage._sqlite"] == "eventbus.storage"
    assert found["eventbus._bus"] == "eventbus.bus"
    assert found["eventbus.workflows._engine"] == "eventbus.workflows"
    assert found["eventbus.reconcile._reconciler"] == "eventbus.reconcile"
    outside = {module: name for module, name in found.items() if not name.startswith("eventbus.")}
    assert outside == {}


def test_the_documented_loggers_are_the_ones_get_logger_gives() -> None:
    for name in LOGGERS:
        assert get_logger(name.removeprefix("eventbus.")).name == name
    with pytest.raises(ValueError, match=r"eventbus\.dispatch"):
        get_logger("subscriptions")


def test_event_fields_become_attributes_of_the_record(caplog: pytest.LogCaptureFixture) -> None:
    logger = get_logger("dispatch")
    with caplog.at_level(logging.INFO, logger="eventbus"):
        logger.info("retrying", extra=event_fields("billing", "ev-1", 42, 2))
    (record,) = caplog.records
    assert {field: getattr(record, field) for field in EVENT_FIELDS} == {
        "subscription": "billing",
        "event_id": "ev-1",
        "seq": 42,
        "attempt": 2,
    }


@pytest.mark.anyio
async def test_retries_dead_letters_and_the_breaker_log_where_the_readme_says(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Retries at INFO, dead letters and breaker changes at WARNING, on
    eventbus.dispatch, each record about one event with its fields."""
    caplog.set_level(logging.INFO, logger="eventbus")
    breaker = BreakerPolicy(failure_ratio=0.5, min_calls=2, cooldown=0.05, max_cooldown=0.05)
    retry = RetryPolicy(max_attempts=2, initial_delay=0.0, max_delay=0.0)
    async with Bus.open(":memory:", config=BusConfig(breaker=breaker)) as bus:

        @bus.subscribe("t", name="s", retry=retry)
        async def handler(event: Event[int], ctx: Context) -> None:
            if event.payload < 3:
                raise ValueError(f"event {event.payload} fails")

        for i in range(5):
            await bus.publish("t", i, key=f"k{i}")
        await bus.drain(timeout=10)
    dispatch = [r for r in caplog.records if r.name == "eventbus.dispatch"]
    retries = [r for r in dispatch if "retrying" in r.getMessage()]
    dead = [r for r in dispatch if "dead-lettered" in r.getMessage()]
    breaker_records = [r for r in dispatch if "circuit breaker" in r.getMessage()]
    assert retries
    assert all(r.levelno == logging.INFO for r in retries)
    assert len(dead) == 3
    assert all(r.levelno == logging.WARNING for r in dead)
    assert {getattr(r, "subscription", None) for r in retries + dead} == {"s"}
    assert all(isinstance(getattr(r, "seq", None), int) for r in retries + dead)
    assert any("opened" in r.getMessage() for r in breaker_records)
    assert all(r.levelno == logging.WARNING for r in breaker_records)


@pytest.mark.anyio
async def test_failures_that_a_retry_heals_log_nothing_at_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A busy day of transient failures (every seventh event fails once, in a handler
    of one event and in a batch handler) logs its retries at INFO, with the event's
    fields, and nothing at WARNING: the operator's log holds only what needs a look.
    Regression: every retry was a WARNING (417 lines for 3,000 events)."""
    caplog.set_level(logging.DEBUG, logger="eventbus")
    retry = RetryPolicy(max_attempts=3, initial_delay=0.0, max_delay=0.0)
    failed: set[tuple[str, int]] = set()

    def fails_once(where: str, n: int) -> bool:
        if n % 7 or (where, n) in failed:
            return False
        failed.add((where, n))
        return True

    async with Bus.open(":memory:", config=BusConfig(breaker=None)) as bus:

        @bus.subscribe("t", name="one", retry=retry)
        async def one(event: Event[int], ctx: Context) -> None:
            if fails_once("one", event.payload):
                raise ValueError(f"event {event.payload} failed once")

        @bus.subscribe("t", name="many", retry=retry, batch={"max_size": 32})
        async def many(events: list[Event[int]], ctx: Context) -> None:
            for event in events:
                if fails_once("many", event.payload):
                    raise ValueError(f"event {event.payload} failed once")

        await bus.publish_many([Message("t", i) for i in range(300)])
        await bus.drain(timeout=30)
        assert await bus.dead_letters.count() == 0
    assert len(failed) == 2 * len(range(0, 300, 7))
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [f"{r.name} {r.levelname}: {r.getMessage()}" for r in loud] == []
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert {r.name for r in retries} == {"eventbus.dispatch"}
    assert {r.levelno for r in retries} == {logging.INFO}
    by_sub = {"one": 0, "many": 0}
    for r in retries:
        by_sub[r.subscription] += 1  # type: ignore[attr-defined]
        assert {f: type(getattr(r, f)) for f in EVENT_FIELDS} == {
            "subscription": str,
            "event_id": str,
            "seq": int,
            "attempt": int,
        }
    assert by_sub["one"] == len(range(0, 300, 7))
