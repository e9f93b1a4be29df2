"""The SQLite log under bad files, contention, cancellation and sustained load."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

import aiosqlite
import anyio
import pytest

from eventbus.storage import (
    SCHEMA_VERSION,
    CorruptLog,
    DeadRecord,
    LogLocked,
    NewRecord,
    NotALog,
    Record,
    SchemaTooNew,
    SQLiteStorage,
    StepRecord,
    StorageError,
    WriteBatch,
)

pytestmark = pytest.mark.anyio


def records(n: int, size: int = 16) -> list[NewRecord]:
    now = time.time()
    return [NewRecord(f"id-{i}", "t", None, b"x" * size, None, now) for i in range(n)]


async def test_a_text_file_is_rejected_as_not_a_log(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("hello, this is not a database\n" * 10)
    with pytest.raises(NotALog, match="not a SQLite database"):
        await SQLiteStorage(path).open()
    assert path.read_text().startswith("hello")  # untouched


async def test_a_foreign_sqlite_database_is_rejected_and_left_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
    with pytest.raises(NotALog, match="users"):
        await SQLiteStorage(path).open()
    with sqlite3.connect(path) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert names == {"users"}


async def test_a_damaged_file_gives_corrupt_log(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = SQLiteStorage(path)
    await store.open()
    await store.commit(WriteBatch(appends=records(200, 100)))
    await store.close()
    data = bytearray(path.read_bytes())
    data[100:4096] = os.urandom(4096 - 100)  # smash the first page after the header
    path.write_bytes(bytes(data))
    with pytest.raises((CorruptLog, NotALog)):
        await SQLiteStorage(path).open()


async def test_a_log_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = SQLiteStorage(path)
    await store.open()
    await store.close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaTooNew, match="upgrade eventbus") as info:
        await SQLiteStorage(path).open()
    assert info.value.found == SCHEMA_VERSION + 1


async def test_a_log_from_before_step_deaths_were_counted_keeps_its_checkpoints(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log.db"
    store = SQLiteStorage(path)
    await store.open()
    running = StepRecord("w1", 0, "charge", "running", 3, time.time())
    await store.commit(WriteBatch(steps=[running]))
    await store.close()
    with sqlite3.connect(path) as conn:  # as schema version 4 wrote it
        conn.execute("ALTER TABLE workflow_steps DROP COLUMN died")
        conn.execute("DROP TABLE workflow_claims")  # version 7's
        conn.execute("PRAGMA user_version = 4")
    conn.close()
    store = SQLiteStorage(path)
    await store.open()
    try:
        assert await store.steps("w1") == [running]  # no death counted yet
        await store.commit(
            WriteBatch(steps=[StepRecord("w1", 0, "charge", "running", 4, 0.0, died=1)])
        )
        assert [s.died for s in await store.steps("w1")] == [1]
    finally:
        await store.close()


async def test_a_second_owner_is_refused_while_the_first_holds_the_log(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    first = SQLiteStorage(path)
    await first.open()
    try:
        with pytest.raises(LogLocked, match=f"pid {os.getpid()}"):
            await SQLiteStorage(path).open()
        # Inspection stays possible.
        reader = SQLiteStorage(path, read_only=True)
        await reader.open()
        assert (await reader.stats()).head == 0
        await reader.close()
    finally:
        await first.close()
    second = SQLiteStorage(path)
    await second.open()
    await second.close()


async def test_open_waits_out_a_busy_database(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "log.db"
    store = SQLiteStorage(path)
    await store.open()
    await store.close()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")

    class ReleaseOnRetry(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "busy while opening" in record.getMessage() and blocker.in_transaction:
                blocker.execute("ROLLBACK")

    handler = ReleaseOnRetry()
    logging.getLogger("eventbus.storage").addHandler(handler)
    try:
        store = SQLiteStorage(path, busy_timeout=0.05, open_timeout=10)
        await store.open()
        await store.commit(WriteBatch(appends=records(1)))
        await store.close()
    finally:
        logging.getLogger("eventbus.storage").removeHandler(handler)
        blocker.close()


async def test_open_gives_up_on_a_database_that_stays_busy(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = SQLiteStorage(path)
    await store.open()
    await store.close()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StorageError, match="locked"):
            await SQLiteStorage(path, busy_timeout=0.01, open_timeout=0.2).open()
    finally:
        blocker.close()


def count_events(path: Path) -> int:
    other = sqlite3.connect(path, isolation_level=None, timeout=0.5)
    try:
        other.execute("BEGIN IMMEDIATE")  # the write lock is free
        other.execute("ROLLBACK")
        return int(other.execute("SELECT count(*) FROM events").fetchone()[0])
    finally:
        other.close()


async def test_a_transaction_failing_half_way_rolls_back_and_releases_the_lock(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log.db"
    store = SQLiteStorage(path)
    await store.open()
    await store.commit(WriteBatch(appends=records(3)))
    unbindable = DeadRecord(
        "s", Record(1, "id", "t", None, b"", None, 0.0), 1, object(), "m", "tb", 0.0, 0.0
    )  # type: ignore[arg-type]
    with pytest.raises(StorageError):
        # The events are inserted first, then the dead letter fails to bind.
        await store.commit(WriteBatch(appends=records(5), dead=[unbindable]))
    assert store.head == 3
    assert count_events(path) == 3
    (receipt,) = await store.commit(WriteBatch(appends=records(1)))
    assert receipt.seq == 4
    await store.close()


async def test_a_commit_cancelled_while_its_transaction_runs_leaves_a_consistent_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import eventbus.storage._statements as sqlite_module

    path = tmp_path / "log.db"
    store = SQLiteStorage(path)
    await store.open()
    await store.commit(WriteBatch(appends=records(3)))
    inside = threading.Event()
    proceed = threading.Event()
    real_write = sqlite_module.write_batch

    def stalled_write(conn: sqlite3.Connection, batch: WriteBatch, head: int):  # type: ignore[no-untyped-def]
        result = real_write(conn, batch, head)
        inside.set()
        assert proceed.wait(10)
        return result

    monkeypatch.setattr(sqlite_module, "write_batch", stalled_write)
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.commit, WriteBatch(appends=records(5)))
        assert await anyio.to_thread.run_sync(inside.wait, 10)
        tg.cancel_scope.cancel()
        proceed.set()
    monkeypatch.undo()
    # The transaction was already running in SQLite's thread: it finished, and the
    # storage re-read its head from the file instead of trusting memory.
    assert store.head == count_events(path) == 8
    (receipt,) = await store.commit(WriteBatch(appends=records(1)))
    assert receipt.seq == 9
    await store.close()


def test_the_aiosqlite_hook_for_one_hop_transactions_exists() -> None:
    # The log's connections run each transaction through the queue that aiosqlite's
    # own methods use (a protected method of the class they extend).
    assert callable(getattr(aiosqlite.Connection, "_execute", None))
    assert isinstance(getattr(aiosqlite.Connection, "_conn", None), property)


async def test_the_wal_stays_bounded_while_a_reader_keeps_tailing(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = SQLiteStorage(path, checkpoint_bytes=1 << 20)
    await store.open()
    largest = 0
    stop = anyio.Event()

    async def tail() -> None:
        pos = 0
        while not stop.is_set():
            rows = await store.read(pos, store.head, None, 500)
            if rows:
                pos = rows[-1].seq
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(tail)
        for _ in range(60):  # ~15 MB through the WAL
            await store.commit(WriteBatch(appends=records(250, 1000)))
            largest = max(largest, os.stat(str(path) + "-wal").st_size)
        stop.set()
    await store.close()
    assert largest < 8 * (1 << 20), f"WAL grew to {largest} bytes"
    wal = anyio.Path(str(path) + "-wal")
    assert not await wal.exists() or (await wal.stat()).st_size == 0
