"""Shared fixtures: a fresh log path (or PostgreSQL schema) per test, anyio on
asyncio only, and the users' test kit (eventbus.testing)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import anyio
import hypothesis  # noqa: F401 - imported early: a late import during the summary hits a CPython 3.11 AST bug
import pytest

from eventbus.testing import VirtualClockLoop
from tests import postgres

pytest_plugins = ["eventbus.testing"]


@pytest.fixture
def anyio_backend(request: pytest.FixtureRequest) -> object:
    # aiosqlite is asyncio-only; the bus runs on asyncio (and uvloop). Tests of timing
    # behaviour run on a virtual clock (eventbus.testing.VirtualClockLoop) in no wall
    # time, as do the tests that use the kit's fixtures (which the kit sees to).
    if request.node.get_closest_marker("virtual_clock"):
        return ("asyncio", {"loop_factory": VirtualClockLoop})
    return "asyncio"


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "events.db"


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    """The URL of a log in a fresh schema of the test PostgreSQL server (dropped
    after the test), with its call journal in the test's directory. Skips, saying
    why, where no server can be had."""
    postgres.require_server()
    schema = postgres.new_schema()
    try:
        yield postgres.url_for(schema, tmp_path / "journal")
    finally:
        postgres.drop_schema(schema)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def log_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A durable log to give ``Bus.open``: a SQLite file, then a PostgreSQL schema."""
    if request.param == "sqlite":
        return str(tmp_path / "events.db")
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def every_log(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every kind of log ``Bus.open`` takes: ``:memory:``, a SQLite file, a
    PostgreSQL schema."""
    if request.param == "memory":
        return ":memory:"
    if request.param == "sqlite":
        return str(tmp_path / "events.db")
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.postgres)])
def log_target(request: pytest.FixtureRequest) -> str:
    """A log to give ``Bus.open`` where durability is beside the point: ``:memory:``,
    then a PostgreSQL schema (the bus on a log with real I/O latency)."""
    if request.param == "memory":
        return ":memory:"
    return str(request.getfixturevalue("pg_url"))


async def wait_until(bus: object, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait, on the bus's progress notifications (never a timed poll), until
    ``predicate()`` holds."""
    with anyio.fail_after(timeout):
        while not predicate():
            await bus._wait_for_progress()  # type: ignore[attr-defined]


def load_bench(name: str) -> ModuleType:
    """Import ``bench/<name>.py`` (bench/ is scripts, not a package) as ``bench_<name>``."""
    bench = str(Path(__file__).resolve().parent.parent / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)  # where a script run from bench/ finds _support
    import _support

    return _support.load_script(name)
