"""The group-commit batching point: the writer's controller sizes each commit, and the
log's commit sizes and latencies are reported."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventbus import Bus, BusConfig, BusError, Context, Event, Message, StorageError, StorageFull
from eventbus._metrics import CommitRecorder
from eventbus.backpressure import FixedController
from eventbus.publish import COMMIT_TARGET_LATENCY, LogWriter
from eventbus.storage import (
    MemoryStorage,
    NewRecord,
    Receipt,
    RecordRejected,
    SQLiteStorage,
    SubscriptionInfo,
    WriteBatch,
)
from eventbus.storage import StorageFull as LogFull

pytestmark = pytest.mark.anyio


class SlowStorage(MemoryStorage):
    """An in-memory log whose commits take ``per_event`` seconds per appended event,
    as a transaction of large events would."""

    def __init__(self, per_event: float) -> None:
        super().__init__()
        self.per_event = per_event
        self.sizes: list[int] = []

    async def commit(self, batch: WriteBatch) -> list[Receipt]:
        self.sizes.append(len(batch.appends))
        await asyncio.sleep(self.per_event * len(batch.appends))
        return await super().commit(batch)


def record(i: int) -> NewRecord:
    return NewRecord(f"id-{i}", "t", None, b"\x01", None, time.time())


async def run_writer(
    storage: MemoryStorage, events: int, **kwargs: object
) -> tuple[LogWriter, list[int]]:
    """Queue ``events`` appends at once, let the writer commit them all, stop it."""
    await storage.open()
    writer = LogWriter(
        storage,
        max_pending=events,
        max_commit_batch=4096,
        on_committed=lambda appended, receipts: None,
        **kwargs,  # type: ignore[arg-type]
    )
    async with asyncio.TaskGroup() as tg:
        tg.create_task(writer.run())
        for i in range(events):
            writer.submit_nowait(record(i), want_receipt=False)
        await writer.flush()
        writer.stop()
    return writer, [s for s in getattr(storage, "sizes", []) if s]


async def test_commits_take_everything_waiting_while_they_are_fast() -> None:
    writer, _ = await run_writer(MemoryStorage(), 10_000)
    log = writer.metrics()
    assert (log.commits, log.committed_events) == (3, 10_000)
    assert (writer.commits, writer.committed_events) == (3, 10_000)
    assert log.commit_size_max == 4096
    assert log.commit_target == 4096
    assert log.commit_latency.max < COMMIT_TARGET_LATENCY


async def test_commits_shrink_when_large_ones_would_take_longer_than_the_target() -> None:
    per_event = 0.0002  # 4096 events: 0.8 s; the target, 0.1 s, fits about 500
    writer, sizes = await run_writer(SlowStorage(per_event), 12_000)
    fits = COMMIT_TARGET_LATENCY / per_event
    assert sizes[0] == 4096  # starts as plain group commit ...
    assert all(s <= 1.25 * fits for s in sizes[-5:]), sizes  # ... then meets the target
    assert writer.metrics().commit_target <= 1.25 * fits
    assert writer.committed_events == 12_000


async def test_a_given_controller_sizes_the_commits() -> None:
    writer, sizes = await run_writer(SlowStorage(0.0), 1000, controller=FixedController(100, 0))
    assert sizes == [100] * 10
    assert writer.metrics().commit_size_p50 == 100


async def test_acknowledgements_ride_in_the_next_commit_and_are_counted() -> None:
    storage = MemoryStorage()
    await storage.open()
    writer = LogWriter(storage, max_pending=10, max_commit_batch=10, on_committed=lambda a, r: None)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(writer.run())
        await asyncio.gather(*(writer.commit(WriteBatch(acks={f"s{i}": 0})) for i in range(3)))
        writer.stop()
    log = writer.metrics()
    assert log.commits == 1
    assert log.acks_per_commit_p50 == 3
    assert log.commit_size_p50 == 0


def test_commit_recorder_reports_medians_of_recent_commits() -> None:
    recorder = CommitRecorder()
    assert recorder.snapshot(8).commit_size_p50 == 0.0
    for size in (1, 2, 3, 10):
        recorder.commit(size, 1, 0.001 * size)
    log = recorder.snapshot(8)
    assert (log.commits, log.committed_events, log.commit_target) == (4, 16, 8)
    assert (log.commit_size_p50, log.commit_size_max) == (2.5, 10)
    recorder.commit(4, 1, 0.004)
    assert recorder.snapshot(8).commit_size_p50 == 3.0
    assert recorder.snapshot(8).commit_latency.max == pytest.approx(0.01)


async def test_bus_metrics_report_the_group_commits() -> None:
    async with Bus.open(":memory:") as bus:

        @bus.subscribe("t", name="s")
        async def handle(event: Event[int], ctx: Context) -> None:
            pass

        await bus.publish_many([Message("t", i) for i in range(100)])
        await bus.drain()
        log = bus.metrics().log
    if log is None:
        pytest.skip("Bus.metrics() does not fill BusMetrics.log yet")
    assert log.commits >= 2  # the publish, then at least one acknowledgement
    assert (log.commit_size_max, log.committed_events) == (100, 100)
    assert log.commit_latency.max > 0
    assert log.commit_target == BusConfig().max_commit_batch


class RefusingStorage(MemoryStorage):
    """An in-memory log that refuses, as a storage would refuse a value it cannot
    store, any commit holding a record on the topic ``"refused"``; or, with
    ``full=True``, every commit that appends (a full disk)."""

    def __init__(self, *, full: bool = False) -> None:
        super().__init__()
        self.full = full
        self.attempts = 0

    async def commit(self, batch: WriteBatch) -> list[Receipt]:
        self.attempts += 1
        if self.full and batch.appends:
            raise LogFull("the disk is full")
        if any(r.topic == "refused" for r in batch.appends):
            raise RecordRejected("memory", "a value it cannot store")
        return await super().commit(batch)


async def test_a_record_the_log_refuses_fails_only_its_own_publish() -> None:
    # Regression: one record that failed inside the shared transaction failed every
    # publish of that group commit and dropped the publish_nowait events queued with it.
    storage = RefusingStorage()
    receipts: list[Receipt] = []
    errors: list[BaseException] = []

    async def publish(topic: str, i: int) -> None:
        try:
            receipts.append(await bus.publish(topic, i))
        except StorageError as exc:
            errors.append(exc)

    async with Bus.open(":memory:", storage=storage) as bus:
        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(publish, "refused" if i == 17 else "good", i)
            for i in range(10):
                bus.publish_nowait("good", 100 + i)
        await bus.drain(timeout=10)
        events = await storage.read(0, 10**6, None, 10**6)
    assert len(receipts) == 39
    assert len(errors) == 1
    assert isinstance(errors[0], BusError)
    assert "refused a value" in str(errors[0])
    assert sorted(e.seq for e in events) == list(range(1, 50))
    assert {e.topic for e in events} == {"good"}


async def test_a_failure_of_the_log_itself_is_not_retried_in_parts() -> None:
    storage = RefusingStorage(full=True)
    async with Bus.open(":memory:", storage=storage) as bus:
        attempts = storage.attempts
        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(publish_expecting_full, bus, i)
        assert storage.attempts - attempts == 1  # one failed commit, not 2n-1


async def publish_expecting_full(bus: Bus, i: int) -> None:
    with pytest.raises(StorageFull):
        await bus.publish("t", i)


async def test_an_unstorable_record_in_a_sqlite_group_commit_fails_alone(tmp_path: Path) -> None:
    # The safety net behind the checks at publish: a record that still reaches SQLite
    # with a value it cannot bind (as a list idempotency key once did) is committed
    # apart from the others: the good appends, the publish_nowait events and the
    # acknowledgement riding in the same transaction all commit.
    storage = SQLiteStorage(tmp_path / "log.db")
    await storage.open()
    writer = LogWriter(
        storage, max_pending=1000, max_commit_batch=4096, on_committed=lambda a, r: None
    )
    bad = NewRecord("bad", "t", None, b"\x01", None, time.time(), ["x"])  # type: ignore[arg-type]
    await storage.commit(WriteBatch(subscriptions=[SubscriptionInfo("s", ("t",), 0, 0.0)]))
    results: list[object] = []

    async def wait(fut: asyncio.Future[object]) -> None:
        try:
            results.append(await fut)
        except BusError as exc:
            results.append(exc)

    try:
        async with asyncio.TaskGroup() as tg:
            futures = [writer.submit_nowait(record(i), want_receipt=True) for i in range(20)]
            futures.append(writer.submit_nowait(bad, want_receipt=True))
            futures += [writer.submit_nowait(record(i), want_receipt=True) for i in range(20, 40)]
            for i in range(40, 50):
                writer.submit_nowait(record(i), want_receipt=False)
            ack = tg.create_task(writer.commit(WriteBatch(acks={"s": 0}, state=[("s", "k", b"v")])))
            for fut in futures:
                tg.create_task(wait(fut))  # type: ignore[arg-type]
            tg.create_task(writer.run())
            await writer.flush()
            writer.stop()
        assert ack.result() == []
        failed = [r for r in results if isinstance(r, BaseException)]
        assert len(failed) == 1
        assert isinstance(failed[0], StorageError)
        assert "refused a value" in str(failed[0])
        logged = await storage.read(0, 10**6, None, 10**6)
        assert [r.id for r in logged] == [f"id-{i}" for i in range(50)]  # in publish order
        assert await storage.get_state("s", ["k"]) == {"k": b"v"}
        assert writer.commits <= 2 * (51).bit_length() + 1  # halving, not one by one
    finally:
        await storage.close()


class PendingAck:
    """A writer source (as a subscription is) with one acknowledgement pending."""

    def __init__(self) -> None:
        self.writes: WriteBatch | None = WriteBatch(acks={"s": 0}, state=[("s", "k", b"v")])
        self.committed_batches: list[WriteBatch] = []
        self.failed_batches: list[WriteBatch] = []

    def take_writes(self) -> WriteBatch | None:
        writes, self.writes = self.writes, None
        return writes

    def committed(self, batch: WriteBatch) -> None:
        self.committed_batches.append(batch)

    def commit_failed(self, batch: WriteBatch) -> None:
        self.failed_batches.append(batch)
        self.writes = batch


async def test_a_subscriptions_pending_writes_commit_beside_a_refused_record(
    tmp_path: Path,
) -> None:
    # The writes a subscription hands the writer ride in the same group commit as
    # publishes; a refused record among those publishes must not hand them back.
    storage = SQLiteStorage(tmp_path / "log.db")
    await storage.open()
    writer = LogWriter(
        storage, max_pending=1000, max_commit_batch=4096, on_committed=lambda a, r: None
    )
    await storage.commit(WriteBatch(subscriptions=[SubscriptionInfo("s", ("t",), 0, 0.0)]))
    source = PendingAck()
    bad = NewRecord("bad", "t", None, b"\x01", None, time.time(), ["x"])  # type: ignore[arg-type]
    try:
        async with asyncio.TaskGroup() as tg:
            good = [writer.submit_nowait(record(i), want_receipt=True) for i in range(10)]
            refused = writer.submit_nowait(bad, want_receipt=True)
            writer.notify(source)  # type: ignore[arg-type]
            tg.create_task(writer.run())
            await writer.flush()
            writer.stop()
        assert all(fut is not None and fut.done() and not fut.exception() for fut in good)
        assert refused is not None
        assert isinstance(refused.exception(), StorageError)
        assert (len(source.committed_batches), source.failed_batches) == (1, [])
        assert await storage.get_state("s", ["k"]) == {"k": b"v"}
    finally:
        await storage.close()


@settings(max_examples=60, deadline=None)
@given(
    plan=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=8), min_size=1, max_size=6),
    limit=st.integers(1, 9),
)
def test_every_publish_gets_its_own_receipts_whatever_mixes_in_a_commit(
    plan: list[list[int]], limit: int
) -> None:
    """Several tasks each publish a sequence of single events (0) and publish_many
    calls (their size), interleaved, with commits capped at ``limit`` events: every
    call gets the receipts of its own records, in order, and the log holds each
    record once, at the seq its receipt names."""

    async def main() -> None:
        storage = SlowStorage(0.0)
        await storage.open()
        writer = LogWriter(
            storage,
            max_pending=1000,
            max_commit_batch=1000,
            on_committed=lambda appended, receipts: None,
            controller=FixedController(limit, 0),
        )
        made = iter(range(10**6))
        checked: list[tuple[list[NewRecord], list[Receipt]]] = []

        async def publisher(calls: list[int]) -> None:
            for size in calls:
                if size == 0:
                    one = record(next(made))
                    checked.append(([one], [await writer.submit(one)]))
                else:
                    many = [record(next(made)) for _ in range(size)]
                    checked.append((many, await writer.submit_many(many)))
                await asyncio.sleep(0)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(writer.run())
            async with asyncio.TaskGroup() as publishers:
                for calls in plan:
                    publishers.create_task(publisher(calls))
            await writer.flush()
            writer.stop()
        stored = {r.seq: r.id for r in await storage.read(0, 10**6, None, 10**6)}
        total = sum(max(size, 1) for calls in plan for size in calls)
        assert sorted(stored) == list(range(1, total + 1))
        for records, receipts in checked:
            assert [r.id for r in receipts] == [r.id for r in records]
            assert [stored[r.seq] for r in receipts] == [r.id for r in records]
            seqs = [r.seq for r in receipts]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # one transaction

    asyncio.run(main())
