"""On an in-memory log a publish is appended at once (``Storage.append_now``), with no
group commit to wait for: never ahead of a publish queued before it, seen by every
reader of the log the moment it returns, never holding the loop, and never written
when cancelled before its append."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import anyio
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventbus import Bus, BusConfig, Context, Event, Message
from eventbus.storage import MemoryStorage, Receipt, WriteBatch

pytestmark = pytest.mark.anyio

# How one publisher publishes each of its events, or lets the loop turn ("turn").
WAYS = ("publish", "nowait", "idempotent", "many", "turn")


async def publish_in_ways(plans: list[list[str]]) -> None:
    """Each plan is one task publishing its events, in order, the ways it says, all
    tasks at once; then every event is in the log once, in each task's order, at the
    seq its receipt gave, and the subscription saw each task's events in that order."""
    log = MemoryStorage()
    handled: dict[str, list[int]] = defaultdict(list)
    seqs: dict[tuple[int, int], int] = {}
    receipts: dict[tuple[int, int], Receipt] = {}
    async with Bus.open(":memory:", storage=log) as bus:

        @bus.subscribe("t", name="s")
        async def handle(event: Event[dict[str, int]], ctx: Context) -> None:
            assert event.key is not None
            handled[event.key].append(event.payload["i"])
            seqs[(event.payload["p"], event.payload["i"])] = event.seq

        async def publisher(p: int, plan: list[str]) -> None:
            key = f"p{p}"
            for i, way in enumerate(plan):
                payload = {"p": p, "i": i}
                if way == "publish":
                    receipts[(p, i)] = await bus.publish("t", payload, key=key)
                elif way == "nowait":
                    bus.publish_nowait("t", payload, key=key)
                elif way == "idempotent":
                    receipts[(p, i)] = await bus.publish(
                        "t", payload, key=key, idempotency_key=f"{p}.{i}"
                    )
                elif way == "many":
                    (receipts[(p, i)],) = await bus.publish_many([Message("t", payload, key)])
                else:
                    await asyncio.sleep(0)

        async with anyio.create_task_group() as tg:
            for p, plan in enumerate(plans):
                tg.start_soon(publisher, p, plan)
        await bus.drain(timeout=30)
        expected = {
            f"p{p}": [i for i, way in enumerate(plan) if way != "turn"]
            for p, plan in enumerate(plans)
        }
        expected = {key: events for key, events in expected.items() if events}
        assert dict(handled) == expected
        total = sum(len(events) for events in expected.values())
        records = await log.read(0, total, None, total + 1)
    assert [r.seq for r in records] == list(range(1, total + 1))
    in_log: dict[str, list[int]] = defaultdict(list)
    for r in records:
        assert r.key is not None
        in_log[r.key].append(msgspec.msgpack.decode(r.payload)["i"])
    assert dict(in_log) == expected
    for (p, i), receipt in receipts.items():
        assert not receipt.duplicate
        assert seqs[(p, i)] == receipt.seq


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from(WAYS), max_size=90), min_size=1, max_size=6))
def test_appends_at_once_never_overtake_what_was_queued_before_them(
    plans: list[list[str]],
) -> None:
    asyncio.run(publish_in_ways(plans))


async def test_many_publishers_each_past_a_run_of_appends() -> None:
    # 64 tasks, each past the run after which it yields, publish_nowait mixed in.
    ways = ["publish"] * 40 + ["nowait"] + ["publish"] * 40 + ["idempotent", "publish"]
    await publish_in_ways([ways] * 64)


async def test_a_publish_that_returned_is_seen_by_every_reader_at_once() -> None:
    # (A subscription starting at the latest event: tests/bus/test_subscribe.py.)
    async with Bus.open(":memory:") as bus:
        for n in range(1, 4):
            receipt = await bus.publish("t", n)
            assert receipt.seq == n
            assert bus.metrics().head == (await bus.stats()).head == n


@pytest.mark.parametrize("read_metrics_every", [0, 10, 1])
async def test_a_producer_that_reads_the_metrics_still_lets_the_loop_turn(
    read_metrics_every: int,
) -> None:
    """Reading the head or the metrics hands on the events appended so far; it must
    not start the producer's run of appends afresh, or the producer never yields."""
    turns = 0
    stop = False

    async def other_task() -> None:
        nonlocal turns
        while not stop:  # counts the turns of the loop it gets
            turns += 1
            await asyncio.sleep(0)

    async with Bus.open(":memory:") as bus:

        @bus.subscribe("t", name="s")
        async def handle(event: Event[int], ctx: Context) -> None:
            pass

        await bus.drain(timeout=10)
        ticker = asyncio.ensure_future(other_task())
        await asyncio.sleep(0)
        before = turns
        for i in range(3200):
            await bus.publish("t", i)
            if read_metrics_every and i % read_metrics_every == 0:
                assert bus.metrics().head == i + 1
        during = turns - before
        stop = True
        await ticker
    # A run is 32 publishes: about a hundred turns for 3,200.
    assert during >= 50, f"the other task ran {during} times during 3,200 publishes"


async def test_a_publish_cancelled_while_it_yields_writes_nothing() -> None:
    """Past a run of appends at once a publish yields to the loop before its own
    append: cancelled there, nothing is written."""
    async with Bus.open(":memory:") as bus:
        returned: list[int] = []

        async def producer() -> None:
            for i in range(1000):
                await bus.publish("t", i)
                returned.append(i)

        task = asyncio.ensure_future(producer())
        await asyncio.sleep(0)  # it appends a run at once, then yields
        assert 0 < len(returned) < 1000
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await bus.drain(timeout=10)
        assert (await bus.stats()).head == len(returned)


async def test_the_events_not_yet_routed_stay_bounded() -> None:
    """What publishes appended at once in one turn of the loop waits to be routed to
    the subscriptions; at ``max_pending_publishes`` further publishes wait for the
    writer instead, so that the list never outgrows it."""
    config = BusConfig(max_pending_publishes=100)
    async with Bus.open(":memory:", config=config) as bus:

        async def producer(p: int) -> None:
            for i in range(50):
                await bus.publish("t", {"p": p, "i": i})

        async with anyio.create_task_group() as tg:
            for p in range(64):
                tg.start_soon(producer, p)
        await bus.drain(timeout=10)
        log = bus.metrics().log
        assert log.committed_events == 64 * 50
        assert 0 < log.commit_size_max <= 100


async def test_a_commit_put_in_the_way_sees_every_append() -> None:
    seen: list[int] = []

    class Counting(MemoryStorage):
        async def commit(self, batch: WriteBatch) -> list[Receipt]:
            seen.append(len(batch.appends))
            return await super().commit(batch)

    log = Counting()
    async with Bus.open(":memory:", storage=log) as bus:
        assert not log.appends_now
        async with anyio.create_task_group() as tg:
            for p in range(8):
                for i in range(10):
                    tg.start_soon(bus.publish, "t", {"p": p, "i": i})
    assert sum(seen) == 80
