"""The retry lane, per-key ordering, the circuit breaker and dead-letter re-injection."""

from __future__ import annotations

import random
import time

import anyio
import pytest

from eventbus import (
    BatchPolicy,
    BreakerPolicy,
    Bus,
    BusConfig,
    Context,
    Event,
    Message,
    RetryPolicy,
)
from eventbus.storage import MemoryStorage
from tests.conftest import wait_until

pytestmark = pytest.mark.anyio

QUICK = RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.05, budget_ratio=1.0)


class Flaky(Exception):
    pass


class Poison(Exception):
    pass


@pytest.mark.parametrize("batch_handler", [False, True])
async def test_poison_and_transient_failures_end_done_or_dead_and_redrive_fixes_them(
    log_url: str, batch_handler: bool
) -> None:
    rng = random.Random(7)
    n = 400
    kinds = {i: rng.choices(["ok", "poison", "flaky"], [70, 10, 20])[0] for i in range(n)}
    poison = {i for i, k in kinds.items() if k == "poison"}
    attempts: dict[int, int] = {}
    done: list[int] = []
    fixed = False

    def handle(event: Event[int]) -> None:
        i = event.payload
        attempts[i] = attempts.get(i, 0) + 1
        if kinds[i] == "poison" and not fixed:
            raise Poison(f"event {i} is poison")
        if kinds[i] == "flaky" and event.attempt == 1:
            raise Flaky(f"event {i} fails once")
        done.append(i)

    async with Bus.open(log_url, config=BusConfig(breaker=None)) as bus:
        if batch_handler:

            @bus.subscribe("t", name="s", retry=QUICK)
            async def many(events: list[Event[int]], ctx: Context) -> None:
                for event in events:
                    try:
                        handle(event)
                    except Exception as exc:  # noqa: BLE001 - reported per event
                        ctx.fail(event, exc)

        else:

            @bus.subscribe("t", name="s", retry=QUICK)
            async def one(event: Event[int], ctx: Context) -> None:
                handle(event)

        await bus.publish_many(Message("t", i, key=f"k{i % 50}") for i in range(n))
        await bus.drain(timeout=30)
        dead = await bus.dead_letters.list("s", limit=1000)
        assert {d.event.payload for d in dead} == poison
        assert all(d.attempts == QUICK.max_attempts for d in dead)
        assert all(d.error_type.endswith("Poison") for d in dead)
        assert all(attempts[i] == QUICK.max_attempts for i in poison)
        assert sorted(done) == sorted(i for i in range(n) if i not in poison)

        fixed = True
        assert await bus.dead_letters.redrive("s") == len(poison)
        await bus.drain(timeout=30)
        assert await bus.dead_letters.list("s") == []
    assert sorted(done) == list(range(n))


async def test_later_events_of_a_key_wait_behind_a_retry_and_other_keys_do_not() -> None:
    order: list[tuple[str, int]] = []
    async with Bus.open(":memory:") as bus:

        @bus.subscribe("t", name="s", retry=RetryPolicy(initial_delay=0.05, max_delay=0.05))
        async def handler(event: Event[int], ctx: Context) -> None:
            if event.key == "a" and event.payload == 0 and ctx.attempt == 1:
                raise Flaky("first event of key a fails once")
            order.append((event.key or "", event.payload))

        await bus.publish_many(Message("t", i, key=key) for i in range(3) for key in ("a", "b"))
        await bus.drain(timeout=10)
    a_events = [p for k, p in order if k == "a"]
    assert a_events == [0, 1, 2]
    # Key "b" was not held up: all of it was handled before "a" resumed.
    assert order[:3] == [("b", 0), ("b", 1), ("b", 2)]


async def test_an_unordered_subscription_lets_later_events_of_a_key_pass() -> None:
    order: list[int] = []
    async with Bus.open(":memory:") as bus:

        @bus.subscribe("t", name="s", ordered=False, retry=QUICK)
        async def handler(event: Event[int], ctx: Context) -> None:
            if event.payload == 0 and ctx.attempt == 1:
                raise Flaky("fails once")
            order.append(event.payload)

        await bus.publish_many(Message("t", i, key="same") for i in range(3))
        await bus.drain(timeout=10)
    assert order == [1, 2, 0]


async def test_give_up_on_and_retry_on_dead_letter_at_once() -> None:
    policy = RetryPolicy(
        max_attempts=5, initial_delay=0.0, give_up_on=(KeyError,), retry_on=(Flaky, KeyError)
    )
    calls: list[int] = []
    async with Bus.open(":memory:") as bus:

        @bus.subscribe("t", name="s", retry=policy)
        async def handler(event: Event[int], ctx: Context) -> None:
            calls.append(event.payload)
            if event.payload == 1:
                raise KeyError("never retried: give_up_on")
            if event.payload == 2:
                raise ValueError("never retried: not in retry_on")

        await bus.publish_many(Message("t", i) for i in range(3))
        await bus.drain(timeout=10)
        dead = await bus.dead_letters.list()
    assert calls == [0, 1, 2]
    assert [(d.event.payload, d.attempts) for d in dead] == [(1, 1), (2, 1)]


@pytest.mark.virtual_clock
async def test_a_pending_retry_survives_a_restart_and_keeps_its_schedule() -> None:
    retry = RetryPolicy(max_attempts=3, initial_delay=60.0, max_delay=60.0, jitter="none")
    failed_at: list[float] = []
    log = MemoryStorage()  # kept across the restart
    async with Bus.open(":memory:", storage=log) as bus:

        @bus.subscribe("t", name="s", retry=retry)
        async def fails(event: Event[int], ctx: Context) -> None:
            failed_at.append(anyio.current_time())
            raise Flaky("fails before the restart")

        await bus.publish("t", 1)
        await wait_until(bus, lambda: bus.metrics().subscriptions["s"].retries_waiting == 1)
        assert (await bus.stats()).retries == {"s": 1}
    retried_at: list[tuple[float, int]] = []
    async with Bus.open(":memory:", storage=log) as bus:

        @bus.subscribe("t", name="s", retry=retry)
        async def works(event: Event[int], ctx: Context) -> None:
            retried_at.append((anyio.current_time(), ctx.attempt))

        await bus.drain(timeout=600)
    ((when, attempt),) = retried_at
    assert attempt == 2
    assert when >= failed_at[0] + 60.0 - 0.05  # not early
    assert when <= failed_at[0] + 61.0  # not lost either


async def test_the_circuit_breaker_pauses_a_failing_subscription_instead_of_dead_lettering(
    bus: Bus,
) -> None:
    """On the test kit's bus (eventbus.testing): its drain fails the test on any
    dead letter."""
    breaker = BreakerPolicy(failure_ratio=0.5, min_calls=5, window=10, cooldown=5, max_cooldown=30)
    retry = RetryPolicy(max_attempts=3, initial_delay=1.0, max_delay=2.0)
    down = True
    handled: list[int] = []

    @bus.subscribe("t", name="s", retry=retry, breaker=breaker, batch=BatchPolicy(mode="natural"))
    async def handler(event: Event[int], ctx: Context) -> None:
        if down:
            raise ConnectionError("the payments API is down")
        handled.append(event.payload)

    await bus.publish_many(Message("t", i, key=f"k{i}") for i in range(100))
    await wait_until(bus, lambda: bus.metrics().subscriptions["s"].breaker_trips > 0)
    # Open: most events wait in the log, not in the dead letters.
    assert bus.metrics().subscriptions["s"].handled < 100
    down = False
    await bus.drain(timeout=600)
    assert sorted(handled) == list(range(100))


@pytest.mark.virtual_clock
async def test_the_retry_budget_caps_retries_to_a_share_of_fresh_traffic() -> None:
    retry = RetryPolicy(
        max_attempts=10, initial_delay=0.0, max_delay=0.0, budget_ratio=0.0, budget_floor=20.0
    )
    attempts = 0
    async with Bus.open(":memory:", config=BusConfig(breaker=None)) as bus:

        @bus.subscribe("t", name="s", retry=retry, ordered=False)
        async def handler(event: Event[int], ctx: Context) -> None:
            nonlocal attempts
            if ctx.attempt > 1:
                attempts += 1
            raise Flaky("always")

        started = anyio.current_time()
        await bus.publish_many(Message("t", i) for i in range(50))
        with anyio.move_on_after(10.0):
            await bus.drain(timeout=None)
        elapsed = anyio.current_time() - started
    # The initial burst (ten seconds of the floor) plus 20 retries/s.
    assert attempts <= 200 + 20 * elapsed + 2
    assert attempts >= 200 + 20 * 9  # the burst was spent, and the floor kept going


async def test_dead_letters_can_be_filtered_fetched_and_purged() -> None:
    retry = RetryPolicy(max_attempts=1)
    async with Bus.open(":memory:") as bus:

        @bus.subscribe("t", name="a", retry=retry)
        async def a(event: Event[int], ctx: Context) -> None:
            raise (ValueError if event.payload % 2 else KeyError)(f"bad {event.payload}")

        @bus.subscribe("t", name="b", retry=retry)
        async def b(event: Event[int], ctx: Context) -> None:
            if event.payload == 0:
                raise RuntimeError("b fails on 0")

        receipts = await bus.publish_many(Message("t", i) for i in range(6))
        await bus.drain(timeout=10)
        assert len(await bus.dead_letters.list("a")) == 6
        assert [
            d.event.payload for d in await bus.dead_letters.list("a", error_type="ValueError")
        ] == [1, 3, 5]
        page = await bus.dead_letters.list("a", limit=2)
        nxt = await bus.dead_letters.list("a", limit=2, after_seq=page[-1].event.seq)
        assert [d.event.payload for d in page + nxt] == [0, 1, 2, 3]
        both = await bus.dead_letters.get(receipts[0].id)
        assert sorted(d.subscription for d in both) == ["a", "b"]
        assert await bus.dead_letters.list(since=time.time() + 60) == []
        assert await bus.dead_letters.purge("a", error_type="KeyError") == 3
        assert await bus.dead_letters.purge("b") == 1
        assert len(await bus.dead_letters.list()) == 3


async def test_redrive_keeps_the_event_id_and_only_reaches_that_subscription() -> None:
    retry = RetryPolicy(max_attempts=1)
    seen: dict[str, list[tuple[str, int, str]]] = {"a": [], "b": []}
    broken = True
    async with Bus.open(":memory:") as bus:

        @bus.subscribe("t", name="a", retry=retry)
        async def a(event: Event[int], ctx: Context) -> None:
            if broken:
                raise RuntimeError("a is broken")
            seen["a"].append((event.id, ctx.attempt, ctx.idempotency_key))

        @bus.subscribe("t", name="b", retry=retry)
        async def b(event: Event[int], ctx: Context) -> None:
            seen["b"].append((event.id, ctx.attempt, ctx.idempotency_key))

        receipt = await bus.publish("t", 1)
        await bus.drain(timeout=10)
        broken = False
        assert await bus.dead_letters.redrive("a") == 1
        await bus.drain(timeout=10)
    assert seen["a"] == [(receipt.id, 1, f"a:{receipt.id}")]
    assert len(seen["b"]) == 1
