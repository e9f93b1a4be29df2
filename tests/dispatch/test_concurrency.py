"""``subscribe(..., concurrency=N)``: up to N handler calls at once, never two events of
one key at once while ordered, each key in publish order, acknowledged exactly once."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from eventbus import (
    BatchPolicy,
    Bus,
    BusConfig,
    ConfigError,
    Context,
    Event,
    Message,
    SubscriptionError,
)

pytestmark = pytest.mark.anyio


class Gauge:
    """Counts calls in flight, and keys in flight."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.keys: set[str] = set()
        self.overlaps: list[str] = []

    def enter(self, keys: list[str]) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        for key in keys:
            if key in self.keys:
                self.overlaps.append(key)
            self.keys.add(key)

    def leave(self, keys: list[str]) -> None:
        self.now -= 1
        self.keys.difference_update(keys)


async def test_calls_overlap_up_to_the_limit_and_never_share_a_key(log_target: str) -> None:
    gauge = Gauge()
    order: dict[str, list[int]] = {}
    full = anyio.Event()
    async with Bus.open(log_target) as bus:

        @bus.subscribe("t", name="s", concurrency=8)
        async def handler(event: Event[int], ctx: Context) -> None:
            key = event.key or ""
            gauge.enter([key])
            if gauge.now == 8:
                full.set()
            with anyio.fail_after(10):
                await full.wait()  # every call waits until eight run at once
            await anyio.lowlevel.checkpoint()
            order.setdefault(key, []).append(event.payload)
            gauge.leave([key])

        await bus.publish_many(Message("t", i, key=f"k{i % 16}") for i in range(400))
        await bus.drain(timeout=20)
        metrics = bus.metrics().subscriptions["s"]
    assert gauge.peak == 8
    assert gauge.overlaps == []
    assert all(values == sorted(values) for values in order.values())
    assert sum(len(v) for v in order.values()) == 400
    assert metrics.handled == 400
    assert metrics.concurrency == 8


async def test_batch_calls_overlap_with_disjoint_keys(log_target: str) -> None:
    gauge = Gauge()
    seen: list[int] = []
    two = anyio.Event()
    async with Bus.open(log_target) as bus:

        @bus.subscribe("t", name="s", concurrency=2, batch=BatchPolicy(mode="natural", max_size=8))
        async def handler(events: list[Event[int]], ctx: Context) -> None:
            keys = sorted({e.key or "" for e in events})
            gauge.enter(keys)
            if gauge.now == 2:
                two.set()
            with anyio.fail_after(10):
                await two.wait()  # every batch waits until two run at once
            seen.extend(e.payload for e in events)
            gauge.leave(keys)

        await bus.publish_many(Message("t", i, key=f"k{i % 40}") for i in range(400))
        await bus.drain(timeout=20)
    assert gauge.overlaps == []
    assert gauge.peak == 2
    assert sorted(seen) == list(range(400))
    for k in range(40):
        mine = [i for i in seen if i % 40 == k]
        assert mine == sorted(mine)


async def test_state_written_by_one_call_is_seen_by_the_next_call_of_its_key(
    log_target: str,
) -> None:
    """Acknowledgements commit behind the calls: a later call of the key must still
    read what the earlier one wrote, committed or not."""
    async with Bus.open(log_target) as bus:

        @bus.subscribe("t", name="s", concurrency=16)
        async def count(event: Event[int], ctx: Context) -> None:
            key = event.key or ""
            total = await ctx.state.get(key, 0)
            await anyio.lowlevel.checkpoint()
            ctx.state.set(key, int(total) + event.payload)  # type: ignore[call-overload]

        await bus.publish_many(Message("t", 1, key=f"k{i % 10}") for i in range(2000))
        await bus.drain(timeout=20)
        totals = [await bus.state("s").get(f"k{k}") for k in range(10)]
    assert totals == [200] * 10


async def test_concurrency_is_a_setting_and_a_bad_value_is_refused() -> None:
    assert BusConfig.from_dict({"concurrency": 32}).concurrency == 32
    assert BusConfig.from_env({"EVENTBUS_CONCURRENCY": "4"}).concurrency == 4
    with pytest.raises(ConfigError, match="concurrency"):
        BusConfig(concurrency=0)
    async with Bus.open(":memory:", config=BusConfig(concurrency=3)) as bus:

        @bus.subscribe("t", name="default")
        async def handler(event: Event[int], ctx: Context) -> None:
            pass

        assert bus.metrics().subscriptions["default"].concurrency == 3
        for bad in (0, -1, 1.5, True):
            with pytest.raises(SubscriptionError, match="concurrency"):
                bus.subscribe("t", name=f"bad{bad}", concurrency=bad)  # type: ignore[arg-type]
