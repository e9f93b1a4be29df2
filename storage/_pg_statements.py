"""The other statements of the PostgreSQL log: reads that need more than one
query, charging deaths, and maintenance (redrive, purge, drop, compaction). Each
runs on one asyncpg connection, inside a transaction its caller opened
(``_postgres.py``); they mirror ``_statements.py`` (the SQLite log) one for one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from ._errors import StorageError
from ._pg_batch import (
    ADD_ACKED,
    DEAD_COLUMNS,
    UPSERT_RETRY,
    dead_from_row,
    retry_row,
)
from ._types import WORKFLOW_PREFIX, RetryRecord, Unaccounted

if TYPE_CHECKING:
    import asyncpg

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record]"


# -- reads -----------------------------------------------------------------------------


async def read_head(conn: Connection) -> int:
    return int(await conn.fetchval("SELECT seq FROM head"))


async def finished_ahead(conn: Connection, sub: str, after: int) -> list[tuple[int, int]]:
    """``sub``'s acknowledged ranges and dead letters past ``after``, in order."""
    rows = await conn.fetch(
        "SELECT greatest(lo, $2 + 1), hi FROM acked WHERE subscription = $1 AND hi > $2"
        " UNION ALL SELECT seq, seq FROM dead_letters WHERE subscription = $1 AND seq > $2"
        " ORDER BY 1, 2",
        sub,
        after,
    )
    return [(int(lo), int(hi)) for lo, hi in rows]


async def unaccounted(conn: Connection, sub: str, upto: int, limit: int) -> Unaccounted:
    """Events up to ``upto`` (and their partition's cursor) on ``sub``'s topics that it
    has neither acknowledged, nor in its retry lane, nor dead-lettered. A cursor
    passes only events done, retrying or dead-lettered, and records the last two as
    holes: so the events to look at are the holes no longer retrying or dead-lettered
    and not acknowledged since. Run it in a REPEATABLE READ transaction: one
    snapshot."""
    info = await conn.fetchrow("SELECT topics FROM subscriptions WHERE name = $1", sub)
    if info is None:
        return Unaccounted(sub, 0, ())
    topics = str(info[0]).split("\n")
    topic_sql = "" if "*" in topics else " AND e.topic = ANY($3::text[])"
    args: list[object] = [sub, upto] if "*" in topics else [sub, upto, topics]
    rows = await conn.fetch(
        "SELECT h.seq FROM holes h JOIN events e ON e.seq = h.seq"
        " JOIN partitions p ON p.subscription = h.subscription AND p.part = e.part"
        f" WHERE h.subscription = $1 AND h.seq <= $2 AND h.seq <= p.cursor{topic_sql}"
        " AND NOT EXISTS (SELECT 1 FROM retries r WHERE r.subscription = $1 AND r.seq = h.seq)"
        " AND NOT EXISTS (SELECT 1 FROM dead_letters d"
        " WHERE d.subscription = $1 AND d.seq = h.seq)"
        " AND NOT EXISTS (SELECT 1 FROM acked a WHERE a.subscription = $1"
        " AND a.lo <= h.seq AND a.hi >= h.seq)"
        " ORDER BY h.seq",
        *args,
    )
    return Unaccounted(sub, len(rows), tuple(int(r[0]) for r in rows[:limit]))


# -- maintenance -----------------------------------------------------------------------


async def compact(
    conn: Connection, upto: int, older_than: float, idem_older_than: float, limit: int
) -> int:
    """Delete up to ``limit`` finished events (one transaction: the caller's)."""
    row = await conn.fetchrow(
        "SELECT seq FROM events WHERE seq <= $1 AND created_at < $2 ORDER BY seq LIMIT 1 OFFSET $3",
        upto,
        older_than,
        max(limit - 1, 0),
    )
    bound = upto if row is None else min(upto, int(row[0]))
    status = await conn.execute(
        "DELETE FROM events WHERE seq <= $1 AND created_at < $2", bound, older_than
    )
    # The head lives in its own row: compacting every event never forgets it.
    await conn.execute("DELETE FROM idempotency WHERE created_at < $1", idem_older_than)
    await conn.execute("DELETE FROM effects WHERE created_at < $1", idem_older_than)
    # Finished workflow runs, after the same retention as idempotency keys: an id
    # stays known (start_workflow returns the old run) for as long.
    old = "status IN ('completed', 'cancelled') AND updated_at < $1"
    await conn.execute(
        f"DELETE FROM workflow_steps WHERE workflow_id IN (SELECT id FROM workflows WHERE {old})",
        idem_older_than,
    )
    await conn.execute(f"DELETE FROM workflows WHERE {old}", idem_older_than)
    # Holes of events gone from the log can never be unaccounted for again.
    await conn.execute(
        "DELETE FROM holes WHERE seq < (SELECT coalesce(min(seq), $1 + 1) FROM events)", bound
    )
    return _rowcount(status)


def _rowcount(status: str) -> int:
    """The row count of a command tag such as ``"DELETE 12"``."""
    return int(status.rsplit(" ", 1)[-1])


class Filter:
    """A ``WHERE`` clause of dead-letter filters, numbering its parameters from
    ``start``."""

    def __init__(
        self,
        subscription: str | None,
        error_type: str | None,
        since: float | None,
        until: float | None,
        ids: Sequence[str] | None,
        start: int = 1,
    ) -> None:
        self.params: list[object] = []
        self._n = start
        clauses: list[str] = []
        if subscription is not None:
            clauses.append(f"subscription = {self._add(subscription)}")
        if error_type is not None:
            # Exact: the qualified name, or its last dotted part ("ValueError").
            p = self._add(error_type)
            clauses.append(f"(error_type = {p} OR right(error_type, length({p}) + 1) = '.' || {p})")
        if since is not None:
            clauses.append(f"last_failed_at >= {self._add(since)}")
        if until is not None:
            clauses.append(f"last_failed_at < {self._add(until)}")
        if ids is not None:
            clauses.append(f"id = ANY({self._add(list(ids))}::text[])")
        self.where = "".join(f" AND {c}" for c in clauses)

    def _add(self, value: object) -> str:
        self.params.append(value)
        self._n += 1
        return f"${self._n - 1}::{_cast(value)}"

    def next(self, value: object) -> str:
        """A further parameter, after the filter's."""
        return self._add(value)


def _cast(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "bigint"
    if isinstance(value, float):
        return "float8"
    if isinstance(value, list):
        return "text[]"
    return "text"


async def redrive(
    conn: Connection, where: Filter, due_at: float, spacing: float, limit: int, now: float
) -> list[RetryRecord]:
    """Move dead letters back to their subscriptions' retry lanes, attempts reset."""
    rows = await conn.fetch(
        f"SELECT {DEAD_COLUMNS} FROM dead_letters WHERE true {where.where}"
        f" ORDER BY seq, subscription LIMIT {where.next(limit)}",
        *where.params,
    )
    out = [
        RetryRecord(d.subscription, d.record, 1, due_at + i * spacing)
        for i, d in enumerate(dead_from_row(r) for r in rows)
    ]
    # A failed workflow run goes back to running, its finished steps kept.
    runs = [r.record.id for r in out if r.subscription.startswith(WORKFLOW_PREFIX)]
    if runs:
        await conn.execute(
            "UPDATE workflows SET status = 'running', updated_at = $1, error_type = '',"
            " error_message = '', traceback = '' WHERE id = ANY($2::text[]) AND status = 'failed'",
            now,
            runs,
        )
        # The step that failed the run and those interrupted run again; failures the
        # workflow handled replay as they happened.
        await conn.execute(
            "DELETE FROM workflow_steps WHERE workflow_id = ANY($1::text[])"
            " AND status IN ('fatal', 'running')",
            runs,
        )
    lane = [retry_row(r) for r in out if not r.subscription.startswith(WORKFLOW_PREFIX)]
    if lane:
        await conn.executemany(UPSERT_RETRY, lane)
    if out:
        await conn.execute(
            "DELETE FROM dead_letters WHERE (subscription, seq) IN"
            " (SELECT * FROM unnest($1::text[], $2::bigint[]))",
            [r.subscription for r in out],
            [r.record.seq for r in out],
        )
    return out


async def purge(conn: Connection, where: Filter) -> int:
    rows = await conn.fetch(
        f"DELETE FROM dead_letters WHERE true {where.where} RETURNING subscription, seq",
        *where.params,
    )
    # A purged event is settled by the operator's decision: account it as done.
    settled = [(s, int(q)) for s, q in rows if not s.startswith(WORKFLOW_PREFIX)]
    if settled:
        await conn.execute(
            ADD_ACKED,
            [s for s, _ in settled],
            [q for _, q in settled],
            [q for _, q in settled],
        )
    return len(rows)


async def drop_subscription(conn: Connection, name: str) -> bool:
    existed = _rowcount(await conn.execute("DELETE FROM subscriptions WHERE name = $1", name))
    for table in ("acked", "retries", "dead_letters", "state", "partitions", "holes", "members"):
        await conn.execute(f"DELETE FROM {table} WHERE subscription = $1", name)
    await conn.execute("DELETE FROM calls WHERE subscription = $1", name)
    return bool(existed)


# -- filling a new log -----------------------------------------------------------------


async def load(
    conn: Connection,
    chunks: AsyncIterator[tuple[str, tuple[str, ...], list[tuple[Any, ...]]]],
    on_copied: Callable[[str, int], None] | None,
    path: str,
) -> dict[str, int]:
    """Fill this empty log with rows of another (``_migrate``), in the caller's
    transaction: ``(table, columns, rows)`` chunks, and ``("meta",
    ("compacted_upto",), [(seq,)])`` for the head of a log whose last events were
    compacted. Then each subscription's partitions start at its cursor."""
    used = await conn.fetchval(
        "SELECT (SELECT seq FROM head) > 0 OR EXISTS (SELECT 1 FROM subscriptions)"
        " OR EXISTS (SELECT 1 FROM workflows) OR EXISTS (SELECT 1 FROM dead_letters)"
    )
    if used:
        raise StorageError(
            f"{path!r} is not empty: a log is copied only into a new one. Give it another "
            "schema (?schema=... in the URL), or drop this one first"
        )
    counts: dict[str, int] = {}
    compacted = 0
    async for table, columns, rows in chunks:
        if table == "meta":
            compacted = int(rows[0][0])
            continue
        await conn.copy_records_to_table(table, records=rows, columns=list(columns))
        counts[table] = counts.get(table, 0) + len(rows)
        if on_copied is not None:
            on_copied(table, len(rows))
    await conn.execute(
        "UPDATE head SET seq = greatest((SELECT coalesce(max(seq), 0) FROM events), $1)",
        compacted,
    )
    await conn.execute(
        "INSERT INTO partitions (subscription, part, cursor)"
        " SELECT s.name, p, s.cursor FROM subscriptions s,"
        " generate_series(0, partition_count() - 1) AS p ON CONFLICT DO NOTHING"
    )
    await conn.execute(
        "INSERT INTO holes (subscription, seq)"
        " SELECT r.subscription, r.seq FROM retries r JOIN subscriptions s"
        " ON s.name = r.subscription WHERE r.seq <= s.cursor"
        " UNION SELECT d.subscription, d.seq FROM dead_letters d JOIN subscriptions s"
        " ON s.name = d.subscription WHERE d.seq <= s.cursor"
        " ON CONFLICT DO NOTHING"
    )
    await conn.execute(
        "SELECT setval(pg_get_serial_sequence('workflows', 'num'),"
        " coalesce(max(num), 1), max(num) IS NOT NULL) FROM workflows"
    )
    return counts
