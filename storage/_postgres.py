"""The log on PostgreSQL, through asyncpg: the same contract as the SQLite log, shared
by any number of processes on any number of machines.

One log is one schema (``_pg_url``). Each process writes through one connection
(``_pg_session``); reads go through a small pool, so a long backlog read never holds
up a group commit; one more connection LISTENs for what the other processes do
(``_pg_listen``). Each subscription's work is divided among the processes subscribed
to it by partitions and their leases, with fencing (``_pg_leases``).

**Visibility: appends are serialised, so readers never skip an event.** A reader
that has seen event ``n`` must be sure no transaction still open can commit an
event below ``n``; with sequence values taken from a ``SEQUENCE`` that is false
(``nextval`` is not transactional: two appends commit out of order, and a reader
that moved past the later one never sees the earlier). Here the head of the log is
one row, ``head``, that every append locks (``SELECT ... FOR UPDATE``, or the
``UPDATE`` that moves it) before it numbers its events after it, and holds to its
commit. Appends therefore commit one after the other in sequence order, whichever
process makes them, a rolled back append gives its numbers back (sequence numbers
stay dense, as the contract requires), and every committed event has all lower
sequence numbers committed before it: whatever prefix of the log a reader sees is
final. The other design (record ``pg_current_xact_id()`` per event and read only
below ``pg_snapshot_xmin(pg_current_snapshot())``) lets appends run in parallel, but
it leaves gaps in the numbering and makes every reader wait for the oldest
transaction open anywhere in the cluster, however unrelated; here only appends to
this log wait for each other, and only for the length of one group commit (about a
millisecond), which the bus amortises over the whole batch. A transaction held open
elsewhere in the database stalls nobody; one that holds the ``head`` row lock (an
operator's ``SELECT ... FOR UPDATE`` on it) stalls appends, which fail with
``LogBusy`` after ``busy_timeout``.

**Durability.** ``"full"`` sets ``synchronous_commit = on`` on the writer's session;
``"normal"`` keeps the server's setting (``on`` unless changed); ``"off"`` sets it
``off``: a commit may then be lost if the database server (not this process)
crashes within a fraction of a second.

**Calls in flight** are rows (``calls``), written before each handler call by the
bus (:meth:`PostgresStorage.mark_call`); :meth:`calls` records nothing. A process
that takes a partition over from one whose lease expired charges their deaths.

**Cancellation.** A write runs in a shielded scope, each statement bounded by
``command_timeout``: a cancelled caller waits for the transaction in flight to
commit or roll back, then the cancellation proceeds. So, as with SQLite, a cancelled
:meth:`PostgresStorage.commit` may have committed; a publisher that retries with an
idempotency key gets the original receipt. A read stops at once (asyncpg cancels
the statement on the server).

**A lost connection.** A commit whose connection is lost is finished on a new one:
if its events are in the log (found by their ids), it went through and its receipts
are read back, else it is applied then (``_finish``). Other writes fail with a
retryable ``StorageError``; reads run once more on a new connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeAlias

import anyio
import asyncpg

from . import _pg_batch as batch_sql
from . import _pg_leases as leases
from . import _pg_statements as stmts
from ._calls import CallSlots, NoCallSlots
from ._errors import RunClaimLost, StorageError
from ._pg_listen import Listener, Watcher
from ._pg_schema import DEFAULT_PARTITIONS, MAX_PARTITIONS
from ._pg_session import Durability, LostConnection, Sessions
from ._pg_url import PgTarget, parse
from ._types import (
    Claim,
    DeadRecord,
    Lease,
    LogStats,
    NewRecord,
    Notice,
    Receipt,
    Record,
    RetryRecord,
    Share,
    StepRecord,
    SubscriptionInfo,
    Unaccounted,
    WorkflowRecord,
    WriteBatch,
)

logger = logging.getLogger("eventbus.storage")

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record]"

__all__ = ["Durability", "PostgresStorage"]

#: Seconds a partition's lease lasts unless renewed (``?lease=`` in the URL).
DEFAULT_LEASE = 10.0
_SUBSCRIPTIONS = (
    "SELECT s.name, s.topics, coalesce(min(p.cursor), s.cursor), s.updated_at"
    " FROM subscriptions s LEFT JOIN partitions p ON p.subscription = s.name"
    " GROUP BY s.name, s.topics, s.cursor, s.updated_at ORDER BY s.name"
)


class PostgresStorage:
    """A log in one schema of a PostgreSQL database, shared by every process that
    opens it (see the module docstring).

    Args:
        url: ``postgresql://user:password@host:port/database?schema=name`` (see
            :mod:`storage._pg_url` for the parameters it reads); ``postgres://``
            too.
        schema: The schema holding the log, instead of the URL's (``eventbus`` if
            neither names one).
        durability: ``"normal"``, ``"full"`` or ``"off"`` (see the module docstring).
        busy_timeout: Seconds a write waits for a row lock another session holds (an
            operator's open transaction) before it fails with :class:`LogBusy`.
        open_timeout: Seconds :meth:`open` keeps trying to reach a server that
            refuses connections (starting up, restarting).
        command_timeout: Seconds any one operation may take before its connection is
            dropped and the operation fails with :class:`StorageError`.
        read_only: Open for inspection only: no writes, no share of the work. Safe
            while buses run on the log.
        journal_dir: Ignored (earlier versions kept a call journal file per machine;
            calls in flight are rows of the log now).
        pool_size: Connections for reads, beside the writer's.
        partitions: How many partitions a log created by this call gets (the URL's
            ``partitions``, else 16): at most that many processes share one
            subscription's work. An existing log keeps its own.
        lease: Seconds a process holds a partition's lease unless it renews it (the
            URL's ``lease``, else 10): how long a process that died keeps its
            partitions from the others.
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        durability: Durability = "normal",
        busy_timeout: float = 5.0,
        open_timeout: float = 10.0,
        command_timeout: float = 60.0,
        read_only: bool = False,
        journal_dir: object = None,
        pool_size: int = 8,
        partitions: int | None = None,
        lease: float | None = None,
    ) -> None:
        self.target: PgTarget = parse(url, schema)
        self.path = self.target.display
        self.read_only = read_only
        parts = partitions if partitions is not None else self.target.partitions
        if parts is None:
            parts = DEFAULT_PARTITIONS
        if (
            isinstance(parts, bool)
            or not isinstance(parts, int)
            or not 1 <= parts <= MAX_PARTITIONS
        ):
            raise ValueError(
                f"partitions must be a whole number from 1 to {MAX_PARTITIONS}, got {parts!r}"
            )
        seconds = lease if lease is not None else self.target.lease
        if seconds is None:
            seconds = DEFAULT_LEASE
        if not isinstance(seconds, int | float) or not 0.1 <= seconds <= 3600:
            raise ValueError(f"lease must be from 0.1 to 3600 seconds, got {seconds!r}")
        #: Seconds a lease lasts unless renewed.
        self.lease_time = float(seconds)
        #: This process's name among those sharing the log.
        self.member = leases.new_member()
        self._db = Sessions(
            self.target,
            durability=durability,
            busy_timeout=busy_timeout,
            open_timeout=open_timeout,
            command_timeout=command_timeout,
            read_only=read_only,
            pool_size=pool_size,
            partitions=parts,
        )
        self._head = 0
        self._watchers: list[Watcher] = []
        self._listener: Listener | None = None

    #: Calls in flight are rows of the log (:meth:`mark_call`).
    records_calls = True
    #: Appends are announced (LISTEN/NOTIFY): nothing to poll.
    poll_interval: float | None = None
    #: Any process does the log's upkeep.
    dispatching = True

    async def poll(self) -> None:
        """Nothing: appends are announced."""

    @property
    def head(self) -> int:
        """The highest head seen: committed here, announced, or read."""
        return self._head

    @property
    def partitions(self) -> int:
        """How many partitions the log has (known once opened)."""
        return self._db.partitions

    # -- opening --------------------------------------------------------------------

    async def open(self) -> None:
        """Open (creating the schema and its tables if needed) the log.

        Raises:
            LogLocked: The log must be migrated to this version's schema, and
                processes of an older version still run on it.
            NotALog: The schema holds tables this library did not create.
            SchemaTooNew: A newer eventbus wrote the log.
            StorageError: The server cannot be reached, or refused (permissions).

        Cancellation: whatever was opened is closed again (shielded).
        """
        self._head = await self._db.open()
        if self.read_only:
            return
        try:
            self._listener = Listener(
                self._db.connect_plain, f"eventbus_{self._db.oid}", self._notified
            )
            await self._listener.start()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self.close()
            if isinstance(exc, Exception) and not isinstance(exc, StorageError):
                raise self._db.translate(exc) from exc
            raise

    async def close(self) -> None:
        """Give up every partition this process holds (so others take them at once),
        stop listening and close every connection. Idempotent."""
        with anyio.CancelScope(shield=True):
            if self._listener is not None:
                await self._listener.stop()
                self._listener = None
                try:
                    with anyio.move_on_after(2.0):
                        await self._db.write(self._leave_all)
                except StorageError as exc:
                    logger.warning(
                        "log %s: could not give up this process's partitions at close "
                        "(%s); they free themselves when their leases expire",
                        self.path,
                        exc,
                    )
            await self._db.close()

    async def _leave_all(self, conn: Connection) -> None:
        subs = [
            str(r[0])
            for r in await conn.fetch(
                "SELECT DISTINCT subscription FROM members WHERE member = $1"
                " UNION SELECT DISTINCT subscription FROM partitions WHERE owner = $1",
                self.member,
            )
        ]
        for sub in subs:
            await leases.release(conn, sub, self.member, None)
            await leases.announce(conn, sub)

    # -- writing --------------------------------------------------------------------

    @property
    def commits_now(self) -> bool:
        return False

    def commit_now(self, batch: WriteBatch) -> list[Receipt] | None:
        """Never: every PostgreSQL transaction is a round trip to the server."""
        return None

    @property
    def appends_now(self) -> bool:
        return False

    def append_now(self, record: NewRecord) -> Receipt | None:
        """Never: every PostgreSQL transaction is a round trip to the server."""
        return None

    async def commit(self, batch: WriteBatch) -> list[Receipt]:
        """Apply ``batch`` in one transaction (see :class:`storage.Storage`).

        Cancellation: the transaction runs to its end first; it may have committed.
        """
        if batch.is_empty():
            if self.read_only:
                raise StorageError(f"{self.path!r} was opened read-only")
            return []
        before = self._head
        try:
            return await self._commit(batch, before)
        except RunClaimLost as exc:
            raise RunClaimLost(self.path, exc.runs) from None

    async def _commit(self, batch: WriteBatch, before: int) -> list[Receipt]:
        try:
            if batch_sql.is_hot(batch):
                receipts, new_head = await self._db.write(
                    batch_sql.commit_hot, batch, time.time(), transaction=False
                )
            else:
                receipts, new_head = await self._db.write(batch_sql.write_batch, batch, time.time())
            head = before if new_head is None else new_head
        except LostConnection as exc:
            logger.warning(
                "log %s: lost the connection during a commit (%s); finding out whether it "
                "committed",
                self.path,
                exc,
            )
            receipts, head = await self._db.write(self._finish, batch, before)
        self._saw_head(head)
        return receipts

    async def _finish(
        self, conn: Connection, batch: WriteBatch, before: int
    ) -> tuple[list[Receipt], int]:
        """After a commit lost its connection, on a new one: if any of its events is
        in the log (by id, past ``before``, the head it started from), it went
        through, and its receipts are read back; otherwise nothing of it did (or it
        appended nothing new), and it is applied now. Applying a batch twice leaves
        what applying it once does (cursors only move forward, ranges merge, rows are
        replaced by the same rows, known idempotency keys are duplicates)."""
        if batch.appends:
            rows = await conn.fetch(
                "SELECT id, seq FROM events WHERE seq > $1 AND id = ANY($2::text[])",
                before,
                [r.id for r in batch.appends],
            )
            found = {str(i): int(q) for i, q in rows}
            if found:
                known = await batch_sql.known_keys(conn, batch.appends)
                receipts: list[Receipt] = []
                for rec in batch.appends:
                    seq = found.get(rec.id)
                    if seq is not None:
                        receipts.append(Receipt(seq, rec.id))
                        continue
                    dup = known.get(rec.idempotency_key or "")
                    if dup is None:
                        raise StorageError(
                            f"cannot tell whether a commit to {self.path!r} went through: "
                            f"some of its events are in the log, but not event {rec.id}"
                        )
                    receipts.append(dup)
                logger.warning("log %s: the interrupted commit had committed", self.path)
                return receipts, max(found.values())
        receipts, new_head = await batch_sql.write_batch(conn, batch, time.time())
        return receipts, before if new_head is None else new_head

    def calls(self, subscription: str, slots: int, width: int) -> CallSlots:
        """Records nothing: on a shared log the bus writes each call in flight to the
        log itself (:meth:`mark_call`), where any process taking over can see it."""
        return NoCallSlots()

    async def redrive(
        self,
        subscription: str | None,
        *,
        ids: Sequence[str] | None = None,
        error_type: str | None = None,
        due_at: float,
        spacing: float = 0.0,
        limit: int = 1_000_000,
    ) -> list[RetryRecord]:
        where = stmts.Filter(subscription, error_type, None, None, ids)
        return await self._db.write(stmts.redrive, where, due_at, spacing, limit, time.time())

    async def purge(
        self,
        subscription: str | None,
        *,
        ids: Sequence[str] | None = None,
        error_type: str | None = None,
        until: float | None = None,
    ) -> int:
        return await self._db.write(
            stmts.purge, stmts.Filter(subscription, error_type, None, until, ids)
        )

    async def drop_subscription(self, name: str) -> bool:
        return await self._db.write(stmts.drop_subscription, name)

    async def done_control(self, ids: Sequence[int]) -> None:
        if not ids:
            return

        async def delete(conn: Connection) -> None:
            await conn.execute("DELETE FROM control WHERE id = ANY($1::bigint[])", list(ids))

        await self._db.write(delete)

    async def compact(
        self, upto: int, older_than: float, idempotency_older_than: float, limit: int = 10_000
    ) -> int:
        return await self._db.write(
            stmts.compact, min(upto, self._head), older_than, idempotency_older_than, limit
        )

    # -- reading --------------------------------------------------------------------

    async def read(
        self, after: int, upto: int, topics: frozenset[str] | None, limit: int
    ) -> list[Record]:
        if limit <= 0:
            return []
        sql = f"SELECT {batch_sql.EVENT_COLUMNS} FROM events WHERE seq > $1 AND seq <= $2"
        if topics is None or "*" in topics:
            rows = await self._db.fetch(sql + " ORDER BY seq LIMIT $3", after, upto, limit)
        else:
            rows = await self._db.fetch(
                sql + " AND topic = ANY($3::text[]) ORDER BY seq LIMIT $4",
                after,
                upto,
                sorted(topics),
                limit,
            )
        return [Record(*row) for row in rows]

    async def subscriptions(self) -> dict[str, SubscriptionInfo]:
        """Every subscription, its cursor the lowest of its partitions'."""
        rows = await self._db.fetch(_SUBSCRIPTIONS)
        return {
            name: SubscriptionInfo(name, tuple(topics.split("\n")), cursor, updated)
            for name, topics, cursor, updated in rows
        }

    async def finished_ahead(self, subscription: str, after: int) -> list[tuple[int, int]]:
        return await self._db.read(stmts.finished_ahead, subscription, after)

    async def dead_letters(
        self,
        subscription: str | None = None,
        limit: int = 100,
        after_seq: int = 0,
        *,
        error_type: str | None = None,
        since: float | None = None,
        until: float | None = None,
        ids: Sequence[str] | None = None,
        after_subscription: str | None = None,
    ) -> list[DeadRecord]:
        where = stmts.Filter(subscription, error_type, since, until, ids)
        seq = where.next(after_seq)
        if after_subscription is None:
            start = f"seq > {seq}"
        else:
            sub = where.next(after_subscription)
            start = f"(seq > {seq} OR (seq = {seq} AND subscription > {sub}))"
        rows = await self._db.fetch(
            f"SELECT {batch_sql.DEAD_COLUMNS} FROM dead_letters WHERE {start} {where.where}"
            f" ORDER BY seq, subscription LIMIT {where.next(limit)}",
            *where.params,
        )
        return [batch_sql.dead_from_row(r) for r in rows]

    async def count_dead_letters(
        self,
        subscription: str | None = None,
        *,
        error_type: str | None = None,
        since: float | None = None,
        until: float | None = None,
        ids: Sequence[str] | None = None,
    ) -> int:
        where = stmts.Filter(subscription, error_type, since, until, ids)
        ((n,),) = await self._db.fetch(
            f"SELECT count(*) FROM dead_letters WHERE true {where.where}", *where.params
        )
        return int(n)

    async def get_state(self, subscription: str, keys: Sequence[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        rows = await self._db.fetch(
            "SELECT key, value FROM state WHERE subscription = $1 AND key = ANY($2::text[])",
            subscription,
            list(keys),
        )
        return {k: bytes(v) for k, v in rows}

    async def state_items(
        self, subscription: str, after: str = "", limit: int = 1000
    ) -> list[tuple[str, bytes]]:
        rows = await self._db.fetch(
            "SELECT key, value FROM state WHERE subscription = $1 AND key > $2"
            " ORDER BY key LIMIT $3",
            subscription,
            after,
            limit,
        )
        return [(k, bytes(v)) for k, v in rows]

    async def get_effect(self, key: str) -> bytes | None:
        rows = await self._db.fetch("SELECT result FROM effects WHERE key = $1", key)
        return bytes(rows[0][0]) if rows else None

    async def retries(self, subscription: str) -> list[RetryRecord]:
        rows = await self._db.fetch(
            f"SELECT {batch_sql.RETRY_COLUMNS} FROM retries WHERE subscription = $1 ORDER BY seq",
            subscription,
        )
        return [batch_sql.retry_from_row(r) for r in rows]

    async def workflow(self, workflow_id: str) -> WorkflowRecord | None:
        rows = await self._db.fetch(
            f"SELECT {batch_sql.WORKFLOW_COLUMNS} FROM workflows WHERE id = $1", workflow_id
        )
        return batch_sql.workflow_from_row(rows[0]) if rows else None

    async def workflows(
        self,
        *,
        name: str | None = None,
        status: str | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> list[WorkflowRecord]:
        rows = await self._db.fetch(
            f"SELECT {batch_sql.WORKFLOW_COLUMNS} FROM workflows WHERE num > $1"
            " AND ($2::text IS NULL OR name = $2) AND ($3::text IS NULL OR status = $3)"
            " ORDER BY num LIMIT $4",
            after,
            name,
            status,
            limit,
        )
        return [batch_sql.workflow_from_row(r) for r in rows]

    async def count_workflows(self, *, name: str | None = None, status: str | None = None) -> int:
        ((n,),) = await self._db.fetch(
            "SELECT count(*) FROM workflows"
            " WHERE ($1::text IS NULL OR name = $1) AND ($2::text IS NULL OR status = $2)",
            name,
            status,
        )
        return int(n)

    async def steps(self, workflow_id: str) -> list[StepRecord]:
        rows = await self._db.fetch(
            f"SELECT {batch_sql.STEP_COLUMNS} FROM workflow_steps WHERE workflow_id = $1"
            " ORDER BY position",
            workflow_id,
        )
        return [batch_sql.step_from_row(r) for r in rows]

    async def unaccounted(self, subscription: str, upto: int, limit: int = 100) -> Unaccounted:
        return await self._db.read(stmts.unaccounted, subscription, upto, limit, snapshot=True)

    async def take_control(self) -> list[tuple[int, bytes]]:
        """Commands queued in the log by another process (the CLI), oldest first."""
        rows = await self._db.fetch("SELECT id, command FROM control ORDER BY id LIMIT 100")
        return [(int(i), bytes(c)) for i, c in rows]

    async def stats(self, *, exact: bool = True) -> LogStats:
        if exact:
            return await self._db.read(self._stats, snapshot=True)
        return await self._db.read(self._quick_stats, snapshot=True)

    async def _quick_stats(self, conn: Connection) -> LogStats:
        return await self._stats(conn, exact=False)

    async def _stats(self, conn: Connection, *, exact: bool = True) -> LogStats:
        head = await stmts.read_head(conn)
        oldest = await conn.fetchval("SELECT min(seq) FROM events")
        count = 0 if oldest is None else max(0, head - oldest + 1)
        if exact:
            count = await conn.fetchval("SELECT count(*) FROM events")
        subs = {
            name: SubscriptionInfo(name, tuple(topics.split("\n")), cursor, updated)
            for name, topics, cursor, updated in await conn.fetch(_SUBSCRIPTIONS)
        }
        lag: dict[str, int] = {}
        for info in subs.values():
            if not exact:
                lag[info.name] = max(0, head - info.cursor)
                continue
            # Per partition: each has a cursor of its own.
            topic_sql = "" if "*" in info.topics else " AND e.topic = ANY($2::text[])"
            args: list[object] = [info.name]
            if "*" not in info.topics:
                args.append(list(info.topics))
            n = await conn.fetchval(
                "SELECT count(*) FROM events e JOIN partitions p ON p.part = e.part"
                f" WHERE p.subscription = $1 AND e.seq > p.cursor{topic_sql}",
                *args,
            )
            lag[info.name] = int(n)
        dead = await conn.fetch(
            "SELECT subscription, count(*) FROM dead_letters GROUP BY subscription"
        )
        retries = await conn.fetch(
            "SELECT subscription, count(*) FROM retries GROUP BY subscription"
        )
        size = await conn.fetchval(
            "SELECT coalesce(sum(pg_total_relation_size(oid)), 0) FROM pg_class"
            " WHERE relnamespace = $1::bigint::oid AND relkind = 'r'",
            self._db.oid,
        )
        return LogStats(
            head=head,
            events=int(count),
            oldest_seq=oldest,
            subscriptions=tuple(subs.values()),
            lag=lag,
            dead_letters={name: int(n) for name, n in dead},
            size_bytes=int(size),
            wal_bytes=0,
            retries={name: int(n) for name, n in retries},
        )

    async def load(
        self,
        chunks: AsyncIterator[tuple[str, tuple[str, ...], list[tuple[Any, ...]]]],
        on_copied: Callable[[str, int], None] | None = None,
    ) -> dict[str, int]:
        """Fill this log, which must be empty, with the rows of another, in one
        transaction (``eventbus migrate``: :mod:`storage._migrate`). Returns the rows
        copied per table.

        Raises:
            StorageError: The log is not empty.

        Cancellation: the transaction runs to its end first (shielded).
        """
        counts = await self._db.write(stmts.load, chunks, on_copied, self.path)
        self._head = await self._db.read(stmts.read_head)
        return counts

    # -- sharing the work among processes (see _pg_leases) --------------------------

    async def claim_runs(self, ids: Sequence[str], lease: float) -> dict[str, int]:
        """See :meth:`SharedLog.claim_runs` (expiry by the database's clock)."""
        if not ids:
            return {}
        return await self._db.write(batch_sql.claim_runs, list(ids), self.member, lease)

    async def release_runs(self, ids: Sequence[str]) -> None:
        """See :meth:`SharedLog.release_runs`."""
        if ids:
            await self._db.write(batch_sql.release_runs, list(ids), self.member)

    def watch(self, watcher: Watcher) -> None:
        """Call ``watcher`` on the event loop with each :class:`Notice` of what
        processes announce on the log (this one's appends included)."""
        self._watchers.append(watcher)

    def _notified(self, notice: Notice) -> None:
        if notice.kind == "head":
            if notice.head <= self._head:
                return
            self._head = notice.head
        for watcher in list(self._watchers):
            watcher(notice)

    def _saw_head(self, head: int) -> None:
        if head > self._head:
            self._notified(Notice("head", "", head))

    async def announce(self, subscription: str) -> None:
        """Tell the processes holding ``subscription``'s partitions that its retry
        lane was written outside their handling (a redrive, a repair): they read it
        again."""

        async def tell(conn: Connection) -> None:
            await leases.announce(conn, subscription, retries=True)

        await self._db.read(tell)

    async def heartbeat(self, subscription: str, lease: Lease | None) -> Share:
        """Renew what of ``lease`` is still held, say this process is alive on
        ``subscription`` and learn its fair share (also: the head, read as a safety
        net for a missed notification, which re-listens if its connection dropped).

        Raises:
            StorageError: The database cannot be reached; the lease then runs out
                unless a later heartbeat renews it in time.
        """
        if self._listener is not None and not self._listener.alive:
            logger.warning("log %s: listening again after losing the connection", self.path)
            try:
                await self._listener.start()
            except Exception as exc:  # noqa: BLE001 - retried at the next heartbeat
                logger.warning("log %s: cannot listen yet (%s)", self.path, exc)

        async def beat(conn: Connection) -> tuple[Share, bool]:
            async with conn.transaction():
                found = await leases.heartbeat(
                    conn, subscription, self.member, self.lease_time, lease, self.partitions
                )
                if found[1]:
                    await leases.announce(conn, subscription)
                return found

        share, _ = await self._db.read(beat)
        self._saw_head(share.head)
        return share

    async def acquire(self, subscription: str, want: int) -> Claim:
        """Take up to ``want`` more free partitions of ``subscription`` (charging the
        deaths of a holder whose lease expired: :func:`_pg_leases.charge`); returns
        everything this process holds of it now."""

        async def take(conn: Connection) -> tuple[Claim, int]:
            async with conn.transaction():
                return await leases.acquire(
                    conn, subscription, self.member, self.lease_time, want, time.time()
                )

        claim, charged = await self._db.read(take)
        if charged:
            logger.warning(
                "log %s: subscription %s: took over partitions %s from a process that "
                "stopped; it died while handling %d events, each counted as a failed "
                "attempt (eventbus.ProcessDied)",
                self.path,
                subscription,
                ", ".join(map(str, claim.taken_over)),
                charged,
            )
        return claim

    async def release(self, subscription: str, partitions: Sequence[int] | None) -> None:
        """Give up ``partitions`` of ``subscription`` (all, and membership, if None),
        and announce it, so another process takes them at once."""

        async def give(conn: Connection) -> None:
            async with conn.transaction():
                if await leases.release(conn, subscription, self.member, partitions):
                    await leases.announce(conn, subscription)

        await self._db.read(give)

    async def mark_call(
        self,
        lease: Lease,
        slot: int,
        seqs: Sequence[int],
        attempts: Sequence[int],
        keys: Sequence[str | None],
        call: int = 0,
    ) -> None:
        """Record, before it starts, handler call number ``call`` of ``seqs`` (at
        ``attempts``, of ``keys``) in ``slot`` under ``lease``: if this process dies
        during it, whoever takes the partitions over charges the death to those
        events."""
        await self._db.read(
            leases.mark_call, lease, self.partitions, slot, seqs, attempts, keys, call
        )

    async def end_calls(self, lease: Lease, calls: Sequence[tuple[int, int]]) -> None:
        """The calls ``(slot, call number)`` returned or raised: a death is no longer
        theirs (a slot whose next call started is left as it is)."""
        if calls:
            await self._db.read(leases.end_calls, lease, calls)

    async def read_claimed(
        self,
        claim: Claim,
        after: int,
        upto: int,
        topics: frozenset[str] | None,
        limit: int,
    ) -> list[Record]:
        """:meth:`read`, of the claim's partitions only, each past its start."""
        if limit <= 0 or not claim.lease.partitions:
            return []
        return await self._db.read(
            leases.read_claimed, claim, self.partitions, after, upto, topics, limit
        )

    async def claimed_retries(self, lease: Lease) -> list[RetryRecord]:
        """:meth:`retries`, of the lease's partitions only."""
        return await self._db.read(leases.claimed_retries, lease)

    async def claimed_finished_ahead(self, lease: Lease, after: int) -> list[tuple[int, int]]:
        """:meth:`finished_ahead`, for a reader of the lease's partitions."""
        return await self._db.read(leases.claimed_finished_ahead, lease, after)

    async def progress(
        self, subscription: str, topics: frozenset[str], upto: int
    ) -> tuple[int, int]:
        """How far ``subscription`` has finished the log up to ``upto`` in all its
        partitions, whoever holds them, and how many of its events wait in its retry
        lane."""
        return await self._db.read(leases.progress, subscription, topics, upto)
