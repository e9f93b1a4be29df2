"""One contract suite, run against every Storage backend."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from eventbus.storage import (
    DeadRecord,
    MemoryStorage,
    NewRecord,
    PostgresStorage,
    Record,
    RetryRecord,
    SQLiteStorage,
    StepRecord,
    Storage,
    SubscriptionInfo,
    WorkflowRecord,
    WriteBatch,
)
from tests import postgres

pytestmark = pytest.mark.anyio


def rec(i: int, topic: str = "t", ikey: str | None = None, created_at: float | None = None):
    return NewRecord(
        id=f"id-{i}",
        topic=topic,
        key=f"k{i % 3}",
        payload=f"p{i}".encode(),
        headers=None,
        created_at=time.time() if created_at is None else created_at,
        idempotency_key=ikey,
    )


def make_log(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """A new, empty log of ``backend`` (``"postgres"``: in a fresh schema)."""
    if backend == "memory":
        return MemoryStorage()
    if backend == "sqlite":
        return SQLiteStorage(tmp_path / "log.db")
    return PostgresStorage(request.getfixturevalue("pg_url"))


BACKENDS = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
async def log(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    store = make_log(request.param, request, tmp_path)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def test_appends_get_dense_increasing_sequence_numbers(log: Storage) -> None:
    receipts = await log.commit(WriteBatch(appends=[rec(i) for i in range(5)]))
    assert [r.seq for r in receipts] == [1, 2, 3, 4, 5]
    assert [r.id for r in receipts] == [f"id-{i}" for i in range(5)]
    assert log.head == 5
    more = await log.commit(WriteBatch(appends=[rec(9)]))
    assert more[0].seq == 6


async def test_a_known_idempotency_key_returns_the_original_receipt(log: Storage) -> None:
    (first,) = await log.commit(WriteBatch(appends=[rec(1, ikey="a")]))
    dup, fresh, dup_in_batch = await log.commit(
        WriteBatch(appends=[rec(2, ikey="a"), rec(3, ikey="b"), rec(4, ikey="b")])
    )
    assert (dup.seq, dup.id, dup.duplicate) == (first.seq, first.id, True)
    assert not fresh.duplicate
    assert (dup_in_batch.seq, dup_in_batch.duplicate) == (fresh.seq, True)
    assert log.head == 2


async def test_every_field_comes_back_as_written_whatever_the_events_shape(
    log: Storage,
) -> None:
    """Events with and without a key, headers and an idempotency key, payloads empty,
    small and around 16 KiB and beyond, mixed in one commit and committed alone."""
    shapes = [
        (key, headers, size, ikey)
        for key in (None, "k")
        for headers in (None, b"\x81\xa1h\xa1v")
        for size in (0, 9, 16 * 1024, 16 * 1024 + 1, 100_000)
        for ikey in (None, "fresh")
    ]
    written = [
        NewRecord(
            id=f"id-{i}",
            topic="t",
            key=key,
            payload=bytes([i % 251]) * size,
            headers=headers,
            created_at=1_700_000_000.0 + i,
            idempotency_key=None if ikey is None else f"ikey-{i}",
        )
        for i, (key, headers, size, ikey) in enumerate(shapes)
    ]
    random.Random(7).shuffle(written)
    half = len(written) // 2
    # Every shape of row is in the one commit of many, and among those alone.
    for part in (written[:half], written[half:]):
        assert {(w.key is None, w.headers is None) for w in part} == {
            (True, True),
            (True, False),
            (False, True),
            (False, False),
        }
    together = await log.commit(WriteBatch(appends=written[:half]))
    alone = [(await log.commit(WriteBatch(appends=[r])))[0] for r in written[half:]]
    ikeyed = [w for w in written if w.idempotency_key is not None]
    again = await log.commit(WriteBatch(appends=[ikeyed[0], ikeyed[-1]]))
    assert [r.duplicate for r in again] == [True, True]
    receipts = together + alone
    assert [r.seq for r in receipts] == list(range(1, len(written) + 1))
    read = await log.read(0, log.head, None, len(written) + 1)
    assert [(r.seq, r.id, r.topic, r.key, r.payload, r.headers, r.created_at) for r in read] == [
        (n, w.id, w.topic, w.key, w.payload, w.headers, w.created_at)
        for n, w in enumerate(written, 1)
    ]
    assert all(type(r.payload) is bytes for r in read)


async def test_read_filters_by_range_topic_and_limit(log: Storage) -> None:
    await log.commit(WriteBatch(appends=[rec(i, topic="a" if i % 2 else "b") for i in range(10)]))
    everything = await log.read(0, log.head, None, 100)
    assert [r.seq for r in everything] == list(range(1, 11))
    only_a = await log.read(0, log.head, frozenset({"a"}), 100)
    assert all(r.topic == "a" for r in only_a)
    assert len(only_a) == 5
    window = await log.read(3, 7, None, 2)
    assert [r.seq for r in window] == [4, 5]
    assert isinstance(window[0], Record)
    assert window[0].payload == b"p3"


async def test_acks_only_move_cursors_forward(log: Storage) -> None:
    info = SubscriptionInfo("s", ("t",), 0, time.time())
    await log.commit(WriteBatch(subscriptions=[info], appends=[rec(i) for i in range(3)]))
    await log.commit(WriteBatch(acks={"s": 2}))
    await log.commit(WriteBatch(acks={"s": 1}))
    subs = await log.subscriptions()
    assert subs["s"].cursor == 2
    assert subs["s"].topics == ("t",)
    # Registering again keeps the cursor.
    await log.commit(WriteBatch(subscriptions=[info]))
    assert (await log.subscriptions())["s"].cursor == 2


async def test_dead_letters_are_kept_with_their_reason(log: Storage) -> None:
    (r,) = await log.commit(WriteBatch(appends=[rec(1)]))
    record = Record(r.seq, "id-1", "t", "k1", b"p1", None, 1.0)
    dead = DeadRecord("s", record, 3, "ValueError", "bad", "tb", 1.0, 2.0)
    await log.commit(WriteBatch(acks={"s": 1}, dead=[dead]))
    assert await log.dead_letters("s") == [dead]
    assert await log.dead_letters("other") == []
    stats = await log.stats()
    assert stats.dead_letters == {"s": 1}


async def test_compaction_keeps_events_a_subscription_has_not_finished(log: Storage) -> None:
    old = time.time() - 100
    await log.commit(WriteBatch(appends=[rec(i, created_at=old) for i in range(10)]))
    removed = await log.compact(upto=4, older_than=time.time(), idempotency_older_than=0)
    assert removed == 4
    remaining = await log.read(0, log.head, None, 100)
    assert [r.seq for r in remaining] == list(range(5, 11))
    # Sequence numbers continue after compaction.
    (r,) = await log.commit(WriteBatch(appends=[rec(99)]))
    assert r.seq == 11


async def test_stats_count_lag_per_subscription(log: Storage) -> None:
    info = SubscriptionInfo("s", ("a",), 0, time.time())
    await log.commit(
        WriteBatch(
            subscriptions=[info], appends=[rec(i, topic="a" if i < 6 else "b") for i in range(9)]
        )
    )
    await log.commit(WriteBatch(acks={"s": 2}))
    stats = await log.stats()
    assert stats.head == 9
    assert stats.lag == {"s": 4}
    assert stats.events == 9


async def test_quick_stats_take_events_and_lag_from_seqs(log: Storage) -> None:
    info = SubscriptionInfo("s", ("a",), 0, time.time())
    old = time.time() - 100
    await log.commit(
        WriteBatch(
            subscriptions=[info],
            appends=[rec(i, topic="a" if i < 6 else "b", created_at=old) for i in range(9)],
        )
    )
    await log.commit(WriteBatch(acks={"s": 3}))
    await log.compact(upto=2, older_than=time.time(), idempotency_older_than=0)
    quick = await log.stats(exact=False)
    exact = await log.stats()
    assert quick.head == exact.head == 9
    assert quick.oldest_seq == exact.oldest_seq == 3
    assert quick.events == exact.events == 7  # no gaps: the span is the count
    assert quick.lag == {"s": 6}  # the head minus the cursor, topic b included
    assert exact.lag == {"s": 3}  # a's events after the cursor, counted


@pytest.mark.parametrize("backend", BACKENDS[1:])
async def test_the_head_survives_compacting_everything(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    store = make_log(backend, request, tmp_path)
    await store.open()
    await store.commit(WriteBatch(appends=[rec(i, created_at=0.0) for i in range(3)]))
    await store.compact(upto=3, older_than=time.time(), idempotency_older_than=0)
    await store.close()
    again = make_log(backend, request, tmp_path)  # the same log again
    await again.open()
    try:
        assert again.head == 3
        (r,) = await again.commit(WriteBatch(appends=[rec(4)]))
        assert r.seq == 4
    finally:
        await again.close()


# -- the acknowledgement ledger and workflow checkpoints ------------------------------


def _retry(sub: str, r: Record, due: float | None = 0.0) -> RetryRecord:
    return RetryRecord(sub, r, 2, due)


async def test_every_event_the_cursor_passed_is_accounted_for(log: Storage) -> None:
    await log.commit(
        WriteBatch(
            appends=[rec(i) for i in range(10)],
            subscriptions=[SubscriptionInfo("s", ("t",), 0, 0.0)],
        )
    )
    records = await log.read(0, 10, None, 100)
    # 3 goes to the retry lane and 5 to the dead letters as the cursor passes them.
    dead = DeadRecord("s", records[4], 1, "E", "m", "", 0.0, 0.0)
    await log.commit(WriteBatch(acks={"s": 8}, retries=[_retry("s", records[2])], dead=[dead]))
    assert (await log.unaccounted("s", 10)).count == 0
    # The retry succeeds: it is settled as done, still accounted for.
    await log.commit(WriteBatch(settled=[("s", 3)]))
    assert (await log.unaccounted("s", 10)).count == 0
    # A purged dead letter is settled by the operator.
    assert await log.purge("s") == 1
    found = await log.unaccounted("s", 10)
    assert found.count == 0
    assert found.seqs == ()


async def test_a_retry_removed_without_settling_is_unaccounted(log: Storage) -> None:
    await log.commit(
        WriteBatch(
            appends=[rec(i) for i in range(6)],
            subscriptions=[SubscriptionInfo("s", ("t",), 0, 0.0)],
        )
    )
    records = await log.read(0, 6, None, 100)
    await log.commit(WriteBatch(acks={"s": 6}, retries=[_retry("s", records[1])]))
    # Dead-lettering from the retry lane keeps it accounted for.
    dead = DeadRecord("s", records[1], 3, "E", "m", "", 0.0, 0.0)
    await log.commit(WriteBatch(dead=[dead], settled=[("s", 2)]))
    assert (await log.unaccounted("s", 6)).count == 0
    # Redrive moves it back to the retry lane.
    assert len(await log.redrive("s", due_at=0.0)) == 1
    assert (await log.unaccounted("s", 6)).count == 0
    # Dropped from the retry lane without being settled (a bug): lost.
    await _forget_retry(log, "s", 2)
    found = await log.unaccounted("s", 6)
    assert (found.count, found.seqs) == (1, (2,))


async def _forget_retry(log: Storage, sub: str, seq: int) -> None:
    if isinstance(log, MemoryStorage):
        del log._retries[(sub, seq)]
        return
    if isinstance(log, PostgresStorage):
        sql = "DELETE FROM retries WHERE subscription = $1 AND seq = $2"
        await postgres.execute(log.target.schema, sql, sub, seq)
        return
    assert isinstance(log, SQLiteStorage)
    conn = log._conn("w")
    await conn.execute("DELETE FROM retries WHERE subscription = ? AND seq = ?", (sub, seq))


async def test_a_subscription_registered_late_owes_nothing_before_it(log: Storage) -> None:
    await log.commit(WriteBatch(appends=[rec(i) for i in range(5)]))
    await log.commit(WriteBatch(subscriptions=[SubscriptionInfo("late", ("t",), 5, 0.0)]))
    assert (await log.unaccounted("late", 5)).count == 0
    assert (await log.unaccounted("unknown", 5)).count == 0


async def test_workflow_runs_start_once_and_keep_step_checkpoints(log: Storage) -> None:
    now = time.time()
    first = WorkflowRecord("w1", "fulfil", "running", b"in-1", now, now, runs=1)
    await log.commit(WriteBatch(workflow_starts=[first]))
    again = WorkflowRecord("w1", "fulfil", "running", b"other", now, now, runs=1)
    await log.commit(WriteBatch(workflow_starts=[again]))
    run = await log.workflow("w1")
    assert run is not None
    assert run.input == b"in-1"
    assert run.num >= 1
    step = StepRecord("w1", 0, "reserve", "done", 1, now, now, b'"r"')
    running = StepRecord("w1", 1, "charge", "running", 1, now)
    await log.commit(WriteBatch(steps=[step, running]))
    assert [s.name for s in await log.steps("w1")] == ["reserve", "charge"]
    failed = msgspec.structs.replace(run, status="failed", error_message="boom")
    dead = DeadRecord(
        "workflow:fulfil",
        Record(run.num, "w1", "workflow:fulfil", "w1", b"in-1", None, now),
        1,
        "E",
        "boom",
        "",
        now,
        now,
    )
    await log.commit(WriteBatch(workflows=[failed], dead=[dead]))
    assert [w.id for w in await log.workflows(status="failed")] == ["w1"]
    # Redriving the dead letter resumes the run: done steps stay, the rest go.
    assert len(await log.redrive("workflow:fulfil", due_at=0.0)) == 1
    resumed = await log.workflow("w1")
    assert resumed is not None
    assert resumed.status == "running"
    assert resumed.error_message == ""
    assert [s.name for s in await log.steps("w1")] == ["reserve"]
    assert await log.retries("workflow:fulfil") == []
    assert await log.workflows(name="other") == []


async def test_step_checkpoints_keep_every_field(log: Storage) -> None:
    now = time.time()
    steps = [
        StepRecord("w1", 0, "reserve", "done", 2, now, now + 1, b'"r"', died=1),
        StepRecord("w1", 1, "charge", "running", 5, now, None, None, "E", "boom", died=3),
    ]
    await log.commit(WriteBatch(steps=steps))
    assert await log.steps("w1") == steps


async def test_dead_letters_page_between_subscriptions_of_one_event(log: Storage) -> None:
    # Two subscriptions dead-letter each event: a page that ends between them resumes
    # at the second, where paging by seq alone would skip it.
    receipts = await log.commit(WriteBatch(appends=[rec(i) for i in range(3)]))
    dead = [
        DeadRecord(sub, Record(r.seq, r.id, "t", None, b"", None, 1.0), 1, "E", "m", "", 1, 2)
        for r in receipts
        for sub in ("a", "b")
    ]
    await log.commit(WriteBatch(dead=dead))
    assert await log.count_dead_letters() == 6
    assert await log.count_dead_letters("b") == 3
    assert await log.count_dead_letters(error_type="Other") == 0
    seen: list[tuple[int, str]] = []
    after: tuple[int, str | None] = (0, None)
    while True:
        page = await log.dead_letters(None, 5, after[0], after_subscription=after[1])
        seen += [(d.record.seq, d.subscription) for d in page]
        if len(page) < 5:
            break
        after = (page[-1].record.seq, page[-1].subscription)
    assert seen == [(d.record.seq, d.subscription) for d in dead]


async def test_dropping_a_subscription_forgets_its_cursor_ledger_lanes_and_state(
    log: Storage,
) -> None:
    info = SubscriptionInfo("old", ("t",), 0, time.time())
    keep = SubscriptionInfo("kept", ("t",), 0, time.time())
    (_, r2) = await log.commit(WriteBatch(subscriptions=[info, keep], appends=[rec(1), rec(2)]))
    record = Record(r2.seq, r2.id, "t", None, b"", None, 1.0)
    await log.commit(
        WriteBatch(
            acks={"old": 1, "kept": 2},
            retries=[RetryRecord("old", record, 2, time.time())],
            dead=[DeadRecord("kept", record, 1, "E", "m", "", 1, 2)],
            state=[("old", "k", b"v"), ("kept", "k", b"w")],
        )
    )
    assert await log.drop_subscription("old")
    assert not await log.drop_subscription("old")
    assert set(await log.subscriptions()) == {"kept"}
    assert await log.retries("old") == []
    assert await log.get_state("old", ["k"]) == {}
    assert await log.get_state("kept", ["k"]) == {"k": b"w"}
    assert await log.count_dead_letters() == 1
    assert (await log.unaccounted("old", log.head)).count == 0
