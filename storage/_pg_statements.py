"""The other statements of the PostgreSQL log: reads that need more than one
query, charging deaths, and maintenance (redrive, purge, drop, compaction). Each
runs on one asyncpg connection, inside a transaction its caller opened
(``_postgres.py``); they mirror ``_statements.py`` (the SQLite log) one for one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

from ._pg_batch import (
    ADD_ACKED,
    DEAD_COLUMNS,
    EVENT_COLUMNS,
    UPSERT_RETRY,
    dead_from_row,
    retry_row,
)
from ._types import (
    PROCESS_DIED,
    WORKFLOW_PREFIX,
    Record,
    RetryRecord,
    Unaccounted,
)

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


# Past this many gaps between acknowledged ranges, one scan beats a query per gap.
_MAX_GAP_QUERIES = 2000


async def unaccounted(conn: Connection, sub: str, upto: int, limit: int) -> Unaccounted:
    """Events up to ``upto`` (and the cursor) on ``sub``'s topics that it has neither
    acknowledged, nor in its retry lane, nor dead-lettered. Run it in a REPEATABLE
    READ transaction: one snapshot."""
    info = await conn.fetchrow("SELECT topics, cursor FROM subscriptions WHERE name = $1", sub)
    if info is None:
        return Unaccounted(sub, 0, ())
    topics = str(info[0]).split("\n")
    upto = min(upto, int(info[1]))
    ranges = [
        (int(lo), int(hi))
        for lo, hi in await conn.fetch(
            "SELECT lo, hi FROM acked WHERE subscription = $1 ORDER BY lo", sub
        )
    ]
    held = {
        int(seq)
        for (seq,) in await conn.fetch(
            "SELECT seq FROM retries WHERE subscription = $1"
            " UNION SELECT seq FROM dead_letters WHERE subscription = $1",
            sub,
        )
    }
    gaps: list[tuple[int, int]] = []
    covered = 0  # every seq <= covered is in a range
    for lo, hi in ranges:
        if covered >= upto:
            break
        if lo > covered + 1:
            gaps.append((covered + 1, min(lo - 1, upto)))
        covered = max(covered, hi)
    if covered < upto:
        gaps.append((covered + 1, upto))
    if len(gaps) > _MAX_GAP_QUERIES:
        gaps = [(1, upto)]  # then held and ranges are checked per event below
    topic_sql = "" if "*" in topics else " AND topic = ANY($3::text[])"
    sql = f"SELECT seq FROM events WHERE seq BETWEEN $1 AND $2{topic_sql} ORDER BY seq"
    count = 0
    first: list[int] = []
    i = 0
    for a, b in gaps:
        args: list[object] = [a, b] if "*" in topics else [a, b, topics]
        for (seq,) in await conn.fetch(sql, *args):
            while i < len(ranges) and ranges[i][1] < seq:
                i += 1
            if (i < len(ranges) and ranges[i][0] <= seq) or seq in held:
                continue
            count += 1
            if len(first) < limit:
                first.append(int(seq))
    return Unaccounted(sub, count, tuple(first))


# -- deaths ----------------------------------------------------------------------------


async def charge_deaths(
    conn: Connection,
    previous: int | None,
    inflight: dict[str, list[int]],
    generation: int,
    now: float,
) -> int:
    """Count a failed attempt for every event whose handler call was in flight when
    the previous owner died, then register this life's journal, ``generation``.
    Returns how many were charged.

    ``previous`` and ``inflight`` are what this machine's call journal says. It is
    charged only if it is the journal of the log's last owner (its generation is the
    one registered last) and not charged yet: a journal left on this machine by an
    owner that was followed by another one (elsewhere) says nothing of the log now.
    """
    rows: dict[str, str] = {
        key: value
        for key, value in await conn.fetch(
            "SELECT key, value FROM meta WHERE key IN ('owner_generation', 'calls_generation')"
        )
    }
    charged = 0
    last = rows.get("owner_generation")
    if (
        previous is not None
        and inflight
        and last == str(previous)
        and rows.get("calls_generation") != str(previous)
    ):
        subs = {
            name
            for (name,) in await conn.fetch(
                "SELECT name FROM subscriptions WHERE name = ANY($1::text[])", list(inflight)
            )
        }
        for sub, seqs in inflight.items():
            if sub in subs:
                for seq in sorted(set(seqs)):
                    charged += await _charge(conn, sub, seq, now)
    if previous is not None:
        await _set_meta(conn, "calls_generation", str(previous))
    await _set_meta(conn, "owner_generation", str(generation))
    return charged


async def _set_meta(conn: Connection, key: str, value: str) -> None:
    await conn.execute(
        "INSERT INTO meta (key, value) VALUES ($1, $2)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        key,
        value,
    )


async def _charge(conn: Connection, sub: str, seq: int, now: float) -> int:
    row = await conn.fetchrow(
        "SELECT attempt FROM retries WHERE subscription = $1 AND seq = $2", sub, seq
    )
    if row is not None:
        failed = int(row[0])
        await conn.execute(
            "UPDATE retries SET attempt = $1, due_at = $2, running = false,"
            " first_failed_at = coalesce(first_failed_at, $2), error_type = $3,"
            " error_message = $4, traceback = '' WHERE subscription = $5 AND seq = $6",
            failed + 1,
            now,
            PROCESS_DIED,
            _died(failed),
            sub,
            seq,
        )
        return 1
    finished = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM dead_letters WHERE subscription = $1 AND seq = $2)"
        " OR EXISTS (SELECT 1 FROM acked WHERE subscription = $1 AND lo <= $2 AND hi >= $2)",
        sub,
        seq,
    )
    if finished:
        return 0
    event = await conn.fetchrow(f"SELECT {EVENT_COLUMNS} FROM events WHERE seq = $1", seq)
    if event is None:
        return 0
    record = RetryRecord(sub, Record(*event), 2, now, now, PROCESS_DIED, _died(1))
    await conn.execute(UPSERT_RETRY, *retry_row(record))
    return 1


def _died(attempt: int) -> str:
    return f"process died while handling (attempt {attempt})"


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
    for table in ("acked", "retries", "dead_letters", "state"):
        await conn.execute(f"DELETE FROM {table} WHERE subscription = $1", name)
    return bool(existed)
