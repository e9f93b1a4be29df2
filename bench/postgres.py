"""The PostgreSQL log beside the SQLite one: 64 concurrent publishers of small events,
and what recording a handler call in flight costs.

    .venv/bin/python bench/postgres.py                    # 20 000 events, 3 rounds
    .venv/bin/python bench/postgres.py --events 50000 --url postgresql://app@db/app

What is timed, per scenario and round (the median of the rounds is reported):

* ``publish``: 64 tasks each awaiting ``bus.publish`` of a small payload (about 30
  bytes) in turn, no subscriber: from the first publish until the last returned;
* ``publish+handle``: the same with one subscription handling every event (a
  trivial per-event handler); until ``bus.drain()`` returns, so every event is also
  handled and its acknowledgement committed;

on a SQLite file (``durability="normal"``), on PostgreSQL (``"normal"``: the server's
``synchronous_commit``, ``on`` by default) and on PostgreSQL with ``"off"``. Beside
them, a ``pgbench``-style ceiling measured in the same run: the same rows inserted by
one asyncpg connection, ``BusConfig.max_commit_batch`` rows per multi-row INSERT, one
transaction each.

Calls in flight: what recording one handler call in the log before it starts costs
(``PostgresStorage.mark_call``, one row per worker slot, committed without waiting for
the disk), beside one round trip to the server (``SELECT 1``).

Each PostgreSQL scenario runs in a fresh schema, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
from _support import add_quiet, loop_name, machine, median, steps, temp_dir

import eventbus
from eventbus import Bus, BusConfig, Context, Event
from eventbus.storage import NewRecord, PostgresStorage, SubscriptionInfo, WriteBatch

DEFAULT_URL = os.environ.get("TESTS_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
PUBLISHERS = 64
TOPIC = "orders"


@dataclass(frozen=True)
class Result:
    name: str
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else float("inf")


def _with_schema(url: str, schema: str, journal_dir: str) -> str:
    joiner = "&" if "?" in url else "?"
    return f"{url}{joiner}schema={schema}&journal_dir={journal_dir}"


async def _drop(url: str, schema: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def bus_round(target: str, events: int, durability: str, handle: bool) -> float:
    """Seconds for ``events`` publishes from PUBLISHERS tasks (and, with ``handle``,
    until every event is handled and acknowledged)."""
    config = BusConfig(durability=durability)  # type: ignore[arg-type]
    async with Bus.open(target, config=config) as bus:
        if handle:

            @bus.subscribe(TOPIC, name="sink")
            async def sink(event: Event[object], ctx: Context) -> None:
                return None

        async def producer(first: int) -> None:
            for i in range(first, events, PUBLISHERS):
                await bus.publish(TOPIC, {"i": i, "sku": "A-1"}, key=f"k{i % 64}")

        started = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for p in range(PUBLISHERS):
                tg.create_task(producer(p))
        if handle:
            await bus.drain(timeout=300)
        return time.perf_counter() - started


async def ceiling_round(url: str, events: int) -> float:
    """Seconds to insert ``events`` rows, max_commit_batch per INSERT and transaction."""
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(
            f'CREATE TABLE "{schema}".events (seq bigint PRIMARY KEY, id text NOT NULL,'
            " topic text NOT NULL, key text, payload bytea NOT NULL, headers bytea,"
            " created_at double precision NOT NULL)"
        )
        batch = BusConfig().max_commit_batch
        payload = b"\x82\xa1i\x00\xa3sku\xa3A-1"
        started = time.perf_counter()
        for first in range(0, events, batch):
            n = min(batch, events - first)
            async with conn.transaction():
                await conn.execute(
                    f'INSERT INTO "{schema}".events SELECT * FROM unnest($1::bigint[],'
                    " $2::text[], $3::text[], $4::text[], $5::bytea[], $6::bytea[],"
                    " $7::float8[])",
                    list(range(first + 1, first + n + 1)),
                    [uuid.uuid4().hex for _ in range(n)],
                    [TOPIC] * n,
                    [f"k{i % 64}" for i in range(first, first + n)],
                    [payload] * n,
                    [None] * n,
                    [time.time()] * n,
                )
        return time.perf_counter() - started
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def journal_cost(url: str, calls: int) -> tuple[float, float]:
    """Nanoseconds per handler call recorded in the log of a PostgreSQL log, and per
    round trip to its server."""
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory() as journal:
        store = PostgresStorage(_with_schema(url, schema, journal))
        await store.open()
        try:
            await store.commit(
                WriteBatch(
                    appends=[
                        NewRecord(f"e{i}", TOPIC, f"k{i}", b"x", None, 0.0) for i in range(64)
                    ],
                    subscriptions=[SubscriptionInfo("sink", (TOPIC,), 0, 0.0)],
                )
            )
            lease = (await store.acquire("sink", store.partitions)).lease
            started = time.perf_counter_ns()
            for i in range(calls):
                await store.mark_call(lease, i & 7, [i % 64 + 1], [1], [f"k{i % 64}"])
            per_call = (time.perf_counter_ns() - started) / calls
        finally:
            await store.close()
            await _drop(url, schema)
    conn = await asyncpg.connect(url)
    try:
        trips = 2000
        started = time.perf_counter_ns()
        for _ in range(trips):
            await conn.fetchval("SELECT 1")
        per_trip = (time.perf_counter_ns() - started) / trips
    finally:
        await conn.close()
    return per_call, per_trip


async def sqlite_round(events: int, handle: bool) -> float:
    with temp_dir() as tmp:
        return await bus_round(os.path.join(tmp, "log.db"), events, "normal", handle)


async def postgres_round(url: str, events: int, durability: str, handle: bool) -> float:
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory() as journal:
        try:
            return await bus_round(_with_schema(url, schema, journal), events, durability, handle)
        finally:
            await _drop(url, schema)


#: Steps of :func:`measure`: 3 storages x publish / publish+handle, the ceiling, and
#: the call journal's cost.
STEPS = 8


async def measure(
    url: str, events: int, rounds: int, progress: Callable[[str], None] | None = None
) -> tuple[list[Result], float, float]:
    """Each scenario ``rounds`` times (medians), then the call journal's cost; calls
    ``progress`` after each of the :data:`STEPS` steps."""
    say = progress or (lambda _msg: None)
    scenarios: list[tuple[str, Callable[[], Awaitable[float]]]] = []
    for handle in (False, True):
        kind = "publish+handle" if handle else "publish"
        scenarios.append(
            (f"{kind}  sqlite file (normal)", functools.partial(sqlite_round, events, handle))
        )
        for durability in ("normal", "off"):
            scenarios.append(
                (
                    f"{kind}  postgresql ({durability})",
                    functools.partial(postgres_round, url, events, durability, handle),
                )
            )
    scenarios.append(
        ("ceiling  asyncpg multi-row INSERT per txn", functools.partial(ceiling_round, url, events))
    )
    results: list[Result] = []
    for name, once in scenarios:
        seconds = median([await once() for _ in range(rounds)])
        results.append(Result(name, events, seconds))
        say(f"{name}: {events / seconds:,.0f}/s")
    per_call, per_trip = await journal_cost(url, 2000)
    say("cost of a call in flight")
    return results, per_call, per_trip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--url", default=DEFAULT_URL, help="the PostgreSQL server")
    parser.add_argument("--events", type=int, default=20_000, help="events per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per scenario")
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio loop")
    add_quiet(parser)
    args = parser.parse_args(argv)

    async def run() -> None:
        with steps("postgres", STEPS, quiet=args.quiet) as say:
            results, per_call, per_trip = await measure(args.url, args.events, args.rounds, say)
        conn = await asyncpg.connect(args.url)
        try:
            server = await conn.fetchval("SHOW server_version")
            sync = await conn.fetchval("SHOW synchronous_commit")
        finally:
            await conn.close()
        print(f"{machine(loop_name())}; PostgreSQL {server} (synchronous_commit={sync})")
        print(f"{PUBLISHERS} concurrent publishers, {args.events} events, median of {args.rounds}")
        for r in results:
            print(f"  {r.name:<44} {r.rate:>10,.0f} events/s  ({r.seconds:.3f} s)")
        print(
            f"a call in flight recorded in the log: {per_call / 1000:.0f} us per call; "
            f"one round trip to the server: {per_trip / 1000:.0f} us"
        )

    eventbus.run(run(), use_uvloop=not args.no_uvloop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
