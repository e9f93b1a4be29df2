"""The statements of the SQLite log, run on a connection's own thread.

Every write here is one whole transaction inside one function call (``_immediate``),
so it can never be left open half-way by a cancellation on the event loop.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ._types import DeadRecord, Receipt, Record, RetryRecord, WriteBatch

EVENT_COLUMNS = "seq, id, topic, key, payload, headers, created_at"
# SQLite's default limit on host parameters is 32766 since 3.32; stay far below it.
IN_CHUNK = 500


def chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


_INSERT_EVENT = f"INSERT INTO events ({EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
_INSERT_IDEMPOTENCY = "INSERT INTO idempotency (key, seq, id, created_at) VALUES (?, ?, ?, ?)"
_STATE_SQL = "INSERT OR REPLACE INTO state (subscription, key, value) VALUES (?, ?, ?)"
_UPSERT_SUBSCRIPTION = (
    "INSERT INTO subscriptions (name, topics, cursor, updated_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (name) DO UPDATE SET topics = excluded.topics"
)
_ACK = (
    "INSERT INTO subscriptions (name, topics, cursor, updated_at) VALUES (?, '*', ?, ?)"
    " ON CONFLICT (name) DO UPDATE SET cursor = max(cursor, excluded.cursor),"
    " updated_at = excluded.updated_at"
)
_INSERT_DEAD = (
    "INSERT OR REPLACE INTO dead_letters (subscription, seq, id, topic, key, payload,"
    " headers, created_at, attempts, error_type, error_message, traceback,"
    " first_failed_at, last_failed_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction on the connection's thread: committed, or rolled back."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def read_head(conn: sqlite3.Connection) -> int:
    row = conn.execute(
        "SELECT max(coalesce((SELECT max(seq) FROM events), 0),"
        " coalesce((SELECT CAST(value AS INTEGER) FROM meta"
        " WHERE key = 'compacted_upto'), 0))"
    ).fetchone()
    return int(row[0])


def apply_batch(
    conn: sqlite3.Connection, batch: WriteBatch, head: int
) -> tuple[list[Receipt], int, int]:
    """One write transaction, run on the connection's thread: all of it or nothing."""
    with _immediate(conn):
        result = write_batch(conn, batch, head)
    return result


def write_batch(
    conn: sqlite3.Connection, batch: WriteBatch, head: int
) -> tuple[list[Receipt], int, int]:
    now = time.time()
    known: dict[str, Receipt] = {}
    appends = batch.appends
    ikeys = [r.idempotency_key for r in appends if r.idempotency_key is not None]
    for chunk in chunks(ikeys, IN_CHUNK):
        rows = conn.execute(
            f"SELECT key, seq, id FROM idempotency WHERE key IN ({','.join('?' * len(chunk))})",
            chunk,
        )
        for key, seq, eid in rows:
            known[key] = Receipt(seq, eid, True)
    seq = head
    receipts: list[Receipt] = []
    nbytes = 0
    if ikeys:
        rows_out: list[tuple[object, ...]] = []
        idem_rows: list[tuple[object, ...]] = []
        for rec in appends:
            ikey = rec.idempotency_key
            if ikey is not None:
                dup = known.get(ikey)
                if dup is not None:
                    receipts.append(dup if dup.duplicate else Receipt(dup.seq, dup.id, True))
                    continue
            seq += 1
            rows_out.append(
                (seq, rec.id, rec.topic, rec.key, rec.payload, rec.headers, rec.created_at)
            )
            nbytes += len(rec.payload)
            receipt = Receipt(seq, rec.id)
            if ikey is not None:
                known[ikey] = receipt
                idem_rows.append((ikey, seq, rec.id, now))
            receipts.append(receipt)
        conn.executemany(_INSERT_EVENT, rows_out)
        conn.executemany(_INSERT_IDEMPOTENCY, idem_rows)
    elif appends:
        # The common case, without idempotency keys: no per-record branching.
        first = head + 1
        conn.executemany(
            _INSERT_EVENT,
            [
                (first + i, r.id, r.topic, r.key, r.payload, r.headers, r.created_at)
                for i, r in enumerate(appends)
            ],
        )
        receipts = [Receipt(first + i, r.id) for i, r in enumerate(appends)]
        seq = head + len(appends)
        nbytes = sum(len(r.payload) for r in appends)
    nbytes += 64 * len(appends)
    if batch.subscriptions:
        conn.executemany(
            _UPSERT_SUBSCRIPTION,
            [(s.name, "\n".join(s.topics), s.cursor, now) for s in batch.subscriptions],
        )
    if batch.acks:
        conn.executemany(_ACK, [(name, cursor, now) for name, cursor in batch.acks.items()])
    if batch.retries:
        conn.executemany(_UPSERT_RETRY, [_retry_row(r) for r in batch.retries])
    if batch.settled:
        conn.executemany("DELETE FROM retries WHERE subscription = ? AND seq = ?", batch.settled)
    if batch.state:
        # In order: a later write to a key in the same transaction wins.
        for sub, key, value in batch.state:
            if value is None:
                conn.execute("DELETE FROM state WHERE subscription = ? AND key = ?", (sub, key))
            else:
                conn.execute(_STATE_SQL, (sub, key, value))
    if batch.effects:
        conn.executemany(
            "INSERT OR IGNORE INTO effects (key, result, created_at) VALUES (?, ?, ?)",
            [(key, result, now) for key, result in batch.effects],
        )
    if batch.inflight:
        conn.executemany(
            "UPDATE subscriptions SET inflight_upto = ? WHERE name = ?",
            # Marks are upper bounds: never past the last event.
            [(min(upto, seq), name) for name, upto in batch.inflight.items()],
        )
    if batch.dead:
        conn.executemany(
            _INSERT_DEAD,
            [
                (
                    d.subscription,
                    d.record.seq,
                    d.record.id,
                    d.record.topic,
                    d.record.key,
                    d.record.payload,
                    d.record.headers,
                    d.record.created_at,
                    d.attempts,
                    d.error_type,
                    d.error_message,
                    d.traceback,
                    d.first_failed_at,
                    d.last_failed_at,
                )
                for d in batch.dead
            ],
        )
    return receipts, seq, nbytes


def compact(
    conn: sqlite3.Connection, upto: int, older_than: float, idem_older_than: float, limit: int
) -> int:
    """Delete up to ``limit`` finished events in one short transaction."""
    with _immediate(conn):
        row = conn.execute(
            "SELECT seq FROM events WHERE seq <= ? AND created_at < ? ORDER BY seq"
            " LIMIT 1 OFFSET ?",
            (upto, older_than, limit - 1),
        ).fetchone()
        bound = upto if row is None else min(upto, int(row[0]))
        removed = conn.execute(
            "DELETE FROM events WHERE seq <= ? AND created_at < ?", (bound, older_than)
        ).rowcount
        # Never forget the head, even when every event is gone.
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('compacted_upto', ?)"
            " ON CONFLICT (key) DO UPDATE SET value ="
            " max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
            (str(bound),),
        )
        conn.execute("DELETE FROM idempotency WHERE created_at < ?", (idem_older_than,))
        conn.execute("DELETE FROM effects WHERE created_at < ?", (idem_older_than,))
    return int(removed)


DEAD_COLUMNS = (
    "subscription, seq, id, topic, key, payload, headers, created_at, attempts,"
    " error_type, error_message, traceback, first_failed_at, last_failed_at"
)
RETRY_COLUMNS = (
    "subscription, seq, id, topic, key, payload, headers, created_at, attempt, due_at,"
    " first_failed_at, error_type, error_message, traceback, running"
)
_UPSERT_RETRY = (
    f"INSERT OR REPLACE INTO retries ({RETRY_COLUMNS})"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _retry_row(r: RetryRecord) -> tuple[object, ...]:
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
        int(r.running),
    )


def retry_from_row(r: Sequence[Any]) -> RetryRecord:
    return RetryRecord(r[0], Record(*r[1:8]), r[8], r[9], r[10], r[11], r[12], r[13], bool(r[14]))


def dead_from_row(r: Sequence[Any]) -> DeadRecord:
    return DeadRecord(r[0], Record(*r[1:8]), r[8], r[9], r[10], r[11], r[12], r[13])


def dead_filter(
    subscription: str | None,
    error_type: str | None,
    since: float | None,
    until: float | None,
    ids: Sequence[str] | None,
) -> tuple[str, list[object]]:
    clauses: list[str] = []
    params: list[object] = []
    if subscription is not None:
        clauses.append("subscription = ?")
        params.append(subscription)
    if error_type is not None:
        # The qualified name, or just its last part ("ValueError").
        # Exact: the name, or its last dotted part (no LIKE: it ignores case and
        # treats "_" and "%" as wildcards).
        clauses.append("(error_type = ? OR substr(error_type, -length(?) - 1) = '.' || ?)")
        params.extend([error_type, error_type, error_type])
    if since is not None:
        clauses.append("last_failed_at >= ?")
        params.append(since)
    if until is not None:
        clauses.append("last_failed_at < ?")
        params.append(until)
    if ids is not None:
        clauses.append(f"id IN ({','.join('?' * len(ids))})" if ids else "0")
        params.extend(ids)
    return "".join(f" AND {c}" for c in clauses), params


def redrive(
    conn: sqlite3.Connection,
    where: str,
    params: list[object],
    due_at: float,
    spacing: float,
    limit: int,
) -> list[RetryRecord]:
    """Move dead letters back to their subscriptions' retry lanes, attempts reset."""
    with _immediate(conn):
        rows = conn.execute(
            f"SELECT {DEAD_COLUMNS} FROM dead_letters WHERE 1 {where}"
            " ORDER BY seq, subscription LIMIT ?",
            [*params, limit],
        ).fetchall()
        out = [
            RetryRecord(d.subscription, d.record, 1, due_at + i * spacing)
            for i, d in enumerate(dead_from_row(r) for r in rows)
        ]
        conn.executemany(_UPSERT_RETRY, [_retry_row(r) for r in out])
        conn.executemany(
            "DELETE FROM dead_letters WHERE subscription = ? AND seq = ?",
            [(r.subscription, r.record.seq) for r in out],
        )
    return out


def purge(conn: sqlite3.Connection, where: str, params: list[object]) -> int:
    with _immediate(conn):
        n = conn.execute(f"DELETE FROM dead_letters WHERE 1 {where}", params).rowcount
    return int(n)


def done_control(conn: sqlite3.Connection, ids: list[int]) -> None:
    with _immediate(conn):
        conn.executemany("DELETE FROM control WHERE id = ?", [(i,) for i in ids])


def submit_control(path: str | os.PathLike[str], command: bytes, busy_timeout: float = 5.0) -> None:
    """Queue a command for the bus that owns the log at ``path`` (blocking; run it in
    a thread). The owner applies it on its next maintenance tick."""
    conn = sqlite3.connect(os.fspath(path), timeout=busy_timeout, isolation_level=None)
    try:
        conn.execute(
            "INSERT INTO control (command, created_at) VALUES (?, ?)", (command, time.time())
        )
    finally:
        conn.close()
