"""End-to-end throughput of the bus against two ceilings measured in the same run.

    .venv/bin/python bench/throughput.py             # 100 000 events per scenario
    .venv/bin/python bench/throughput.py --quick     # 10 000, for a smoke run
    .venv/bin/python bench/throughput.py --only memory --events 50000

What is timed, per scenario: from the first publish until ``await bus.drain()``
returns, i.e. every event is committed to the log, handed to the one subscription,
handled and its acknowledgement committed. Opening and closing the bus are not timed.

Scenarios are every combination of

* storage: ``:memory:`` (``MemoryStorage``), a SQLite file with
  ``durability="normal"``, and one with ``durability="full"`` (fsync per commit);
* producer: ``publish_many`` in chunks from a few concurrent tasks, many concurrent
  ``await bus.publish(...)`` tasks, and ``publish_nowait`` with backoff on ``BusFull``;
* handler: a per-event handler and a batch handler (``list[Event]``), both trivial.

The ceilings, measured in the same process on the same loop:

* ``asyncio.Queue``: a bounded queue handing the same payload objects from one
  producer task to one consumer task (the in-memory ceiling);
* ``sqlite3``: plain ``executemany`` inserts of the same pre-encoded rows into the
  bus's own ``events`` table, in a fresh WAL file, in transactions the size of the
  bus's group commit (``BusConfig.max_commit_batch``), run synchronously in the main
  thread (the durable ceiling). It is measured with ``synchronous=NORMAL`` and with
  ``synchronous=FULL``; each file scenario is compared with the ceiling of its own
  durability.

Everything asynchronous runs on uvloop through ``eventbus.run``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import msgspec
from _support import add_quiet, frozen_gc, loop_name, machine, median, steps, temp_dir

import eventbus
from eventbus import Bus, BusConfig, BusFull, Context, Event, Message
from eventbus.storage._schema import MIGRATIONS

StorageKind = Literal["memory", "normal", "full"]
ProducerKind = Literal["publish_many", "publish", "publish_nowait"]
HandlerKind = Literal["event", "batch"]

STORAGES: tuple[StorageKind, ...] = ("memory", "normal", "full")
PRODUCERS: tuple[ProducerKind, ...] = ("publish_many", "publish", "publish_nowait")
HANDLERS: tuple[HandlerKind, ...] = ("event", "batch")

TOPIC = "bench"
KEYS = 64  # distinct ordering keys the events cycle through

# The targets the project must meet (ratio of end-to-end rate to the ceiling).
DURABLE_TARGET = 0.25  # file, durability="normal", vs the sqlite3 NORMAL ceiling
MEMORY_TARGET = 0.20  # ":memory:" vs the asyncio.Queue ceiling
# The scenario the targets are judged on: the common high-throughput shape.
HEADLINE_PRODUCER: ProducerKind = "publish_many"
HEADLINE_HANDLER: HandlerKind = "event"
CONCURRENT_PRODUCER: ProducerKind = "publish"


@dataclass(frozen=True)
class Workload:
    """What every scenario and ceiling moves: ``events`` payloads of about
    ``payload_bytes`` encoded bytes each."""

    events: int = 100_000
    payload_bytes: int = 100
    chunk: int = 1000  # messages per publish_many call
    many_producers: int = 4  # concurrent tasks calling publish_many
    publish_producers: int = 64  # concurrent tasks calling publish
    commit_batch: int = BusConfig().max_commit_batch  # rows per sqlite3 ceiling txn
    queue_capacity: int = BusConfig().channel_capacity  # asyncio.Queue maxsize

    def payloads(self) -> list[dict[str, object]]:
        """The payload objects (shared between runs: treat as read-only)."""
        return _payloads(self.events, self.payload_bytes)

    def keys(self) -> list[str]:
        names = [f"key-{k}" for k in range(KEYS)]
        return [names[i % KEYS] for i in range(self.events)]


@functools.lru_cache(maxsize=2)
def _payloads(events: int, payload_bytes: int) -> list[dict[str, object]]:
    filler = "x" * max(0, payload_bytes - 16)
    return [{"i": i, "data": filler} for i in range(events)]


@dataclass(frozen=True)
class Measurement:
    """One timed run."""

    name: str
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")


# -- ceilings ----------------------------------------------------------------------


async def queue_ceiling(work: Workload) -> Measurement:
    """A bare bounded ``asyncio.Queue`` hand-off: one producer task, one consumer."""
    payloads = work.payloads()
    queue: asyncio.Queue[dict[str, object] | None] = asyncio.Queue(work.queue_capacity)
    handled = 0

    async def produce() -> None:
        for p in payloads:
            await queue.put(p)
        await queue.put(None)

    async def consume() -> None:
        nonlocal handled
        while True:
            item = await queue.get()
            if item is None:
                return
            handled += 1  # the same trivial work as the bus handlers

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(consume())
        tg.create_task(produce())
    elapsed = time.perf_counter() - started
    _check(handled, work.events, "asyncio.Queue")
    return Measurement("asyncio.Queue hand-off", work.events, elapsed)


def sqlite_ceiling(work: Workload, synchronous: Literal["NORMAL", "FULL"]) -> Measurement:
    """Plain batched ``executemany`` inserts of pre-encoded event rows into a fresh
    WAL-mode file with the bus's schema, one transaction per ``commit_batch`` rows."""
    encode = msgspec.msgpack.Encoder().encode
    prefix = os.urandom(8).hex()
    now = time.time()
    rows = [
        (i + 1, f"{prefix}{i:016x}", TOPIC, key, encode(payload), None, now)
        for i, (payload, key) in enumerate(zip(work.payloads(), work.keys(), strict=True))
    ]
    with temp_dir() as directory:
        path = os.path.join(directory, "ceiling.db")
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.execute("PRAGMA temp_store = MEMORY")
            conn.execute("PRAGMA cache_size = -16000")
            conn.executescript(MIGRATIONS[0])
            sql = (
                "INSERT INTO events (seq, id, topic, key, payload, headers, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
            )
            step = work.commit_batch
            started = time.perf_counter()
            for start in range(0, len(rows), step):
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(sql, rows[start : start + step])
                conn.execute("COMMIT")
            elapsed = time.perf_counter() - started
            ((count,),) = conn.execute("SELECT count(*) FROM events").fetchall()
        finally:
            conn.close()
    _check(int(count), work.events, "sqlite3 ceiling")
    return Measurement(f"sqlite3 executemany ({synchronous})", work.events, elapsed)


# -- the bus -----------------------------------------------------------------------


def scenario_name(storage: StorageKind, producer: ProducerKind, handler: HandlerKind) -> str:
    return f"{storage}/{producer}/{handler}"


async def bus_scenario(
    work: Workload,
    storage: StorageKind,
    producer: ProducerKind,
    handler: HandlerKind,
) -> Measurement:
    """Publish ``work.events`` events to a fresh bus with one subscription and time
    until ``drain()`` returns (every event handled and acknowledged)."""
    payloads = work.payloads()
    keys = work.keys()
    with temp_dir() as directory:
        if storage == "memory":
            path, config = ":memory:", BusConfig()
        else:
            path, config = os.path.join(directory, "bus.db"), BusConfig(durability=storage)
        async with Bus.open(path, config=config) as bus:
            counter = _Counter()
            if handler == "event":
                bus.subscribe(TOPIC, name="bench")(counter.on_event)
            else:
                bus.subscribe(TOPIC, name="bench")(counter.on_batch)
            produce = _PRODUCERS[producer]
            started = time.perf_counter()
            await produce(bus, work, payloads, keys)
            await bus.drain(timeout=None)
            elapsed = time.perf_counter() - started
            _check(counter.handled, work.events, scenario_name(storage, producer, handler))
    return Measurement(scenario_name(storage, producer, handler), work.events, elapsed)


class _Counter:
    """The handlers' trivial work: count what arrives."""

    def __init__(self) -> None:
        self.handled = 0

    async def on_event(self, event: Event[object], ctx: Context) -> None:
        self.handled += 1

    async def on_batch(self, events: list[Event[object]], ctx: Context) -> None:
        self.handled += len(events)


Producer = Callable[[Bus, Workload, list[dict[str, object]], list[str]], Awaitable[None]]


async def _produce_many(
    bus: Bus, work: Workload, payloads: list[dict[str, object]], keys: list[str]
) -> None:
    """``publish_many`` in chunks of ``work.chunk`` from ``work.many_producers`` tasks,
    each awaiting its chunk's commit before sending the next."""
    chunks = [range(i, min(i + work.chunk, work.events)) for i in range(0, work.events, work.chunk)]

    async def producer(mine: list[range]) -> None:
        for chunk in mine:
            await bus.publish_many([Message(TOPIC, payloads[i], key=keys[i]) for i in chunk])

    n = max(1, work.many_producers)
    async with asyncio.TaskGroup() as tg:
        for p in range(n):
            tg.create_task(producer(chunks[p::n]))


async def _produce_publish(
    bus: Bus, work: Workload, payloads: list[dict[str, object]], keys: list[str]
) -> None:
    """``work.publish_producers`` tasks, each awaiting one ``publish`` at a time."""

    async def producer(first: int, step: int) -> None:
        publish = bus.publish
        for i in range(first, work.events, step):
            await publish(TOPIC, payloads[i], key=keys[i])

    n = max(1, work.publish_producers)
    async with asyncio.TaskGroup() as tg:
        for p in range(n):
            tg.create_task(producer(p, n))


async def _produce_nowait(
    bus: Bus, work: Workload, payloads: list[dict[str, object]], keys: list[str]
) -> None:
    """One task calling ``publish_nowait``; on ``BusFull`` it sleeps with exponential
    backoff (0.1 ms doubling to 5 ms) and tries the same event again."""
    publish = bus.publish_nowait
    for i in range(work.events):
        delay = 0.0001
        while True:
            try:
                publish(TOPIC, payloads[i], key=keys[i])
                break
            except BusFull:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.005)


_PRODUCERS: dict[ProducerKind, Producer] = {
    "publish_many": _produce_many,
    "publish": _produce_publish,
    "publish_nowait": _produce_nowait,
}


def producer_label(producer: ProducerKind, work: Workload) -> str:
    if producer == "publish_many":
        return f"publish_many {work.many_producers}x{work.chunk}"
    if producer == "publish":
        return f"publish x{work.publish_producers} tasks"
    return "publish_nowait+backoff"


# -- running and reporting ---------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One scenario: the median of its runs, each paired with a ceiling run just before."""

    storage: StorageKind
    producer: str
    handler: str
    measurement: Measurement  # the median run
    ceiling: Measurement | None  # the median of the paired ceiling runs
    ratio: float | None  # the median of the paired ratios
    runs: tuple[float, ...] = ()  # every run's events/s


@dataclass
class Report:
    work: Workload
    repeat: int
    ceilings: dict[str, list[Measurement]]  # ceiling name -> every run of it
    rows: list[Row]

    def ceiling_median(self, name: str) -> Measurement | None:
        runs = self.ceilings.get(name)
        return median(runs, key=_seconds) if runs else None

    def find(
        self, storage: StorageKind, producer: ProducerKind, handler: HandlerKind
    ) -> Row | None:
        name = scenario_name(storage, producer, handler)
        return next((r for r in self.rows if r.measurement.name == name), None)


QUEUE = "asyncio.Queue"
SQLITE_NORMAL = "sqlite3 NORMAL"
SQLITE_FULL = "sqlite3 FULL"
_CEILING_OF: dict[StorageKind, str] = {
    "memory": QUEUE,
    "normal": SQLITE_NORMAL,
    "full": SQLITE_FULL,
}


async def run_ceiling(work: Workload, name: str) -> Measurement:
    """Measure the named ceiling once (``QUEUE``, ``SQLITE_NORMAL`` or ``SQLITE_FULL``)."""
    with frozen_gc():
        if name == QUEUE:
            return await queue_ceiling(work)
        return sqlite_ceiling(work, "FULL" if name == SQLITE_FULL else "NORMAL")


async def run_scenario(
    work: Workload, storage: StorageKind, producer: ProducerKind, handler: HandlerKind
) -> Measurement:
    """Measure one bus scenario once."""
    with frozen_gc():
        return await bus_scenario(work, storage, producer, handler)


def _seconds(m: Measurement) -> float:
    return m.seconds


async def measure(
    work: Workload,
    *,
    storages: tuple[StorageKind, ...] = STORAGES,
    producers: tuple[ProducerKind, ...] = PRODUCERS,
    handlers: tuple[HandlerKind, ...] = HANDLERS,
    repeat: int = 3,
    only: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Measure every selected scenario ``repeat`` times, each run right after a run of
    its ceiling, so each ratio compares two measurements taken seconds apart (the
    machine's speed drifts when other work shares it). Rates and ratios reported are
    medians. Call it inside ``eventbus.run`` (uvloop)."""
    say = progress or (lambda _msg: None)
    repeat = max(1, repeat)
    report = Report(work, repeat, {}, [])
    for storage in storages:
        ceiling_name = _CEILING_OF[storage]
        for producer in producers:
            for handler in handlers:
                name = scenario_name(storage, producer, handler)
                if only is not None and only not in name:
                    continue
                runs: list[Measurement] = []
                ceilings: list[Measurement] = []
                ratios: list[float] = []
                for _ in range(repeat):
                    ceiling = await run_ceiling(work, ceiling_name)
                    run = await run_scenario(work, storage, producer, handler)
                    ceilings.append(ceiling)
                    runs.append(run)
                    ratios.append(run.rate / ceiling.rate)
                report.ceilings.setdefault(ceiling_name, []).extend(ceilings)
                ratio = median(ratios)
                mid = median(runs, key=_seconds)
                say(
                    f"{name}: {mid.rate:,.0f}/s ({ratio:.1%} of {ceiling_name});"
                    f" runs {', '.join(f'{m.rate:,.0f}' for m in runs)}"
                )
                report.rows.append(
                    Row(
                        storage,
                        producer_label(producer, work),
                        "batch (list[Event])" if handler == "batch" else "per-event",
                        mid,
                        median(ceilings, key=_seconds),
                        ratio,
                        tuple(m.rate for m in runs),
                    )
                )
    return report


def verdicts(report: Report) -> list[tuple[str, bool | None]]:
    """The PASS/FAIL lines: (text, passed); passed is None when not measured."""
    out: list[tuple[str, bool | None]] = []
    targets: tuple[tuple[StorageKind, float, str], ...] = (
        ("normal", DURABLE_TARGET, "sqlite3 NORMAL executemany"),
        ("memory", MEMORY_TARGET, "asyncio.Queue"),
    )
    # The headline (publish_many), then the concurrent publishers of bench/peers.py's
    # targets (each task awaiting its publish), held to the same ratios.
    for producer in (HEADLINE_PRODUCER, CONCURRENT_PRODUCER):
        for storage, target, ceiling in targets:
            row = report.find(storage, producer, HEADLINE_HANDLER)
            label = (
                f"{storage} ({producer_label(producer, report.work)}, per-event handler)"
                f" >= {target:.0%} of {ceiling}"
            )
            if row is None or row.ratio is None:
                out.append((f"SKIP {label}: not measured", None))
                continue
            ok = row.ratio >= target
            out.append((f"{'PASS' if ok else 'FAIL'} {label}: {row.ratio:.1%}", ok))
    return out


def format_report(report: Report) -> str:
    w = report.work
    lines = [
        f"eventbus throughput: {w.events:,} events, ~{w.payload_bytes} B payload, one subscription",
        machine(loop_name()),
        f"each scenario run {report.repeat}x right after its ceiling; medians of rates and of"
        " the paired ratios",
        "",
        "ceilings (same run, same machine; median of all runs):",
    ]
    labels = {
        QUEUE: f"asyncio.Queue(maxsize={w.queue_capacity}), 1 producer -> 1 consumer",
        SQLITE_NORMAL: f"sqlite3 executemany, WAL, synchronous=NORMAL, {w.commit_batch}/txn",
        SQLITE_FULL: f"sqlite3 executemany, WAL, synchronous=FULL, {w.commit_batch}/txn",
    }
    for name, label in labels.items():
        ceiling = report.ceiling_median(name)
        if ceiling is not None:
            lines.append(f"  {label:<62} {ceiling.rate:>12,.0f} ev/s")
    header = (
        f"{'storage':<8} {'producer':<24} {'handler':<20} {'events/s':>10}"
        f" {'ratio':>7}  {'ceiling':<15} {'runs (ev/s)'}"
    )
    lines += ["", header, "-" * (len(header) + 14)]
    for row in report.rows:
        ratio = "-" if row.ratio is None else f"{row.ratio:.1%}"
        runs = " ".join(f"{r / 1000:.0f}k" for r in row.runs)
        lines.append(
            f"{row.storage:<8} {row.producer:<24} {row.handler:<20}"
            f" {row.measurement.rate:>10,.0f} {ratio:>7}  {_CEILING_OF[row.storage]:<15} {runs}"
        )
    lines.append("")
    lines += [text for text, _ in verdicts(report)]
    return "\n".join(lines)


def _check(handled: int, expected: int, what: str) -> None:
    if handled != expected:
        raise RuntimeError(f"{what}: handled {handled} events, expected {expected}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=100_000, help="events per scenario")
    parser.add_argument("--payload-bytes", type=int, default=100, help="approx. payload size")
    parser.add_argument("--quick", action="store_true", help="10 000 events, for a smoke run")
    parser.add_argument(
        "--repeat", type=int, help="runs per scenario, medians reported (default 3, quick 1)"
    )
    parser.add_argument("--chunk", type=int, default=1000, help="messages per publish_many")
    parser.add_argument("--producers", type=int, default=64, help="concurrent publish tasks")
    parser.add_argument(
        "--storage", choices=STORAGES, action="append", help="only these storages (repeatable)"
    )
    parser.add_argument("--only", help="only scenarios whose storage/producer/handler has this")
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio loop")
    add_quiet(parser)
    args = parser.parse_args(argv)
    events = 10_000 if args.quick and args.events == 100_000 else args.events
    work = Workload(
        events=events,
        payload_bytes=args.payload_bytes,
        chunk=args.chunk,
        publish_producers=args.producers,
    )
    storages = tuple(args.storage) if args.storage else STORAGES
    scenarios = [
        name
        for name in (scenario_name(s, p, h) for s in storages for p in PRODUCERS for h in HANDLERS)
        if args.only is None or args.only in name
    ]

    async def run() -> Report:
        with steps("throughput", len(scenarios), quiet=args.quiet) as say:
            report = await measure(
                work,
                storages=storages,
                repeat=args.repeat or (1 if args.quick else 3),
                only=args.only,
                progress=say,
            )
        # Formatted inside the loop, so the header names the loop that ran.
        print(format_report(report))
        return report

    report = eventbus.run(run(), use_uvloop=not args.no_uvloop)
    failed = any(ok is False for _, ok in verdicts(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
