"""Scale-out on PostgreSQL: events/s of 1, 2 and 4 consumer processes sharing one log,
with a handler that awaits 1 ms of outside I/O; and, beside it, one process's publish
throughput on PostgreSQL, on SQLite and against a multi-row INSERT ceiling.

    .venv/bin/python bench/scaleout.py                     # 4000 events per run
    .venv/bin/python bench/scaleout.py --events 20000 --processes 1,2,4,8 --rounds 3

What is timed:

* ``consumers``: for each process count N, a fresh schema; N consumer processes
  (``python bench/scaleout.py --consumer``) subscribe one per-event handler that
  awaits ``--io-ms`` (default 1 ms) of simulated I/O, at concurrency 1 each, and wait
  until they hold the log's 16 partitions between them (a fair share each). Then
  this process publishes ``--events`` small events over 10,000 keys (publish_many, 500
  a commit) and times from the first publish until every event is handled and
  acknowledged in every partition (the log's own progress, read every 10 ms). The
  ratio of each N's events/s to 1 process's is printed: the ideal is N, since each
  process handles a disjoint share of the partitions. Median of ``--rounds``.
* ``publish``: 64 concurrent publishers of small events in one process, no
  subscriber, on a SQLite file, on PostgreSQL (``durability="normal"``) and a
  ``pgbench``-style ceiling (the same rows, max_commit_batch per multi-row INSERT, one
  transaction each), measured in the same run (``bench/postgres.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from types import ModuleType

import asyncpg
from _support import load_script, loop_name, machine, median

import eventbus
from eventbus import Bus, BusConfig, Context, Event, Message
from eventbus.storage import PostgresStorage

DEFAULT_URL = os.environ.get("TESTS_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
KEYS = 10_000  # many keys, as customers are: the partitions get even shares
pg: ModuleType = load_script("postgres")  # the single-process publish scenarios
SUBSCRIPTION = "work"
TOPIC = "orders"


def _with_schema(url: str, schema: str) -> str:
    joiner = "&" if "?" in url else "?"
    return f"{url}{joiner}schema={schema}&lease=5"


# -- a consumer process ------------------------------------------------------------------


async def consumer(url: str, io_ms: float) -> None:
    """Handle the work until stdin closes; say ``holding N`` whenever the partitions
    held change."""
    io = io_ms / 1000
    async with Bus.open(url, config=BusConfig(breaker=None)) as bus:

        @bus.subscribe(TOPIC, name=SUBSCRIPTION)
        async def work(event: Event[int], ctx: Context) -> None:
            await asyncio.sleep(io)  # the outside call

        sub = bus._subs[SUBSCRIPTION]
        loop = asyncio.get_running_loop()
        stdin = loop.run_in_executor(None, sys.stdin.read)
        held = -1
        while not stdin.done():
            now = len(getattr(sub, "partitions", ()))
            if now != held:
                held = now
                print(f"holding {held}", flush=True)
            await asyncio.wait([stdin], timeout=0.05)
        generations = getattr(sub, "generations", 0)
        print(f"done: {generations} generations", file=sys.stderr, flush=True)


# -- the driver ----------------------------------------------------------------------------


async def _wait_balanced(procs: list[asyncio.subprocess.Process], partitions: int) -> None:
    """Until the consumers hold every partition, each a fair share."""
    held = [0] * len(procs)
    fair = partitions // len(procs)

    async def follow(i: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while not (sum(held) == partitions and min(held) >= fair):
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError(f"a consumer exited ({proc.returncode})")
            held[i] = int(line.split()[1])
            if sum(held) == partitions and min(held) >= fair:
                return

    async with asyncio.timeout(120):
        while not (sum(held) == partitions and min(held) >= fair):
            waits = [asyncio.create_task(follow(i, p)) for i, p in enumerate(procs)]
            _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            for task in waits:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]


async def consumers_round(url: str, processes: int, events: int, io_ms: float) -> float:
    """Seconds for ``processes`` consumers to handle ``events`` published at once."""
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    target = _with_schema(url, schema)
    store = PostgresStorage(target)
    await store.open()  # creates the log
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--consumer",
            target,
            "--io-ms",
            str(io_ms),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(processes)
    ]
    try:
        await _wait_balanced(procs, store.partitions)
        async with Bus.open(target) as bus:
            started = time.perf_counter()
            for first in range(0, events, 500):
                await bus.publish_many(
                    Message(TOPIC, i, key=f"k{i % KEYS}")
                    for i in range(first, min(events, first + 500))
                )
            head = bus.metrics().head
            # The log's own progress, in every partition, whoever holds it.
            while (await store.progress(SUBSCRIPTION, frozenset({TOPIC}), head))[0] < head:  # noqa: ASYNC110 - polling the log
                await asyncio.sleep(0.01)
            return time.perf_counter() - started
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in procs:
            await proc.wait()
        await store.close()
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


async def measure(
    url: str, counts: list[int], events: int, io_ms: float, rounds: int
) -> dict[int, float]:
    rates: dict[int, float] = {}
    for n in counts:
        seconds = median([await consumers_round(url, n, events, io_ms) for _ in range(rounds)])
        rates[n] = events / seconds
        print(f"  .. {n} consumer processes: {rates[n]:,.0f} events/s", file=sys.stderr, flush=True)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--url", default=DEFAULT_URL, help="the PostgreSQL server")
    parser.add_argument("--events", type=int, default=4000, help="events per run")
    parser.add_argument("--processes", default="1,2,4", help="consumer process counts")
    parser.add_argument("--io-ms", type=float, default=1.0, help="the handler's I/O, ms")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per count (median)")
    parser.add_argument("--publish-events", type=int, default=20_000, help="publish rounds")
    parser.add_argument("--no-publish", action="store_true", help="skip the publish part")
    parser.add_argument("--consumer", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.consumer:
        eventbus.run(consumer(args.consumer, args.io_ms))
        return 0
    counts = [int(n) for n in args.processes.split(",")]

    async def run() -> None:
        rates = await measure(args.url, counts, args.events, args.io_ms, args.rounds)
        publish: list[tuple[str, float]] = []
        if not args.no_publish:
            n = args.publish_events
            runs: list[tuple[str, Callable[[], Awaitable[float]]]] = [
                ("sqlite file (normal)", lambda: pg.sqlite_round(n, False)),
                ("postgresql (normal)", lambda: pg.postgres_round(args.url, n, "normal", False)),
                ("ceiling: multi-row INSERT per txn", lambda: pg.ceiling_round(args.url, n)),
            ]
            for name, once in runs:
                seconds = median([await once() for _ in range(args.rounds)])
                publish.append((name, n / seconds))
        print(f"{machine(loop_name())}")
        print(
            f"consumer processes sharing a PostgreSQL log, {args.events} events, handler "
            f"awaiting {args.io_ms:g} ms, concurrency 1 each, median of {args.rounds}"
        )
        base = rates[counts[0]]
        for n in counts:
            print(
                f"  {n} processes  {rates[n]:>9,.0f} events/s  "
                f"{rates[n] / base:>5.2f}x of {counts[0]}  (ideal {n / counts[0]:g}x)"
            )
        if publish:
            print(f"one process, {pg.PUBLISHERS} concurrent publishers of small events:")
            ceiling = publish[-1][1]
            for name, rate in publish:
                print(f"  {name:<36} {rate:>10,.0f} events/s  {rate / ceiling:>5.2f}x ceiling")

    eventbus.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
