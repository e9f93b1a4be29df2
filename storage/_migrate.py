"""Copy a SQLite log into a new PostgreSQL log (``eventbus migrate SRC DST``).

Everything a bus relies on is copied, with its sequence numbers: the events and their
idempotency keys, each subscription's cursor (every partition starts there), its
acknowledgement ledger, retry lane, dead letters and handler state, recorded outside
effects, workflow runs and their step checkpoints. Commands queued by the command
line for the SQLite log's owner are not.

The source is opened as its owner, so it is refused while a bus runs on it (stop it
first: the copy is of a log nobody writes), and the deaths its last owner's call
journal records are charged first, as the next open would. It is read in one
snapshot. The destination must be an empty log (created if missing); the copy is one
transaction there, so it is all there or not at all.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio

from ._errors import StorageError
from ._postgres import PostgresStorage
from ._sqlite import SQLiteStorage

# The tables copied, with the columns both logs have (in the PostgreSQL column order).
TABLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("events", ("seq", "id", "topic", "key", "payload", "headers", "created_at")),
    ("idempotency", ("key", "seq", "id", "created_at")),
    ("subscriptions", ("name", "topics", "cursor", "updated_at")),
    ("acked", ("subscription", "lo", "hi")),
    (
        "retries",
        (
            "subscription",
            "seq",
            "id",
            "topic",
            "key",
            "payload",
            "headers",
            "created_at",
            "attempt",
            "due_at",
            "first_failed_at",
            "error_type",
            "error_message",
            "traceback",
            "running",
        ),
    ),
    (
        "dead_letters",
        (
            "subscription",
            "seq",
            "id",
            "topic",
            "key",
            "payload",
            "headers",
            "created_at",
            "attempts",
            "error_type",
            "error_message",
            "traceback",
            "first_failed_at",
            "last_failed_at",
        ),
    ),
    ("state", ("subscription", "key", "value")),
    ("effects", ("key", "result", "created_at")),
    (
        "workflows",
        (
            "num",
            "id",
            "name",
            "status",
            "input",
            "output",
            "error_type",
            "error_message",
            "traceback",
            "created_at",
            "updated_at",
            "deadline",
            "runs",
        ),
    ),
    (
        "workflow_steps",
        (
            "workflow_id",
            "position",
            "name",
            "status",
            "attempts",
            "started_at",
            "finished_at",
            "output",
            "error_type",
            "error_message",
            "died",
        ),
    ),
)

Rows = list[tuple[Any, ...]]
Chunks = AsyncIterator[tuple[str, tuple[str, ...], Rows]]


async def migrate_sqlite_to_postgres(
    source: str,
    target: str,
    *,
    chunk: int = 10_000,
    on_copied: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    """Copy the SQLite log at ``source`` into the empty PostgreSQL log at ``target``
    (a URL). Returns the rows copied per table; ``on_copied(table, rows)`` is told
    after each chunk.

    Raises:
        LogLocked: A bus runs on the source (stop it first).
        StorageError: The target log is not empty, or either log fails.

    Cancellation: nothing is written to the target unless the copy completes (one
    transaction); the source is only read.
    """
    src = SQLiteStorage(source)
    await src.open()  # as the owner: refused while a bus runs; charges its last deaths
    try:
        dst = PostgresStorage(target)
        await dst.open()
        try:
            return await dst.load(_read(source, chunk), on_copied)
        finally:
            await dst.close()
    finally:
        await src.close()


async def _read(path: str, chunk: int) -> Chunks:
    """The source's rows, table by table, ``chunk`` at a time, from one snapshot."""
    conn = await anyio.to_thread.run_sync(_connect, path)
    try:
        await anyio.to_thread.run_sync(conn.execute, "BEGIN")
        for table, columns in TABLES:
            cursor = await anyio.to_thread.run_sync(
                conn.execute, f"SELECT {', '.join(columns)} FROM {table}"
            )
            while rows := await anyio.to_thread.run_sync(cursor.fetchmany, chunk):
                yield table, columns, [_fix(table, row) for row in rows]
        compacted = await anyio.to_thread.run_sync(_compacted, conn)
        yield "meta", ("compacted_upto",), [(compacted,)]
    except sqlite3.Error as exc:
        raise StorageError(f"cannot read the SQLite log {path!r}: {exc}") from exc
    finally:
        await anyio.to_thread.run_sync(conn.close)


def _connect(path: str) -> sqlite3.Connection:
    return sqlite3.connect(
        f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
    )


def _compacted(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'compacted_upto'").fetchone()
    return int(row[0]) if row else 0


def _fix(table: str, row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A SQLite row as PostgreSQL takes it (SQLite keeps booleans as integers)."""
    if table == "retries":
        return (*row[:-1], bool(row[-1]))
    return tuple(row)
