"""The log on PostgreSQL, through asyncpg: the same contract as the SQLite log.

One log is one schema (``_pg_url``). The owner writes through one connection, which
holds the log's ownership lock for the bus's life (``_pg_owner``); reads go through
a small pool, so a long backlog read never holds up a group commit.

**Visibility: appends are serialised, so readers never skip an event.** A reader
that has seen event ``n`` must be sure no transaction still open can commit an
event below ``n``; with sequence values taken from a ``SEQUENCE`` that is false
(``nextval`` is not transactional: two appends commit out of order, and a reader
that moved past the later one never sees the earlier). Here the head of the log is
one row, ``head``, that every append locks (``SELECT ... FOR UPDATE``, or the
``UPDATE`` that moves it) before it numbers its events after it, and holds to its
commit. Appends therefore commit one after the other in sequence order, a rolled
back append gives its numbers back (sequence numbers stay dense, as the contract
requires), and every committed event has all lower sequence numbers committed
before it: whatever prefix of the log a reader sees is final. The other design
(record ``pg_current_xact_id()`` per event and read only below
``pg_snapshot_xmin(pg_current_snapshot())``) lets appends run in parallel, but it
leaves gaps in the numbering and makes every reader wait for the oldest transaction
open anywhere in the cluster, however unrelated; here only appends to this log wait
for each other, and only for the length of one group commit (about a millisecond),
which the bus amortises over the whole batch. Several processes appending to one
log stay correct under this design: they take turns on the head row.

**Durability.** ``"full"`` sets ``synchronous_commit = on`` on the writer's session;
``"normal"`` keeps the server's setting (``on`` unless changed); ``"off"`` sets it
``off``: a commit may then be lost if the database server (not this process)
crashes within a fraction of a second.

**The call journal** (which handler calls were running when the process died, see
``_calls.py``) stays a memory-mapped file on this machine, as for SQLite, in
``journal_dir`` and named after the log's id: starting or ending a call is a store
into mapped memory (well under a microsecond), where a row per call would cost a
round trip to the server (about 0.1 ms here) before every handler call, and a row
written in batches would miss exactly the call that kills the process at once.
The log records which life of which journal is the current owner's
(``meta.owner_generation``); the next owner to open the log on this machine charges
the deaths the journal records, once, and only if no other owner came between (a
journal left behind by an owner that was followed by another, elsewhere, says
nothing of the log now). What this does not cover: an owner that dies and is
followed only by owners on other machines has its last calls retried without a
death counted (see the README on several processes).

**Cancellation.** A write runs in a shielded scope, each statement bounded by
``command_timeout``: a cancelled caller waits for the transaction in flight to
commit or roll back, then the cancellation proceeds. So, as with SQLite, a cancelled
:meth:`PostgresStorage.commit` may have committed; a publisher that retries with an
idempotency key gets the original receipt. A read stops at once (asyncpg cancels
the statement on the server).

**A lost connection.** A commit whose connection is lost is finished on a new one,
which owns the log again: if the head moved, the commit went through and its
receipts are worked out again, else it is applied then (``_finish``). Other writes
fail with a retryable ``StorageError``; reads run once more on a new connection.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import TypeAlias

import anyio
import asyncpg

from . import _pg_batch as batch_sql
from . import _pg_statements as stmts
from ._calls import CallJournal, CallSlots, NoCallSlots, read_journal
from ._errors import StorageError
from ._pg_session import Durability, LostConnection, Sessions
from ._pg_url import PgTarget, default_journal_dir, parse
from ._types import (
    PROCESS_DIED,
    DeadRecord,
    LogStats,
    Receipt,
    Record,
    RetryRecord,
    StepRecord,
    SubscriptionInfo,
    Unaccounted,
    WorkflowRecord,
    WriteBatch,
)

logger = logging.getLogger("eventbus.storage")

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record]"

__all__ = ["Durability", "PostgresStorage"]


class PostgresStorage:
    """A log in one schema of a PostgreSQL database.

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
        read_only: Open for inspection only: no ownership lock, no writes. Safe while
            a bus runs on the log.
        journal_dir: The directory of this machine's call journal for the log
            (default: the URL's ``journal_dir``, else ``$XDG_STATE_HOME/eventbus``).
        pool_size: Connections for reads, beside the writer's.
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
        journal_dir: str | os.PathLike[str] | None = None,
        pool_size: int = 4,
    ) -> None:
        self.target: PgTarget = parse(url, schema)
        self.path = self.target.display
        self.read_only = read_only
        self.journal_dir = os.fspath(
            journal_dir or self.target.journal_dir or default_journal_dir()
        )
        self._db = Sessions(
            self.target,
            durability=durability,
            busy_timeout=busy_timeout,
            open_timeout=open_timeout,
            command_timeout=command_timeout,
            read_only=read_only,
            pool_size=pool_size,
        )
        self._journal: CallJournal | None = None
        self._head = 0

    @property
    def head(self) -> int:
        return self._head

    @property
    def journal_path(self) -> str:
        """This machine's call journal for the log (known once opened)."""
        return os.path.join(self.journal_dir, f"pg-{self._db.log_id}.calls")

    # -- opening --------------------------------------------------------------------

    async def open(self) -> None:
        """Open (creating the schema and its tables if needed) the log.

        Raises:
            LogLocked: Another process runs a bus on this log.
            NotALog: The schema holds tables this library did not create.
            SchemaTooNew: A newer eventbus wrote the log.
            StorageError: The server cannot be reached, or refused (permissions).

        Cancellation: whatever was opened is closed again (shielded).
        """
        self._head = await self._db.open()
        try:
            if not self.read_only:
                await self._open_journal()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.close()
            raise

    async def _open_journal(self) -> None:
        """Charge the deaths this machine's call journal records for the log's last
        owner, register this life's journal, then start it."""
        path = self.journal_path
        try:
            os.makedirs(self.journal_dir, mode=0o700, exist_ok=True)
            previous = await anyio.to_thread.run_sync(read_journal, path)
        except OSError as exc:
            raise StorageError(
                f"cannot use {self.journal_dir!r} for the call journal of {self.path!r} "
                f"({exc}); give the log a writable directory with ?journal_dir=... in "
                "its URL"
            ) from exc
        last, inflight = previous if previous is not None else (None, {})
        self._db.generation = int.from_bytes(os.urandom(8), "little") >> 1
        charged = await self._db.write(
            stmts.charge_deaths, last, inflight, self._db.generation, time.time()
        )
        if charged:
            logger.warning(
                "log %s: the process died while handling %d events; each counts as a "
                "failed attempt (%s)",
                self.path,
                charged,
                PROCESS_DIED,
            )
        try:
            self._journal = await anyio.to_thread.run_sync(CallJournal, path, self._db.generation)
        except OSError as exc:
            raise StorageError(
                f"cannot write the call journal {path!r} of {self.path!r} ({exc})"
            ) from exc

    async def close(self) -> None:
        """Let go of the ownership lock and close every connection. Idempotent."""
        await self._db.close()
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    # -- writing --------------------------------------------------------------------

    def commit_now(self, batch: WriteBatch) -> list[Receipt] | None:
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
        self._head = max(self._head, head)
        return receipts

    async def _finish(
        self, conn: Connection, batch: WriteBatch, before: int
    ) -> tuple[list[Receipt], int]:
        """After a commit lost its connection, on a new one that owns the log again
        (so no one else appended meanwhile): if the head moved past ``before``, that
        commit went through, and its receipts are worked out again; otherwise nothing
        of it did, and it is applied now. A batch without appends is applied again
        either way: applying one twice leaves what applying it once does (cursors
        only move forward, ledger ranges merge, rows are replaced by the same rows).
        """
        head = await stmts.read_head(conn)
        if batch.appends and head != before:
            known = await batch_sql.known_keys(conn, batch.appends, before)
            receipts, rows, _ = batch_sql.number(batch.appends, before, known)
            if before + len(rows) != head:
                raise StorageError(
                    f"cannot tell whether a commit to {self.path!r} went through: the head "
                    f"moved from {before} to {head}, not by the {len(rows)} events it held"
                )
            logger.warning("log %s: the interrupted commit had committed", self.path)
            return receipts, head
        receipts, new_head = await batch_sql.write_batch(conn, batch, time.time())
        return receipts, head if new_head is None else new_head

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

    def calls(self, subscription: str, slots: int, width: int) -> CallSlots:
        if self._journal is None:
            return NoCallSlots()  # read-only: nothing runs
        return self._journal.region(subscription, slots, width)

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
        rows = await self._db.fetch(
            "SELECT name, topics, cursor, updated_at FROM subscriptions ORDER BY name"
        )
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

    async def stats(self) -> LogStats:
        return await self._db.read(self._stats, snapshot=True)

    async def _stats(self, conn: Connection) -> LogStats:
        head = await stmts.read_head(conn)
        count, oldest = await conn.fetchrow("SELECT count(*), min(seq) FROM events") or (0, None)
        subs = {
            name: SubscriptionInfo(name, tuple(topics.split("\n")), cursor, updated)
            for name, topics, cursor, updated in await conn.fetch(
                "SELECT name, topics, cursor, updated_at FROM subscriptions ORDER BY name"
            )
        }
        lag: dict[str, int] = {}
        for info in subs.values():
            if "*" in info.topics:
                n = await conn.fetchval("SELECT count(*) FROM events WHERE seq > $1", info.cursor)
            else:
                n = await conn.fetchval(
                    "SELECT count(*) FROM events WHERE seq > $1 AND topic = ANY($2::text[])",
                    info.cursor,
                    list(info.topics),
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
