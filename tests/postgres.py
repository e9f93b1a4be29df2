"""A PostgreSQL server for the tests: one fresh schema per test, dropped afterwards.

The server is ``$TESTS_POSTGRES_URL`` (default: the local one, which ``make
test`` starts with ``pg_ctlcluster`` when PostgreSQL is installed). Where none can
be reached, PostgreSQL tests skip, saying why; with ``TESTS_REQUIRE_POSTGRES=1``
(set by ``.ci/run`` where PostgreSQL is installed) they fail instead.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import pytest

from eventbus.storage import Storage

T = TypeVar("T")

SERVER = os.environ.get("TESTS_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def run_aside(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end on an event loop of its own, in a thread (so it can be
    called from sync code and from inside a test's running loop alike)."""
    result: list[T] = []
    error: list[BaseException] = []

    def main() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=main)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


@functools.cache
def server_problem() -> str | None:
    """Why the test server cannot be used (None when it can)."""
    try:
        import asyncpg
    except ImportError as exc:
        return f"asyncpg is not installed: {exc}"

    async def probe() -> None:
        conn = await asyncpg.connect(SERVER, timeout=5)
        await conn.close()

    try:
        run_aside(probe())
    except Exception as exc:  # noqa: BLE001 - any failure means: no server
        return f"{type(exc).__name__}: {exc}"
    return None


def require_server() -> None:
    problem = server_problem()
    if problem is None:
        return
    message = (
        f"no PostgreSQL server at {SERVER} ({problem}). `make test` starts the local one "
        "with pg_ctlcluster when PostgreSQL is installed; or point "
        "TESTS_POSTGRES_URL at a server"
    )
    if os.environ.get("TESTS_REQUIRE_POSTGRES"):
        pytest.fail(message)
    pytest.skip(message)


def new_schema() -> str:
    return f"t_{uuid.uuid4().hex[:20]}"


def url_for(schema: str, journal_dir: Path | str | None = None) -> str:
    """The log URL of ``schema`` on the test server."""
    params = {"schema": schema}
    if journal_dir is not None:
        params["journal_dir"] = str(journal_dir)
    joiner = "&" if "?" in SERVER else "?"
    return f"{SERVER}{joiner}{urlencode(params)}"


async def execute(schema: str, sql: str, *args: object) -> str:
    """Run one statement in ``schema`` on a connection of its own."""
    import asyncpg

    conn = await asyncpg.connect(SERVER, server_settings={"search_path": f'"{schema}"'})
    try:
        return await conn.execute(sql, *args)
    finally:
        await conn.close()


def drop_schema(schema: str) -> None:
    run_aside(execute(schema, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


def log_at(target: str | Path, *, read_only: bool = False) -> Storage:
    """The storage ``Bus.open(target)`` would use, not yet opened: a PostgreSQL log
    for a URL, else a SQLite file."""
    from eventbus.storage import PostgresStorage, SQLiteStorage, is_postgres_url

    if is_postgres_url(str(target)):
        return PostgresStorage(str(target), read_only=read_only)
    return SQLiteStorage(target, read_only=read_only)
