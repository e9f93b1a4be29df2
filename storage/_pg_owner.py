"""Who runs on a PostgreSQL log, and the log's schema: created, recognised, migrated.

Every process running a bus on the log holds a *shared* session-level advisory lock
keyed by the log's schema (its OID, so two logs never share a key) on the connection
it writes through; many processes share the log at once (``_pg_leases`` divides the
work). Bringing the schema to a newer version takes the same lock *exclusively*, so
a newer version never migrates a log under a running older one: it waits a moment
for them, then refuses with ``LogLocked`` naming one. PostgreSQL releases the lock
when a session ends, however the process died, so a ``kill -9`` never leaves the log
locked. A writer's connection names its process in ``application_name``
(``eventbus pid 1234 on host``), which is how a refused opener names them.
"""

from __future__ import annotations

import os
import re
import socket
from typing import TYPE_CHECKING, TypeAlias

from . import _pg_schema as schema_sql
from ._errors import NotALog, SchemaTooNew, StorageError
from ._pg_url import PgTarget

if TYPE_CHECKING:
    import asyncpg

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record]"

# The high 32 bits of the advisory lock keys: "EVBS" for ownership (the low bits are
# the schema's OID), "EVBM" for creating a schema (the low bits hash its name).
OWNER_CLASS = 0x45564253
CREATE_CLASS = 0x4556424D
_NAME = re.compile(r"eventbus pid (\d+) on (.*)")


def application_name() -> str:
    """How the owner's session names it to other sessions (63 bytes at most)."""
    return f"eventbus pid {os.getpid()} on {socket.gethostname()}"[:63]


async def schema_oid(conn: Connection, target: PgTarget) -> int | None:
    oid = await conn.fetchval("SELECT oid FROM pg_namespace WHERE nspname = $1", target.schema)
    return None if oid is None else int(oid)


async def ensure_schema(conn: Connection, target: PgTarget) -> int:
    """The OID of the log's schema, created (empty) if missing."""
    oid = await schema_oid(conn, target)
    if oid is not None:
        return oid
    async with conn.transaction():
        # Two processes creating one schema at once: one waits for the other, then
        # finds it there.
        await conn.execute(
            "SELECT pg_advisory_xact_lock("
            "($1::bigint << 32) | (hashtext($2)::bigint & 4294967295))",
            CREATE_CLASS,
            target.schema,
        )
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {target.quoted_schema}")
    # Names resolve through search_path: look again now that the schema exists.
    await conn.execute(f"SET search_path TO {target.quoted_schema}")
    oid = await schema_oid(conn, target)
    assert oid is not None
    return oid


async def try_join(conn: Connection, oid: int) -> bool:
    """Take the log's lock shared on this session: false while a migration holds it."""
    return bool(
        await conn.fetchval("SELECT pg_try_advisory_lock_shared($1)", (OWNER_CLASS << 32) | oid)
    )


async def leave(conn: Connection, oid: int) -> None:
    await conn.execute("SELECT pg_advisory_unlock_shared($1)", (OWNER_CLASS << 32) | oid)


async def try_own(conn: Connection, oid: int) -> bool:
    """Take the log's lock exclusively on this session, if no other session holds it
    (to migrate the schema)."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", (OWNER_CLASS << 32) | oid))


async def release(conn: Connection, oid: int) -> None:
    await conn.execute("SELECT pg_advisory_unlock($1)", (OWNER_CLASS << 32) | oid)


async def holder(conn: Connection, oid: int) -> tuple[str, int | None, int | None]:
    """Another session holding the log's lock (a process running on it): a
    description, its pid if it runs on this host, and the server process of its
    session."""
    row = await conn.fetchrow(
        "SELECT l.pid, a.application_name, host(a.client_addr) FROM pg_locks l"
        " LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1::bigint::oid"
        " AND l.objid = $2::bigint::oid AND l.objsubid = 1 AND l.pid <> pg_backend_pid()"
        " ORDER BY l.pid LIMIT 1",
        OWNER_CLASS,
        oid,
    )
    if row is None:
        return "unknown: it let go just now", None, None
    backend, name, addr = int(row[0]), row[1] or "", row[2]
    session = f"PostgreSQL session {backend}" + (f" from {addr}" if addr else "")
    match = _NAME.fullmatch(name)
    if match is None:
        return f"{name or 'a session without a name'}, {session}", None, backend
    pid, host = int(match.group(1)), match.group(2)
    local = pid if host == socket.gethostname() else None
    return f"pid {pid} on {host}, {session}", local, backend


async def tables(conn: Connection, oid: int) -> set[str]:
    rows = await conn.fetch(
        "SELECT relname FROM pg_class WHERE relnamespace = $1::bigint::oid"
        " AND relkind IN ('r', 'p', 'v', 'm', 'f')",
        oid,
    )
    return {str(r[0]) for r in rows}


async def identity(conn: Connection, oid: int, target: PgTarget) -> tuple[int, str]:
    """The log's schema version and id. Raises ``NotALog`` for a schema this library
    did not create (or an empty one)."""
    found = await tables(conn, oid)
    if "log_schema" not in found:
        detail = (
            f"the schema {target.schema!r} holds tables {sorted(found)}"
            if found
            else f"the schema {target.schema!r} is empty"
        )
        raise NotALog(target.display, detail)
    row = await conn.fetchrow("SELECT application, version, log_id FROM log_schema")
    if row is None or row[0] != schema_sql.APPLICATION:
        raise NotALog(
            target.display,
            f"the schema {target.schema!r} has a log_schema table that another program wrote",
        )
    return int(row[1]), str(row[2])


async def version(conn: Connection, oid: int) -> int | None:
    """The log's schema version; None for a schema without a log yet."""
    if "log_schema" not in await tables(conn, oid):
        return None
    found = await conn.fetchval("SELECT version FROM log_schema")
    return None if found is None else int(found)


async def partitions(conn: Connection) -> int:
    """The number of partitions of the (current) log."""
    found = await conn.fetchval("SELECT value FROM meta WHERE key = 'partitions'")
    return int(found)


async def migrate(conn: Connection, oid: int, target: PgTarget, parts: int) -> None:
    """Create the log in its schema (with ``parts`` partitions), or bring an older one
    up to date (a log that had none gets ``parts``), in one transaction. The caller
    holds the log's lock exclusively."""
    async with conn.transaction():
        found = await tables(conn, oid)
        if not found:
            await conn.execute(schema_sql.create_script())
            await conn.execute(
                "INSERT INTO log_schema (application, version, log_id)"
                " VALUES ($1, $2, gen_random_uuid()::text)",
                schema_sql.APPLICATION,
                schema_sql.BASE_VERSION,
            )
        version, _ = await identity(conn, oid, target)
        if version > schema_sql.SCHEMA_VERSION:
            raise SchemaTooNew(target.display, version, schema_sql.SCHEMA_VERSION)
        if version < schema_sql.BASE_VERSION:
            raise StorageError(
                f"{target.display!r} has schema version {version}, older than any "
                "PostgreSQL log this library wrote"
            )
        for index in range(version - schema_sql.BASE_VERSION, len(schema_sql.MIGRATIONS)):
            await conn.execute(schema_sql.migration(index, parts))
        await conn.execute("UPDATE log_schema SET version = $1", schema_sql.SCHEMA_VERSION)


async def check(conn: Connection, oid: int, target: PgTarget) -> str:
    """Refuse a log this version cannot use; returns the log's id."""
    version, log_id = await identity(conn, oid, target)
    if version > schema_sql.SCHEMA_VERSION:
        raise SchemaTooNew(target.display, version, schema_sql.SCHEMA_VERSION)
    if version < schema_sql.SCHEMA_VERSION:
        raise StorageError(
            f"{target.display!r} has schema version {version} and was opened read-only; "
            "open it once with a bus to migrate it"
        )
    return log_id
