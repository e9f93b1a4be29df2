"""The connections of a PostgreSQL log: the writer's session, which owns the log,
and a small pool of readers, with asyncpg's errors translated at this one boundary.

Writes go through the one writer session, serialised, each in a shielded scope: a
cancelled caller waits for the transaction in flight to commit or roll back (each
statement bounded by ``command_timeout``), then the cancellation proceeds. Reads go
through the pool, so a long backlog read never holds up a group commit.

A lost writer session (a server restart, a network cut) is replaced on the next
write: the new session takes the ownership lock again (ending this process's old
session first, if the server still holds the lock for it), and refuses to write if
another owner registered itself meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal, TypeAlias, TypeVar

import anyio
import asyncpg

from . import _pg_owner as owner
from ._errors import LogBusy, LogLocked, RecordRejected, StorageClosed, StorageError, StorageFull
from ._pg_url import PgTarget

if TYPE_CHECKING:
    from asyncpg.pool import Pool

logger = logging.getLogger("eventbus.storage")

T = TypeVar("T")
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record]"
Durability = Literal["normal", "full", "off"]

_SYNCHRONOUS: dict[str, str | None] = {"normal": None, "full": "on", "off": "off"}
# SQLSTATE classes and codes (PostgreSQL's errcodes.txt).
_DISK_FULL = "53100"
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
# How long an opener waits for the session of an owner that died on this host to end.
_OWNER_WAIT = 5.0
_OWNER_RETRY = 0.02
_LOCK_ADVICE = (
    "only one process may run a bus on a PostgreSQL log for now. Stop that process, "
    "or give this one another schema (?schema=... in the URL); the other's lock goes "
    "when its database session ends, so a killed owner frees the log at once"
)


async def _reset(conn: Connection) -> None:
    """Ready a pooled connection for its next reader. Readers change no session
    state, so only an interrupted transaction needs ending (asyncpg's default reset,
    a round trip of ``RESET ALL`` and more on every release, doubled the cost of a
    read)."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


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
    ) -> None:
        self.target = target
        self.path = target.display
        self.durability = durability
        self.busy_timeout = busy_timeout
        self.open_timeout = open_timeout
        self.command_timeout = command_timeout
        self.read_only = read_only
        self.pool_size = pool_size
        self.oid = 0
        self.log_id = ""
        #: This life's registration in the log (``meta.owner_generation``), once made.
        self.generation = 0
        self.session: int | None = None  # the server process of the writer's session
        self._writer: Connection | None = None
        self._pool: Pool[asyncpg.Record] | None = None
        self._lock = anyio.Lock()
        self._closed = False
        self._fenced: StorageError | None = None

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

    async def open(self) -> int:
        """Connect, create or migrate the log, own it (unless read-only); returns
        the head. Raises a ``StorageError`` subclass; closes what it opened first."""
        self._closed = False
        self._fenced = None
        try:
            conn = self._writer = await self._connect()
            self.session = conn.get_server_pid()
            with anyio.CancelScope(shield=True):
                head = await self._open_on(conn)
            self._pool = await asyncpg.create_pool(
                self.target.dsn,
                min_size=1,
                max_size=max(1, self.pool_size),
                server_settings=self._settings(writer=False),
                command_timeout=self.command_timeout,
                reset=_reset,
            )
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
            # Owned before the log is read at all: a newer version opening it while
            # an older one runs must not migrate it under that one.
            await self._own(conn)
            await owner.migrate(conn, self.oid, self.target)
        self.log_id = await owner.check(conn, self.oid, self.target)
        head = await conn.fetchval("SELECT seq FROM head")
        return int(head)

    async def _own(self, conn: Connection, previous: int | None = None) -> None:
        """Take the ownership lock on ``conn``'s session, or raise ``LogLocked``.

        ``previous`` is this storage's own earlier session (after a lost connection):
        if the server still thinks it holds the lock, it is ended and the lock taken
        over."""
        deadline = time.monotonic() + _OWNER_WAIT
        while True:
            if await owner.try_own(conn, self.oid):
                return
            description, pid, session = await owner.holder(conn, self.oid)
            if previous is not None and session == previous:
                logger.warning(
                    "log %s: ending this process's previous database session %d, which "
                    "the server still holds the log's lock for",
                    self.path,
                    previous,
                )
                await conn.execute("SELECT pg_terminate_backend($1, 5000)", previous)
                previous = None
                continue
            # An owner on this host that is gone (killed): the server ends its session
            # as soon as it sees the socket closed; wait for that, briefly.
            gone = pid is not None and not _alive(pid)
            if not gone or time.monotonic() >= deadline:
                if gone:
                    description += ", which is not running here any more"
                raise LogLocked(self.path, description, pid, advice=_LOCK_ADVICE)
            await anyio.sleep(_OWNER_RETRY)

    async def close(self) -> None:
        """Close the pool and the writer's session (the ownership lock goes with
        it). Idempotent."""
        self._closed = True
        with anyio.CancelScope(shield=True):
            pool, self._pool = self._pool, None
            if pool is not None:
                with contextlib.suppress(Exception), anyio.move_on_after(self.command_timeout):
                    await pool.close()
                pool.terminate()
            conn, self._writer = self._writer, None
            if conn is not None:
                with contextlib.suppress(Exception), anyio.move_on_after(self.command_timeout):
                    await conn.close()
                conn.terminate()

    # -- the writer's connection ----------------------------------------------------

    async def _writer_conn(self) -> Connection:
        """The writer's connection; a new one (owning the log again) if it was lost."""
        if self._closed:
            raise StorageClosed(f"the log {self.path!r} is closed")
        if self._fenced is not None:
            raise self._fenced
        conn = self._writer
        if conn is not None and not conn.is_closed():
            return conn
        self._writer = None
        conn = await self._connect()
        try:
            if not self.read_only:
                await self._own(conn, previous=self.session)
                await self._check_still_owner(conn)
        except BaseException:
            conn.terminate()
            raise
        self._writer, self.session = conn, conn.get_server_pid()
        logger.warning("log %s: reconnected to the database", self.path)
        return conn

    async def _check_still_owner(self, conn: Connection) -> None:
        """After a lost connection: refuse to write if another owner came and went
        meanwhile (its writes and this bus's memory of the log may disagree)."""
        if not self.generation:
            return
        last = await conn.fetchval("SELECT value FROM meta WHERE key = 'owner_generation'")
        if last != str(self.generation):
            self._fenced = StorageError(
                f"another process owned the log {self.path!r} while this one was "
                "disconnected from the database; this bus can no longer write to it. "
                "Close it and open a new one"
            )
            raise self._fenced

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
