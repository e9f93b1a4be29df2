"""A publish that nothing is queued ahead of commits at once on the loop's thread
(``Storage.commit_now``): never blocking the loop on a lock held elsewhere, never
taking the group commit away from concurrent publishers, never starving the loop, and
never skipping a ``commit`` that a test or a subclass put in the way."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path

import anyio
import pytest

from eventbus import Bus, BusConfig, Context, Event
from eventbus.storage import MemoryStorage, NewRecord, Receipt, SQLiteStorage, WriteBatch
from eventbus.storage import StorageFull as LogFull

pytestmark = pytest.mark.anyio


def record(i: int, payload: bytes = b"\x01") -> NewRecord:
    return NewRecord(f"id-{i}", "t", None, payload, None, time.time())


async def test_a_lock_held_elsewhere_sends_the_commit_to_the_thread_not_the_loop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "app.db"
    async with Bus.open(path, config=BusConfig(busy_timeout=6.0)) as bus:
        await bus.publish("t", {"n": 0})  # the log exists, its schema committed
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # an operator's shell holding the write lock
        try:
            before = time.monotonic()
            publish = asyncio.ensure_future(bus.publish("t", {"n": 1}))
            for _ in range(5):
                await asyncio.sleep(0)
            # Had the commit waited for the lock on the loop's thread, the loop would
            # have stood still for the whole busy timeout before coming back here.
            assert time.monotonic() - before < 3.0
            assert not publish.done()
        finally:
            other.execute("ROLLBACK")
            other.close()
        with anyio.fail_after(10):
            receipt = await publish
        assert receipt.seq == 2
    async with Bus.open(path) as bus:
        assert (await bus.stats()).head == 2


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_commit_put_in_the_way_sees_every_commit(tmp_path: Path, kind: str) -> None:
    """Fault injection (a subclass, or a function set on the instance) must see every
    transaction, so ``commit_now`` steps aside for it."""
    seen: list[int] = []

    class Counting(MemoryStorage):
        async def commit(self, batch: WriteBatch) -> list[Receipt]:
            seen.append(len(batch.appends))
            return await super().commit(batch)

    if kind == "memory":
        log: MemoryStorage | SQLiteStorage = Counting()
    else:
        log = SQLiteStorage(tmp_path / "app.db")
        plain = log.commit

        async def counting(batch: WriteBatch) -> list[Receipt]:
            seen.append(len(batch.appends))
            return await plain(batch)

        log.commit = counting  # type: ignore[method-assign]
    async with Bus.open(":memory:", storage=log) as bus:
        assert log.commit_now(WriteBatch(appends=[record(1)])) is None
        for i in range(5):
            await bus.publish("t", {"n": i})
    assert sum(seen) == 5


async def test_a_plain_sqlite_log_commits_small_batches_at_once(tmp_path: Path) -> None:
    log = SQLiteStorage(tmp_path / "app.db")
    await log.open()
    try:
        receipts = log.commit_now(WriteBatch(appends=[record(1), record(2)]))
        assert receipts is not None
        assert [r.seq for r in receipts] == [1, 2]
        assert log.head == 2
        big = WriteBatch(appends=[record(i) for i in range(3, 303)])
        assert log.commit_now(big) is None  # too large for the loop's thread
        assert log.head == 2
        assert [r.seq for r in await log.commit(big)] == list(range(3, 303))
        assert [r.seq for r in await log.read(0, 400, None, 500)] == list(range(1, 303))
    finally:
        await log.close()


async def test_concurrent_publishers_still_share_group_commits(tmp_path: Path) -> None:
    async with Bus.open(tmp_path / "app.db") as bus:
        before = bus.metrics().commits

        async def producer(p: int) -> None:
            for i in range(20):
                await bus.publish("t", {"p": p, "i": i})

        async with anyio.create_task_group() as tg:
            for p in range(64):
                tg.start_soon(producer, p)
        commits = bus.metrics().commits - before
    # 1,280 events: one group commit per round of 64, plus the one publish of each
    # round committed at once; never a commit per event.
    assert commits <= 1280 // 8


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_a_producer_that_never_waits_lets_subscriptions_run(
    tmp_path: Path, kind: str
) -> None:
    """Committing at once (appending at once, in memory) means a publish need not wait
    for anything; the producer still yields to the loop every few dozen publishes, so
    handlers keep up with it rather than run only once it stops."""
    async with Bus.open(tmp_path / "app.db" if kind == "sqlite" else ":memory:") as bus:
        handled_during: list[int] = []
        published = 0

        @bus.subscribe("t", name="s")
        async def handle(event: Event[dict[str, int]], ctx: Context) -> None:
            handled_during.append(published)

        await bus.drain(timeout=10)
        for i in range(500):
            await bus.publish("t", {"i": i})
            published += 1
        # Events were handled while the producer still had most of its publishes ahead.
        assert handled_during
        assert handled_during[0] < 100
        await bus.drain(timeout=10)
        assert len(handled_during) == 500


async def test_the_wal_stays_bounded_without_automatic_checkpoints(tmp_path: Path) -> None:
    """Commits on the loop's thread never run SQLite's automatic checkpoint (it would
    hold the loop for milliseconds); the log checkpoints on its thread instead."""
    path = tmp_path / "app.db"
    payload = {"pad": "x" * 4000}
    async with Bus.open(path) as bus:
        for _ in range(4000):  # about 16 MB, committed one event at a time
            await bus.publish("t", payload)
        wal = os.stat(f"{path}-wal").st_size
    assert wal < 12 * 1024 * 1024, wal


async def test_full_durability_never_fsyncs_on_the_loop(tmp_path: Path) -> None:
    log = SQLiteStorage(tmp_path / "app.db", durability="full")
    await log.open()
    try:
        assert log.commit_now(WriteBatch(appends=[record(1)])) is None
        assert [r.seq for r in await log.commit(WriteBatch(appends=[record(1)]))] == [1]
    finally:
        await log.close()


async def test_a_storage_that_never_commits_at_once_is_never_asked(tmp_path: Path) -> None:
    """Full durability (and PostgreSQL) say so up front (``commits_now``): a lone
    publish then goes straight to the writer, without taking the subscriptions'
    pending writes along only to give them back."""
    asked = 0

    class Counting(SQLiteStorage):
        def commit_now(self, batch: WriteBatch) -> list[Receipt] | None:
            nonlocal asked
            asked += 1
            return super().commit_now(batch)

    for durability, expected in (("full", False), ("normal", True)):
        asked = 0
        log = Counting(tmp_path / f"{durability}.db", durability=durability)
        async with Bus.open(":memory:", storage=log) as bus:
            assert log.commits_now is expected

            @bus.subscribe("t", name="s")
            async def handle(event: Event[dict[str, int]], ctx: Context) -> None:
                ctx.state.set(str(event.payload["n"]), 1)

            for n in range(20):
                await bus.publish("t", {"n": n})
            await bus.drain(timeout=10)
            assert await bus.state("s").get("19") == 1
        assert (asked > 0) is expected, (durability, asked)


async def test_a_failed_commit_at_once_falls_back_and_loses_no_acknowledgement() -> None:
    """A commit made at once that fails (here: the disk full, once) writes nothing;
    the publish goes to the writer, and the acknowledgements it had taken along
    are committed there, not dropped."""

    class FullOnce(MemoryStorage):
        fail_next = False

        def commit_now(self, batch: WriteBatch) -> list[Receipt] | None:
            if self.fail_next:
                self.fail_next = False
                raise LogFull("the disk is full")
            return super().commit_now(batch)

    log = FullOnce()
    async with Bus.open(":memory:", storage=log) as bus:
        seen = asyncio.Event()

        @bus.subscribe("t", name="s")
        async def handle(event: Event[dict[str, int]], ctx: Context) -> None:
            ctx.state.set(str(event.payload["n"]), 1)
            seen.set()

        await bus.drain(timeout=10)
        await bus.publish("t", {"n": 1})
        with anyio.fail_after(10):
            await seen.wait()  # its acknowledgement is now pending
        log.fail_next = True
        receipt = await bus.publish("t", {"n": 2})
        assert receipt.seq == 2
        assert not log.fail_next  # the commit at once was tried, and failed
        await bus.drain(timeout=10)
        view = bus.state("s")
        assert (await view.get("1"), await view.get("2")) == (1, 1)
        assert (await bus.stats()).lag == {"s": 0}


async def test_a_large_batch_is_never_written_on_the_loops_thread(tmp_path: Path) -> None:
    """A few rows can still be megabytes (events up to max_event_bytes, a large
    ``ctx.state`` value): written on the loop's thread, sixteen 1 MB events held it
    for over 100 ms. Such a batch goes to the connection's thread."""
    log = SQLiteStorage(tmp_path / "app.db")
    await log.open()
    try:
        big = b"x" * (1024 * 1024)
        assert log.commit_now(WriteBatch(appends=[record(1, big)])) is None
        many = WriteBatch(appends=[record(i, b"x" * 20_000) for i in range(1, 17)])
        assert log.commit_now(many) is None
        state = WriteBatch(state=[("s", "k", big)])
        assert log.commit_now(state) is None
        assert log.head == 0  # nothing was written
        (receipt,) = log.commit_now(WriteBatch(appends=[record(1, b"x" * 1000)])) or []
        assert receipt.seq == 1
        assert [r.seq for r in await log.commit(many)] == list(range(2, 18))
    finally:
        await log.close()


async def test_large_state_values_do_not_let_the_wal_grow(tmp_path: Path) -> None:
    """The checkpoint on the connection's thread comes after about as much WAL as
    SQLite's automatic one would (4 MB), whatever a commit writes: counting only the
    appended events, acknowledgements carrying 32 KB state values grew it past 13 MB
    here (past 60 MB with 60 KB values); 2 MB now."""
    path = tmp_path / "app.db"
    value = "v" * 32_000
    async with Bus.open(path, config=BusConfig(reconcile_interval=0)) as bus:

        @bus.subscribe("t", name="s")
        async def handle(event: Event[dict[str, int]], ctx: Context) -> None:
            ctx.state.set(str(event.payload["i"] % 10), value)

        largest = 0
        for i in range(1200):
            await bus.publish("t", {"i": i})
            if i % 20 == 0:
                largest = max(largest, os.stat(f"{path}-wal").st_size)
        await bus.drain(timeout=10)
    assert largest < 8 * 1024 * 1024, largest


async def test_a_small_checkpoint_bytes_bounds_the_wal_of_a_lone_producer(
    tmp_path: Path,
) -> None:
    """``SQLiteStorage(checkpoint_bytes=...)`` truncates the WAL after that much, also
    when every publish commits at once (those used to wait for the 4 MB passive
    checkpoint before the truncating one could run)."""
    path = tmp_path / "app.db"
    log = SQLiteStorage(path, checkpoint_bytes=256 * 1024)
    largest = 0
    async with Bus.open(":memory:", storage=log) as bus:
        for i in range(1500):
            await bus.publish("t", {"i": i, "pad": "x" * 1000})
            largest = max(largest, os.stat(f"{path}-wal").st_size)
    assert largest < 1024 * 1024, largest
