"""How a SQLite log stores an event's row: a group commit of events of every shape
(with and without a key or headers) fills the events table as tightly as the same
events committed one at a time, in seq order."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from eventbus.storage import NewRecord, SQLiteStorage, WriteBatch

pytestmark = pytest.mark.anyio


def mixed(n: int) -> list[NewRecord]:
    return [
        NewRecord(
            f"id-{i:08d}",
            "t",
            None if i % 3 == 0 else f"k{i % 10}",
            b"x" * 100,
            b"\x81\xa1h\xa1v" if i % 3 == 1 else None,
            1.7e9 + i,
        )
        for i in range(n)
    ]


def events_pages(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        (pages,) = conn.execute("SELECT count(*) FROM dbstat WHERE name = 'events'").fetchone()
    finally:
        conn.close()
    return int(pages)


async def test_a_group_commit_of_mixed_shapes_fills_pages_as_in_seq_order(
    tmp_path: Path,
) -> None:
    events = mixed(256 * 16)
    grouped = SQLiteStorage(tmp_path / "grouped.db")
    await grouped.open()
    try:
        for i in range(0, len(events), 256):
            await grouped.commit(WriteBatch(appends=events[i : i + 256]))
    finally:
        await grouped.close()
    alone = SQLiteStorage(tmp_path / "alone.db")
    await alone.open()
    try:
        for record in events:
            await alone.commit(WriteBatch(appends=[record]))
    finally:
        await alone.close()
    in_groups, one_by_one = (
        events_pages(tmp_path / "grouped.db"),
        events_pages(tmp_path / "alone.db"),
    )
    assert in_groups <= one_by_one * 1.02, (in_groups, one_by_one)
