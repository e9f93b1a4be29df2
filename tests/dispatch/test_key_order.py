"""Per-key order around retries, with and without concurrency: later events of a key
wait behind an earlier one that waits for a retry; other keys pass."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from eventbus import BatchPolicy, Bus, BusConfig, Context, Event, Message, RetryPolicy

pytestmark = pytest.mark.anyio


class Flaky(Exception):
    pass


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_a_key_waits_behind_its_retry_while_a_slow_other_key_runs(
    concurrency: int, bus: Bus
) -> None:
    """Regression: A1 fails once; then, in one publish_many, A2, X (slow) and A3. The
    handler used to see A1, X, A3, A2. (On the test kit's bus, on a virtual clock.)"""
    seen: list[str] = []
    first_failure = anyio.Event()

    @bus.subscribe(
        "t",
        name="s",
        batch=BatchPolicy(mode="natural"),
        retry=RetryPolicy(initial_delay=0.05, jitter="none"),
        breaker=None,
        concurrency=concurrency,
    )
    async def handler(event: Event[str], ctx: Context) -> None:
        if event.payload == "A1" and ctx.attempt == 1:
            first_failure.set()
            raise Flaky("A1 fails once")
        if event.payload == "X":
            await anyio.sleep(0.3)  # long enough for A1's retry to come due
        seen.append(event.payload)

    await bus.publish("t", "A1", key="A")
    with anyio.fail_after(10):
        await first_failure.wait()  # A1 is in its own call, failing
    await bus.publish_many(
        [Message("t", "A2", key="A"), Message("t", "X", key="X"), Message("t", "A3", key="A")]
    )
    await bus.drain(timeout=10)  # and no dead letter
    assert [p for p in seen if p.startswith("A")] == ["A1", "A2", "A3"]
    assert sorted(seen) == ["A1", "A2", "A3", "X"]


@pytest.mark.parametrize("concurrency", [1, 16])
async def test_no_event_is_handled_after_a_later_event_of_its_key_under_load(
    concurrency: int, log_target: str
) -> None:
    """37 keys, 20,000 events, every 101st always failing (dead-lettered after
    three attempts): every key's handled events are in publish order, and every event
    ends handled or dead-lettered."""
    total = 20000
    poison = {i for i in range(total) if i % 101 == 100}
    last: dict[str, int] = {}
    violations: list[tuple[str, int, int]] = []
    handled = 0
    retry = RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.05, budget_ratio=1.0)
    async with Bus.open(log_target, config=BusConfig(breaker=None)) as bus:

        @bus.subscribe("t", name="s", retry=retry, concurrency=concurrency)
        async def handler(event: Event[int], ctx: Context) -> None:
            nonlocal handled
            i = event.payload
            if i in poison:
                raise Flaky(f"event {i} always fails")
            if i % 7 == 0:
                await anyio.lowlevel.checkpoint()  # give other calls a turn inside this one
            key = event.key or ""
            if last.get(key, -1) > i:
                violations.append((key, last[key], i))
            last[key] = i
            handled += 1

        for first in range(0, total, 500):
            await bus.publish_many(
                Message("t", i, key=f"k{i % 37}") for i in range(first, first + 500)
            )
        await bus.drain(timeout=60)
        dead = await bus.dead_letters.list("s", limit=total)
    assert violations == []
    assert handled == total - len(poison)
    assert {d.event.payload for d in dead} == poison
