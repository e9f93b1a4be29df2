"""What only the PostgreSQL log has to get right: its URL, one owner per schema, a
foreign or newer schema refused, appends that never let a reader skip an event,
another session's locks, and a connection lost under it."""

from __future__ import annotations

import os
import random
import time

import anyio
import anyio.lowlevel
import asyncpg
import pytest

import eventbus
from eventbus import Bus
from eventbus.storage import (
    SCHEMA_VERSION,
    LogBusy,
    LogLocked,
    NewRecord,
    NotALog,
    PostgresStorage,
    RecordRejected,
    SchemaTooNew,
    StorageError,
    WriteBatch,
)
from eventbus.storage import _pg_schema as pg_schema
from eventbus.storage._pg_batch import write_batch
from eventbus.storage._pg_url import parse
from tests import postgres

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


def rec(i: int, ikey: str | None = None, topic: str = "t") -> NewRecord:
    return NewRecord(f"id-{i}", topic, f"k{i % 3}", b"p", None, time.time(), ikey)


def schema_of(url: str) -> str:
    return parse(url).schema


# -- the URL ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "schema"),
    [
        ("postgresql://u@h/db", "eventbus"),
        ("postgres://u@h/db?schema=orders", "orders"),
        ("postgresql://u@h/db?options=-csearch_path%3DBilling,public", "billing"),
        ("postgresql://u@h/db?options=-c%20search_path%3D%22Billing%22", "Billing"),
        ("postgresql://u@h/db?schema=a&options=-csearch_path%3Db", "a"),
    ],
)
def test_the_schema_comes_from_the_url(url: str, schema: str) -> None:
    assert parse(url).schema == schema


def test_the_url_keeps_its_other_parameters_and_shows_no_password() -> None:
    target = parse(
        "postgresql://app:secret@db:5433/app?sslmode=disable&schema=s&journal_dir=/j"
        "&options=-c%20statement_timeout%3D5s"
    )
    assert target.dsn == "postgresql://app:secret@db:5433/app?sslmode=disable"
    assert target.display == "postgresql://app@db:5433/app?schema=s"
    assert target.journal_dir == "/j"
    assert target.server_settings == {"statement_timeout": "5s"}


@pytest.mark.parametrize("schema", ["", "1abc", "a-b", 'a"b', "x" * 64])
def test_a_schema_that_is_not_a_plain_identifier_is_refused(schema: str) -> None:
    with pytest.raises(ValueError, match="letters, digits and underscores"):
        PostgresStorage("postgresql://u@h/db", schema=schema or "''")


async def test_bus_open_refuses_a_bad_schema_as_a_config_error() -> None:
    with pytest.raises(eventbus.ConfigError, match="letters, digits"):
        async with Bus.open("postgresql://u@h/db?schema=no-dashes"):
            pass


def test_the_postgres_schema_is_at_the_sqlite_schemas_version() -> None:
    # A new version is a migration of both backends.
    assert pg_schema.SCHEMA_VERSION == SCHEMA_VERSION


# -- many processes ---------------------------------------------------------------------


async def test_several_storages_write_to_one_log_at_once(pg_url: str) -> None:
    first = PostgresStorage(pg_url)
    second = PostgresStorage(pg_url)
    await first.open()
    await second.open()
    try:
        assert first.member != second.member
        (a,) = await first.commit(WriteBatch(appends=[rec(1)]))
        (b,) = await second.commit(WriteBatch(appends=[rec(2)]))
        (c,) = await first.commit(WriteBatch(appends=[rec(3, "ik")]))
        (d,) = await second.commit(WriteBatch(appends=[rec(4, "ik")]))
        assert [a.seq, b.seq, c.seq] == [1, 2, 3]
        assert (d.seq, d.duplicate) == (3, True)  # idempotency keys hold across processes
        # Reading needs no share of the work.
        reader = PostgresStorage(pg_url, read_only=True)
        await reader.open()
        assert [r.seq for r in await reader.read(0, 10, None, 10)] == [1, 2, 3]
        await reader.close()
    finally:
        await first.close()
        await second.close()


async def test_a_log_to_migrate_is_refused_while_an_older_version_runs_on_it(
    pg_url: str,
) -> None:
    older = PostgresStorage(pg_url)
    await older.open()
    try:
        # As if ``older`` were a version before the last migration.
        await postgres.execute(schema_of(pg_url), "UPDATE log_schema SET version = version - 1")
        with pytest.raises(LogLocked) as info:
            await PostgresStorage(pg_url).open()
        assert info.value.pid == os.getpid()  # this host: the pid is usable here
        assert "older version" in str(info.value)
    finally:
        await older.close()
        await postgres.execute(schema_of(pg_url), "UPDATE log_schema SET version = version + 1")
    newer = PostgresStorage(pg_url)
    await newer.open()
    await newer.close()


async def test_a_commit_that_lost_its_session_connects_again_and_commits_once(
    pg_url: str,
) -> None:
    store = PostgresStorage(pg_url)
    await store.open()
    try:
        await store.commit(WriteBatch(appends=[rec(1)]))
        await postgres.execute(
            schema_of(pg_url), "SELECT pg_terminate_backend($1, 5000)", store._db.session
        )
        receipts = await store.commit(WriteBatch(appends=[rec(2, "ik"), rec(3)]))
        assert [(r.seq, r.duplicate) for r in receipts] == [(2, False), (3, False)]
        assert [r.seq for r in await store.read(0, 10, None, 10)] == [1, 2, 3]
    finally:
        await store.close()


# -- what the database says about a schema -----------------------------------------------


async def test_a_schema_of_another_program_is_not_a_log(pg_url: str) -> None:
    schema = schema_of(pg_url)
    await postgres.execute(schema, f'CREATE SCHEMA "{schema}"')
    await postgres.execute(schema, "CREATE TABLE users (id int)")
    with pytest.raises(NotALog, match="users"):
        await PostgresStorage(pg_url).open()
    with pytest.raises(eventbus.NotALog):
        async with Bus.open(pg_url):
            pass


async def test_a_log_written_by_a_newer_version_is_refused(pg_url: str) -> None:
    store = PostgresStorage(pg_url)
    await store.open()
    await store.close()
    await postgres.execute(schema_of(pg_url), "UPDATE log_schema SET version = version + 1")
    with pytest.raises(SchemaTooNew) as info:
        await PostgresStorage(pg_url).open()
    assert info.value.found == pg_schema.SCHEMA_VERSION + 1


async def test_opening_a_missing_log_read_only_creates_nothing(pg_url: str) -> None:
    with pytest.raises(StorageError, match="there is no log"):
        await PostgresStorage(pg_url, read_only=True).open()
    found = await postgres.execute(
        schema_of(pg_url), "SELECT 1 FROM pg_namespace WHERE nspname = $1", schema_of(pg_url)
    )
    assert found == "SELECT 0"


async def test_a_value_postgres_cannot_store_is_rejected_alone(pg_url: str) -> None:
    store = PostgresStorage(pg_url)
    await store.open()
    try:
        with pytest.raises(RecordRejected):
            await store.commit(WriteBatch(appends=[rec(1, topic="nul\x00")]))
        (receipt,) = await store.commit(WriteBatch(appends=[rec(2)]))
        assert receipt.seq == 1  # the rejected commit gave its number back
    finally:
        await store.close()


async def test_a_write_waiting_on_another_sessions_lock_fails_as_busy_naming_it(
    pg_url: str,
) -> None:
    store = PostgresStorage(pg_url, busy_timeout=0.2)
    await store.open()
    other = await asyncpg.connect(
        postgres.SERVER,
        server_settings={"search_path": schema_of(pg_url), "application_name": "psql"},
    )
    try:
        async with other.transaction():
            await other.execute("SELECT seq FROM head FOR UPDATE")  # an operator's session
            with pytest.raises(LogBusy) as info:
                await store.commit(WriteBatch(appends=[rec(1)]))
            assert any("psql" in h for h in info.value.holders)
        (receipt,) = await store.commit(WriteBatch(appends=[rec(1)]))
        assert receipt.seq == 1
    finally:
        await other.close()
        await store.close()


# -- the sequence-gap trap ---------------------------------------------------------------


async def test_readers_never_skip_an_event_while_many_sessions_append(pg_url: str) -> None:
    """Regression guard for the trap of sequence numbers taken before commit: appends
    from many sessions at once (some rolled back, some slow to commit), a reader that
    reads ``seq > cursor`` with no upper bound as fast as it can, and a transaction
    held open elsewhere the whole time. The reader must see every event, densely, in
    order, and must not stall behind the open transaction."""
    store = PostgresStorage(pg_url)
    await store.open()
    await store.close()
    schema = schema_of(pg_url)
    settings = {"search_path": schema}
    rng = random.Random(7)
    writers, rounds = 6, 25
    committed: list[int] = []
    done = anyio.Event()

    async def append(w: int) -> None:
        conn = await asyncpg.connect(postgres.SERVER, server_settings=settings)
        try:
            for i in range(rounds):
                n = rng.randint(1, 4)
                batch = WriteBatch(
                    appends=[rec(w * 10_000 + i * 10 + j, f"ik-{w}-{i}-{j}") for j in range(n)]
                )
                try:
                    async with conn.transaction():
                        await write_batch(conn, batch, time.time())
                        await anyio.sleep(rng.random() * 0.003)  # slow to commit
                        if rng.random() < 0.2:
                            raise _RolledBack
                    committed.append(n)
                except _RolledBack:
                    pass
        finally:
            await conn.close()

    async def read() -> None:
        conn = await asyncpg.connect(postgres.SERVER, server_settings=settings)
        cursor = 0
        try:
            while not done.is_set() or cursor < sum(committed):
                rows = await conn.fetch(
                    "SELECT seq FROM events WHERE seq > $1 ORDER BY seq LIMIT 50", cursor
                )
                for (seq,) in rows:
                    assert seq == cursor + 1, f"skipped from {cursor} to {seq}"
                    cursor = seq
                await anyio.lowlevel.checkpoint()
        finally:
            await conn.close()
        assert cursor == sum(committed)

    idle = await asyncpg.connect(postgres.SERVER, server_settings=settings)
    try:
        async with idle.transaction():
            await idle.fetchval("SELECT pg_current_xact_id()")  # holds the xmin back
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(read)
                    async with anyio.create_task_group() as inner:
                        for w in range(writers):
                            inner.start_soon(append, w)
                    done.set()
    finally:
        await idle.close()
    assert sum(committed) > 0


class _RolledBack(Exception):
    pass
