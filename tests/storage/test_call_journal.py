"""The call journal: a death is charged to exactly the events whose handler call was
running, once, whatever happens to the process afterwards. On SQLite (a PostgreSQL
log records its calls in flight in the log itself: tests/storage/test_pg_leases.py)."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from eventbus.storage import (
    PROCESS_DIED,
    MemoryStorage,
    NewRecord,
    RetryRecord,
    SQLiteStorage,
    Storage,
    SubscriptionInfo,
    WriteBatch,
)
from eventbus.storage._calls import CallJournal, read_journal

pytestmark = pytest.mark.anyio


def _records(n: int) -> list[NewRecord]:
    return [NewRecord(f"id-{i}", "t", f"k{i}", b"\x01", None, time.time()) for i in range(n)]


class Log:
    """One log, opened again and again, and where its call journal lies."""

    def __init__(self, backend: str, tmp_path: Path) -> None:
        self.backend = backend
        self.tmp_path = tmp_path
        self.path = tmp_path / "log.db"
        self.journal = Path(f"{self.path}-calls")

    def store(self) -> Storage:
        return SQLiteStorage(self.path)

    async def opened(self) -> Storage:
        store = self.store()
        await store.open()
        return store

    def die(self) -> Log:
        """What a SIGKILL leaves behind, as a log to open again: a copy of the
        database, its WAL and the call journal (the open log's own files are closed
        cleanly afterwards)."""
        dead = Log.__new__(Log)
        dead.backend, dead.tmp_path = self.backend, self.tmp_path
        dead.path = self.tmp_path / "dead.db"
        dead.journal = Path(f"{dead.path}-calls")
        for suffix in ("", "-wal", "-calls"):
            if Path(f"{self.path}{suffix}").exists():
                shutil.copy(f"{self.path}{suffix}", f"{dead.path}{suffix}")
        return dead


@pytest.fixture
def log(tmp_path: Path) -> Log:
    return Log("sqlite", tmp_path)


async def _dying_log(log: Log) -> Log:
    """A log whose process died with calls on events 2 (fresh), 3 (in the retry lane)
    and 4 (done ahead of the cursor, its call not yet ended) in flight; 5 was buffered
    but its call had not started."""
    store = await log.opened()
    receipts = await store.commit(
        WriteBatch(
            appends=_records(5),
            subscriptions=[SubscriptionInfo("s", ("t",), 0, time.time())],
        )
    )
    assert [r.seq for r in receipts] == [1, 2, 3, 4, 5]
    (third,) = await store.read(2, 3, None, 1)
    await store.commit(
        WriteBatch(
            acks={"s": 1},
            retries=[RetryRecord("s", third, 2, time.time(), time.time(), "x.Boom", "boom")],
            done=[("s", 4, 4)],
        )
    )
    slots = store.calls("s", 3, 1)
    slots.started(0, [2])
    slots.started(1, [3])
    slots.started(2, [4])
    dead = log.die()  # the process dies here
    await store.close()
    return dead


async def _lane(log: Log) -> dict[int, RetryRecord]:
    store = await log.opened()
    try:
        return {r.record.seq: r for r in await store.retries("s")}
    finally:
        await store.close()


async def test_a_death_counts_one_attempt_for_exactly_the_calls_in_flight(log: Log) -> None:
    lane = await _lane(await _dying_log(log))
    assert sorted(lane) == [2, 3]  # 4 was done already; 5 had not started
    assert lane[2].attempt == 2
    assert lane[3].attempt == 3
    assert {r.error_type for r in lane.values()} == {PROCESS_DIED}
    assert lane[3].error_message == "process died while handling (attempt 2)"
    assert not any(r.running for r in lane.values())


async def test_a_journal_is_charged_once_even_if_the_process_dies_again_at_once(
    log: Log,
) -> None:
    dead = await _dying_log(log)
    old_journal = dead.journal.read_bytes()
    first = await _lane(dead)
    # The process died again right after the charge committed, before the new
    # journal replaced the old one: the next open finds the old journal again.
    dead.journal.write_bytes(old_journal)
    second = await _lane(dead)
    assert {s: r.attempt for s, r in second.items()} == {s: r.attempt for s, r in first.items()}


async def test_calls_that_ended_are_not_charged_and_a_clean_close_leaves_nothing(
    log: Log,
) -> None:
    store = await log.opened()
    await store.commit(
        WriteBatch(appends=_records(2), subscriptions=[SubscriptionInfo("s", ("t",), 0, 0.0)])
    )
    slots = store.calls("s", 2, 4)
    slots.started(0, [1, 2])
    slots.ended(0)
    await store.close()
    _, inflight = read_journal(str(log.journal)) or (0, {})
    assert inflight == {}
    assert await _lane(log) == {}


@pytest.mark.parametrize("damage", ["empty", "foreign", "truncated"])
async def test_a_damaged_journal_is_ignored(log: Log, damage: str) -> None:
    dead = await _dying_log(log)
    journal = dead.journal
    data = journal.read_bytes()
    journal.write_bytes(
        {"empty": b"", "foreign": b"not a journal" * 100, "truncated": data[: len(data) // 2]}[
            damage
        ]
    )
    lane = await _lane(dead)
    assert lane[3].attempt == 2  # only what the log itself says
    assert lane[3].error_type == "x.Boom"


async def test_attempts_marked_running_by_an_earlier_version_count_as_deaths(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log.db"
    store = SQLiteStorage(path)
    await store.open()
    await store.commit(
        WriteBatch(appends=_records(1), subscriptions=[SubscriptionInfo("s", ("t",), 0, 0.0)])
    )
    (first,) = await store.read(0, 1, None, 1)
    await store.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(
        "INSERT INTO retries VALUES ('s', 1, ?, 't', 'k0', x'01', NULL, 0, 2, 0, 0,"
        " 'x.Boom', 'boom', '', 1)",
        (first.id,),
    )
    conn.close()
    lane = await _lane(Log("sqlite", tmp_path))
    assert (lane[1].attempt, lane[1].error_type, lane[1].running) == (3, PROCESS_DIED, False)


def test_a_slot_holds_at_most_its_width(tmp_path: Path) -> None:
    journal = CallJournal(str(tmp_path / "j"), 7)
    try:
        slots = journal.region("s", 1, 2)
        slots.started(0, [1, 2])
        with pytest.raises(ValueError, match="cannot hold 3 events"):
            slots.started(0, [1, 2, 3])
        assert read_journal(str(tmp_path / "j")) == (7, {"s": [1, 2]})
    finally:
        journal.close()


async def test_the_memory_log_remembers_no_calls() -> None:
    slots = MemoryStorage().calls("s", 4, 1)
    slots.started(0, [1])
    slots.ended(0)
