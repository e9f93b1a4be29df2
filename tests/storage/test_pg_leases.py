"""Several processes on one PostgreSQL log, at the storage level: fair shares of the
partitions, leases fenced by epoch and expiry, deaths charged by whoever takes an
expired partition over, reads of the partitions held, and the announcements that wake
the others."""

from __future__ import annotations

import time

import anyio
import asyncpg
import pytest

from eventbus.storage import (
    PROCESS_DIED,
    LeaseLost,
    NewRecord,
    Notice,
    PostgresStorage,
    RetryRecord,
    SubscriptionInfo,
    WriteBatch,
)
from eventbus.storage._pg_url import parse
from tests import postgres

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


def rec(i: int, key: str | None = None) -> NewRecord:
    return NewRecord(f"id-{i}", "t", key if key is not None else f"k{i}", b"\x01", None, 0.0)


async def _opened(url: str, lease: float = 30.0) -> PostgresStorage:
    store = PostgresStorage(url, partitions=4, lease=lease)
    await store.open()
    return store


async def _registered(store: PostgresStorage, events: int = 0) -> None:
    await store.commit(
        WriteBatch(
            appends=[rec(i) for i in range(events)],
            subscriptions=[SubscriptionInfo("s", ("t",), 0, 0.0)],
        )
    )


async def test_the_partitions_are_shared_fairly_among_the_processes(pg_url: str) -> None:
    a, b = await _opened(pg_url), await _opened(pg_url)
    try:
        await _registered(a)
        share = await a.heartbeat("s", None)
        assert (share.target, share.free, share.members) == (4, 4, 1)
        claim = await a.acquire("s", share.target)
        assert claim.lease.partitions == (0, 1, 2, 3)
        assert claim.starts == (0, 0, 0, 0)
        # b joins: each should hold two; a still holds four until it gives two up.
        b_share = await b.heartbeat("s", None)
        assert (b_share.target, b_share.free, b_share.members) == (2, 0, 2)
        assert (await b.acquire("s", 2)).lease.partitions == ()
        a_share = await a.heartbeat("s", claim.lease)
        assert (a_share.held, a_share.target) == ((0, 1, 2, 3), 2)
        await a.release("s", claim.lease.partitions[2:])
        b_claim = await b.acquire("s", 2)
        assert b_claim.lease.partitions == (2, 3)
        assert b_claim.taken_over == ()  # given up on purpose: nothing to charge
        assert all(e == 2 for e in b_claim.lease.epochs)  # each grant bumps the epoch
    finally:
        await a.close()
        await b.close()


async def test_a_write_under_a_lost_lease_is_refused_whole(pg_url: str) -> None:
    a, b = await _opened(pg_url, lease=0.3), await _opened(pg_url)
    try:
        await _registered(a, events=8)
        claim = await a.acquire("s", 4)
        await anyio.sleep(0.4)  # a pauses past its lease; b takes everything over
        taken = await b.acquire("s", 4)
        assert taken.taken_over == (0, 1, 2, 3)
        late = WriteBatch(
            appends=[rec(100)],
            acks={"s": 8},
            state=[("s", "k", b"zombie")],
            leases={"s": claim.lease},
        )
        with pytest.raises(LeaseLost) as info:
            await a.commit(late)
        assert info.value.subscriptions == ("s",)
        assert await a.get_state("s", ["k"]) == {}
        assert (await a.subscriptions())["s"].cursor == 0
        assert a.head == 8  # the outbox event was not appended either
        # The new holder's writes go through, and move only its partitions' cursors.
        await b.commit(
            WriteBatch(acks={"s": 8}, state=[("s", "k", b"b")], leases={"s": taken.lease})
        )
        assert await b.get_state("s", ["k"]) == {"k": b"b"}
        assert (await b.subscriptions())["s"].cursor == 8
    finally:
        await a.close()
        await b.close()


async def test_an_expired_lease_is_neither_renewed_nor_honoured(pg_url: str) -> None:
    a = await _opened(pg_url, lease=0.3)
    try:
        await _registered(a, events=2)
        claim = await a.acquire("s", 4)
        await anyio.sleep(0.4)
        # Nobody took it, but it ran out: the holder must claim it again.
        assert (await a.heartbeat("s", claim.lease)).held == ()
        with pytest.raises(LeaseLost):
            await a.commit(WriteBatch(acks={"s": 2}, leases={"s": claim.lease}))
        again = await a.acquire("s", 4)
        assert again.lease.partitions == (0, 1, 2, 3)
        assert all(e == 2 for e in again.lease.epochs)
    finally:
        await a.close()


async def test_taking_over_charges_a_death_to_exactly_the_calls_in_flight(pg_url: str) -> None:
    a, b = await _opened(pg_url, lease=0.3), await _opened(pg_url)
    try:
        await _registered(a, events=6)
        claim = await a.acquire("s", 4)
        records = await a.read(0, 6, None, 10)
        # 3 waits in the retry lane at attempt 2; 1 is done (the cursor passed it).
        await a.commit(
            WriteBatch(
                acks={"s": 1},
                retries=[RetryRecord("s", records[2], 2, time.time(), time.time(), "x.Boom", "b")],
                leases={"s": claim.lease},
            )
        )
        await a.mark_call(claim.lease, 0, [2], [1], ["k1"])  # fresh, running
        await a.mark_call(claim.lease, 1, [3], [2], ["k2"])  # its second attempt, running
        await a.mark_call(claim.lease, 2, [5], [1], ["k4"])
        await a.mark_call(claim.lease, 2, [6], [1], ["k5"])  # replaced 5 in its slot: 5 ended
        await a.mark_call(claim.lease, 3, [1], [1], ["k0"])  # ended, and its ack committed
        await a.mark_call(claim.lease, 4, [4], [1], ["k3"])
        await a.mark_call(claim.lease, 5, [5], [1], ["k4"], call=7)
        await a.end_calls(claim.lease, [(4, 0), (5, 6)])  # 4 returned; 5 is call 7 now
        await anyio.sleep(0.4)  # a dies: its lease runs out
        taken = await b.acquire("s", 4)
        assert taken.taken_over == (0, 1, 2, 3)
        lane = {r.record.seq: r for r in await b.retries("s")}
        assert sorted(lane) == [2, 3, 5, 6]
        assert (lane[2].attempt, lane[3].attempt, lane[6].attempt) == (2, 3, 2)
        assert {r.error_type for r in lane.values()} == {PROCESS_DIED}
        assert lane[3].error_message == "process died while handling (attempt 2)"
        # Charged once: a second takeover finds nothing more to charge.
        await b.release("s", None)
        await b.acquire("s", 4)
        assert {r.record.seq: r.attempt for r in await b.retries("s")} == {2: 2, 3: 3, 5: 2, 6: 2}
    finally:
        await a.close()
        await b.close()


async def test_a_process_reads_only_its_partitions_past_their_cursors(pg_url: str) -> None:
    a, b = await _opened(pg_url), await _opened(pg_url)
    try:
        await _registered(a, events=40)
        await a.acquire("s", 4)
        await a.release("s", (2, 3))
        mine = (await a.acquire("s", 0)).lease
        theirs = (await b.acquire("s", 4)).lease
        assert (mine.partitions, theirs.partitions) == ((0, 1), (2, 3))
        # a finished its partitions up to 20; b finished nothing.
        await a.commit(WriteBatch(acks={"s": 20}, leases={"s": mine}))
        part = await _partitions(pg_url)
        a_claim = await a.acquire("s", 0)
        assert a_claim.starts == (20, 20)
        read = [r.seq for r in await a.read_claimed(a_claim, 0, 40, None, 100)]
        b_claim = await b.acquire("s", 0)
        b_read = [r.seq for r in await b.read_claimed(b_claim, 0, 40, frozenset({"t"}), 100)]
        assert read == [s for s in range(21, 41) if part[s] in (0, 1)]
        assert b_read == [s for s in range(1, 41) if part[s] in (2, 3)]
        # Paging: a limit, and a range.
        assert [r.seq for r in await a.read_claimed(a_claim, 0, 40, None, 3)] == read[:3]
        assert [r.seq for r in await a.read_claimed(a_claim, read[0], read[2], None, 9)] == (
            read[1:3]
        )
        # Progress is of every partition: b's hold the subscription back.
        assert await a.progress("s", frozenset({"t"}), 40) == (b_read[0] - 1, 0)
        assert await a.progress("s", frozenset({"other"}), 40) == (40, 0)
    finally:
        await a.close()
        await b.close()


async def _partitions(url: str) -> dict[int, int]:
    conn = await asyncpg.connect(
        postgres.SERVER, server_settings={"search_path": parse(url).schema}
    )
    try:
        return {int(s): int(p) for s, p in await conn.fetch("SELECT seq, part FROM events")}
    finally:
        await conn.close()


async def test_appends_and_changes_of_hands_wake_the_other_processes(pg_url: str) -> None:
    a, b = await _opened(pg_url), await _opened(pg_url)
    heard: list[Notice] = []
    woke = anyio.Event()

    def watcher(notice: Notice) -> None:
        heard.append(notice)
        woke.set()

    b.watch(watcher)
    try:
        await _registered(a, events=3)
        with anyio.fail_after(5):
            while Notice("head", "", 3) not in heard:
                await woke.wait()
                woke = anyio.Event()
        assert b.head == 3
        await a.heartbeat("s", None)  # a new member is announced
        with anyio.fail_after(5):
            while Notice("share", "s") not in heard:
                await woke.wait()
                woke = anyio.Event()
        await a.announce("s")  # a retry lane written behind the holders' backs
        with anyio.fail_after(5):
            while Notice("retries", "s") not in heard:
                await woke.wait()
                woke = anyio.Event()
    finally:
        await a.close()
        await b.close()


async def test_the_number_of_partitions_is_the_logs_own(pg_url: str) -> None:
    store = PostgresStorage(pg_url, partitions=4)
    await store.open()
    await store.close()
    again = PostgresStorage(pg_url, partitions=32)
    await again.open()
    try:
        assert again.partitions == 4
    finally:
        await again.close()
    with pytest.raises(ValueError, match="partitions"):
        PostgresStorage(postgres.url_for("x") + "&partitions=0")
    with pytest.raises(ValueError, match="lease"):
        PostgresStorage(postgres.url_for("x") + "&lease=soon")


async def test_the_partition_a_call_is_recorded_in_is_the_one_the_log_reads_it_from(
    pg_url: str,
) -> None:
    """mark_call works an event's partition out in Python: the same as the schema's
    partition_of, for keys of every kind and events without a key."""
    from eventbus.storage._pg_leases import partition_of

    store = await _opened(pg_url)
    keys: list[str | None] = [f"k{i}" for i in range(200)]
    keys += ["", "é", "ключ", "🙂 key", "a" * 300, None, None]
    try:
        conn = await asyncpg.connect(
            postgres.SERVER, server_settings={"search_path": parse(pg_url).schema}
        )
        try:
            rows = await conn.fetch(
                "SELECT partition_of(k, s) FROM unnest($1::text[], $2::bigint[]) AS u(k, s)",
                keys,
                list(range(1000, 1000 + len(keys))),
            )
        finally:
            await conn.close()
        server = [int(r[0]) for r in rows]
        here = [partition_of(k, 1000 + i, store.partitions) for i, k in enumerate(keys)]
        assert here == server
        assert len(set(here)) == store.partitions
    finally:
        await store.close()


async def _raw(url: str) -> asyncpg.Connection[asyncpg.Record]:
    return await asyncpg.connect(
        postgres.SERVER, server_settings={"search_path": parse(url).schema}
    )


async def _blocked(watcher: asyncpg.Connection[asyncpg.Record], blocker: int) -> None:
    """Wait until a session waits for a lock that session ``blocker`` holds (asked of
    the server until so, with a timeout: PostgreSQL tells no one of a lock wait)."""
    with anyio.fail_after(10):
        while not await watcher.fetchval(  # noqa: ASYNC110
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            blocker,
        ):
            await anyio.sleep(0.01)


async def _locked(watcher: asyncpg.Connection[asyncpg.Record], sub: str, part: int) -> bool:
    """Whether another transaction holds the lease row of ``sub``'s ``part``."""
    async with watcher.transaction():
        try:
            await watcher.execute(
                "SELECT 1 FROM partitions WHERE subscription = $1 AND part = $2"
                " FOR NO KEY UPDATE NOWAIT",
                sub,
                part,
            )
        except asyncpg.LockNotAvailableError:
            return True
    return False


async def test_lease_rows_are_locked_in_one_order_so_a_commit_and_a_heartbeat_never_deadlock(
    pg_url: str,
) -> None:
    """Regression: an acknowledgement of two subscriptions (its fence locks their
    lease rows) and the same process's heartbeat (its renewal locks them too) locked
    the rows in two orders and deadlocked; PostgreSQL failed the commit a second later,
    and the late heartbeat could let the lease run out. Every statement that waits for
    lease rows now locks them by (subscription, partition): blocked at a row, it holds
    none after it."""
    a = await _opened(pg_url)
    blocker, watcher = await _raw(pg_url), await _raw(pg_url)
    try:
        await a.commit(
            WriteBatch(
                appends=[rec(i) for i in range(4)],
                subscriptions=[
                    SubscriptionInfo("s", ("t",), 0, 0.0),
                    SubscriptionInfo("u", ("t",), 0, 0.0),
                ],
            )
        )
        # The rows stored in reverse: a scan through the index (whose entries keep
        # pointing at the rows first stored) visits them out of order too.
        async with watcher.transaction():
            await watcher.execute(
                "CREATE TEMP TABLE reversed ON COMMIT DROP AS SELECT * FROM partitions"
            )
            await watcher.execute("DELETE FROM partitions")
            await watcher.execute(
                "INSERT INTO partitions SELECT * FROM reversed"
                " ORDER BY subscription DESC, part DESC"
            )
        s = (await a.acquire("s", 4)).lease
        u = (await a.acquire("u", 4)).lease
        blocker_pid = await blocker.fetchval("SELECT pg_backend_pid()")
        for attempt in ("commit", "heartbeat", "release"):
            # As after a while of updates: the rows' versions stored out of their order.
            for sub in ("u", "s"):
                for part in (3, 2, 1, 0):
                    await watcher.execute(
                        "UPDATE partitions SET cursor = cursor"
                        " WHERE subscription = $1 AND part = $2",
                        sub,
                        part,
                    )
            lock = blocker.transaction()
            await lock.start()
            await blocker.execute(
                "SELECT 1 FROM partitions WHERE subscription = 's' AND part = 0 FOR NO KEY UPDATE"
            )
            async with anyio.create_task_group() as tg:
                if attempt == "commit":  # "u" first: the fence gets the rows out of order
                    tg.start_soon(
                        a.commit, WriteBatch(acks={"u": 1, "s": 1}, leases={"u": u, "s": s})
                    )
                elif attempt == "heartbeat":
                    tg.start_soon(a.heartbeat, "s", s)
                else:
                    tg.start_soon(a.release, "s", None)
                await _blocked(watcher, blocker_pid)
                later = [("s", 3), ("u", 0), ("u", 3)] if attempt == "commit" else [("s", 3)]
                assert [p for p in later if await _locked(watcher, *p)] == [], attempt
                await lock.rollback()
    finally:
        await blocker.close()
        await watcher.close()
        await a.close()
