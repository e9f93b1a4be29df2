"""README, Retries and dead letters, Prolonged failure: "A retry budget caps retries to a
share of fresh traffic (`budget_ratio` per fresh event, plus `budget_floor` per second),
so a storm of failures cannot take over the process; a retry that succeeds gives its
token back, so once the cause is gone the backlog of retries drains at handler speed,
while retries that keep failing stay held to the floor."
"A per-subscription circuit breaker (`BreakerPolicy`) opens when the failure ratio over
a window crosses a threshold" (`failure_ratio` 0.5, `min_calls` 20).
Guarantee 5: "A failing event never delays events of other keys beyond one batch."
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from eventbus import Bus, BusConfig, Context, DrainTimeout, Event, Message, RetryPolicy

CONFIG = BusConfig(reconcile_interval=0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_once_the_cause_is_fixed_a_burst_of_retries_drains_much_faster_than_budget_floor(
    tmp_path: Path,
) -> None:
    # 2,000 events fail their first attempt (and their retries fail too, for as long as
    # the cause lasts). At budget_floor=10 per second the retries would take 200 s.
    events = 2000
    policy = RetryPolicy()  # the shipped budget: floor 10/s, ratio 0.2, 4 retry workers

    async def main() -> tuple[float, int]:
        broken = True
        fresh_failures = 0
        fixed = asyncio.Event()
        async with Bus.open(tmp_path / "log.db", config=CONFIG) as bus:

            @bus.subscribe("t", name="s", retry=policy, breaker=None)
            async def h(event: Event[dict[str, int]], ctx: Context) -> None:
                nonlocal broken, fresh_failures
                if broken:
                    if ctx.attempt == 1:
                        fresh_failures += 1
                        if fresh_failures == events:
                            broken = False  # the cause is fixed
                            fixed.set()
                    raise RuntimeError("downstream down")

            await bus.publish_many([Message("t", {"i": i}, key=f"k{i}") for i in range(events)])
            await asyncio.wait_for(fixed.wait(), timeout=120)
            waiting = bus.metrics().subscriptions["s"].retries_waiting
            t0 = time.monotonic()
            await bus.drain(timeout=120)
            return time.monotonic() - t0, waiting

    elapsed, waiting = asyncio.run(main())
    assert waiting > 1000, "the burst had mostly drained before the cause was fixed"
    at_floor = waiting / policy.budget_floor
    assert elapsed < at_floor / 10, (
        f"{waiting} retries took {elapsed:.1f}s; at the floor they take {at_floor:.0f}s"
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_with_the_shipped_policies_a_burst_of_failures_drains_in_reasonable_time(
    tmp_path: Path,
) -> None:
    # Everything as shipped, breaker included: a downstream outage fails the first
    # events; once it is over, everything published must be handled within the
    # breaker's cool-down and a little more, not minutes.
    events = 5000

    async def main() -> float:
        broken = True
        failures = 0
        fixed = asyncio.Event()
        async with Bus.open(tmp_path / "log.db", config=CONFIG) as bus:

            @bus.subscribe("t", name="s")
            async def h(event: Event[dict[str, int]], ctx: Context) -> None:
                nonlocal broken, failures
                if broken:
                    failures += 1
                    if failures == 20:
                        broken = False
                        fixed.set()
                    raise RuntimeError("downstream down")

            await bus.publish_many(
                [Message("t", {"i": i}, key=f"k{i % 50}") for i in range(events)]
            )
            await asyncio.wait_for(fixed.wait(), timeout=60)
            t0 = time.monotonic()
            await bus.drain(timeout=120)
            assert await bus.dead_letters.count() == 0
            return time.monotonic() - t0

    elapsed = asyncio.run(main())
    assert elapsed < 30, f"drained {elapsed:.1f}s after the cause was fixed"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_retries_that_keep_failing_are_capped_at_budget_ratio_per_fresh_event_plus_budget_floor(
    tmp_path: Path,
) -> None:
    fresh = 50
    policy = RetryPolicy(
        max_attempts=100_000,
        initial_delay=0.001,
        max_delay=0.01,
        budget_floor=2.0,
        budget_ratio=0.2,
    )
    window = 3.0

    async def main() -> tuple[int, int, float]:
        calls = {"fresh": 0, "retry": 0}
        async with Bus.open(tmp_path / "log.db", config=CONFIG) as bus:

            @bus.subscribe("t", name="s", retry=policy, breaker=None)
            async def h(event: Event[dict[str, int]], ctx: Context) -> None:
                calls["fresh" if ctx.attempt == 1 else "retry"] += 1
                raise RuntimeError("keeps failing")

            t0 = time.monotonic()
            await bus.publish_many([Message("t", {"i": i}, key=f"k{i}") for i in range(fresh)])
            with pytest.raises(DrainTimeout):
                await bus.drain(timeout=window)
            return calls["fresh"], calls["retry"], time.monotonic() - t0

    seen_fresh, retries, elapsed = asyncio.run(main())
    assert seen_fresh == fresh
    # The documented allowance: the starting budget (ten seconds of the floor plus the
    # earnings of 1,000 fresh events), then ratio per fresh event and the floor.
    start = max(10.0, 10 * policy.budget_floor) + 1000 * policy.budget_ratio
    allowed = start + policy.budget_ratio * fresh + policy.budget_floor * elapsed
    # Slack: one second of floor, and one retry per retry worker.
    assert retries <= allowed + policy.budget_floor + policy.concurrency, (
        f"{retries} retries of events that keep failing in {elapsed:.1f}s after {fresh} fresh "
        f"events; the budget allows {allowed:.0f} ({policy.budget_ratio} per fresh event "
        f"+ {policy.budget_floor}/s)"
    )


async def _healthy_time(path: Path, seed: int, limit: float) -> str | None:
    """The failing workload of the README's retry benchmark, with every policy as
    shipped: 2,000 events, each on its own key; 10% poison (fail every attempt), 20%
    fail once. Returns None once every healthy event is handled within `limit`
    seconds, or what was still pending."""
    rng = random.Random(seed)
    kinds = [
        "poison" if r < 0.1 else "once" if r < 0.3 else "ok"
        for r in (rng.random() for _ in range(2000))
    ]
    healthy = kinds.count("ok")
    handled = 0
    all_done = asyncio.Event()
    async with Bus.open(path, config=CONFIG) as bus:

        @bus.subscribe("t", name="s")
        async def h(event: Event[dict[str, int]], ctx: Context) -> None:
            nonlocal handled
            kind = kinds[event.payload["i"]]
            if kind == "poison" or (kind == "once" and ctx.attempt == 1):
                raise RuntimeError(kind)
            if kind == "ok":
                handled += 1
                if handled == healthy:
                    all_done.set()

        await bus.publish_many([Message("t", {"i": i}, key=f"k{i}") for i in range(len(kinds))])
        try:
            await asyncio.wait_for(all_done.wait(), timeout=limit)
        except TimeoutError:
            m = bus.metrics().subscriptions["s"]
            return (
                f"{handled} of {healthy} healthy events handled after {limit}s; "
                f"breaker {m.breaker_state}, trips {m.breaker_trips}, "
                f"failed attempts {m.failed_attempts}"
            )
    return None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_poison_and_transient_failures_do_not_stall_the_healthy_events_of_other_keys(
    tmp_path: Path,
) -> None:
    # Healthy events are on keys of their own: nothing may hold them up for longer
    # than a batch. 1,400 of them take well under a second. Three rounds (seeds).
    stalls = []
    for seed in (1, 2, 3):
        outcome = asyncio.run(_healthy_time(tmp_path / f"log{seed}.db", seed, limit=10))
        if outcome is not None:
            stalls.append(f"seed {seed}: {outcome}")
    assert stalls == [], "\n".join(stalls)
