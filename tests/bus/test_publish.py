"""Publishing: receipts, idempotency, bad input, backpressure."""

from __future__ import annotations

import msgspec
import pytest

from eventbus import (
    Bus,
    BusClosed,
    BusConfig,
    BusFull,
    Event,
    EventTooLarge,
    Message,
    PayloadError,
)
from tests import postgres

pytestmark = pytest.mark.anyio


class Order(msgspec.Struct):
    id: str
    amount: int


async def read_log(target: str) -> list[tuple[int, str, str]]:
    store = postgres.log_at(target, read_only=True)
    await store.open()
    try:
        return [(r.seq, r.id, r.topic) for r in await store.read(0, 10**9, None, 10**6)]
    finally:
        await store.close()


async def test_a_returned_publish_is_in_the_log(log_url: str) -> None:
    async with Bus.open(log_url) as bus:
        receipt = await bus.publish("orders", {"amount": 5}, key="o-1")
        # Read the file from outside while the bus still runs.
        assert await read_log(log_url) == [(receipt.seq, receipt.id, "orders")]
    assert receipt.seq == 1
    assert not receipt.duplicate


async def test_a_repeated_idempotency_key_returns_the_original_receipt(log_url: str) -> None:
    async with Bus.open(log_url) as bus:
        first = await bus.publish("orders", {"n": 1}, idempotency_key="req-1")
    async with Bus.open(log_url) as bus:
        again = await bus.publish("orders", {"n": 2}, idempotency_key="req-1")
        other = await bus.publish("orders", {"n": 3}, idempotency_key="req-2")
    assert (again.seq, again.id, again.duplicate) == (first.seq, first.id, True)
    assert other.seq == 2
    assert len(await read_log(log_url)) == 2


async def test_a_payload_that_will_not_encode_raises_and_writes_nothing(log_url: str) -> None:
    async with Bus.open(log_url) as bus:
        with pytest.raises(PayloadError, match="orders") as info:
            await bus.publish("orders", {"when": object()})
        assert isinstance(info.value, TypeError)
        with pytest.raises(PayloadError, match="headers"):
            await bus.publish("orders", {}, headers={"n": 1})  # type: ignore[dict-item]
        with pytest.raises(PayloadError):
            await bus.publish_many([Message("orders", {"ok": 1}), Message("orders", 1 + 2j)])
    assert await read_log(log_url) == []


async def test_an_oversized_event_raises_event_too_large_before_writing(log_url: str) -> None:
    config = BusConfig(max_event_bytes=1000)
    async with Bus.open(log_url, config=config) as bus:
        with pytest.raises(EventTooLarge) as info:
            await bus.publish("blobs", b"x" * 2000)
        assert info.value.limit == 1000
        assert info.value.size > 1000
        with pytest.raises(EventTooLarge):
            bus.publish_nowait("blobs", "y" * 5000)
        await bus.publish("blobs", b"x" * 500)
    assert len(await read_log(log_url)) == 1


async def test_bad_topics_and_keys_are_argument_errors() -> None:
    async with Bus.open(":memory:") as bus:
        with pytest.raises(ValueError, match="topic"):
            await bus.publish("", {})
        with pytest.raises(ValueError, match="topic"):
            await bus.publish("*", {})
        with pytest.raises(ValueError, match="key"):
            await bus.publish("t", {}, key=5)  # type: ignore[arg-type]


@pytest.mark.parametrize("with_subscriber", [False, True])
async def test_publish_nowait_raises_bus_full_at_capacity(with_subscriber: bool) -> None:
    async with Bus.open(":memory:", config=BusConfig(max_pending_publishes=10)) as bus:
        if with_subscriber:

            @bus.subscribe("t", name="s")
            async def handler(event: Event[object], ctx: object) -> None:
                pass

        for i in range(10):
            bus.publish_nowait("t", i)
        with pytest.raises(BusFull) as info:
            bus.publish_nowait("t", 10)
        assert info.value.pending == 10
        await bus.drain(timeout=10)
        bus.publish_nowait("t", 11)  # room again once the writer committed
        await bus.drain(timeout=10)
        stats = await bus.stats()
    assert stats.head == 11


async def test_publish_waits_for_room_instead_of_failing() -> None:
    async with Bus.open(":memory:", config=BusConfig(max_pending_publishes=4)) as bus:
        receipts = [await bus.publish("t", i) for i in range(50)]
    assert [r.seq for r in receipts] == list(range(1, 51))


async def test_publish_many_is_atomic_and_ordered(log_url: str) -> None:
    async with Bus.open(log_url) as bus:
        receipts = await bus.publish_many(
            Message("t", i, key="k", idempotency_key=f"m-{i % 3}") for i in range(6)
        )
    assert [r.seq for r in receipts] == [1, 2, 3, 1, 2, 3]
    assert [r.duplicate for r in receipts] == [False] * 3 + [True] * 3


async def test_structs_are_published_and_arrive_as_plain_data() -> None:
    async with Bus.open(":memory:") as bus:
        seen: list[object] = []

        @bus.subscribe("orders", name="s")
        async def handler(event: Event[object], ctx: object) -> None:
            seen.append(event.payload)

        await bus.publish("orders", Order("o-1", 5), headers={"source": "test"})
        await bus.drain(timeout=10)
    assert seen == [{"id": "o-1", "amount": 5}]
    assert msgspec.convert(seen[0], Order) == Order("o-1", 5)


async def test_publishing_on_a_closed_bus_raises_bus_closed() -> None:
    async with Bus.open(":memory:") as bus:
        pass
    with pytest.raises(BusClosed):
        await bus.publish("t", 1)
    with pytest.raises(BusClosed):
        bus.publish_nowait("t", 1)
