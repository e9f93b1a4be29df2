"""The embedded log: SQLite in WAL mode through aiosqlite.

One connection writes (the bus's single writer task), another reads (subscriptions
tailing their backlog), so a long backlog read never holds up a group commit.

aiosqlite runs every statement on its own thread, so cancelling the awaiting task does
not stop SQL already queued: a cancelled :meth:`SQLiteStorage.commit` may still commit.
The log is built so that this is harmless: after any failed or cancelled commit the
writer re-reads the head from the file before assigning another sequence number, and
publishers that retry with an idempotency key get the original receipt.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal, TypeVar

import aiosqlite
import anyio

from . import _statements as stmts
from ._calls import CallJournal, CallSlots, NoCallSlots, read_journal
from ._errors import (
    CorruptLog,
    LogBusy,
    NotALog,
    RecordRejected,
    SchemaTooNew,
    StorageClosed,
    StorageError,
    StorageFull,
)
from ._holders import write_lock_holders
from ._ownership import LogOwnership, ShareLock
from ._schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION
from ._types import (
    PROCESS_DIED,
    DeadRecord,
    LogStats,
    NewRecord,
    Receipt,
    Record,
    RetryRecord,
    StepRecord,
    SubscriptionInfo,
    Unaccounted,
    WorkflowRecord,
    WriteBatch,
    batch_bytes,
    batch_rows,
    plain_commit,
)

logger = logging.getLogger("eventbus.storage")

T = TypeVar("T")

Durability = Literal["normal", "full", "off"]

_SYNCHRONOUS: dict[str, str] = {"normal": "NORMAL", "full": "FULL", "off": "OFF"}
_SQLITE_MAGIC = b"SQLite format 3\x00"
# Checkpoint explicitly once this much has been appended since the last one, so the
# WAL stays bounded even when a reader keeps the passive auto-checkpoint from finishing.
_CHECKPOINT_EVERY_BYTES = 32 * 1024 * 1024
# What SQLite's automatic checkpoint would do (every ~1,000 pages), done on a worker
# thread with a connection of its own (_start_passive) rather than inside a commit.
_PASSIVE_CHECKPOINT_BYTES = 4 * 1024 * 1024
_PAGE_BYTES = 4096
# The largest transaction commit_now runs on the loop's thread (rows written). An
# inline commit costs about 12 us and 2.4 us a row here (128 rows: 0.3 ms of loop
# time); the hop to the connection's thread costs the process far more than its
# 50-80 us of wall time, since the thread and the loop then contend for the GIL: with
# 64 tasks publishing at once (commits of ~64 rows), inline commits took 6.3 us of
# CPU an event, the thread 11.5. Larger transactions still go through the thread.
_INLINE_MAX_ROWS = 128
# And in bytes of values: a 1 MB event takes 4-5 ms to write, sixteen of them 110 ms,
# all of it time the loop would stand still.
_INLINE_MAX_BYTES = 64 * 1024
# The first wait between tries of a commit that SQLite refused as busy before
# busy_timeout ran out (as it does while another connection recovers or checkpoints).
_BUSY_FIRST_DELAY = 0.01


# A value SQLite would not bind or store (a list, a string past SQLITE_MAX_LENGTH, a
# constraint): the fault of one record, not of the log.
_REFUSED_VALUE = (
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    sqlite3.DataError,
    sqlite3.IntegrityError,
)


def _translate(path: str, exc: BaseException) -> StorageError:
    """Turn a sqlite3 error into the storage error tree (the one boundary for it)."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_FULL or "disk is full" in str(exc):
            return StorageFull(
                f"the disk holding {path!r} is full; the write was rolled back and "
                "nothing partial was kept. Free space and retry"
            )
        if isinstance(exc, sqlite3.DatabaseError) and (
            code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
            or "malformed" in str(exc)
            or "not a database" in str(exc)
        ):
            return CorruptLog(path, str(exc))
        if isinstance(exc, _REFUSED_VALUE):
            return RecordRejected(path, str(exc))
        return StorageError(f"SQLite failed on {path!r}: {exc}")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return StorageFull(f"the disk holding {path!r} is full: {exc}")
    return StorageError(f"storage failure on {path!r}: {exc!r}")


def _is_taken_seq(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.IntegrityError) and "events.seq" in str(exc)


def _is_busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc)
    )


class _Connection(aiosqlite.Connection):
    """An aiosqlite connection that runs a whole function on its thread, in one hop,
    and that the event loop's thread may also use while the connection's thread is idle.

    aiosqlite queues every statement to the connection's thread; a transaction made
    of several awaited statements costs a hop each, and a cancellation between them
    would leave it open. :meth:`run` hands the thread one function instead.

    ``busy_ms`` (the writer's): the connection rests with a busy timeout of 0, so a
    transaction begun on the loop's thread (:meth:`run_here`) fails at once instead
    of blocking the loop while another process holds the write lock; each function
    on the connection's thread waits up to ``busy_ms`` for the lock instead.
    """

    def __init__(
        self,
        connector: Callable[[], sqlite3.Connection],
        *,
        busy_ms: int | None = None,
    ) -> None:
        super().__init__(connector, iter_chunk_size=64)
        self.busy_ms = busy_ms
        self._queued = 0  # written by the loop's thread only
        self._finished = 0  # written by the connection's thread only

    @property
    def idle(self) -> bool:
        """Whether nothing is queued to or running on the connection's thread."""
        return self._queued == self._finished

    async def _execute(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        function = partial(fn, *args, **kwargs)
        busy = self.busy_ms
        self._queued += 1

        def counted() -> T:
            try:
                if busy is None:
                    return function()
                raw = self._conn
                raw.execute(f"PRAGMA busy_timeout = {busy}")
                try:
                    return function()
                finally:
                    with contextlib.suppress(sqlite3.Error, ValueError):
                        raw.execute("PRAGMA busy_timeout = 0")
            finally:
                self._finished += 1

        return await super()._execute(counted)  # type: ignore[no-untyped-call,no-any-return]

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(connection)`` on the connection's thread.

        Cancellation: ``fn`` still runs to its end on the thread (a transaction it
        holds commits or rolls back there); only the wait for its result stops.
        """
        return await self._execute(fn, self._conn)

    def run_here(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(connection)`` on the calling thread; only while :attr:`idle`."""
        assert self.idle, "the connection's thread is using it"
        return fn(self._conn)


def _connect(database: str, *, uri: bool, busy_ms: int | None = None) -> _Connection:
    """A connection to ``database`` (not yet started: await it)."""

    def connector() -> sqlite3.Connection:
        return sqlite3.connect(
            database, uri=uri, isolation_level=None, check_same_thread=busy_ms is None
        )

    return _Connection(connector, busy_ms=busy_ms)


class SQLiteStorage:
    """A log in one SQLite file (WAL mode).

    Args:
        path: The database file; created if missing.
        durability: ``"normal"`` (synchronous=NORMAL: a commit survives a killed
            process), ``"full"`` (synchronous=FULL: it survives power loss) or
            ``"off"`` (the OS decides when data reaches the disk).
        busy_timeout: Seconds a commit waits, in all, for a write lock another
            connection holds (an operator's ``sqlite3`` shell, a backup) before it
            fails with :class:`LogBusy`.
        open_timeout: Seconds :meth:`open` keeps retrying while the file is busy,
            as it is while SQLite recovers a log left by a crashed process.
        read_only: Open for inspection only: no lock file, no writes. Safe while
            another process runs a bus on the file.
        checkpoint_bytes: After this many bytes appended, force a full WAL checkpoint
            (TRUNCATE), so the WAL stays bounded even when readers keep SQLite's
            passive auto-checkpoint from ever completing.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "normal",
        busy_timeout: float = 5.0,
        open_timeout: float = 10.0,
        read_only: bool = False,
        checkpoint_bytes: int = _CHECKPOINT_EVERY_BYTES,
    ) -> None:
        self.path = os.fspath(path)
        self.durability = durability
        self.busy_timeout = busy_timeout
        self.open_timeout = open_timeout
        self.read_only = read_only
        self.checkpoint_bytes = checkpoint_bytes
        self._writer: _Connection | None = None
        self._reader: _Connection | None = None
        self._lock = LogOwnership(self.path)
        self._share = ShareLock(self.path)
        self._journal: CallJournal | None = None
        self._head = 0
        self._bytes_since_checkpoint = 0
        self._bytes_since_passive = 0
        # The passive checkpoint in progress (a worker thread's), and the connection
        # it uses: its own, so that commits go on meanwhile.
        self._passive: asyncio.Future[None] | None = None
        self._checkpointer: sqlite3.Connection | None = None

    @property
    def head(self) -> int:
        return self._head

    @property
    def commits_now(self) -> bool:
        return (
            not self.read_only
            and self.durability != "full"  # an fsync per commit: never on the loop
            and plain_commit(self, SQLiteStorage)
        )

    @property
    def appends_now(self) -> bool:
        return False

    def append_now(self, record: NewRecord) -> Receipt | None:
        """Never: every append is a transaction, which concurrent publishes share."""
        return None

    # -- opening --------------------------------------------------------------------

    async def open(self) -> None:
        deadline = time.monotonic() + self.open_timeout
        delay = 0.01
        try:
            if not self.read_only:
                # Owned before the file is read at all: see _ownership.
                await anyio.to_thread.run_sync(self._take_locks)
            await anyio.to_thread.run_sync(self._precheck)
            while True:
                try:
                    await self._open_connections()
                    return
                except sqlite3.Error as exc:
                    await self._close_connections()
                    if not _is_busy(exc) or time.monotonic() >= deadline:
                        raise _translate(self.path, exc) from exc
                    # The first open after a crash finds the file busy while SQLite
                    # recovers the WAL; so does an open racing another connection.
                    logger.warning("log %s is busy while opening (%s); retrying", self.path, exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.5)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.close()
            raise

    async def _open_connections(self) -> None:
        self._writer = await self._connect(writer=not self.read_only)
        if not self.read_only:
            await self._migrate(self._writer)
        await self._check_schema(self._writer)
        self._reader = await self._connect(writer=False)
        self._head = await self._read_head(self._writer)
        if not self.read_only and self.dispatching:
            await self._open_journal()

    #: Whether this process dispatches (owns the log, and its call journal).
    dispatching = True

    def _take_locks(self) -> None:
        """The log alone (blocking: on a worker thread)."""
        self._lock.acquire()
        try:
            self._share.acquire(shared=False)
        except BaseException:
            self._lock.release()
            raise

    async def _open_journal(self) -> None:
        """Count the deaths the previous life's call journal records, then start this
        life's journal."""
        path = self.path + "-calls"
        previous = await anyio.to_thread.run_sync(read_journal, path)
        generation, inflight = previous or (0, {})
        charged = await self._run("w", stmts.charge_deaths, generation, inflight, time.time())
        if charged:
            logger.warning(
                "log %s: the process died while handling %d events; each counts as a "
                "failed attempt (%s)",
                self.path,
                charged,
                PROCESS_DIED,
            )
        generation = int.from_bytes(os.urandom(8), "little") >> 1
        self._journal = await anyio.to_thread.run_sync(CallJournal, path, generation)

    async def _close_connections(self) -> None:
        with anyio.CancelScope(shield=True):
            for attr in ("_reader", "_writer"):
                conn: _Connection | None = getattr(self, attr)
                setattr(self, attr, None)
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        await conn.close()

    def _precheck(self) -> None:
        """Recognise a foreign file before SQLite gets to it."""
        try:
            with open(self.path, "rb") as f:
                magic = f.read(len(_SQLITE_MAGIC))
        except FileNotFoundError:
            if self.read_only:
                raise StorageError(f"there is no log at {self.path!r}") from None
            return
        except IsADirectoryError:
            raise NotALog(self.path, "it is a directory") from None
        if magic and magic != _SQLITE_MAGIC:
            raise NotALog(self.path, "it is not a SQLite database")

    async def _connect(self, *, writer: bool) -> _Connection:
        busy_ms = int(self.busy_timeout * 1000)
        if self.read_only:
            conn = _connect(f"file:{self.path}?mode=ro", uri=True)
        else:
            conn = _connect(self.path, uri=False, busy_ms=busy_ms if writer else None)
        await conn  # starts its thread and connects
        try:
            await conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
            if writer:
                await conn.execute("PRAGMA journal_mode = WAL")
                # Checkpoints run when this storage asks: passive ones on a worker
                # thread (_start_passive), the truncating one on this connection's
                # thread; never inside a commit made on the loop's thread.
                await conn.execute("PRAGMA wal_autocheckpoint = 0")
                await conn.execute(f"PRAGMA synchronous = {_SYNCHRONOUS[self.durability]}")
                await conn.execute("PRAGMA journal_size_limit = 67108864")
            else:
                await conn.execute("PRAGMA query_only = 1")
            await conn.execute("PRAGMA temp_store = MEMORY")
            await conn.execute("PRAGMA cache_size = -16000")
            # Touch the file so a damaged or locked database fails here, not later.
            await conn.execute_fetchall("SELECT count(*) FROM sqlite_master")
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise
        return conn

    async def _migrate(self, conn: _Connection) -> None:
        """Create or upgrade the schema. sqlite3 errors propagate (open retries busy)."""
        await conn.execute("BEGIN IMMEDIATE")
        try:
            version, app_id, tables = await self._identity(conn)
            if version == 0 and app_id == 0:
                if tables:
                    raise NotALog(
                        self.path, f"it is a SQLite database with tables {sorted(tables)}"
                    )
                await conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            if app_id in (0, APPLICATION_ID) and version < SCHEMA_VERSION:
                for script in MIGRATIONS[version:]:
                    for statement in script.split(";"):
                        if statement.strip():
                            await conn.execute(statement)
                await conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            await conn.execute("COMMIT")
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._rollback(conn)
            raise

    async def _identity(self, conn: _Connection) -> tuple[int, int, set[str]]:
        ((version,),) = await conn.execute_fetchall("PRAGMA user_version")
        ((app_id,),) = await conn.execute_fetchall("PRAGMA application_id")
        rows = await conn.execute_fetchall(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
        return int(version), int(app_id), {r[0] for r in rows}

    async def _check_schema(self, conn: _Connection) -> None:
        version, app_id, tables = await self._identity(conn)
        if app_id != APPLICATION_ID:
            detail = (
                f"it is a SQLite database with tables {sorted(tables)}"
                if tables
                else "it is an empty SQLite database"
            )
            raise NotALog(self.path, detail)
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(self.path, version, SCHEMA_VERSION)
        if version < SCHEMA_VERSION:
            raise StorageError(
                f"{self.path!r} has schema version {version} and was opened read-only; "
                "open it once with a bus to migrate it"
            )

    async def _read_head(self, conn: _Connection) -> int:
        return await conn.run(stmts.read_head)

    async def close(self) -> None:
        """Checkpoint the WAL into the database, close both connections, release the
        lock file. Idempotent."""
        await self._passive_done()
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        for attr in ("_reader", "_writer"):
            conn: _Connection | None = getattr(self, attr)
            setattr(self, attr, None)
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    if attr == "_writer" and not self.read_only:
                        # Leave a small file behind: fold the WAL back into the database.
                        await conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                await conn.close()
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        self._lock.release()
        self._share.release()

    # -- writing --------------------------------------------------------------------

    def _conn(self, which: str) -> _Connection:
        conn = self._writer if which == "w" else self._reader
        if conn is None:
            raise StorageClosed(f"the log {self.path!r} is closed")
        return conn

    async def _rollback(self, conn: _Connection) -> None:
        # Queued after whatever statement was in flight, so it runs once that finishes;
        # "no transaction is active" means the statement in flight was a COMMIT.
        with contextlib.suppress(sqlite3.Error):
            await conn.execute("ROLLBACK")

    async def _run(self, which: str, fn: Callable[..., T], *args: object) -> T:
        """``fn(connection, *args)`` on the reader's (``"r"``) or writer's (``"w"``)
        thread, its SQLite errors translated."""
        conn = self._conn(which)
        try:
            return await conn.run(partial(_call_with_connection, fn, args))
        except sqlite3.Error as exc:
            if which == "w" and _is_busy(exc):
                holders = await anyio.to_thread.run_sync(write_lock_holders, self.path)
                raise LogBusy(self.path, self.busy_timeout, holders) from exc
            raise _translate(self.path, exc) from exc

    async def commit(self, batch: WriteBatch) -> list[Receipt]:
        if self.read_only:
            raise StorageError(f"{self.path!r} was opened read-only")
        conn = self._conn("w")
        head = self._head
        # One bound on the whole commit: SQLite's busy handler waits up to the
        # connection's busy_timeout inside each try, so a retry gets only what is left.
        deadline = time.monotonic() + self.busy_timeout
        delay = _BUSY_FIRST_DELAY
        shortened = False
        try:
            while True:
                try:
                    receipts, new_head, nbytes = await conn.run(partial(_apply_batch, batch, head))
                    break
                except sqlite3.Error as exc:
                    left = deadline - time.monotonic()
                    if _is_taken_seq(exc):
                        # Another process appended since this one last did (a log
                        # shared by processes): number after the head the file has.
                        head = await conn.run(stmts.read_head)
                        continue
                    if not _is_busy(exc):
                        raise _translate(self.path, exc) from exc
                    if left <= 0.001:
                        holders = await anyio.to_thread.run_sync(write_lock_holders, self.path)
                        raise LogBusy(self.path, self.busy_timeout, holders) from exc
                    # Refused early (a connection recovering or checkpointing the
                    # file): the transaction rolled back; try again in the time left.
                    logger.info("log %s is busy (%s); retrying the commit", self.path, exc)
                except BaseException:
                    # Cancelled while the transaction ran in the thread: it may have
                    # committed. Wait for it to finish, then trust the file.
                    with anyio.CancelScope(shield=True):
                        self._head = await conn.run(stmts.read_head)
                    raise
                await anyio.sleep(min(delay, left))
                delay = min(delay * 4, 1.0)
                shortened = True
                # Then the try waits longer.
                conn.busy_ms = max(1, int((deadline - time.monotonic()) * 1000))
        finally:
            if shortened:
                conn.busy_ms = int(self.busy_timeout * 1000)
        self._committed(new_head, nbytes)
        await self._checkpoint_if_due(conn)
        return receipts

    def commit_now(self, batch: WriteBatch) -> list[Receipt] | None:
        """Commit a small ``batch`` on the calling thread (the event loop's), skipping
        the hop to the connection's thread, which costs more than a small commit.

        None, with nothing written, when it must go through :meth:`commit` instead: a
        large batch, in rows or in bytes (it would hold the loop),
        ``durability="full"`` (its fsync would hold the loop for milliseconds), the
        connection's thread busy (a commit or maintenance in flight), the truncating
        checkpoint ``checkpoint_bytes`` asks for due (passive ones run beside commits,
        on a worker thread), the write lock held by another connection (the thread
        waits for it; the loop must not), or ``commit``
        overridden (a subclass injecting faults sees every commit).
        """
        conn = self._writer
        if (
            conn is None
            or self.read_only
            or self.durability == "full"  # an fsync per commit: never on the loop
            or not conn.idle
            or self._passive_finished()
            or self._bytes_since_checkpoint >= self.checkpoint_bytes
            or not plain_commit(self, SQLiteStorage)
            or batch_rows(batch) > _INLINE_MAX_ROWS
            or batch_bytes(batch) > _INLINE_MAX_BYTES
        ):
            return None
        try:
            receipts, new_head, nbytes = conn.run_here(partial(_apply_batch, batch, self._head))
        except sqlite3.Error as exc:
            if _is_busy(exc):
                return None
            raise _translate(self.path, exc) from exc
        self._committed(new_head, nbytes)
        return receipts

    def _committed(self, new_head: int, nbytes: int) -> None:
        self._head = new_head
        # The WAL grows by whole pages: a commit adds at least one, however small.
        nbytes += _PAGE_BYTES
        self._bytes_since_checkpoint += nbytes
        self._bytes_since_passive += nbytes
        if (
            self._bytes_since_passive >= _PASSIVE_CHECKPOINT_BYTES
            and self._bytes_since_checkpoint < self.checkpoint_bytes
        ):
            self._start_passive()

    def _start_passive(self) -> None:
        """Start a PASSIVE checkpoint on a worker thread, unless one is running. It
        never waits for (nor blocks) a reader or a writer, so commits, on the loop's
        thread or the writer's, go on while it copies the WAL into the database;
        awaited by the next truncating checkpoint and by :meth:`close`."""
        self._bytes_since_passive = 0
        if self._passive is None or self._passive.done():
            loop = asyncio.get_running_loop()
            self._passive = loop.run_in_executor(None, self._passive_checkpoint)

    def _passive_checkpoint(self) -> None:
        """On a worker thread, one at a time."""
        try:
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False
                )
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            logger.warning("WAL checkpoint of %s failed: %s", self.path, exc)

    def _passive_finished(self) -> bool:
        """Whether a passive checkpoint has finished and :meth:`commit` is to follow
        it up (commit_now leaves that commit to :meth:`commit`)."""
        return self._passive is not None and self._passive.done()

    async def _passive_done(self) -> None:
        """Wait for the passive checkpoint in progress, if any."""
        passive, self._passive = self._passive, None
        if passive is not None:
            try:
                await passive
            except Exception:  # not an sqlite3.Error: that one is logged by the checkpoint
                logger.exception("WAL checkpoint of %s failed", self.path)

    async def _checkpoint_if_due(self, conn: _Connection) -> None:
        if self._bytes_since_checkpoint >= self.checkpoint_bytes:
            self._bytes_since_checkpoint = self._bytes_since_passive = 0
            await self._passive_done()
            await self._checkpoint(conn, "TRUNCATE")
        elif self._passive_finished():
            await self._passive_done()
            # Copy the frames committed while it ran, this connection waiting (a few:
            # well under a millisecond): once none is left, the next transaction
            # starts the WAL over instead of growing it.
            await self._checkpoint(conn, "PASSIVE")

    async def _checkpoint(self, conn: _Connection, mode: str = "TRUNCATE") -> None:
        # A TRUNCATE checkpoint waits (busy handler) for readers of old snapshots;
        # ours are short, so wait briefly rather than stall commits for busy_timeout.
        # A PASSIVE one copies what no reader still needs and never waits.
        conn.busy_ms = 200
        try:
            rows = await conn.execute_fetchall(f"PRAGMA wal_checkpoint({mode})")
        except sqlite3.Error as exc:
            logger.warning("WAL checkpoint of %s failed: %s", self.path, exc)
            return
        finally:
            conn.busy_ms = int(self.busy_timeout * 1000)
        busy = next(iter(rows))[0]
        if busy and mode == "TRUNCATE":
            logger.warning("WAL checkpoint of %s could not finish: a reader is busy", self.path)

    # -- reading --------------------------------------------------------------------

    async def read(
        self, after: int, upto: int, topics: frozenset[str] | None, limit: int
    ) -> list[Record]:
        conn = self._conn("r")
        sql = f"SELECT {stmts.EVENT_COLUMNS} FROM events WHERE seq > ? AND seq <= ?"
        params: list[object] = [after, upto]
        if topics is not None and "*" not in topics:
            sql += f" AND topic IN ({','.join('?' * len(topics))})"
            params.extend(sorted(topics))
        sql += " ORDER BY seq LIMIT ?"
        params.append(limit)
        try:
            rows = await conn.execute_fetchall(sql, params)
        except sqlite3.Error as exc:
            raise _translate(self.path, exc) from exc
        return [Record(*row) for row in rows]

    async def subscriptions(self) -> dict[str, SubscriptionInfo]:
        rows = await self._fetch(
            "SELECT name, topics, cursor, updated_at FROM subscriptions ORDER BY name"
        )
        return {
            name: SubscriptionInfo(name, tuple(topics.split("\n")), cursor, updated)
            for name, topics, cursor, updated in rows
        }

    async def finished_ahead(self, subscription: str, after: int) -> list[tuple[int, int]]:
        return await self._run("r", stmts.finished_ahead, subscription, after)

    def calls(self, subscription: str, slots: int, width: int) -> CallSlots:
        if self._journal is None:
            return NoCallSlots()  # read-only: nothing runs
        return self._journal.region(subscription, slots, width)

    async def _fetch(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        conn = self._conn("r")
        try:
            return [tuple(r) for r in await conn.execute_fetchall(sql, params)]
        except sqlite3.Error as exc:
            raise _translate(self.path, exc) from exc

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
        where, params = stmts.dead_filter(subscription, error_type, since, until, ids)
        start_params: list[object] = [after_seq]
        if after_subscription is None:
            start = "seq > ?"
        else:
            start = "(seq > ? OR (seq = ? AND subscription > ?))"
            start_params += [after_seq, after_subscription]
        rows = await self._fetch(
            f"SELECT {stmts.DEAD_COLUMNS} FROM dead_letters WHERE {start} {where}"
            " ORDER BY seq, subscription LIMIT ?",
            [*start_params, *params, limit],
        )
        return [stmts.dead_from_row(r) for r in rows]

    async def count_dead_letters(
        self,
        subscription: str | None = None,
        *,
        error_type: str | None = None,
        since: float | None = None,
        until: float | None = None,
        ids: Sequence[str] | None = None,
    ) -> int:
        where, params = stmts.dead_filter(subscription, error_type, since, until, ids)
        ((n,),) = await self._fetch(f"SELECT count(*) FROM dead_letters WHERE 1 {where}", params)
        return int(n)

    async def get_state(self, subscription: str, keys: Sequence[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for chunk in stmts.chunks(list(keys), stmts.IN_CHUNK):
            rows = await self._fetch(
                f"SELECT key, value FROM state WHERE subscription = ?"
                f" AND key IN ({','.join('?' * len(chunk))})",
                [subscription, *chunk],
            )
            found.update((k, bytes(v)) for k, v in rows)
        return found

    async def state_items(
        self, subscription: str, after: str = "", limit: int = 1000
    ) -> list[tuple[str, bytes]]:
        rows = await self._fetch(
            "SELECT key, value FROM state WHERE subscription = ? AND key > ? ORDER BY key LIMIT ?",
            [subscription, after, limit],
        )
        return [(k, bytes(v)) for k, v in rows]

    async def get_effect(self, key: str) -> bytes | None:
        rows = await self._fetch("SELECT result FROM effects WHERE key = ?", [key])
        return bytes(rows[0][0]) if rows else None

    async def retries(self, subscription: str) -> list[RetryRecord]:
        rows = await self._fetch(
            f"SELECT {stmts.RETRY_COLUMNS} FROM retries WHERE subscription = ? ORDER BY seq",
            [subscription],
        )
        return [stmts.retry_from_row(r) for r in rows]

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
        where, params = stmts.dead_filter(subscription, error_type, None, None, ids)
        return await self._run("w", stmts.redrive, where, params, due_at, spacing, limit)

    async def purge(
        self,
        subscription: str | None,
        *,
        ids: Sequence[str] | None = None,
        error_type: str | None = None,
        until: float | None = None,
    ) -> int:
        where, params = stmts.dead_filter(subscription, error_type, None, until, ids)
        return await self._run("w", stmts.purge, where, params)

    async def workflow(self, workflow_id: str) -> WorkflowRecord | None:
        rows = await self._fetch(
            f"SELECT {stmts.WORKFLOW_COLUMNS} FROM workflows WHERE id = ?", [workflow_id]
        )
        return stmts.workflow_from_row(rows[0]) if rows else None

    async def workflows(
        self,
        *,
        name: str | None = None,
        status: str | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> list[WorkflowRecord]:
        sql = f"SELECT {stmts.WORKFLOW_COLUMNS} FROM workflows WHERE num > ?"
        params: list[object] = [after]
        if name is not None:
            sql += " AND name = ?"
            params.append(name)
        if status is not None:
            sql += " AND status = ?"
            params.append(status)
        rows = await self._fetch(sql + " ORDER BY num LIMIT ?", [*params, limit])
        return [stmts.workflow_from_row(r) for r in rows]

    async def count_workflows(self, *, name: str | None = None, status: str | None = None) -> int:
        sql = "SELECT count(*) FROM workflows WHERE 1"
        params: list[object] = []
        if name is not None:
            sql += " AND name = ?"
            params.append(name)
        if status is not None:
            sql += " AND status = ?"
            params.append(status)
        ((n,),) = await self._fetch(sql, params)
        return int(n)

    async def drop_subscription(self, name: str) -> bool:
        return await self._run("w", stmts.drop_subscription, name)

    async def steps(self, workflow_id: str) -> list[StepRecord]:
        rows = await self._fetch(
            f"SELECT {stmts.STEP_COLUMNS} FROM workflow_steps WHERE workflow_id = ?"
            " ORDER BY position",
            [workflow_id],
        )
        return [stmts.step_from_row(r) for r in rows]

    async def unaccounted(self, subscription: str, upto: int, limit: int = 100) -> Unaccounted:
        return await self._run("r", stmts.unaccounted, subscription, upto, limit)

    async def take_control(self) -> list[tuple[int, bytes]]:
        """Commands queued in the file by another process (the CLI), oldest first."""
        rows = await self._fetch("SELECT id, command FROM control ORDER BY id LIMIT 100")
        return [(int(i), bytes(c)) for i, c in rows]

    async def done_control(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        await self._run("w", stmts.done_control, list(ids))

    async def compact(
        self, upto: int, older_than: float, idempotency_older_than: float, limit: int = 10_000
    ) -> int:
        return await self._run(
            "w", stmts.compact, min(upto, self._head), older_than, idempotency_older_than, limit
        )

    async def stats(self, *, exact: bool = True) -> LogStats:
        conn = self._conn("r")
        try:
            head = await self._read_head(conn)
            ((oldest,),) = await conn.execute_fetchall("SELECT min(seq) FROM events")
            count = _span(head, oldest)
            if exact:
                ((count,),) = await conn.execute_fetchall("SELECT count(*) FROM events")
            subs = await self.subscriptions()
            lag: dict[str, int] = {}
            for info in subs.values():
                if not exact:
                    lag[info.name] = max(0, head - info.cursor)
                    continue
                sql = "SELECT count(*) FROM events WHERE seq > ?"
                params: list[object] = [info.cursor]
                if "*" not in info.topics:
                    sql += f" AND topic IN ({','.join('?' * len(info.topics))})"
                    params.extend(info.topics)
                ((n,),) = await conn.execute_fetchall(sql, params)
                lag[info.name] = int(n)
            dead_rows = await conn.execute_fetchall(
                "SELECT subscription, count(*) FROM dead_letters GROUP BY subscription"
            )
            retry_rows = await conn.execute_fetchall(
                "SELECT subscription, count(*) FROM retries GROUP BY subscription"
            )
        except sqlite3.Error as exc:
            raise _translate(self.path, exc) from exc
        size = await anyio.to_thread.run_sync(_file_size, self.path)
        wal = await anyio.to_thread.run_sync(_file_size, self.path + "-wal")
        return LogStats(
            head=head,
            events=int(count),
            oldest_seq=oldest,
            subscriptions=tuple(subs.values()),
            lag=lag,
            dead_letters={name: int(n) for name, n in dead_rows},
            size_bytes=size,
            wal_bytes=wal,
            retries={name: int(n) for name, n in retry_rows},
        )


def _span(head: int, oldest: int | None) -> int:
    """Events kept, from their seqs: exact unless compaction left gaps."""
    return 0 if oldest is None else max(0, head - oldest + 1)


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _call_with_connection(
    fn: Callable[..., T], args: tuple[object, ...], conn: sqlite3.Connection
) -> T:
    return fn(conn, *args)


def _apply_batch(
    batch: WriteBatch, head: int, conn: sqlite3.Connection
) -> tuple[list[Receipt], int, int]:
    return stmts.apply_batch(conn, batch, head)
