"""The group-commit batching point: the writer's controller sizes each commit, and the
log's commit sizes and latencies are reported."""

from __future__ import annotations

import asyncio
import time

import pytest

from backpressure import FixedController
from eventbus import Bus, BusConfig, Context, Event, Message
from eventbus._metrics import CommitRecorder
from eventbus.publish import COMMIT_TARGET_LATENCY, LogWriter
from storage import MemoryStorage, NewRecord, Receipt, WriteBatch

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
