"""Several buses on one PostgreSQL log (here in one process; tests/crash holds the
same with processes killed and paused): every one publishes, each subscription's
events are divided among them, each handled once, in order per key, and the
partitions move when a bus joins or leaves."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import pytest

from eventbus import Bus, BusConfig, Context, Event, Message, RetryPolicy
from eventbus.dispatch import SharedSubscription

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

KEYS = 23


class Books:
    """What the handlers of every bus saw."""

    def __init__(self) -> None:
        self.calls: Counter[int] = Counter()
        self.last: dict[str, int] = {}
        self.violations: list[tuple[str, int, int]] = []
        self.by_bus: Counter[int] = Counter()


def _subscribe(bus: Bus, books: Books, who: int, io: float = 0.0) -> None:
    @bus.subscribe("orders", name="count", retry=RetryPolicy(max_attempts=3, initial_delay=0.01))
    async def count(event: Event[int], ctx: Context) -> None:
        if io:
            await anyio.sleep(io)
        key = event.key or ""
        if books.last.get(key, -1) > event.payload:
            books.violations.append((key, books.last[key], event.payload))
        books.last[key] = event.payload
        books.calls[event.payload] += 1
        books.by_bus[who] += 1
        seen = await ctx.state.get(key, 0)
        ctx.state.set(key, seen + 1)
        await ctx.publish("counted", event.payload, key=key)


@asynccontextmanager
async def _buses(url: str, n: int, books: Books, io: float = 0.0) -> AsyncIterator[list[Bus]]:
    async with AsyncExitStack() as stack:
        buses = []
        for who in range(n):
            bus = await stack.enter_async_context(Bus.open(url, config=BusConfig(breaker=None)))
            _subscribe(bus, books, who, io)
            buses.append(bus)
        yield buses


def _shared(bus: Bus) -> SharedSubscription:
    sub = bus._subs["count"]
    assert isinstance(sub, SharedSubscription)
    return sub


async def _held(buses: list[Bus], partitions: int = 16, timeout: float = 20) -> None:
    """Until each bus holds a fair share and together they hold every partition."""
    with anyio.fail_after(timeout):
        while True:
            held = [_shared(b).partitions for b in buses]
            counts = sorted(len(h) for h in held)
            fair = partitions // len(buses)
            if sum(counts) == partitions and counts[0] >= fair and counts[-1] <= fair + 1:
                assert not set.intersection(*map(set, held)) or len(buses) == 1
                return
            await anyio.sleep(0.05)


async def test_buses_on_one_log_share_the_work_each_event_once_in_key_order(pg_url: str) -> None:
    url = pg_url + "&lease=2"
    books = Books()
    n = 600
    async with _buses(url, 3, books) as buses:
        await _held(buses)
        for first in range(0, n, 100):
            bus = buses[first // 100 % 3]  # each bus publishes some
            await bus.publish_many(
                Message("orders", i, key=f"k{i % KEYS}") for i in range(first, first + 100)
            )
        for bus in buses:
            await bus.drain(timeout=60)
        state = buses[0].state("count")
        totals = {f"k{k}": await state.get(f"k{k}") for k in range(KEYS)}
        counted = await buses[1].stats()
    assert books.violations == []
    assert sorted(books.calls) == list(range(n))
    assert set(books.calls.values()) == {1}
    assert all(books.by_bus[who] > 0 for who in range(3))  # the work was shared
    assert totals == {f"k{k}": len(range(k, n, KEYS)) for k in range(KEYS)}
    assert counted.events == 2 * n  # every outbox event once


async def test_a_bus_joining_and_one_leaving_move_partitions_without_losing_order(
    pg_url: str,
) -> None:
    url = pg_url + "&lease=2"
    books = Books()
    n = 900
    async with _buses(url, 2, books, io=0.001) as buses:
        await _held(buses)
        await buses[0].publish_many(Message("orders", i, key=f"k{i % KEYS}") for i in range(n // 3))
        async with _buses(url, 1, books, io=0.001) as joined:
            # A third bus joins while the first two are busy: each gives partitions up.
            everyone = [*buses, *joined]
            await joined[0].publish_many(
                Message("orders", i, key=f"k{i % KEYS}") for i in range(n // 3, 2 * n // 3)
            )
            await _held(everyone)
            await joined[0].drain(timeout=60)
        # It left: its partitions are free at once, and taken by the other two.
        await buses[1].publish_many(
            Message("orders", i, key=f"k{i % KEYS}") for i in range(2 * n // 3, n)
        )
        await _held(buses)
        for bus in buses:
            await bus.drain(timeout=60)
        assert all(_shared(b).lease_losses == 0 for b in buses)  # nothing was fenced
    assert books.violations == []
    assert sorted(books.calls) == list(range(n))
    assert set(books.calls.values()) == {1}
