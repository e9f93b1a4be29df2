"""The group commit of the PostgreSQL log: one :class:`WriteBatch` written on one
asyncpg connection, inside the transaction its caller opened (``_postgres.py``).

It mirrors ``_statements.write_batch`` (the SQLite log) step for step; the contract
suite runs both against the same expectations. Rows go in by ``unnest`` of one array
per column, and the acknowledgement ledger is kept by functions in the schema
(``_pg_schema.py``), so a group commit of any size is a handful of round trips.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

import msgspec

from ._errors import RunClaimLost
from ._types import (
    DeadRecord,
    NewRecord,
    Receipt,
    Record,
    RetryRecord,
    StepRecord,
    WorkflowRecord,
    WriteBatch,
)

if TYPE_CHECKING:
    import asyncpg

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record]"
Row: TypeAlias = "asyncpg.Record"

EVENT_COLUMNS = "seq, id, topic, key, payload, headers, created_at"
_EVENT_ARRAYS = (
    "$1::bigint[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::bytea[], $7::float8[]"
)

# Appends under the head row's lock: the lock is held to the end of the transaction,
# so appends commit one after the other, in sequence order (see _postgres.py).
_LOCK_HEAD = "SELECT seq FROM head FOR UPDATE"
_INSERT_EVENTS = (
    f"WITH ins AS (INSERT INTO events ({EVENT_COLUMNS}) SELECT * FROM unnest({_EVENT_ARRAYS}))"
    " UPDATE head SET seq = $8"
)
# The same without idempotency keys, in one statement: take the head's lock by
# moving it, and number the rows from where it was.
_APPEND_PLAIN = (
    "WITH h AS (UPDATE head SET seq = seq + $7 RETURNING seq - $7 AS base),"
    f" ins AS (INSERT INTO events ({EVENT_COLUMNS})"
    " SELECT h.base + u.n, u.id, u.topic, u.key, u.payload, u.headers, u.created_at"
    " FROM h, unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::bytea[],"
    " $6::float8[]) WITH ORDINALITY AS u(id, topic, key, payload, headers, created_at, n))"
    " SELECT base FROM h"
)
_COMMIT_HOT = (
    "SELECT commit_hot($1::text[], $2::text[], $3::text[], $4::bytea[], $5::bytea[],"
    " $6::float8[], $7::text[], $8::text[], $9::bytea[], $10::text[], $11::bigint[],"
    " $12::text[], $13::bigint[], $14::bigint[], $15, $16::text[], $17::text[],"
    " $18::integer[], $19::bigint[])"
)
# Each lease a batch carries, one row per partition (the schema's ``fence``).
_FENCE = "SELECT fence($1::text[], $2::text[], $3::integer[], $4::bigint[])"
_NOTIFY_HEAD = "SELECT pg_notify(log_channel(), 'h' || $1::bigint)"
_INSERT_IDEMPOTENCY = (
    "INSERT INTO idempotency (key, seq, id, created_at)"
    " SELECT k, s, i, $4 FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(k, s, i)"
)
_UPSERT_SUBSCRIPTION = (
    "INSERT INTO subscriptions (name, topics, cursor, updated_at) VALUES ($1, $2, $3, $4)"
    " ON CONFLICT (name) DO UPDATE SET topics = excluded.topics"
)
_REGISTER = "SELECT register($1, $2, $3, $4)"
DEAD_COLUMNS = (
    "subscription, seq, id, topic, key, payload, headers, created_at, attempts,"
    " error_type, error_message, traceback, first_failed_at, last_failed_at"
)
_UPSERT_DEAD = (
    f"INSERT INTO dead_letters ({DEAD_COLUMNS})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
    " ON CONFLICT (subscription, seq) DO UPDATE SET id = excluded.id, topic = excluded.topic,"
    " key = excluded.key, payload = excluded.payload, headers = excluded.headers,"
    " created_at = excluded.created_at, attempts = excluded.attempts,"
    " error_type = excluded.error_type, error_message = excluded.error_message,"
    " traceback = excluded.traceback, first_failed_at = excluded.first_failed_at,"
    " last_failed_at = excluded.last_failed_at"
)
RETRY_COLUMNS = (
    "subscription, seq, id, topic, key, payload, headers, created_at, attempt, due_at,"
    " first_failed_at, error_type, error_message, traceback, running"
)
UPSERT_RETRY = (
    f"INSERT INTO retries ({RETRY_COLUMNS})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
    " ON CONFLICT (subscription, seq) DO UPDATE SET id = excluded.id,"
    " topic = excluded.topic, key = excluded.key, payload = excluded.payload,"
    " headers = excluded.headers, created_at = excluded.created_at,"
    " attempt = excluded.attempt, due_at = excluded.due_at,"
    " first_failed_at = excluded.first_failed_at, error_type = excluded.error_type,"
    " error_message = excluded.error_message, traceback = excluded.traceback,"
    " running = excluded.running"
)
WORKFLOW_COLUMNS = (
    "id, name, status, input, created_at, updated_at, num, output, error_type,"
    " error_message, traceback, deadline, runs"
)
STEP_COLUMNS = (
    "workflow_id, position, name, status, attempts, started_at, finished_at, output,"
    " error_type, error_message, died"
)
_INSERT_WORKFLOW = (
    "INSERT INTO workflows (id, name, status, input, created_at, updated_at, output,"
    " error_type, error_message, traceback, deadline, runs)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
)
_UPSERT_WORKFLOW = (
    f"{_INSERT_WORKFLOW} ON CONFLICT (id) DO UPDATE SET status = excluded.status,"
    " updated_at = excluded.updated_at, output = excluded.output,"
    " error_type = excluded.error_type, error_message = excluded.error_message,"
    " traceback = excluded.traceback, deadline = excluded.deadline, runs = excluded.runs"
    # Only a running run changes: a late write cannot undo a cancel or a finish.
    " WHERE workflows.status = 'running'"
)
_UPSERT_STEP = (
    f"INSERT INTO workflow_steps ({STEP_COLUMNS})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    " ON CONFLICT (workflow_id, position) DO UPDATE SET name = excluded.name,"
    " status = excluded.status, attempts = excluded.attempts,"
    " started_at = excluded.started_at, finished_at = excluded.finished_at,"
    " output = excluded.output, error_type = excluded.error_type,"
    " error_message = excluded.error_message, died = excluded.died"
)
# The ledger functions (_pg_schema.py) merge ranges: a union, so the order in which
# one statement applies them does not matter.
ADD_ACKED = (
    "SELECT add_acked(s, lo, hi) FROM unnest($1::text[], $2::bigint[], $3::bigint[])"
    " AS u(s, lo, hi)"
)
# Cursors forward (_pg_schema.py), after the batch's retries and dead letters are
# written: what they hold are holes the cursors pass.
_ACK = "SELECT ack($1::text[], $2::bigint[], $3, $4::text[], $5::integer[])"


def lease_rows(
    batch: WriteBatch,
) -> tuple[list[str], list[str], list[int], list[int]]:
    """The batch's leases, one row per partition: subscriptions, members, partitions,
    epochs."""
    subs: list[str] = []
    members: list[str] = []
    parts: list[int] = []
    epochs: list[int] = []
    for lease in batch.leases.values():
        n = len(lease.partitions)
        subs += [lease.subscription] * n
        members += [lease.member] * n
        parts += lease.partitions
        epochs += lease.epochs
    return subs, members, parts, epochs


def _workflow_row(w: WorkflowRecord) -> tuple[object, ...]:
    return (
        w.id,
        w.name,
        w.status,
        w.input,
        w.created_at,
        w.updated_at,
        w.output,
        w.error_type,
        w.error_message,
        w.traceback,
        w.deadline,
        w.runs,
    )


def workflow_from_row(r: Row) -> WorkflowRecord:
    return WorkflowRecord(*r)


def step_from_row(r: Row) -> StepRecord:
    return StepRecord(*r)


def retry_row(r: RetryRecord) -> tuple[object, ...]:
    rec = r.record
    return (
        r.subscription,
        rec.seq,
        rec.id,
        rec.topic,
        rec.key,
        rec.payload,
        rec.headers,
        rec.created_at,
        r.attempt,
        r.due_at,
        r.first_failed_at,
        r.error_type,
        r.error_message,
        r.traceback,
        r.running,
    )


def retry_from_row(r: Row) -> RetryRecord:
    return RetryRecord(r[0], Record(*r[1:8]), r[8], r[9], r[10], r[11], r[12], r[13], r[14])


def _dead_row(d: DeadRecord) -> tuple[object, ...]:
    rec = d.record
    return (
        d.subscription,
        rec.seq,
        rec.id,
        rec.topic,
        rec.key,
        rec.payload,
        rec.headers,
        rec.created_at,
        d.attempts,
        d.error_type,
        d.error_message,
        d.traceback,
        d.first_failed_at,
        d.last_failed_at,
    )


def dead_from_row(r: Row) -> DeadRecord:
    return DeadRecord(r[0], Record(*r[1:8]), r[8], r[9], r[10], r[11], r[12], r[13])


def _last_wins(rows: Sequence[tuple[object, ...]], width: int) -> list[tuple[object, ...]]:
    """Rows keyed by their first ``width`` values, the last of each key kept, in the
    order the keys first came: what writing them one after the other leaves (one
    statement may not write a row twice)."""
    kept: dict[tuple[object, ...], tuple[object, ...]] = {}
    for row in rows:
        kept[row[:width]] = row
    return list(kept.values())


# -- appends ---------------------------------------------------------------------------


def is_hot(batch: WriteBatch) -> bool:
    """Whether ``batch`` holds only what a running bus commits all the time: appends
    without idempotency keys, handler state, acknowledgements and ranges done ahead.
    Then one statement, with no transaction around it, commits it (:func:`commit_hot`).
    """
    if batch.runs or any(r.idempotency_key is not None for r in batch.appends):
        return False
    rest = msgspec.structs.replace(batch, appends=[], state=[], acks={}, done=[])
    return rest.is_empty()


async def commit_hot(
    conn: Connection, batch: WriteBatch, now: float
) -> tuple[list[Receipt], int | None]:
    """A batch :func:`is_hot` accepts, in one statement (the schema's ``commit_hot``).
    Returns the receipts and the new head (None when nothing was appended)."""
    appends = batch.appends
    final: dict[tuple[str, str], bytes | None] = {}
    for sub, key, value in batch.state:
        final[sub, key] = value  # a later write to a key in the batch wins
    subs, members, parts, epochs = lease_rows(batch)
    base = await conn.fetchval(
        _COMMIT_HOT,
        [r.id for r in appends],
        [r.topic for r in appends],
        [r.key for r in appends],
        [r.payload for r in appends],
        [r.headers for r in appends],
        [r.created_at for r in appends],
        [s for s, _ in final],
        [k for _, k in final],
        list(final.values()),
        list(batch.acks),
        list(batch.acks.values()),
        [s for s, _, _ in batch.done],
        [lo for _, lo, _ in batch.done],
        [hi for _, _, hi in batch.done],
        now,
        subs,
        members,
        parts,
        epochs,
    )
    if base is None:
        return [], None
    first = int(base) + 1
    return [Receipt(first + i, r.id) for i, r in enumerate(appends)], first + len(appends) - 1


async def append_plain(conn: Connection, batch: WriteBatch) -> tuple[list[Receipt], int]:
    """Appends without idempotency keys, numbered after the head, in one statement."""
    appends = batch.appends
    base = await conn.fetchval(
        _APPEND_PLAIN,
        [r.id for r in appends],
        [r.topic for r in appends],
        [r.key for r in appends],
        [r.payload for r in appends],
        [r.headers for r in appends],
        [r.created_at for r in appends],
        len(appends),
    )
    first = int(base) + 1
    return [Receipt(first + i, r.id) for i, r in enumerate(appends)], first + len(appends) - 1


def number(
    appends: Sequence[NewRecord], head: int, known: dict[str, Receipt]
) -> tuple[list[Receipt], list[NewRecord], list[tuple[str, int, str]]]:
    """Number ``appends`` after ``head``, those whose idempotency key is ``known``
    (or repeats an earlier one of the batch) left out: the receipts, the records to
    insert (numbered ``head + 1`` on), and the idempotency keys to record."""
    receipts: list[Receipt] = []
    rows: list[NewRecord] = []
    idem: list[tuple[str, int, str]] = []
    seq = head
    for rec in appends:
        ikey = rec.idempotency_key
        if ikey is not None:
            dup = known.get(ikey)
            if dup is not None:
                receipts.append(dup if dup.duplicate else Receipt(dup.seq, dup.id, True))
                continue
        seq += 1
        rows.append(rec)
        receipt = Receipt(seq, rec.id)
        if ikey is not None:
            known[ikey] = receipt
            idem.append((ikey, seq, rec.id))
        receipts.append(receipt)
    return receipts, rows, idem


async def known_keys(
    conn: Connection, appends: Sequence[NewRecord], upto: int | None = None
) -> dict[str, Receipt]:
    """The idempotency keys of ``appends`` already in the log (recorded at or below
    ``upto``, if given), with their original receipts."""
    ikeys = [r.idempotency_key for r in appends if r.idempotency_key is not None]
    if not ikeys:
        return {}
    rows = await conn.fetch(
        "SELECT key, seq, id FROM idempotency WHERE key = ANY($1::text[])"
        " AND ($2::bigint IS NULL OR seq <= $2)",
        ikeys,
        upto,
    )
    return {key: Receipt(seq, eid, True) for key, seq, eid in rows}


async def _append(conn: Connection, batch: WriteBatch, now: float) -> tuple[list[Receipt], int]:
    """The batch's appends, deduplicated by idempotency key, under the head's lock."""
    head = int(await conn.fetchval(_LOCK_HEAD))
    # Read after the lock is held (a new statement, so a new snapshot under READ
    # COMMITTED): every append that committed before sees its keys here.
    known = await known_keys(conn, batch.appends)
    receipts, rows, idem = number(batch.appends, head, known)
    seq = head + len(rows)
    if rows:
        await conn.execute(
            _INSERT_EVENTS,
            list(range(head + 1, seq + 1)),
            [r.id for r in rows],
            [r.topic for r in rows],
            [r.key for r in rows],
            [r.payload for r in rows],
            [r.headers for r in rows],
            [r.created_at for r in rows],
            seq,
        )
    if idem:
        await conn.execute(
            _INSERT_IDEMPOTENCY,
            [k for k, _, _ in idem],
            [s for _, s, _ in idem],
            [i for _, _, i in idem],
            now,
        )
    return receipts, seq


# -- the whole batch -------------------------------------------------------------------


async def write_batch(
    conn: Connection, batch: WriteBatch, now: float
) -> tuple[list[Receipt], int | None]:
    """Everything in ``batch``, in the order ``_statements.write_batch`` applies it.
    Returns the receipts and the new head (None when nothing was appended)."""
    receipts: list[Receipt] = []
    head: int | None = None
    subs, members, parts, epochs = lease_rows(batch)
    if subs:
        await conn.execute(_FENCE, subs, members, parts, epochs)
    if batch.runs:
        await raise_unless_claimed(conn, batch.runs)
    if batch.appends:
        if any(r.idempotency_key is not None for r in batch.appends):
            receipts, head = await _append(conn, batch, now)
        else:
            receipts, head = await append_plain(conn, batch)
        if receipts and head is not None:
            await conn.execute(_NOTIFY_HEAD, head)
    if batch.subscriptions:
        existing = {
            name
            for (name,) in await conn.fetch(
                "SELECT name FROM subscriptions WHERE name = ANY($1::text[])",
                [s.name for s in batch.subscriptions],
            )
        }
        # Events before a subscription existed are not its to handle.
        first: dict[str, int] = {}
        for info in batch.subscriptions:
            if info.name not in existing:
                first.setdefault(info.name, info.cursor)
        late = [(name, cursor) for name, cursor in first.items() if cursor > 0]
        if late:
            await conn.execute(
                ADD_ACKED, [n for n, _ in late], [1] * len(late), [c for _, c in late]
            )
        await conn.executemany(
            _UPSERT_SUBSCRIPTION,
            [(s.name, "\n".join(s.topics), s.cursor, now) for s in batch.subscriptions],
        )
        # Its partitions, each at the cursor it was first registered with.
        await conn.executemany(
            _REGISTER,
            [(name, "*", cursor, now) for name, cursor in first.items()],
        )
    if batch.retries:
        rows = _last_wins([retry_row(r) for r in batch.retries], 2)
        await conn.executemany(UPSERT_RETRY, rows)
    if batch.settled:
        await conn.execute(
            "DELETE FROM retries WHERE (subscription, seq) IN"
            " (SELECT * FROM unnest($1::text[], $2::bigint[]))",
            [s for s, _ in batch.settled],
            [q for _, q in batch.settled],
        )
    if batch.state:
        await _write_state(conn, batch.state)
    if batch.effects:
        await conn.execute(
            "INSERT INTO effects (key, result, created_at)"
            " SELECT k, r, $3 FROM unnest($1::text[], $2::bytea[]) AS u(k, r)"
            " ON CONFLICT (key) DO NOTHING",
            [k for k, _ in batch.effects],
            [r for _, r in batch.effects],
            now,
        )
    if batch.dead:
        await conn.executemany(_UPSERT_DEAD, _last_wins([_dead_row(d) for d in batch.dead], 2))
    ranges: list[tuple[str, int, int]] = []
    if batch.settled:
        dead = {(d.subscription, d.record.seq) for d in batch.dead}
        ranges += [(sub, seq, seq) for sub, seq in batch.settled if (sub, seq) not in dead]
    if batch.acks:
        # The cursor each starts from is read here, after this batch registered its
        # subscriptions: a new one's ledger already holds what precedes its cursor,
        # so the ledger ends up as when it is read first (the SQLite order).
        await conn.execute(_ACK, list(batch.acks), list(batch.acks.values()), now, subs, parts)
    ranges += batch.done
    if ranges:
        await conn.execute(
            ADD_ACKED,
            [s for s, _, _ in ranges],
            [lo for _, lo, _ in ranges],
            [hi for _, _, hi in ranges],
        )
    if batch.workflow_starts:
        await conn.executemany(
            _INSERT_WORKFLOW + " ON CONFLICT (id) DO NOTHING",
            [_workflow_row(w) for w in batch.workflow_starts],
        )
    if batch.workflows:
        await conn.executemany(_UPSERT_WORKFLOW, [_workflow_row(w) for w in batch.workflows])
    if batch.steps:
        rows = [
            (
                st.workflow_id,
                st.position,
                st.name,
                st.status,
                st.attempts,
                st.started_at,
                st.finished_at,
                st.output,
                st.error_type,
                st.error_message,
                st.died,
            )
            for st in batch.steps
        ]
        await conn.executemany(_UPSERT_STEP, _last_wins(rows, 2))
    return receipts, head


async def _write_state(conn: Connection, writes: list[tuple[str, str, bytes | None]]) -> None:
    """State writes in order: a later write to a key in the same batch wins."""
    final: dict[tuple[str, str], bytes | None] = {}
    for sub, key, value in writes:
        final[sub, key] = value
    gone = [k for k, v in final.items() if v is None]
    kept = [(k, v) for k, v in final.items() if v is not None]
    if gone:
        await conn.execute(
            "DELETE FROM state WHERE (subscription, key) IN"
            " (SELECT * FROM unnest($1::text[], $2::text[]))",
            [s for s, _ in gone],
            [k for _, k in gone],
        )
    if kept:
        await conn.execute(
            "INSERT INTO state (subscription, key, value)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[])"
            " ON CONFLICT (subscription, key) DO UPDATE SET value = excluded.value",
            [s for (s, _), _ in kept],
            [k for (_, k), _ in kept],
            [v for _, v in kept],
        )


# -- workflow run claims ---------------------------------------------------------------

# The claims a batch's runs hold, still valid; locked to the end of the transaction,
# so that no process takes them over before it commits.
_HELD_RUNS = (
    "SELECT c.workflow_id FROM workflow_claims c"
    " JOIN unnest($1::text[], $2::text[], $3::bigint[]) AS u(w, o, e)"
    " ON c.workflow_id = u.w AND c.owner = u.o AND c.epoch = u.e"
    " WHERE c.expires_at > clock_timestamp() FOR NO KEY UPDATE OF c"
)
_CLAIM_RUNS = (
    "INSERT INTO workflow_claims AS c (workflow_id, owner, epoch, expires_at)"
    " SELECT w, $2, 1, clock_timestamp() + make_interval(secs => $3)"
    " FROM unnest($1::text[]) AS u(w)"
    # Not the runs a live process holds: an upsert would lock their rows for nothing.
    " WHERE NOT EXISTS (SELECT 1 FROM workflow_claims h WHERE h.workflow_id = u.w"
    " AND h.owner <> $2 AND h.expires_at > clock_timestamp())"
    # Only a run still running: a cancelled or finished one is not renewed.
    " AND EXISTS (SELECT 1 FROM workflows r WHERE r.id = u.w AND r.status = 'running')"
    " ON CONFLICT (workflow_id) DO UPDATE SET"
    " epoch = CASE WHEN c.owner = excluded.owner THEN c.epoch ELSE c.epoch + 1 END,"
    " owner = excluded.owner, expires_at = excluded.expires_at"
    " WHERE c.owner = excluded.owner OR c.expires_at <= clock_timestamp()"
    " RETURNING workflow_id, epoch"
)
_RELEASE_RUNS = "DELETE FROM workflow_claims WHERE owner = $2 AND workflow_id = ANY($1::text[])"


async def raise_unless_claimed(conn: Connection, runs: dict[str, tuple[str, int]]) -> None:
    """Refuse the transaction (:class:`RunClaimLost`, without the log's path: the
    storage adds it) unless each run is still held by its owner at its epoch."""
    ids = list(runs)
    held = {
        str(w)
        for (w,) in await conn.fetch(
            _HELD_RUNS, ids, [o for o, _ in runs.values()], [e for _, e in runs.values()]
        )
    }
    lost = tuple(w for w in ids if w not in held)
    if lost:
        raise RunClaimLost("", lost)


async def claim_runs(conn: Connection, ids: list[str], owner: str, lease: float) -> dict[str, int]:
    """See :meth:`SharedLog.claim_runs`."""
    return {str(w): int(e) for w, e in await conn.fetch(_CLAIM_RUNS, ids, owner, lease)}


async def release_runs(conn: Connection, ids: list[str], owner: str) -> None:
    """See :meth:`SharedLog.release_runs`."""
    await conn.execute(_RELEASE_RUNS, ids, owner)
