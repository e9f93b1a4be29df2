"""Subscriptions: delivery, ordering, batching, backlog from the log, outbox, failures."""

from __future__ import annotations

import anyio
import pytest

from eventbus import (
    BatchPolicy,
    Bus,
    BusConfig,
    Context,
    DrainTimeout,
    Event,
    Message,
    RetryPolicy,
    SubscriptionError,
)

pytestmark = pytest.mark.anyio

FAST_RETRY = RetryPolicy(max_attempts=3, initial_delay=0.0, max_delay=0.0)


async def test_every_subscription_gets_every_event_of_its_topic_in_order(
    every_log: str,
) -> None:
    target = every_log
    async with Bus.open(target) as bus:
        singles: list[int] = []
        batches: list[list[int]] = []

        @bus.subscribe("orders", name="single")
        async def single(event: Event[int], ctx: Context) -> None:
            singles.append(event.payload)

        @bus.subscribe(["orders", "refunds"], name="batched")
        async def batched(events: list[Event[int]], ctx: Context) -> None:
            batches.append([e.payload for e in events])

        await bus.publish_many(Message("orders", i) for i in range(500))
        await bus.publish("refunds", 500)
        await bus.publish("other", -1)
        await bus.drain(timeout=10)
    assert singles == list(range(500))
    flat = [p for batch in batches for p in batch]
    assert flat == list(range(501))
    assert len(batches) < 501  # events were batched
    assert max(len(b) for b in batches) <= BatchPolicy().max_size


async def test_a_string_annotated_list_parameter_makes_a_batch_handler() -> None:
    async with Bus.open(":memory:") as bus:
        calls: list[object] = []

        async def handler(events: list[Event[int]], ctx: Context) -> None:
            calls.append(events)

        handler.__annotations__["events"] = "list[Event[int]]"
        bus.subscribe("t", name="s")(handler)
        await bus.publish("t", 1)
        await bus.drain(timeout=10)
    assert isinstance(calls[0], list)


async def test_a_wildcard_subscription_sees_every_topic() -> None:
    async with Bus.open(":memory:") as bus:
        topics: list[str] = []

        @bus.subscribe("*", name="audit")
        async def audit(event: Event[object], ctx: Context) -> None:
            topics.append(event.topic)

        for t in ("a", "b", "c"):
            await bus.publish(t, None)
        await bus.drain(timeout=10)
    assert topics == ["a", "b", "c"]


async def test_a_slow_subscription_reads_its_backlog_from_the_log(log_url: str) -> None:
    config = BusConfig(channel_capacity=8)
    release = anyio.Event()
    seen: list[int] = []
    most_buffered = 0
    async with Bus.open(log_url, config=config) as bus:

        @bus.subscribe("t", name="slow", batch=BatchPolicy(mode="natural", max_size=4))
        async def slow(event: Event[int], ctx: Context) -> None:
            nonlocal most_buffered
            await release.wait()
            seen.append(event.payload)
            most_buffered = max(most_buffered, bus.metrics().subscriptions["slow"].buffered)

        await bus.publish_many(Message("t", i) for i in range(300))
        release.set()
        await bus.drain(timeout=20)
    assert seen == list(range(300))
    assert most_buffered <= 8


async def test_unacknowledged_events_are_delivered_again_after_reopen(log_url: str) -> None:
    config = BusConfig(close_timeout=0.2)
    attempts: list[tuple[int, int]] = []
    async with Bus.open(log_url, config=config) as bus:
        started = anyio.Event()

        @bus.subscribe("t", name="s")
        async def stuck(event: Event[int], ctx: Context) -> None:
            attempts.append((event.payload, ctx.attempt))
            started.set()
            await anyio.sleep_forever()

        await bus.publish("t", 1)
        await started.wait()
    # close abandoned the batch in flight: it was not acknowledged
    async with Bus.open(log_url) as bus:
        again: list[int] = []

        @bus.subscribe("t", name="s")
        async def works(event: Event[int], ctx: Context) -> None:
            again.append(event.payload)

        await bus.drain(timeout=10)
    assert attempts == [(1, 1)]
    assert again == [1]


async def test_acknowledged_events_are_not_delivered_again(log_url: str) -> None:
    async with Bus.open(log_url) as bus:

        @bus.subscribe("t", name="s")
        async def first(event: Event[int], ctx: Context) -> None:
            pass

        await bus.publish_many(Message("t", i) for i in range(20))
        await bus.drain(timeout=10)
    async with Bus.open(log_url) as bus:
        seen: list[int] = []

        @bus.subscribe("t", name="s")
        async def second(event: Event[int], ctx: Context) -> None:
            seen.append(event.payload)

        await bus.publish("t", 99)
        await bus.drain(timeout=10)
    assert seen == [99]


async def test_a_new_subscription_can_start_at_the_latest_event() -> None:
    async with Bus.open(":memory:") as bus:
        await bus.publish("t", "old")
        seen: list[str] = []

        @bus.subscribe("t", name="s", start="latest")
        async def handler(event: Event[str], ctx: Context) -> None:
            seen.append(event.payload)

        await bus.publish("t", "new")
        await bus.drain(timeout=10)
    assert seen == ["new"]


async def test_outbox_events_commit_with_the_acknowledgement(log_url: str) -> None:
    async with Bus.open(log_url) as bus:
        invoices: list[tuple[str | None, object]] = []

        @bus.subscribe("orders", name="billing")
        async def bill(event: Event[dict[str, int]], ctx: Context) -> None:
            await ctx.publish("invoices", {"total": event.payload["amount"] * 2}, key=event.key)
            if event.payload["amount"] == 3:
                await ctx.publish("invoices", {"discarded": True})
                raise RuntimeError("fails after publishing")

        @bus.subscribe("invoices", name="mail")
        async def mail(event: Event[object], ctx: Context) -> None:
            invoices.append((event.key, event.payload))

        for amount in (1, 2, 3):
            await bus.publish("orders", {"amount": amount}, key=f"o-{amount}")
        await bus.drain(timeout=10)
        dead = await bus.dead_letters.list("billing")
    # The failed attempts' outbox events were rolled back with them.
    assert invoices == [("o-1", {"total": 2}), ("o-2", {"total": 4})]
    assert [d.event.payload for d in dead] == [{"amount": 3}]


async def test_a_failing_event_is_retried_then_dead_lettered_with_its_reason() -> None:
    async with Bus.open(":memory:") as bus:
        attempts: list[int] = []
        handled: list[int] = []

        @bus.subscribe("t", name="s", retry=FAST_RETRY)
        async def handler(event: Event[int], ctx: Context) -> None:
            if event.payload == 2:
                attempts.append(ctx.attempt)
                raise ValueError(f"cannot handle {event.payload}")
            handled.append(event.payload)

        receipts = await bus.publish_many(Message("t", i) for i in range(4))
        await bus.drain(timeout=10)
        (dead,) = await bus.dead_letters.list("s")
    assert attempts == [1, 2, 3]
    assert handled == [0, 1, 3]
    assert dead.event.id == receipts[2].id
    assert dead.event.seq == receipts[2].seq
    assert dead.attempts == 3
    assert dead.error_type == "builtins.ValueError"
    assert dead.error_message == "cannot handle 2"
    assert "ValueError" in dead.traceback
    assert dead.first_failed_at <= dead.last_failed_at


async def test_a_failing_batch_is_split_so_only_the_poison_event_is_dead_lettered() -> None:
    async with Bus.open(":memory:") as bus:
        handled: list[int] = []

        @bus.subscribe("t", name="s", retry=FAST_RETRY, batch=BatchPolicy(mode="natural"))
        async def handler(events: list[Event[int]], ctx: Context) -> None:
            if any(e.payload == 7 for e in events):
                raise ValueError("poison")
            handled.extend(e.payload for e in events)

        await bus.publish_many(Message("t", i) for i in range(20))
        await bus.drain(timeout=10)
        dead = await bus.dead_letters.list()
    assert sorted(handled) == [i for i in range(20) if i != 7]
    assert [d.event.payload for d in dead] == [7]


async def test_a_hanging_handler_attempt_times_out_and_is_retried() -> None:
    retry = RetryPolicy(max_attempts=2, initial_delay=0.0, max_delay=0.0, timeout=0.05)
    async with Bus.open(":memory:") as bus:
        attempts: list[int] = []

        @bus.subscribe("t", name="s", retry=retry)
        async def handler(event: Event[int], ctx: Context) -> None:
            attempts.append(ctx.attempt)
            if ctx.attempt == 1:
                await anyio.sleep_forever()

        await bus.publish("t", 1)
        await bus.drain(timeout=10)
        assert await bus.dead_letters.list() == []
    assert attempts == [1, 2]


async def test_idempotency_keys_are_stable_per_event_and_subscription(log_url: str) -> None:
    keys: list[str] = []
    async with Bus.open(log_url, config=BusConfig(close_timeout=0.1)) as bus:

        @bus.subscribe("t", name="s")
        async def stuck(event: Event[int], ctx: Context) -> None:
            keys.append(ctx.idempotency_key)
            await anyio.sleep_forever()

        receipt = await bus.publish("t", 1)
        while not keys:
            await anyio.lowlevel.checkpoint()
    async with Bus.open(log_url) as bus:

        @bus.subscribe("t", name="s")
        async def batch(events: list[Event[int]], ctx: Context) -> None:
            keys.extend(ctx.idempotency_key_for(e) for e in events)
            with pytest.raises(RuntimeError, match="idempotency_key_for"):
                _ = ctx.idempotency_key

        await bus.drain(timeout=10)
    assert keys == [f"s:{receipt.id}", f"s:{receipt.id}"]


async def test_drain_times_out_naming_the_subscription_behind() -> None:
    async with Bus.open(":memory:", config=BusConfig(close_timeout=0.1)) as bus:

        @bus.subscribe("t", name="stuck")
        async def handler(event: Event[int], ctx: Context) -> None:
            await anyio.sleep_forever()

        await bus.publish("t", 1)
        with pytest.raises(DrainTimeout, match="stuck") as info:
            await bus.drain(timeout=0.1)
        assert "stuck" in info.value.lagging


async def test_subscribing_twice_under_one_name_is_refused() -> None:
    async with Bus.open(":memory:") as bus:

        @bus.subscribe("t", name="s")
        async def one(event: Event[int], ctx: Context) -> None:
            pass

        with pytest.raises(SubscriptionError, match="already exists"):

            @bus.subscribe("t", name="s")
            async def two(event: Event[int], ctx: Context) -> None:
                pass

        with pytest.raises(SubscriptionError, match="declare it with async def"):
            bus.subscribe("t", name="bad")(lambda e: None)  # type: ignore[arg-type,return-value]


@pytest.mark.anyio
async def test_a_batch_larger_than_the_channel_does_not_spin_the_linger() -> None:
    # A fixed batch of 32 with a linger, through a channel of 8: the batcher used to
    # wait for more than the channel can hold, spinning without awaiting.
    config = BusConfig(channel_capacity=8)
    seen: list[int] = []
    async with Bus.open(":memory:", config=config) as bus:

        @bus.subscribe("t", name="s", batch=BatchPolicy(mode="fixed", max_size=32, max_wait=0.05))
        async def handle(events: list[Event[int]], ctx: Context) -> None:
            seen.extend(e.payload for e in events)

        for i in range(100):
            await bus.publish("t", i)
        with anyio.fail_after(10):
            await bus.drain(timeout=5)
    assert seen == list(range(100))
