"""README, Draining and closing: "`drain(timeout)` waits until every committed event
(including outbox events published meanwhile) is handled or dead-lettered by every
subscription, or raises `DrainTimeout` naming the laggards."
Metrics: "what is not finished and why: `in_flight` (handler calls running),
`retries_waiting` (in the retry lane with a due time; `retries_due` of them due now,
held by the budget, the breaker or a suspect running alone), `parked` (behind an
earlier event of their key) ... `DrainTimeout` says the same per subscription."
Retries and dead letters: "`DrainTimeout` and `bus.metrics()` say which retries wait,
and why."
DESIGN.md, Public contract: "in users' tests: failures surface instead of being
dead-lettered silently: `await bus.drain(timeout=5, raise_failures=True)`".
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from eventbus import (
    BatchPolicy,
    BreakerPolicy,
    Bus,
    BusConfig,
    Context,
    DrainTimeout,
    Event,
    Message,
    RetryPolicy,
)

CONFIG = BusConfig(reconcile_interval=0)


def test_drain_waits_for_outbox_events_published_meanwhile(tmp_path: Path) -> None:
    # orders -> billing publishes invoices -> mailer publishes mails -> archive.
    counts = {"billing": 0, "mailer": 0, "archive": 0}

    async def main() -> None:
        async with Bus.open(tmp_path / "log.db", config=CONFIG) as bus:

            @bus.subscribe("orders", name="billing", concurrency=4)
            async def bill(event: Event[dict[str, int]], ctx: Context) -> None:
                await asyncio.sleep(0.001)
                counts["billing"] += 1
                await ctx.publish("invoices", event.payload, key=event.key)

            @bus.subscribe("invoices", name="mailer", batch=BatchPolicy(max_size=7))
            async def mail(events: list[Event[dict[str, int]]], ctx: Context) -> None:
                await asyncio.sleep(0.005)
                for event in events:
                    counts["mailer"] += 1
                    await ctx.publish("mails", event.payload, key=event.key)

            @bus.subscribe("mails", name="archive")
            async def archive(event: Event[dict[str, int]], ctx: Context) -> None:
                await asyncio.sleep(0.002)
                counts["archive"] += 1

            await bus.publish_many(
                [Message("orders", {"n": n}, key=f"k{n % 9}") for n in range(300)]
            )
            await bus.drain(timeout=60)
            assert counts == {"billing": 300, "mailer": 300, "archive": 300}

    asyncio.run(main())


def test_drain_waits_for_retries_and_the_events_parked_behind_them(tmp_path: Path) -> None:
    handled: list[tuple[str, int]] = []

    async def main() -> None:
        async with Bus.open(tmp_path / "log.db", config=CONFIG) as bus:
            retry = RetryPolicy(initial_delay=0.3, jitter="none")

            @bus.subscribe("t", name="s", retry=retry, breaker=None)
            async def h(event: Event[dict[str, int]], ctx: Context) -> None:
                if event.payload["i"] == 0 and ctx.attempt == 1:
                    raise RuntimeError("first event of K fails once")
                handled.append((event.key or "?", event.payload["i"]))

            await bus.publish_many(
                [Message("t", {"i": i}, key="K") for i in range(4)]
                + [Message("t", {"i": i}, key="other") for i in range(4)]
            )
            await bus.drain(timeout=30)
            assert [i for k, i in handled if k == "K"] == [0, 1, 2, 3]
            assert [i for k, i in handled if k == "other"] == [0, 1, 2, 3]

    asyncio.run(main())


def test_drain_timeout_and_metrics_say_what_is_pending_and_why(tmp_path: Path) -> None:
    async def main() -> None:
        async with Bus.open(tmp_path / "log.db", config=CONFIG) as bus:
            # A retry due in an hour, with three later events of its key parked.
            @bus.subscribe(
                "a",
                name="waiting",
                breaker=None,
                retry=RetryPolicy(initial_delay=3600, max_delay=3600, jitter="none"),
            )
            async def waiting(event: Event[dict[str, int]], ctx: Context) -> None:
                if event.payload["i"] == 0:
                    raise RuntimeError("fails")

            # Two calls hanging.
            release = asyncio.Event()
            both = asyncio.Event()
            running = [0]

            @bus.subscribe("b", name="busy", concurrency=2)
            async def busy(event: Event[dict[str, int]], ctx: Context) -> None:
                running[0] += 1
                if running[0] == 2:
                    both.set()
                await release.wait()

            # A breaker that opened and stays open for a minute.
            breaker = BreakerPolicy(min_calls=10, cooldown=60, max_cooldown=60)
            fast = {"initial_delay": 0.001, "max_delay": 0.01, "max_attempts": 1000}

            @bus.subscribe("c", name="broken", retry=RetryPolicy(**fast), breaker=breaker)  # type: ignore[arg-type]
            async def broken(event: Event[dict[str, int]], ctx: Context) -> None:
                raise RuntimeError("down")

            # Retries due at once but held by a budget of one retry per ten seconds.
            stingy = RetryPolicy(**fast, budget_floor=0.1, budget_ratio=0.0)  # type: ignore[arg-type]

            @bus.subscribe("d", name="budget", retry=stingy, breaker=None)
            async def budget(event: Event[dict[str, int]], ctx: Context) -> None:
                raise RuntimeError("down")

            await bus.publish_many([Message("a", {"i": i}, key="K") for i in range(4)])
            await bus.publish_many([Message("b", {"i": i}, key=f"k{i}") for i in range(5)])
            await bus.publish_many([Message("c", {"i": i}, key=f"k{i}") for i in range(30)])
            await bus.publish_many([Message("d", {"i": i}, key=f"k{i}") for i in range(30)])
            await asyncio.wait_for(both.wait(), timeout=10)

            with pytest.raises(DrainTimeout) as info:
                await bus.drain(timeout=2)
            pending = info.value.pending or {}
            metrics = bus.metrics().subscriptions
            release.set()

            assert set(info.value.lagging) == {"waiting", "busy", "broken", "budget"}
            assert set(pending) == set(info.value.lagging)

            w = metrics["waiting"]
            assert (w.retries_waiting, w.retries_due, w.parked) == (1, 0, 3)
            assert "1 retries waiting" in pending["waiting"]
            assert "3 parked" in pending["waiting"]

            assert metrics["busy"].in_flight == 2
            assert "2 calls in flight" in pending["busy"]

            assert metrics["broken"].breaker_state == "open"
            assert "breaker" in pending["broken"]

            b = metrics["budget"]
            assert b.retries_due > 0
            assert b.in_flight == 0
            assert "budget" in pending["budget"], pending["budget"]

    asyncio.run(main())


def test_drain_with_raise_failures_surfaces_a_failure_instead_of_a_silent_dead_letter(
    tmp_path: Path,
) -> None:
    async def main() -> BaseException | None:
        async with Bus.open(tmp_path / "log.db", config=CONFIG) as bus:

            @bus.subscribe("t", name="s", retry=RetryPolicy(max_attempts=1))
            async def h(event: Event[dict[str, int]], ctx: Context) -> None:
                raise ValueError("the handler's own failure")

            await bus.publish("t", {"i": 0}, key="k")
            try:
                await bus.drain(timeout=5, raise_failures=True)  # type: ignore[call-arg]
            except Exception as exc:  # noqa: BLE001 - whatever it raises is the finding
                return exc
            return None

    error = asyncio.run(main())
    assert error is not None, "drain(raise_failures=True) returned over a dead letter"
    assert not isinstance(error, TypeError), f"the contract's drain call is refused: {error}"
    assert "the handler's own failure" in repr(error) + repr(error.__cause__)
