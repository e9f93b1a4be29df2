"""Healthy traffic never touches the retry machinery: a profile of 20,000 events
handled without a failure shows the retry lane's loop started and never woken."""

from __future__ import annotations

import asyncio
import cProfile
import pstats

from eventbus import Bus, Context, Event, Message


async def _healthy(n: int) -> None:
    async with Bus.open(":memory:") as bus:

        @bus.subscribe("t", name="per-event")
        async def one(event: Event[int], ctx: Context) -> None:
            ctx.state.set(event.key or "", event.payload)

        @bus.subscribe("t", name="batch", concurrency=4)
        async def many(events: list[Event[int]], ctx: Context) -> None:
            pass

        for first in range(0, n, 1000):
            await bus.publish_many(
                Message("t", i, key=f"k{i % 50}") for i in range(first, first + 1000)
            )
        await bus.drain(timeout=60)
        assert bus.metrics().subscriptions["per-event"].handled == n


def test_twenty_thousand_healthy_events_never_wake_the_retry_lane() -> None:
    profile = cProfile.Profile()
    profile.enable()
    asyncio.run(_healthy(20_000))
    profile.disable()
    calls: dict[str, int] = {}
    for (filename, _, function), row in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
        if filename.endswith(("_subscription.py", "_scheduler.py")):
            calls[function] = calls.get(function, 0) + row[1]
    # Per subscription: the retry loop runs once at start and once to end at close;
    # it asks for a retry call once; no retry attempt ever starts.
    assert calls.get("_retry_loop", 0) <= 2 * 2
    assert calls.get("_next_retry", 0) <= 2
    assert calls.get("_attempt", 0) == 0
    assert calls.get("next_wakeup", 0) <= 2
