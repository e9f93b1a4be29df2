"""Transactional handler state, its read view, and idempotent outside effects."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import eventbus
from eventbus import BatchPolicy, Bus, Context, Event, Message, PayloadError, RetryPolicy

pytestmark = pytest.mark.anyio

QUICK = RetryPolicy(max_attempts=3, initial_delay=0.0, max_delay=0.0)


async def test_state_commits_with_the_acknowledgement_and_survives_reopen(
    log_url: str,
) -> None:
    async with Bus.open(log_url) as bus:

        @bus.subscribe("orders", name="totals")
        async def total(event: Event[int], ctx: Context) -> None:
            key = event.key or ""
            ctx.state.set(key, await ctx.state.get(key, 0) + event.payload)  # type: ignore[operator]

        await bus.publish_many(Message("orders", i, key=f"k{i % 3}") for i in range(30))
        await bus.drain(timeout=10)
        assert await bus.state("totals").get("k0") == sum(range(0, 30, 3))
    async with Bus.open(log_url) as bus:
        reader = bus.state("totals")
        assert await reader.get("k1") == sum(range(1, 30, 3))
        assert await reader.get("missing", "none") == "none"
        assert [k async for k, _ in reader.items()] == ["k0", "k1", "k2"]


async def test_a_failed_attempt_leaves_no_state_behind() -> None:
    async with Bus.open(":memory:") as bus:

        @bus.subscribe("t", name="s", retry=QUICK)
        async def handler(event: Event[int], ctx: Context) -> None:
            ctx.state.set("count", await ctx.state.get("count", 0) + 1)  # type: ignore[operator]
            ctx.state.set(f"seen-{event.payload}", ctx.attempt)
            if event.payload == 1 and ctx.attempt == 1:
                raise RuntimeError("after writing state")

        await bus.publish_many(Message("t", i) for i in range(3))
        await bus.drain(timeout=10)
        state = bus.state("s")
        assert await state.get("count") == 3  # once per event, not per attempt
        assert await state.get("seen-1") == 2


async def test_later_events_in_a_batch_see_earlier_writes_and_deletes() -> None:
    async with Bus.open(":memory:") as bus:
        seen: list[object] = []

        @bus.subscribe("t", name="s")
        async def handler(events: list[Event[str]], ctx: Context) -> None:
            for event in events:
                seen.append(await ctx.state.get("last"))
                if event.payload == "clear":
                    ctx.state.delete("last")
                else:
                    ctx.state.set("last", event.payload)

        await bus.publish_many(Message("t", p) for p in ["a", "b", "clear", "c"])
        await bus.drain(timeout=10)
        assert await bus.state("s").get("last") == "c"
    assert seen == [None, "a", "b", None]


async def test_a_value_that_will_not_encode_fails_the_handler_call() -> None:
    async with Bus.open(":memory:") as bus:

        @bus.subscribe("t", name="s", retry=RetryPolicy(max_attempts=1))
        async def handler(event: Event[int], ctx: Context) -> None:
            ctx.state.set("bad", object())

        await bus.publish("t", 1)
        await bus.drain(timeout=10)
        (dead,) = await bus.dead_letters.list()
    assert dead.error_type == f"{PayloadError.__module__}.PayloadError"


async def test_an_idempotent_effect_runs_once_per_key_across_restarts(log_url: str) -> None:
    calls: list[str] = []

    async def charge(order: str, *, idempotency_key: str) -> dict[str, str]:
        calls.append(idempotency_key)
        await anyio.lowlevel.checkpoint()
        return {"charge": f"ch-{order}"}

    async with Bus.open(log_url) as bus:
        once = eventbus.idempotent(bus)(charge)
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(lambda: once("o-1", idempotency_key="k-1"))
        assert await once("o-2", idempotency_key="k-2") == {"charge": "ch-o-2"}
        with pytest.raises(ValueError, match="idempotency_key"):
            await once("o-3")  # type: ignore[call-arg]
    async with Bus.open(log_url) as bus:
        again = eventbus.idempotent(bus)(charge)
        assert await again("o-1", idempotency_key="k-1") == {"charge": "ch-o-1"}
    assert calls == ["k-1", "k-2"]


async def test_an_outbox_publish_without_await_is_committed_with_its_event(
    log_path: Path,
) -> None:
    # Regression: ctx.publish was a coroutine; forgetting its await dropped the outbox
    # event while the input event was acknowledged. It now takes the event when called.
    invoices: list[int] = []
    async with Bus.open(log_path) as bus:

        @bus.subscribe("orders", name="billing")
        async def bill(event: Event[int], ctx: Context) -> None:
            ctx.publish("invoices", event.payload, key=event.key)  # no await

        @bus.subscribe("orders", name="batched", batch=BatchPolicy(mode="fixed", max_size=4))
        async def bill_batch(events: list[Event[int]], ctx: Context) -> None:
            for event in events:
                ctx.publish("invoices", -event.payload)  # no await

        @bus.subscribe("invoices", name="ledger")
        async def record(event: Event[int], ctx: Context) -> None:
            invoices.append(event.payload)

        await bus.publish_many(Message("orders", i, key=f"k{i}") for i in range(1, 9))
        await bus.drain(timeout=10, raise_failures=True)
        assert sorted(invoices) == sorted([*range(1, 9), *range(-8, 0)])
        assert (await bus.stats()).head == 8 + 16
