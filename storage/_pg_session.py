"""The connections of a PostgreSQL log: the writer's session, which joins the log,
and a small pool of readers, with asyncpg's errors translated at this one boundary.

Writes go through the one writer session, serialised, each in a shielded scope: a
cancelled caller waits for the transaction in flight to commit or roll back (each
statement bounded by ``command_timeout``), then the cancellation proceeds. Reads go
through the pool, so a long backlog read never holds up a group commit.

A lost writer session (a server restart, a network cut) is replaced on the next
write: the new session joins the log again. Several processes write to one log at
once; what keeps their dispatching apart is the partitions' leases (``_pg_leases``),
checked in the transactions that need them, not the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal, TypeAlias, TypeVar

import anyio
import asyncpg

from . import _pg_owner as owner
from . import _pg_schema as schema_sql
from ._errors import (
    LeaseLost,
    LogBusy,
    LogLocked,
    RecordRejected,
    SchemaTooNew,
    StorageClosed,
    StorageError,
    StorageFull,
)
from ._pg_url import PgTarget

logger = logging.getLogger("eventbus.storage")

T = TypeVar("T")
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record]"
Durability = Literal["normal", "full", "off"]

_SYNCHRONOUS: dict[str, str | None] = {"normal": None, "full": "on", "off": "off"}
# SQLSTATE classes and codes (PostgreSQL's errcodes.txt).
_DISK_FULL = "53100"
#: Raised by the schema's ``fence`` when a lease a transaction carries was lost.
LEASE_LOST = "EB001"
_CONNECTION_CLASSES = ("08", "57P")  # connection exceptions; operator intervention
_REJECTED_CLASSES = ("22", "23", "54")  # data exceptions; constraints; program limits
_INSUFFICIENT_PRIVILEGE = "42501"
# Failures of a connection rather than of a statement: the session (and the
# ownership lock with it) may be gone.
_CONNECTION_ERRORS = (
    OSError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
)


def _lost_connection(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection failed, not the statement. asyncpg's own
    refusals of a value (``DataError``, an ``InterfaceError`` that is also a
    ``ValueError``) are the statement's."""
    return isinstance(exc, _CONNECTION_ERRORS) and not isinstance(exc, ValueError)


_OPEN_RETRY_FIRST = 0.05
# How long an opener waits for a migration by another process to end, or for the
# processes of an older version to stop before it migrates the log.
_JOIN_WAIT = 2.0
_JOIN_RETRY = 0.02
_LOCK_ADVICE = (
    "this version must bring the log's schema up to date, which it does only while "
    "no process runs on the log. Stop the processes of the older version, then start "
    "this one (it migrates the log), then the others with this version"
)


class _Pool:
    """Connections for reads (and the few pooled writes), at most ``size`` at once.

    asyncpg's own pool costs about 0.1 ms of Python per acquire and release (a
    shielded release, a timeout, a reset callback): as much as the statement, when
    every handler call writes its row through it. This one hands a free connection
    out and takes it back; one that failed, or was left in a transaction (a caller
    cancelled mid-statement), is closed rather than reused.
    """

    def __init__(self, connect: Callable[[], Awaitable[Connection]], size: int) -> None:
        self._connect = connect
        self._free: list[Connection] = []
        # asyncio's: it does not yield when a connection is free (anyio's does).
        self._limit = asyncio.Semaphore(max(1, size))
        self._closed = False

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Connection]:
        async with self._limit:
            conn = self._free.pop() if self._free else await self._connect()
            reuse = False
            try:
                yield conn
                reuse = True
            finally:
                if reuse and not self._closed and not conn.is_closed():
                    if conn.is_in_transaction():
                        conn.terminate()
                    else:
                        self._free.append(conn)
                else:
                    conn.terminate()

    async def close(self) -> None:
        self._closed = True
        free, self._free = self._free, []
        for conn in free:
            with contextlib.suppress(Exception), anyio.move_on_after(2.0):
                await conn.close()
            conn.terminate()


class LostConnection(StorageError):
    """The writer's connection failed (or timed out) during an operation, which may
    or may not have committed. Retryable: the next write connects again."""


class Sessions:
    """The writer's session and the readers' pool of one log (see the module
    docstring). :meth:`open` connects, creates or migrates the schema and takes the
    ownership lock; ``oid`` and ``log_id`` then identify the log."""

    def __init__(
        self,
        target: PgTarget,
        *,
        durability: Durability,
        busy_timeout: float,
        open_timeout: float,
        command_timeout: float,
        read_only: bool,
        pool_size: int,
        partitions: int,
    ) -> None:
        self.target = target
        self.path = target.display
        self.durability = durability
        self.busy_timeout = busy_timeout
        self.open_timeout = open_timeout
        self.command_timeout = command_timeout
        self.read_only = read_only
        self.pool_size = pool_size
        #: Partitions of a log this opens for the first time; the log's own once open.
        self.partitions = partitions
        self.oid = 0
        self.log_id = ""
        self.session: int | None = None  # the server process of the writer's session
        self._writer: Connection | None = None
        self._pool: _Pool | None = None
        self._lock = anyio.Lock()
        self._closed = False

    def _settings(self, *, writer: bool) -> dict[str, str]:
        settings = dict(self.target.server_settings)
        settings["search_path"] = self.target.quoted_schema
        settings["application_name"] = (
            owner.application_name() if writer else f"eventbus reader {self.target.schema}"[:63]
        )
        if writer:
            settings["lock_timeout"] = str(max(1, int(self.busy_timeout * 1000)))
            synchronous = _SYNCHRONOUS[self.durability]
            if synchronous is not None:
                settings["synchronous_commit"] = synchronous
        else:
            # The pool's few writes (calls in flight, lease heartbeats and claims)
            # must outlive this process, not the database server: they commit
            # without waiting for the WAL to reach the disk (a handler call waits
            # for its row: 0.1 ms so, 5-8 ms with the flush here). The writer's
            # next commit flushes them before anything it writes.
            settings["synchronous_commit"] = "off"
        return settings

    async def _connect(self) -> Connection:
        """A writer's connection, retried while the server refuses connections."""
        deadline = time.monotonic() + self.open_timeout
        delay = _OPEN_RETRY_FIRST
        while True:
            try:
                with anyio.fail_after(max(deadline - time.monotonic(), 0.5)):
                    return await asyncpg.connect(
                        self.target.dsn,
                        server_settings=self._settings(writer=True),
                        command_timeout=self.command_timeout,
                    )
            except Exception as exc:
                if not (isinstance(exc, TimeoutError) or _lost_connection(exc)):
                    raise self.translate(exc) from exc
                if time.monotonic() + delay >= deadline:
                    raise self.translate(exc) from exc
                logger.warning("cannot reach %s yet (%s); retrying", self.path, exc)
            await anyio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def connect_plain(self) -> Connection:
        """A connection of its own to the log's schema (for LISTEN).

        Cancellation: the connection attempt finishes first (within ``open_timeout``)
        and the new connection is closed. Abandoned halfway, asyncpg leaves an error
        in a future nobody reads (its TLS probe's), which asyncio reports later."""
        try:
            with anyio.CancelScope(shield=True):
                conn = await asyncpg.connect(
                    self.target.dsn,
                    server_settings=self._settings(writer=False),
                    command_timeout=self.command_timeout,
                    timeout=self.open_timeout,
                )
        except Exception as exc:
            raise self.translate(exc) from exc
        try:
            await anyio.lowlevel.checkpoint()  # a cancellation that came meanwhile
        except BaseException:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await conn.close(timeout=1)
            raise
        return conn

    async def open(self) -> int:
        """Connect, create or migrate the log, own it (unless read-only); returns
        the head. Raises a ``StorageError`` subclass; closes what it opened first."""
        self._closed = False
        try:
            conn = self._writer = await self._connect()
            self.session = conn.get_server_pid()
            with anyio.CancelScope(shield=True):
                head = await self._open_on(conn)
            self._pool = _Pool(self.connect_plain, self.pool_size)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self.close()
            if isinstance(exc, Exception) and not isinstance(exc, StorageError):
                raise self.translate(exc) from exc
            raise
        return head

    async def _open_on(self, conn: Connection) -> int:
        if self.read_only:
            oid = await owner.schema_oid(conn, self.target)
            if oid is None:
                raise StorageError(f"there is no log at {self.path!r}")
            self.oid = oid
        else:
            self.oid = await owner.ensure_schema(conn, self.target)
            # Joined before the log is read at all: a newer version opening it while
            # an older one runs must not migrate it under that one.
            await self._join(conn, migrate=True)
        self.log_id = await owner.check(conn, self.oid, self.target)
        self.partitions = await owner.partitions(conn)
        head = await conn.fetchval("SELECT seq FROM head")
        return int(head)

    async def _join(self, conn: Connection, *, migrate: bool = False) -> None:
        """Take the log's lock shared on ``conn``'s session; with ``migrate``, first
        create the log or bring it up to date if it needs it (under the lock taken
        exclusively, which waits briefly for other processes, then raises
        ``LogLocked`` naming one)."""
        deadline = time.monotonic() + _JOIN_WAIT
        while True:
            if await owner.try_join(conn, self.oid):
                found = await owner.version(conn, self.oid) if migrate else None
                if not migrate or found == schema_sql.SCHEMA_VERSION:
                    return
                if found is not None and found > schema_sql.SCHEMA_VERSION:
                    raise SchemaTooNew(self.path, found, schema_sql.SCHEMA_VERSION)
                await owner.leave(conn, self.oid)
                if await owner.try_own(conn, self.oid):
                    try:
                        await owner.migrate(conn, self.oid, self.target, self.partitions)
                    finally:
                        await owner.release(conn, self.oid)
                    continue
            if time.monotonic() >= deadline:
                description, pid, _ = await owner.holder(conn, self.oid)
                raise LogLocked(self.path, description, pid, advice=_LOCK_ADVICE)
            await anyio.sleep(_JOIN_RETRY)

    async def close(self) -> None:
        """Close the pool and the writer's session (the ownership lock goes with
        it). Idempotent."""
        self._closed = True
        with anyio.CancelScope(shield=True):
            pool, self._pool = self._pool, None
            if pool is not None:
                await pool.close()
            conn, self._writer = self._writer, None
            if conn is not None:
                with contextlib.suppress(Exception), anyio.move_on_after(self.command_timeout):
                    await conn.close()
                conn.terminate()

    # -- the writer's connection ----------------------------------------------------

    async def _writer_conn(self) -> Connection:
        """The writer's connection; a new one (joining the log again) if it was lost."""
        if self._closed:
            raise StorageClosed(f"the log {self.path!r} is closed")
        conn = self._writer
        if conn is not None and not conn.is_closed():
            return conn
        self._writer = None
        conn = await self._connect()
        try:
            if not self.read_only:
                await self._join(conn)
        except BaseException:
            conn.terminate()
            raise
        self._writer, self.session = conn, conn.get_server_pid()
        logger.warning("log %s: reconnected to the database", self.path)
        return conn

    async def write(
        self,
        fn: Callable[..., Awaitable[T]],
        *args: object,
        transaction: bool = True,
    ) -> T:
        """``fn(connection, *args)`` on the writer's connection, in one transaction
        (unless ``transaction`` is false: then ``fn`` runs one statement), its errors
        translated.

        Cancellation: shielded; runs to its end (bounded by ``command_timeout``)."""
        if self.read_only:
            raise StorageError(f"{self.path!r} was opened read-only")
        async with self._lock:
            with anyio.CancelScope(shield=True):
                conn = await self._writer_conn()
                try:
                    # Each statement is bounded by the connection's command_timeout.
                    if not transaction:
                        return await fn(conn, *args)
                    async with conn.transaction():
                        return await fn(conn, *args)
                except asyncpg.exceptions.LockNotAvailableError as exc:
                    raise LogBusy(
                        self.path, self.busy_timeout, await self._lock_holders(conn)
                    ) from exc
                except Exception as exc:
                    if isinstance(exc, TimeoutError) or _lost_connection(exc) or conn.is_closed():
                        # In an unknown state (or gone): start afresh next time.
                        conn.terminate()
                        self._writer = None
                        raise LostConnection(str(self.translate(exc))) from exc
                    raise self.translate(exc) from exc
        raise AssertionError("unreachable: the shield swallows nothing")  # pragma: no cover

    async def _lock_holders(self, conn: Connection) -> tuple[str, ...]:
        """Other sessions holding locks on the log's tables, described."""
        with contextlib.suppress(Exception), anyio.move_on_after(self.command_timeout):
            rows = await conn.fetch(
                "SELECT DISTINCT a.pid, a.application_name, host(a.client_addr)"
                " FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
                " JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE c.relnamespace = $1::bigint::oid AND l.granted"
                " AND l.pid <> pg_backend_pid() ORDER BY a.pid",
                self.oid,
            )
            return tuple(
                f"PostgreSQL session {pid} ({name or 'no name'}"
                + (f", from {addr}" if addr else "")
                + ")"
                for pid, name, addr in rows
            )
        return ()

    async def read(
        self, fn: Callable[..., Awaitable[T]], *args: object, snapshot: bool = False
    ) -> T:
        """``fn(connection, *args)`` on a pooled connection (in one REPEATABLE READ
        snapshot if ``snapshot``), its errors translated.

        Cancellation: stops the wait at once; asyncpg cancels the statement on the
        server, and the connection is rolled back before it is used again."""
        for attempt in (1, 2):
            pool = self._pool
            if pool is None or self._closed:
                raise StorageClosed(f"the log {self.path!r} is closed")
            try:
                async with pool.acquire() as conn:
                    if not snapshot:
                        return await fn(conn, *args)
                    async with conn.transaction(isolation="repeatable_read", readonly=True):
                        return await fn(conn, *args)
            except Exception as exc:
                # A pooled session the server ended (a restart, an idle timeout): a
                # read can safely run again on a new one.
                if attempt == 2 or self._closed or not _lost_connection(exc):
                    raise self.translate(exc) from exc
                logger.info("log %s: a read lost its connection (%s); retrying", self.path, exc)
        raise AssertionError("unreachable")  # pragma: no cover

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        async def fetch(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(sql, *args)

        return await self.read(fetch)

    def translate(self, exc: BaseException) -> StorageError:
        """Turn an asyncpg (or socket) error into the storage error tree: the one
        boundary for them."""
        if isinstance(exc, StorageError):
            return exc
        path = self.path
        if isinstance(exc, TimeoutError):
            return StorageError(
                f"an operation on {path!r} took longer than command_timeout "
                f"({self.command_timeout:g}s); its connection was dropped, and the "
                "operation may or may not have completed"
            )
        state = getattr(exc, "sqlstate", None) or ""
        if state == LEASE_LOST:
            detail = getattr(exc, "detail", None) or ""
            return LeaseLost(path, tuple(s for s in detail.split("\n") if s))
        if state == _DISK_FULL:
            return StorageFull(
                f"the database server holding {path!r} is out of disk space; the write "
                "was rolled back and nothing partial was kept. Free space and retry"
            )
        if state.startswith(_REJECTED_CLASSES) or (
            isinstance(exc, asyncpg.exceptions.InterfaceError) and isinstance(exc, ValueError)
        ):
            return RecordRejected(path, str(exc))
        if _lost_connection(exc) or state.startswith(_CONNECTION_CLASSES):
            return StorageError(
                f"lost the connection to the database of {path!r} ({exc}). Retryable: "
                "the next operation connects again"
            )
        if state == _INSUFFICIENT_PRIVILEGE:
            return StorageError(
                f"the database refused {path!r} ({exc}): the user needs CREATE on the "
                "database (to create the schema) and on the schema, or a schema made "
                "for it in advance"
            )
        if isinstance(exc, asyncpg.PostgresError):
            return StorageError(f"PostgreSQL failed on {path!r}: {exc}")
        return StorageError(f"storage failure on {path!r}: {exc!r}")
