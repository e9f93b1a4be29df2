"""A batch handler's failing batch is split in halves; when the split is stopped
half-way (the circuit breaker opened on the failures it isolated), the events not
yet attempted go back to the buffer and are handled once the breaker closes."""

from __future__ import annotations

import pytest

from eventbus import (
    BatchPolicy,
    BreakerPolicy,
    Bus,
    Context,
    Event,
    Message,
    RetryPolicy,
)

pytestmark = pytest.mark.anyio


class Bad(Exception):
    pass


async def test_events_a_stopped_split_did_not_reach_are_handled_once_the_breaker_closes() -> None:
    """Regression: the split dropped the events its stop released, which stayed "in a
    call" for good: drain timed out with nothing buffered, running or retrying."""
    handled: list[int] = []
    async with Bus.open(":memory:") as bus:

        @bus.subscribe(
            "t",
            name="s",
            batch=BatchPolicy(mode="fixed", max_size=16, max_wait=1.0),
            retry=RetryPolicy(max_attempts=1),
            breaker=BreakerPolicy(min_calls=2, failure_ratio=0.5, cooldown=0.05, max_cooldown=0.05),
        )
        async def handler(events: list[Event[int]], ctx: Context) -> None:
            if any(e.payload < 2 for e in events):
                raise Bad("events 0 and 1 always fail")
            handled.extend(e.payload for e in events)

        await bus.publish_many(Message("t", i, key=f"k{i}") for i in range(16))
        await bus.drain(timeout=10)
        dead = await bus.dead_letters.list("s")
    assert sorted(d.event.payload for d in dead) == [0, 1]
    assert sorted(handled) == list(range(2, 16))
