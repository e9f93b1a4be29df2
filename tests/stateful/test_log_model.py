"""The log behaves like a plain Python model through commits, acks, compactions,
clean reopens and crashes.

A hypothesis ``RuleBasedStateMachine`` drives a :class:`storage.SQLiteStorage` on a real
file, a :class:`storage.PostgresStorage` in a fresh schema (with the database session
it writes through ended under it now and then) and, without those rules, a
:class:`storage.MemoryStorage`, and checks every answer against a model: a list of
records, the idempotency keys, the cursors and in-flight marks, the retry lanes and
the dead letters.

A crash is simulated by copying the database and its WAL while the log is still open:
the copy is the on-disk state after the last committed transaction, as a SIGKILL would
leave it. The log reopened on the copy must equal the model.

The tests at the end are regression tests for contract bugs the machine (or writing
it) found.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from eventbus.storage import (
    DeadRecord,
    MemoryStorage,
    NewRecord,
    PostgresStorage,
    Receipt,
    Record,
    RetryRecord,
    SQLiteStorage,
    Storage,
    SubscriptionInfo,
    WriteBatch,
)
from tests import postgres

T = TypeVar("T")

TOPICS = ("a", "b", "c")
IDEMPOTENCY_KEYS = tuple(f"ik-{n}" for n in range(6))
SUBSCRIPTIONS = ("s1", "s2", "s3")
# Mostly small payloads; the occasional large one makes SQLite's WAL grow by pages.
PAYLOAD_SIZES = (0, 7, 300, 5000)
FOREVER = 1e300  # an idempotency cutoff after every key's creation time
ERROR_TYPES = ("pkg.ValueError", "pkg.KeyError")

new_records = st.lists(
    st.tuples(
        st.sampled_from(TOPICS),
        st.none() | st.sampled_from(("k1", "k2")),
        st.none() | st.sampled_from(IDEMPOTENCY_KEYS),
        st.sampled_from(PAYLOAD_SIZES),
        st.booleans(),  # with headers
    ),
    max_size=6,
)


@dataclass
class Model:
    """What the log should hold."""

    records: list[Record] = field(default_factory=list)  # every appended record, by seq
    compacted: set[int] = field(default_factory=set)  # seqs deleted by compaction
    head: int = 0
    idempotency: dict[str, Receipt] = field(default_factory=dict)
    cursors: dict[str, int] = field(default_factory=dict)
    topics: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ledger: dict[str, set[int]] = field(default_factory=dict)  # acknowledged as done
    retries: dict[tuple[str, int], RetryRecord] = field(default_factory=dict)
    dead: dict[tuple[str, int], DeadRecord] = field(default_factory=dict)

    def live(self) -> list[Record]:
        return [r for r in self.records if r.seq not in self.compacted]

    def commit(self, batch: WriteBatch) -> list[Receipt]:
        receipts: list[Receipt] = []
        for rec in batch.appends:
            known = self.idempotency.get(rec.idempotency_key or "")
            if rec.idempotency_key is not None and known is not None:
                receipts.append(Receipt(known.seq, known.id, True))
                continue
            self.head += 1
            self.records.append(
                Record(
                    self.head, rec.id, rec.topic, rec.key, rec.payload, rec.headers, rec.created_at
                )
            )
            receipt = Receipt(self.head, rec.id)
            if rec.idempotency_key is not None:
                self.idempotency[rec.idempotency_key] = receipt
            receipts.append(receipt)
        # The rest in the order the contract states: register, ack, write retries,
        # settle retries, dead-letter; then the acknowledgement ledger.
        prev = {name: self.cursors.get(name, 0) for name in batch.acks}
        for info in batch.subscriptions:
            self.topics[info.name] = info.topics
            if info.name not in self.cursors:
                self.cursors[info.name] = info.cursor
                self.ledger.setdefault(info.name, set()).update(range(1, info.cursor + 1))
        for name, cursor in batch.acks.items():
            self.topics.setdefault(name, ("*",))
            self.cursors[name] = max(self.cursors.get(name, cursor), cursor)
        for retry in batch.retries:
            self.retries[retry.subscription, retry.record.seq] = retry
        for settled in batch.settled:
            self.retries.pop(settled, None)
        for dead in batch.dead:
            self.dead[dead.subscription, dead.record.seq] = dead
        dead_now = {(d.subscription, d.record.seq) for d in batch.dead}
        for name, seq in batch.settled:
            if (name, seq) not in dead_now:
                self.ledger.setdefault(name, set()).add(seq)
        for name, cursor in batch.acks.items():
            held = {s for (n, s) in [*self.retries, *self.dead] if n == name}
            done = set(range(prev[name] + 1, cursor + 1)) - held
            self.ledger.setdefault(name, set()).update(done)
        for name, lo, hi in batch.done:
            self.ledger.setdefault(name, set()).update(range(lo, hi + 1))
        return receipts

    def finished_ahead(self, name: str, after: int) -> set[int]:
        dead = {s for (n, s) in self.dead if n == name}
        return {s for s in self.ledger.get(name, set()) | dead if s > after}

    def read(
        self, after: int, upto: int, topics: frozenset[str] | None, limit: int
    ) -> list[Record]:
        out = [
            r
            for r in self.live()
            if after < r.seq <= upto and (topics is None or r.topic in topics)
        ]
        return out[:limit]

    def lag(self, name: str) -> int:
        topics = self.topics[name]
        return sum(
            1
            for r in self.live()
            if r.seq > self.cursors[name] and ("*" in topics or r.topic in topics)
        )


class LogMachine(RuleBasedStateMachine):
    """Rules every backend supports. Subclasses say how to make and reopen the log."""

    # False skips reads whose upto lies below the oldest event still in the log: a
    # known bug (see test_a_read_below_the_oldest_event_returns_nothing).
    reads_below_oldest_event = True

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.model = Model()
        self.clock = 1_000_000.0  # created_at of the next record: increases with seq
        self.next_id = 0
        self.log: Storage = self.make_log()
        try:
            self.run(self.log.open)
        except BaseException:
            self.runner.close()
            raise

    # -- plumbing -------------------------------------------------------------------

    def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        return self.runner.run(fn(*args, **kwargs))

    def make_log(self) -> Storage:
        raise NotImplementedError

    def reopen(self) -> None:
        """Close the log cleanly and open it again."""
        raise NotImplementedError

    def teardown(self) -> None:
        try:
            self.run(self.log.close)
        finally:
            self.runner.close()

    # -- rules ----------------------------------------------------------------------

    @rule(
        specs=new_records,
        acks=st.dictionaries(st.sampled_from(SUBSCRIPTIONS), st.integers(0)),
        done=st.none() | st.sampled_from(SUBSCRIPTIONS),
    )
    def commit_appends(
        self,
        specs: list[tuple[str, str | None, str | None, int, bool]],
        acks: dict[str, int],
        done: str | None,
    ) -> None:
        appends = []
        for topic, key, ikey, size, with_headers in specs:
            self.next_id += 1
            self.clock += 1.0
            appends.append(
                NewRecord(
                    id=f"id-{self.next_id}",
                    topic=topic,
                    key=key,
                    payload=self.next_id.to_bytes(4, "big") * (size // 4 + 1),
                    headers=b"\x81\xa1h\xa1v" if with_headers else None,
                    created_at=self.clock,
                    idempotency_key=ikey,
                )
            )
        # Acks ride along with appends, as the writer merges them; any cursor up to
        # where this batch may take the head.
        reach = self.model.head + len(appends) + 1
        batch = WriteBatch(appends=appends, acks={n: c % reach for n, c in acks.items()})
        if done is not None and self.model.head:
            # Events handled ahead of the cursor ride along, as with concurrency.
            lo = self.model.head // 2 + 1
            batch.done.append((done, lo, self.model.head))
        receipts = self.run(self.log.commit, batch)
        expected = self.model.commit(batch)
        assert receipts == expected
        assert self.log.head == self.model.head

    @rule(name=st.sampled_from(SUBSCRIPTIONS), data=st.data())
    def ack(self, name: str, data: st.DataObject) -> None:
        # Anywhere in [0, head]: an ack behind the cursor must not move it back.
        cursor = data.draw(st.integers(0, self.model.head), label="cursor")
        batch = WriteBatch(acks={name: cursor})
        assert self.run(self.log.commit, batch) == []
        self.model.commit(batch)

    @rule(
        name=st.sampled_from(SUBSCRIPTIONS),
        topics=st.sets(st.sampled_from((*TOPICS, "*")), min_size=1),
        data=st.data(),
    )
    def register(self, name: str, topics: set[str], data: st.DataObject) -> None:
        cursor = data.draw(st.integers(0, self.model.head), label="cursor")
        info = SubscriptionInfo(name, tuple(sorted(topics)), cursor, 0.0)
        batch = WriteBatch(subscriptions=[info])
        assert self.run(self.log.commit, batch) == []
        self.model.commit(batch)

    @rule(
        data=st.data(),
        topics=st.none() | st.frozensets(st.sampled_from(TOPICS), min_size=1),
        limit=st.integers(1, 8),
    )
    def read_range(self, data: st.DataObject, topics: frozenset[str] | None, limit: int) -> None:
        head = self.model.head
        after = data.draw(st.integers(0, head + 1), label="after")
        lowest = after - 1
        live = self.model.live()
        if not self.reads_below_oldest_event and live:
            lowest = max(lowest, live[0].seq - 1)
        upto = data.draw(st.integers(max(0, lowest), head + 2), label="upto")
        got = self.run(self.log.read, after, upto, topics, limit)
        assert got == self.model.read(after, upto, topics, limit)

    @rule(data=st.data(), forget_keys=st.booleans(), limit=st.integers(1, 4) | st.just(10_000))
    def compact(self, data: st.DataObject, forget_keys: bool, limit: int) -> None:
        model = self.model
        # Compacting everything is the interesting edge (the head must survive it), so
        # draw it often.
        upto = data.draw(st.just(model.head) | st.integers(0, model.head), label="upto")
        # created_at grows with seq, so "older than" the n-th record is a prefix.
        live = model.live()
        nth = data.draw(st.just(len(live)) | st.integers(0, len(live)), label="older_than_nth")
        older_than = live[nth].created_at if nth < len(live) else self.clock + 1
        removed = self.run(
            self.log.compact, upto, older_than, FOREVER if forget_keys else 0.0, limit
        )
        gone = [r.seq for r in live if r.seq <= upto and r.created_at < older_than][:limit]
        assert removed == len(gone)
        model.compacted.update(gone)
        if forget_keys:
            model.idempotency.clear()

    @rule(name=st.sampled_from(SUBSCRIPTIONS), data=st.data())
    def commit_lane_changes(self, name: str, data: st.DataObject) -> None:
        """Retries written and settled, events done ahead of the cursor and dead letters,
        in one batch (what a subscription commits around its handler calls)."""
        model = self.model
        records = model.records  # compacted ones too: the lanes keep their own copies
        waiting = sorted(k for k in model.retries if k[0] == name)
        settled = (
            data.draw(st.lists(st.sampled_from(waiting), max_size=2), label="settled")
            if waiting
            else []
        )
        retried = dead = []
        if records:
            # Sometimes rewrite a record the same batch settles: the settle wins.
            pick = st.sampled_from(records)
            if settled:
                pick |= st.sampled_from([model.retries[k].record for k in settled])
            retried = data.draw(
                st.lists(
                    st.tuples(
                        pick,
                        st.integers(1, 5),  # attempt
                        st.none() | st.floats(0, 2e9),  # due_at
                        st.just(False),  # running: only logs of an earlier version
                    ),
                    min_size=1,
                    max_size=3,
                ),
                label="retries",
            )
            dead = data.draw(
                st.lists(
                    st.tuples(st.sampled_from(records), st.sampled_from(ERROR_TYPES)), max_size=2
                ),
                label="dead",
            )
        ahead = data.draw(st.none() | st.integers(1, max(1, model.head)), label="done")
        self.clock += 1.0
        batch = WriteBatch(
            retries=[
                RetryRecord(name, rec, attempt, due, self.clock, "pkg.E", "boom", "tb", running)
                for rec, attempt, due, running in retried
            ],
            settled=settled,
            done=[] if ahead is None else [(name, ahead, ahead)],
            dead=[
                DeadRecord(name, rec, 3, error, f"failed {rec.seq}", "tb", self.clock, self.clock)
                for rec, error in dead
            ],
        )
        assert self.run(self.log.commit, batch) == []
        model.commit(batch)

    @rule()
    def close_and_reopen(self) -> None:
        self.reopen()
        self.check_everything()

    # -- invariants -----------------------------------------------------------------

    @invariant()
    def head_matches_model(self) -> None:
        assert self.log.head == self.model.head

    @invariant()
    def log_is_dense_and_matches_model(self) -> None:
        got = self.run(self.log.read, 0, self.model.head, None, self.model.head + 1)
        seqs = [r.seq for r in got]
        assert seqs == sorted(set(seqs))
        assert got == self.model.live()

    @invariant()
    def subscriptions_and_lanes_match_model(self) -> None:
        model = self.model
        subs = self.run(self.log.subscriptions)
        assert {n: (s.topics, s.cursor) for n, s in subs.items()} == {
            n: (model.topics[n], c) for n, c in model.cursors.items()
        }
        for name, cursor in model.cursors.items():
            ranges = self.run(self.log.finished_ahead, name, cursor)
            found = {s for lo, hi in ranges for s in range(lo, hi + 1)}
            assert found == model.finished_ahead(name, cursor), name
        for sub in SUBSCRIPTIONS:
            lane = self.run(self.log.retries, sub)
            assert lane == [r for (s, _), r in sorted(model.retries.items()) if s == sub]
        dead = [model.dead[k] for k in sorted(model.dead, key=lambda k: (k[1], k[0]))]
        assert self.run(self.log.dead_letters, None, 10**6) == dead
        for error_type in ("ValueError", *ERROR_TYPES):
            found = self.run(self.log.dead_letters, None, 10**6, error_type=error_type)
            assert found == [
                d
                for d in dead
                if d.error_type == error_type or d.error_type.endswith(f".{error_type}")
            ]

    def check_everything(self) -> None:
        """After a reopen: head, every record, cursors, lanes, lag, idempotency keys."""
        model = self.model
        assert self.log.head == model.head
        assert self.run(self.log.read, 0, model.head + 5, None, 10**6) == model.live()
        self.subscriptions_and_lanes_match_model()
        stats = self.run(self.log.stats)
        assert stats.head == model.head
        assert stats.events == len(model.live())
        assert stats.lag == {n: model.lag(n) for n in model.cursors}
        assert stats.dead_letters == dict(Counter(sub for sub, _ in model.dead))
        assert stats.retries == dict(Counter(sub for sub, _ in model.retries))
        # Every remembered key still dedupes; probing commits nothing new.
        probes = [
            NewRecord(f"probe-{k}", "a", None, b"", None, self.clock, k) for k in model.idempotency
        ]
        if probes:
            receipts = self.run(self.log.commit, WriteBatch(appends=probes))
            originals = [model.idempotency[p.idempotency_key or ""] for p in probes]
            assert receipts == [Receipt(o.seq, o.id, True) for o in originals]
            assert self.log.head == model.head


class MemoryLogMachine(LogMachine):
    reads_below_oldest_event = True

    def make_log(self) -> Storage:
        return MemoryStorage()

    def reopen(self) -> None:
        self.run(self.log.close)
        self.run(self.log.open)


class SQLiteLogMachine(LogMachine):
    """Adds the file-level rules: crash-copy, and checkpoints by another connection."""

    base_dir: Path  # set by the test: a pytest temporary directory

    def make_log(self) -> Storage:
        self.dir = Path(tempfile.mkdtemp(dir=self.base_dir))
        self.generation = 0
        return self.open_at(self.path_for(0))

    def path_for(self, generation: int) -> Path:
        return self.dir / f"log-{generation}.db"

    def open_at(self, path: Path) -> SQLiteStorage:
        self.path = path
        return SQLiteStorage(path, durability="normal")

    def reopen(self) -> None:
        self.run(self.log.close)
        self.log = self.open_at(self.path)
        self.run(self.log.open)

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    @rule()
    def crash_and_reopen(self) -> None:
        """Copy the files of the open log (what a SIGKILL leaves), then reopen the copy."""
        old = self.path
        self.generation += 1
        new = self.path_for(self.generation)
        shutil.copy(old, new)
        wal = Path(f"{old}-wal")
        if wal.exists():
            shutil.copy(wal, f"{new}-wal")
        self.run(self.log.close)
        for leftover in old.parent.glob(f"{old.name}*"):
            leftover.unlink()
        self.log = self.open_at(new)
        self.run(self.log.open)
        self.check_everything()

    @rule(mode=st.sampled_from(("PASSIVE", "FULL", "RESTART", "TRUNCATE")))
    def checkpoint_from_another_connection(self, mode: str) -> None:
        """What SQLite's auto-checkpoint does: later commits then restart the WAL from
        its start, leaving stale frames behind it that a crash recovery must ignore."""
        conn = sqlite3.connect(self.path, timeout=5.0)
        try:
            conn.execute(f"PRAGMA wal_checkpoint({mode})")
        finally:
            conn.close()


class PostgresLogMachine(LogMachine):
    """Adds the session-level rule: the server ends the session the log writes
    through (a restart, a network cut, an operator); the next commit connects again,
    finds out whether anything was lost, and carries on."""

    base_dir: Path

    def make_log(self) -> Storage:
        self.schema = postgres.new_schema()
        self.url = postgres.url_for(self.schema, tempfile.mkdtemp(dir=self.base_dir))
        return self.open_log()

    def open_log(self) -> PostgresStorage:
        # The server's crash safety is not what this checks: commits without waiting
        # for its WAL flush keep the run short.
        return PostgresStorage(self.url, durability="off")

    def reopen(self) -> None:
        self.run(self.log.close)
        self.log = self.open_log()
        self.run(self.log.open)

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            postgres.drop_schema(self.schema)

    @rule(readers=st.booleans())
    def end_the_writers_session(self, readers: bool) -> None:
        assert isinstance(self.log, PostgresStorage)
        session = self.log._db.session
        self.run(
            postgres.execute,
            self.schema,
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
            " WHERE pid = $1 OR ($2 AND application_name = $3)",
            session,
            readers,
            f"eventbus reader {self.schema}",
        )


SETTINGS = settings(
    max_examples=30,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.slow
def test_sqlite_log_matches_the_model_across_reopens_and_crashes(tmp_path: Path) -> None:
    machine = type("SQLiteLog", (SQLiteLogMachine,), {"base_dir": tmp_path})
    run_state_machine_as_test(machine, settings=SETTINGS)


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_log_matches_the_model_across_reopens_and_lost_sessions(tmp_path: Path) -> None:
    postgres.require_server()
    machine = type("PostgresLog", (PostgresLogMachine,), {"base_dir": tmp_path})
    # Each example creates a schema, and every step waits on the server: fewer.
    run_state_machine_as_test(machine, settings=settings(SETTINGS, max_examples=20))


def test_memory_log_matches_the_model() -> None:
    run_state_machine_as_test(MemoryLogMachine, settings=SETTINGS)


async def _open(backend: str, tmp_path: Path) -> Storage:
    log: Storage = MemoryStorage() if backend == "memory" else SQLiteStorage(tmp_path / "l.db")
    await log.open()
    return log


def _records(*ids: int, topic: str = "a") -> WriteBatch:
    return WriteBatch(appends=[NewRecord(f"id-{i}", topic, None, b"", None, float(i)) for i in ids])


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["sqlite", "memory"])
async def test_a_read_below_the_oldest_event_returns_nothing(backend: str, tmp_path: Path) -> None:
    # Found by the state machine: compact everything, append more, read an old range.
    log = await _open(backend, tmp_path)
    try:
        await log.commit(_records(1, 2, 3))
        assert await log.compact(3, 10.0, 0.0) == 3
        await log.commit(_records(4, 5))
        assert await log.read(0, 2, None, 10) == []
    finally:
        await log.close()


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["sqlite", "memory"])
async def test_a_read_with_limit_zero_returns_nothing(backend: str, tmp_path: Path) -> None:
    log = await _open(backend, tmp_path)
    try:
        await log.commit(_records(1, 2))
        assert await log.read(0, 2, None, 0) == []
        assert await log.read(0, 2, frozenset({"a"}), 0) == []
    finally:
        await log.close()


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_an_error_type_filter_matches_the_exception_name_exactly(
    backend: str, tmp_path: Path
) -> None:
    # Found while modelling dead letters: purge and redrive take the same filter.
    log = await _open(backend, tmp_path)
    try:
        await log.commit(_records(1, 2))
        dead = [
            DeadRecord("s", r, 3, error, "boom", "tb", 1.0, 1.0)
            for r, error in zip(
                await log.read(0, 2, None, 2), ("pkg.ValueError", "pkg.KeyError"), strict=True
            )
        ]
        await log.commit(WriteBatch(dead=dead))
        assert await log.dead_letters(error_type="valueerror") == []
        assert await log.dead_letters(error_type="Key_rror") == []
        assert await log.dead_letters(error_type="%") == []
        assert await log.purge(None, error_type="valueerror") == 0
        assert await log.dead_letters() == dead
    finally:
        await log.close()
