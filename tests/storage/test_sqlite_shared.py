"""A SQLite log shared by the processes of one machine: each appends (numbering after
whatever the others appended), one at a time dispatches, and a process that owns the
log alone never mixes with processes that share it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from eventbus.storage import (
    LeaseLost,
    LogLocked,
    NewRecord,
    SharedSQLiteStorage,
    SQLiteStorage,
    SubscriptionInfo,
    WriteBatch,
)

pytestmark = pytest.mark.anyio


def rec(i: int, ikey: str | None = None) -> NewRecord:
    return NewRecord(f"id-{i}", "t", f"k{i}", b"\x01", None, time.time(), ikey)


async def test_processes_sharing_a_file_append_in_turn_and_number_densely(
    log_path: Path,
) -> None:
    a, b = SharedSQLiteStorage(log_path), SharedSQLiteStorage(log_path)
    await a.open()
    await b.open()
    try:
        (first,) = await a.commit(WriteBatch(appends=[rec(1)]))
        (second,) = await b.commit(WriteBatch(appends=[rec(2)]))
        # a's idea of the head is one behind: it numbers after the file's head.
        third, fourth = await a.commit(WriteBatch(appends=[rec(3), rec(4, "ik")]))
        (again,) = await b.commit(WriteBatch(appends=[rec(5, "ik")]))
        assert [first.seq, second.seq, third.seq, fourth.seq] == [1, 2, 3, 4]
        assert (again.seq, again.duplicate) == (4, True)
        assert [r.seq for r in await b.read(0, 10, None, 10)] == [1, 2, 3, 4]
        # b notices a's appends when it looks.
        await b.poll()
        assert b.head == 4
    finally:
        await a.close()
        await b.close()


async def test_one_process_at_a_time_dispatches(log_path: Path) -> None:
    a, b = SharedSQLiteStorage(log_path), SharedSQLiteStorage(log_path)
    await a.open()
    await b.open()
    try:
        await a.commit(
            WriteBatch(appends=[rec(1)], subscriptions=[SubscriptionInfo("s", ("t",), 0, 0.0)])
        )
        assert not a.dispatching  # publishing alone takes nothing
        claim = await a.acquire("s", 1)
        assert (claim.lease.partitions, claim.starts) == ((0,), (0,))
        assert a.dispatching
        assert (await b.acquire("s", 1)).lease.partitions == ()
        assert (await b.heartbeat("s", None)).free == 1  # it keeps trying
        with pytest.raises(LeaseLost):
            await b.commit(WriteBatch(acks={"s": 1}, leases={"s": claim.lease}))
        await a.commit(WriteBatch(acks={"s": 1}, leases={"s": claim.lease}))
        await a.release("s", None)  # a stops dispatching: b may
        taken = await b.acquire("s", 1)
        assert (taken.lease.partitions, taken.starts) == ((0,), (1,))
    finally:
        await a.close()
        await b.close()


async def test_a_process_owning_the_file_alone_and_sharing_ones_refuse_each_other(
    log_path: Path,
) -> None:
    alone = SQLiteStorage(log_path)
    await alone.open()
    try:
        with pytest.raises(LogLocked) as info:
            await SharedSQLiteStorage(log_path).open()
        assert info.value.owner == f"pid {os.getpid()}"
        assert "shared=True" in str(info.value)
    finally:
        await alone.close()
    shared = SharedSQLiteStorage(log_path)
    await shared.open()
    try:
        with pytest.raises(LogLocked, match="processes sharing it"):
            await SQLiteStorage(log_path).open()
    finally:
        await shared.close()
    again = SQLiteStorage(log_path)
    await again.open()
    await again.close()
