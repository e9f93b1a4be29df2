"""The SQLite log under bad files, contention, cancellation and sustained load."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

import anyio
import pytest

from storage import (
    SCHEMA_VERSION,
    CorruptLog,
    LogLocked,
    NewRecord,
    NotALog,
    SchemaTooNew,
    SQLiteStorage,
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
    logging.getLogger("storage._sqlite").addHandler(handler)
    try:
        store = SQLiteStorage(path, busy_timeout=0.05, open_timeout=10)
        await store.open()
        await store.commit(WriteBatch(appends=records(1)))
        await store.close()
    finally:
        logging.getLogger("storage._sqlite").removeHandler(handler)
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


async def test_a_commit_cancelled_mid_transaction_rolls_back_and_releases_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "log.db"
    store = SQLiteStorage(path)
    await store.open()
    await store.commit(WriteBatch(appends=records(3)))
    conn = store._writer
    assert conn is not None
    inside = anyio.Event()
    real_executemany = conn.executemany

    async def stalled_executemany(sql: str, rows: object) -> object:
        result = await real_executemany(sql, rows)  # type: ignore[arg-type]
        inside.set()
        await anyio.sleep_forever()
        return result

    monkeypatch.setattr(conn, "executemany", stalled_executemany)
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.commit, WriteBatch(appends=records(5)))
        await inside.wait()
        tg.cancel_scope.cancel()
    monkeypatch.undo()
    assert store.head == 3
    other = sqlite3.connect(path, isolation_level=None, timeout=0.5)
    try:
        other.execute("BEGIN IMMEDIATE")  # the write lock is free again
        other.execute("ROLLBACK")
        assert other.execute("SELECT count(*) FROM events").fetchone()[0] == 3
    finally:
        other.close()
    (receipt,) = await store.commit(WriteBatch(appends=records(1)))
    assert receipt.seq == 4
    await store.close()


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
