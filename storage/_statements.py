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

from ._errors import RunClaimLost
from ._types import (
    PROCESS_DIED,
    WORKFLOW_PREFIX,
    DeadRecord,
    NewRecord,
    Receipt,
    Record,
    RetryRecord,
    StepRecord,
    Unaccounted,
    WorkflowRecord,
    WriteBatch,
    side_bytes,
)

EVENT_COLUMNS = "seq, id, topic, key, payload, headers, created_at"
# SQLite's default limit on host parameters is 32766 since 3.32; stay far below it.
IN_CHUNK = 500


def chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# The sqlite3 module binds an int, float, str or bytearray as it is, but sends bytes
# and None through its adaptation protocol first, which on Python 3.11 costs about a
# microsecond a value (it looks for ``__adapt__`` on a type, which raises and clears
# an AttributeError): more than SQLite takes to insert a small row. So an event's row
# binds 0 for a missing key or headers (``nullif`` stores NULL: a key is text and
# headers a blob, never the integer 0), and a small payload or headers as a
# bytearray copy, which costs less than the adaptation up to about a kilobyte. One
# statement for every row keeps them in seq order, as the table's B-tree is best
# filled. The rows stored are the same.
_INSERT_ROW = (
    f"INSERT INTO events ({EVENT_COLUMNS}) VALUES (?, ?, ?, nullif(?, 0), ?, nullif(?, 0), ?)"
)
_BLOB_COPY_MAX = 1024
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
DEAD_COLUMNS = (
    "subscription, seq, id, topic, key, payload, headers, created_at, attempts,"
    " error_type, error_message, traceback, first_failed_at, last_failed_at"
)
_INSERT_DEAD = (
    f"INSERT OR REPLACE INTO dead_letters ({DEAD_COLUMNS})"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
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
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
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
    f"INSERT OR REPLACE INTO workflow_steps ({STEP_COLUMNS})"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


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


def workflow_from_row(r: Sequence[Any]) -> WorkflowRecord:
    return WorkflowRecord(
        r[0],
        r[1],
        r[2],
        bytes(r[3]),
        r[4],
        r[5],
        r[6],
        None if r[7] is None else bytes(r[7]),
        *r[8:],
    )


def step_from_row(r: Sequence[Any]) -> StepRecord:
    output = None if r[7] is None else bytes(r[7])
    return StepRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], output, r[8], r[9], r[10])


# -- the acknowledgement ledger ---------------------------------------------------------
# ``acked`` holds, per subscription, ranges [lo, hi] of seq acknowledged as done.
# Events the cursor passed that went to the retry lane or the dead letters are holes
# in it; a retry that succeeds later fills its hole. Reconciliation checks that every
# event the cursor passed is in exactly one of the three places.


def _add_acked(conn: sqlite3.Connection, sub: str, lo: int, hi: int) -> None:
    """Add [lo, hi] to ``sub``'s acknowledged ranges, merged with every range it
    overlaps or touches: ranges only ever grow."""
    touching = "subscription = ? AND hi >= ? AND lo <= ?"
    params = (sub, lo - 1, hi + 1)
    rows = conn.execute(f"SELECT lo, hi FROM acked WHERE {touching}", params).fetchall()
    if len(rows) == 1 and rows[0][0] <= lo:
        # The common case: extending the range it follows (or already inside it).
        if rows[0][1] < hi:
            conn.execute(
                "UPDATE acked SET hi = ? WHERE subscription = ? AND lo = ?", (hi, sub, rows[0][0])
            )
        return
    for r_lo, r_hi in rows:
        lo, hi = min(lo, r_lo), max(hi, r_hi)
    if rows:
        conn.execute(f"DELETE FROM acked WHERE {touching}", params)
    conn.execute("INSERT INTO acked (subscription, lo, hi) VALUES (?, ?, ?)", (sub, lo, hi))


def _coalesce(ranges: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """``ranges`` with those of one subscription that overlap or touch merged: calls
    running at once finish out of order, so one commit often holds neighbours."""
    if len(ranges) < 2:
        return ranges
    merged: list[tuple[str, int, int]] = []
    for name, lo, hi in sorted(ranges):
        if merged:
            m_name, m_lo, m_hi = merged[-1]
            if m_name == name and lo <= m_hi + 1:
                merged[-1] = (name, m_lo, max(m_hi, hi))
                continue
        merged.append((name, lo, hi))
    return merged


def _ack_ranges(conn: sqlite3.Connection, sub: str, prev: int, cursor: int) -> None:
    """Record (prev, cursor] as done for ``sub``, except the events it passed to its
    retry lane or the dead letters."""
    holes = conn.execute(
        "SELECT seq FROM retries WHERE subscription = ? AND seq > ? AND seq <= ?"
        " UNION SELECT seq FROM dead_letters WHERE subscription = ? AND seq > ? AND seq <= ?"
        " ORDER BY 1",
        (sub, prev, cursor, sub, prev, cursor),
    ).fetchall()
    lo = prev + 1
    for (hole,) in holes:
        if hole > lo:
            _add_acked(conn, sub, lo, hole - 1)
        lo = hole + 1
    if lo <= cursor:
        _add_acked(conn, sub, lo, cursor)


# Past this many gaps between acknowledged ranges, one scan beats a query per gap.
_MAX_GAP_QUERIES = 2000


def finished_ahead(conn: sqlite3.Connection, sub: str, after: int) -> list[tuple[int, int]]:
    """``sub``'s acknowledged ranges and dead letters past ``after``, in order."""
    rows = conn.execute(
        "SELECT max(lo, ? + 1), hi FROM acked WHERE subscription = ? AND hi > ?"
        " UNION ALL SELECT seq, seq FROM dead_letters WHERE subscription = ? AND seq > ?"
        " ORDER BY 1",
        (after, sub, after, sub, after),
    ).fetchall()
    return [(int(lo), int(hi)) for lo, hi in rows]


def unaccounted(conn: sqlite3.Connection, sub: str, upto: int, limit: int) -> Unaccounted:
    """Events up to ``upto`` (and the cursor) on ``sub``'s topics that it has neither
    acknowledged, nor in its retry lane, nor dead-lettered. One read snapshot.

    Only the gaps between acknowledged ranges are read, so the cost follows the
    number of events in the retry lane and dead letters, not the size of the log.
    """
    conn.execute("BEGIN")
    try:
        info = conn.execute(
            "SELECT topics, cursor FROM subscriptions WHERE name = ?", (sub,)
        ).fetchone()
        if info is None:
            return Unaccounted(sub, 0, ())
        topics = info[0].split("\n")
        upto = min(upto, int(info[1]))
        ranges = conn.execute(
            "SELECT lo, hi FROM acked WHERE subscription = ? ORDER BY lo", (sub,)
        ).fetchall()
        held = {
            int(seq)
            for (seq,) in conn.execute(
                "SELECT seq FROM retries WHERE subscription = ?"
                " UNION SELECT seq FROM dead_letters WHERE subscription = ?",
                (sub, sub),
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
        topic_sql, topic_params = "", []
        if "*" not in topics:
            topic_sql = f" AND topic IN ({','.join('?' * len(topics))})"
            topic_params = topics
        count = 0
        first: list[int] = []
        i = 0
        for a, b in gaps:
            rows = conn.execute(
                f"SELECT seq FROM events WHERE seq BETWEEN ? AND ?{topic_sql} ORDER BY seq",
                [a, b, *topic_params],
            )
            for (seq,) in rows:
                while i < len(ranges) and ranges[i][1] < seq:
                    i += 1
                if (i < len(ranges) and ranges[i][0] <= seq) or seq in held:
                    continue
                count += 1
                if len(first) < limit:
                    first.append(int(seq))
        return Unaccounted(sub, count, tuple(first))
    finally:
        conn.execute("COMMIT")


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
    # _immediate, spelt out: this runs for every commit, often on the loop's thread.
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = write_batch(conn, batch, head)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _blob(value: bytes) -> bytes | bytearray:
    """``value`` as bound cheapest (see _INSERT_ROW)."""
    return bytearray(value) if len(value) <= _BLOB_COPY_MAX else value


def insert_events(conn: sqlite3.Connection, records: list[NewRecord], first: int) -> None:
    """Insert ``records`` into the events table, with seqs from ``first`` on."""
    rows = [
        (
            first + i,
            r.id,
            r.topic,
            0 if r.key is None else r.key,
            bytearray(r.payload) if len(r.payload) <= _BLOB_COPY_MAX else r.payload,
            0 if r.headers is None else _blob(r.headers),  # most events have none
            r.created_at,
        )
        for i, r in enumerate(records)
    ]
    if len(rows) == 1:
        conn.execute(_INSERT_ROW, rows[0])
    else:
        conn.executemany(_INSERT_ROW, rows)


def write_batch(
    conn: sqlite3.Connection, batch: WriteBatch, head: int
) -> tuple[list[Receipt], int, int]:
    now = time.time()
    if batch.runs:
        raise_unless_claimed(conn, batch.runs, now)
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
        fresh: list[NewRecord] = []  # not duplicates: their seqs follow the head's
        idem_rows: list[tuple[object, ...]] = []
        for rec in appends:
            ikey = rec.idempotency_key
            if ikey is not None:
                dup = known.get(ikey)
                if dup is not None:
                    receipts.append(dup if dup.duplicate else Receipt(dup.seq, dup.id, True))
                    continue
            seq += 1
            fresh.append(rec)
            nbytes += len(rec.payload)
            receipt = Receipt(seq, rec.id)
            if ikey is not None:
                known[ikey] = receipt
                idem_rows.append((ikey, seq, rec.id, now))
            receipts.append(receipt)
        insert_events(conn, fresh, head + 1)
        conn.executemany(_INSERT_IDEMPOTENCY, idem_rows)
    elif appends:
        # The common case, without idempotency keys: no per-record branching.
        first = head + 1
        insert_events(conn, appends, first)
        receipts = [Receipt(first + i, r.id) for i, r in enumerate(appends)]
        seq = head + len(appends)
        nbytes = sum(len(r.payload) for r in appends)
    # The WAL grows by these too (a 32 KB state value as much as a 32 KB event), and
    # its growth decides when to checkpoint.
    nbytes += 64 * len(appends) + side_bytes(batch)
    prev: dict[str, int] = {}
    for name in batch.acks:
        row = conn.execute("SELECT cursor FROM subscriptions WHERE name = ?", (name,)).fetchone()
        prev[name] = 0 if row is None else int(row[0])
    for info in batch.subscriptions:
        new = conn.execute("SELECT 1 FROM subscriptions WHERE name = ?", (info.name,)).fetchone()
        if new is None and info.cursor > 0:
            # Events before a subscription existed are not its to handle.
            _add_acked(conn, info.name, 1, info.cursor)
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
    if batch.settled:
        dead = {(d.subscription, d.record.seq) for d in batch.dead}
        for sub, settled_seq in batch.settled:
            if (sub, settled_seq) not in dead:
                _add_acked(conn, sub, settled_seq, settled_seq)
    for name, cursor in batch.acks.items():
        if cursor > prev[name]:
            _ack_ranges(conn, name, prev[name], cursor)
    for name, lo, hi in _coalesce(batch.done):
        _add_acked(conn, name, lo, hi)
    if batch.workflow_starts:
        conn.executemany(
            _INSERT_WORKFLOW + " ON CONFLICT (id) DO NOTHING",
            [_workflow_row(w) for w in batch.workflow_starts],
        )
    if batch.workflows:
        conn.executemany(_UPSERT_WORKFLOW, [_workflow_row(w) for w in batch.workflows])
    if batch.steps:
        conn.executemany(
            _UPSERT_STEP,
            [
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
            ],
        )
    return receipts, seq, nbytes


# -- deaths --------------------------------------------------------------------------


def charge_deaths(
    conn: sqlite3.Connection, generation: int, inflight: dict[str, list[int]], now: float
) -> int:
    """Count a failed attempt for every event whose handler call was in flight when
    the process died (``inflight``, from the call journal of life ``generation``), in
    one transaction; returns how many were charged.

    An event in the retry lane gets its attempt counted there; an unfinished event
    enters the retry lane at attempt 2. Events already done or dead-lettered are left
    alone (their call ended but the journal did not say so yet). A journal is charged
    once: its generation is recorded with the charge. Attempts recorded as running by
    an earlier version of the log count as deaths too.
    """
    with _immediate(conn):
        row = conn.execute("SELECT value FROM meta WHERE key = 'calls_generation'").fetchone()
        charged = 0
        if inflight and (row is None or row[0] != str(generation)):
            for sub, seqs in inflight.items():
                info = conn.execute(
                    "SELECT cursor FROM subscriptions WHERE name = ?", (sub,)
                ).fetchone()
                if info is None:
                    continue
                for seq in sorted(set(seqs)):
                    charged += _charge(conn, sub, seq, now)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('calls_generation', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(generation),),
            )
        # Logs written before the call journal marked running retry attempts instead.
        for sub, seq in conn.execute(
            "SELECT subscription, seq FROM retries WHERE running = 1"
        ).fetchall():
            charged += _charge(conn, sub, int(seq), now)
    return charged


def _charge(conn: sqlite3.Connection, sub: str, seq: int, now: float) -> int:
    row = conn.execute(
        "SELECT attempt FROM retries WHERE subscription = ? AND seq = ?", (sub, seq)
    ).fetchone()
    if row is not None:
        failed = int(row[0])
        conn.execute(
            "UPDATE retries SET attempt = ?, due_at = ?, running = 0,"
            " first_failed_at = coalesce(first_failed_at, ?), error_type = ?,"
            " error_message = ?, traceback = '' WHERE subscription = ? AND seq = ?",
            (failed + 1, now, now, PROCESS_DIED, _died(failed), sub, seq),
        )
        return 1
    finished = conn.execute(
        "SELECT 1 FROM dead_letters WHERE subscription = ? AND seq = ?"
        " UNION ALL SELECT 1 FROM acked WHERE subscription = ? AND lo <= ? AND hi >= ?",
        (sub, seq, sub, seq, seq),
    ).fetchone()
    if finished is not None:
        return 0
    event = conn.execute(f"SELECT {EVENT_COLUMNS} FROM events WHERE seq = ?", (seq,)).fetchone()
    if event is None:
        return 0
    record = RetryRecord(sub, Record(*event), 2, now, now, PROCESS_DIED, _died(1))
    conn.execute(_UPSERT_RETRY, _retry_row(record))
    return 1


def _died(attempt: int) -> str:
    return f"process died while handling (attempt {attempt})"


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
        # Finished workflow runs, after the same retention as idempotency keys: an id
        # stays known (start_workflow returns the old run) for as long.
        old = "status IN ('completed', 'cancelled') AND updated_at < ?"
        conn.execute(
            "DELETE FROM workflow_steps WHERE workflow_id IN"
            f" (SELECT id FROM workflows WHERE {old})",
            (idem_older_than,),
        )
        conn.execute(f"DELETE FROM workflows WHERE {old}", (idem_older_than,))
    return int(removed)


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
        # A failed workflow run goes back to running, its finished steps kept.
        runs = [r.record.id for r in out if r.subscription.startswith(WORKFLOW_PREFIX)]
        now = time.time()
        for run_id in runs:
            conn.execute(
                "UPDATE workflows SET status = 'running', updated_at = ?, error_type = '',"
                " error_message = '', traceback = '' WHERE id = ? AND status = 'failed'",
                (now, run_id),
            )
            # The step that failed the run and those interrupted run again; failures
            # the workflow handled replay as they happened.
            conn.execute(
                "DELETE FROM workflow_steps WHERE workflow_id = ?"
                " AND status IN ('fatal', 'running')",
                (run_id,),
            )
        conn.executemany(
            _UPSERT_RETRY,
            [_retry_row(r) for r in out if not r.subscription.startswith(WORKFLOW_PREFIX)],
        )
        conn.executemany(
            "DELETE FROM dead_letters WHERE subscription = ? AND seq = ?",
            [(r.subscription, r.record.seq) for r in out],
        )
    return out


def purge(conn: sqlite3.Connection, where: str, params: list[object]) -> int:
    with _immediate(conn):
        rows = conn.execute(
            f"SELECT subscription, seq FROM dead_letters WHERE 1 {where}", params
        ).fetchall()
        n = conn.execute(f"DELETE FROM dead_letters WHERE 1 {where}", params).rowcount
        # A purged event is settled by the operator's decision: account it as done.
        for sub, seq in rows:
            if not sub.startswith(WORKFLOW_PREFIX):
                _add_acked(conn, sub, int(seq), int(seq))
    return int(n)


def drop_subscription(conn: sqlite3.Connection, name: str) -> bool:
    with _immediate(conn):
        existed = conn.execute("DELETE FROM subscriptions WHERE name = ?", (name,)).rowcount
        for table in ("acked", "retries", "dead_letters", "state"):
            conn.execute(f"DELETE FROM {table} WHERE subscription = ?", (name,))
    return bool(existed)


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


# -- workflow run claims (a log shared by processes) -----------------------------------


def raise_unless_claimed(
    conn: sqlite3.Connection, runs: dict[str, tuple[str, int]], now: float
) -> None:
    """Refuse the transaction (:class:`RunClaimLost`) unless each run is still held
    by its owner at its epoch: write transactions take turns, so none can take it
    over before this one commits."""
    lost = []
    for workflow_id, (owner, epoch) in runs.items():
        row = conn.execute(
            "SELECT owner, epoch, expires_at FROM workflow_claims WHERE workflow_id = ?",
            (workflow_id,),
        ).fetchone()
        if row is None or row[0] != owner or row[1] != epoch or row[2] <= now:
            lost.append(workflow_id)
    if lost:
        raise RunClaimLost("", tuple(lost))


def claim_runs(
    conn: sqlite3.Connection, ids: Sequence[str], owner: str, lease: float, now: float
) -> dict[str, int]:
    """See :meth:`SharedLog.claim_runs`."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        held: dict[str, int] = {}
        for workflow_id in ids:
            # Only a run still running: a cancelled or finished one is not renewed.
            conn.execute(
                "INSERT INTO workflow_claims (workflow_id, owner, epoch, expires_at)"
                " SELECT ?1, ?2, 1, ?3 WHERE EXISTS (SELECT 1 FROM workflows"
                " WHERE id = ?1 AND status = 'running') ON CONFLICT (workflow_id) DO UPDATE SET"
                " epoch = CASE WHEN owner = excluded.owner THEN epoch ELSE epoch + 1 END,"
                " owner = excluded.owner, expires_at = excluded.expires_at"
                " WHERE owner = excluded.owner OR expires_at <= ?4",
                (workflow_id, owner, now + lease, now),
            )
            row = conn.execute(
                "SELECT epoch FROM workflow_claims WHERE workflow_id = ?1 AND owner = ?2"
                " AND expires_at = ?3",  # claimed or renewed just now
                (workflow_id, owner, now + lease),
            ).fetchone()
            if row is not None:
                held[workflow_id] = int(row[0])
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return held


def release_runs(conn: sqlite3.Connection, ids: Sequence[str], owner: str) -> None:
    """See :meth:`SharedLog.release_runs`."""
    for chunk in chunks(list(ids), IN_CHUNK):
        conn.execute(
            f"DELETE FROM workflow_claims WHERE owner = ? AND workflow_id IN"
            f" ({','.join('?' * len(chunk))})",
            [owner, *chunk],
        )
