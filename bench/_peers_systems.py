"""What bench/peers.py runs in each child process: one system, one workload, one run.

Every driver publishes the same events (:func:`payload`) from one producer (or
``publishers`` concurrent ones), waits until its one subscriber has handled the last,
and returns an :class:`Outcome`: the wall time and the process's CPU time
(``resource.getrusage``, every thread) of the timed part, and what the subscriber
counted and summed, which the parent checks against :func:`expected`. Set-up (opening
files, registering handlers, building payloads) and tear-down are not timed.

Peers are imported with :func:`peer` so that a missing one raises :class:`Unavailable`
(reported as such, never as a number) and so that the harness type-checks the same with
or without them installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import resource
import sqlite3
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, cast

import msgspec
from _support import frozen_gc, load_script, temp_dir

import eventbus
from eventbus import Bus, BusConfig, Context, Event
from eventbus.storage._schema import MIGRATIONS

TOPIC = "peers"
# The SQLite peers that leave SQLite's default synchronous=FULL (persist-queue, huey,
# DBOS) run like for like with the bus and the other peers at synchronous=NORMAL, set on
# their connections; --peer-defaults (SYNCHRONOUS = None) leaves them at FULL, where an
# fsync per commit bounds them (~700 commits/s on this machine, against ~15,000).
SYNCHRONOUS: str | None = "NORMAL"
PAD_BYTES = 100
WAIT = 600.0  # seconds a consumer may take before the run is declared stuck


def amount(i: int) -> int:
    """The ``amount`` of event ``i``: varied, so a lost or doubled event moves the sum."""
    return (i * 7919) % 1000 + 1


def payload(i: int, *, small: bool = False) -> dict[str, object]:
    """Event ``i``: ``{"i", "amount", "pad"}`` (``pad`` 100 bytes), or without ``pad``."""
    if small:
        return {"i": i, "amount": amount(i)}
    return {"i": i, "amount": amount(i), "pad": _PAD}


_PAD = "p" * PAD_BYTES


def payloads(events: int, *, small: bool = False) -> list[dict[str, object]]:
    return [payload(i, small=small) for i in range(events)]


def expected(events: int) -> tuple[int, int]:
    """The count and the sum of ``amount`` a subscriber must reach."""
    return events, sum(amount(i) for i in range(events))


class Unavailable(Exception):
    """The system cannot run here (not installed, or not importable): the reason."""


def peer(module: str, dist: str | None = None) -> Any:
    """Import a peer library, or raise :class:`Unavailable` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Unavailable(
            f"{dist or module} is not installed ({exc}); pip install -e '.[peers]'"
        ) from exc


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class Outcome:
    """One timed run, as measured in the child."""

    seconds: float
    cpu: float  # user + system seconds of the whole process (all threads)
    count: int
    total: int
    how: str  # how the system is driven and how durable a publish is
    version: str
    latencies: list[float] = field(default_factory=list)  # seconds, publish to handler

    def to_json(self, events: int) -> dict[str, object]:
        out: dict[str, object] = {
            "events": events,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu,
            "count": self.count,
            "sum": self.total,
            "how": self.how,
            "version": self.version,
        }
        if self.latencies:
            ordered = sorted(self.latencies)
            out["latency_ms"] = {
                "p50": _quantile(ordered, 0.50) * 1000,
                "p99": _quantile(ordered, 0.99) * 1000,
                "max": ordered[-1] * 1000,
                "mean": statistics.fmean(ordered) * 1000,
            }
        return out


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Meter:
    """Wall and process CPU time between :meth:`start` and :meth:`stop`."""

    def start(self) -> None:
        self._cpu0 = _cpu()
        self._t0 = time.perf_counter()

    def stop(self) -> tuple[float, float]:
        seconds = time.perf_counter() - self._t0
        return seconds, _cpu() - self._cpu0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Tally:
    """The subscriber's work in every system: count the events and sum ``amount``;
    ``done`` (a ``threading.Event``: sync peers count in their consumer thread) is set
    at the last one."""

    def __init__(self, events: int) -> None:
        self.events = events
        self.count = 0
        self.total = 0
        self.done = threading.Event()

    def add(self, value: int) -> None:
        self.count += 1
        self.total += value
        if self.count >= self.events:
            self.done.set()


@contextlib.contextmanager
def timed() -> Iterator[Meter]:
    meter = Meter()
    with frozen_gc():
        yield meter


# -- eventbus ---------------------------------------------------------------------


class _BusCounter:
    def __init__(
        self, tally: Tally, latency: list[float] | None = None, sent: list[float] | None = None
    ) -> None:
        self.tally = tally
        self.latencies = latency
        self.sent = sent

    async def on_event(self, event: Event[object], ctx: Context) -> None:
        body = cast(dict[str, int], event.payload)
        if self.latencies is not None and self.sent is not None:
            self.latencies.append(time.perf_counter() - self.sent[body["i"]])
        self.tally.add(body["amount"])

    async def on_batch(self, events: list[Event[object]], ctx: Context) -> None:
        add = self.tally.add
        for event in events:
            add(cast(dict[str, int], event.payload)["amount"])


def _bus_how(memory: bool, publishers: int, batch: bool) -> str:
    producer = (
        "one producer awaiting each publish()"
        if publishers == 1
        else f"{publishers} tasks each awaiting publish()"
    )
    handler = "a batch handler (list[Event])" if batch else "a per-event handler"
    if memory:
        return (
            f"Bus.open(':memory:'): no durability; {producer}, {handler};"
            " timed until drain() returns"
        )
    sync = BusConfig().durability
    return (
        f"SQLite file, WAL, durability={sync!r} (the default: synchronous=NORMAL);"
        f" publish() returns after the group commit; {producer}, {handler};"
        " acknowledgements committed, timed until drain() returns"
    )


async def eventbus_throughput(
    events: int, *, memory: bool, publishers: int = 1, batch: bool = False, small: bool = False
) -> Outcome:
    """Publish ``events`` events from ``publishers`` tasks, each awaiting its publish;
    one subscription counts them; timed until ``drain()`` (every ack committed)."""
    items = payloads(events, small=small)
    tally = Tally(events)
    counter = _BusCounter(tally)
    with temp_dir() as directory:
        path = ":memory:" if memory else os.path.join(directory, "bus.db")
        async with Bus.open(path) as bus:
            if batch:
                bus.subscribe(TOPIC, name="count")(counter.on_batch)
            else:
                bus.subscribe(TOPIC, name="count")(counter.on_event)

            async def produce(first: int) -> None:
                publish = bus.publish
                for i in range(first, events, publishers):
                    await publish(TOPIC, items[i])

            with timed() as meter:
                meter.start()
                if publishers == 1:
                    await produce(0)
                else:
                    async with asyncio.TaskGroup() as tg:
                        for p in range(publishers):
                            tg.create_task(produce(p))
                await bus.drain(timeout=WAIT)
                seconds, cpu = meter.stop()
    return Outcome(
        seconds,
        cpu,
        tally.count,
        tally.total,
        _bus_how(memory, publishers, batch),
        version("eventbus"),
    )


async def eventbus_latency(events: int, *, interval: float = 0.001) -> Outcome:
    """Light load on a durable file: one publish every ``interval`` seconds (each awaited);
    a handler's latency is from just before its ``publish`` to the handler's start."""
    items = payloads(events)
    sent = [0.0] * events
    latencies: list[float] = []
    tally = Tally(events)
    counter = _BusCounter(tally, latencies, sent)
    with temp_dir() as directory:
        async with Bus.open(os.path.join(directory, "bus.db")) as bus:
            bus.subscribe(TOPIC, name="count")(counter.on_event)
            publish = bus.publish
            with timed() as meter:
                meter.start()
                started = time.perf_counter()
                for i in range(events):
                    delay = started + i * interval - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    sent[i] = time.perf_counter()
                    await publish(TOPIC, items[i])
                await bus.drain(timeout=WAIT)
                seconds, cpu = meter.stop()
    how = (
        f"SQLite file, WAL, durability={BusConfig().durability!r}; one publish() every"
        f" {interval * 1000:g} ms, awaited; latency from just before publish() to the"
        " per-event handler's start (perf_counter)"
    )
    return Outcome(seconds, cpu, tally.count, tally.total, how, version("eventbus"), latencies)


# -- ceilings ---------------------------------------------------------------------


_INSERT_EVENT = (
    "INSERT INTO events (seq, id, topic, key, payload, headers, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def _ceiling_log(directory: str) -> sqlite3.Connection:
    """A fresh file with the bus's tables, in WAL mode at ``synchronous=NORMAL`` (as
    the bus's default durability), for the bare sqlite3 ceilings."""
    conn = sqlite3.connect(os.path.join(directory, "ceiling.db"), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(MIGRATIONS[0])
    except BaseException:
        conn.close()
        raise
    return conn


def sqlite_ceiling(events: int, *, small: bool = False, per_txn: int = 1000) -> Outcome:
    """Plain ``executemany`` of pre-encoded rows into the bus's ``events`` table, in a
    fresh WAL file at ``synchronous=NORMAL``, ``per_txn`` rows per transaction, in the
    main thread; the sum is read back from the file (not timed)."""
    encode = msgspec.msgpack.Encoder().encode
    prefix = os.urandom(8).hex()
    now = time.time()
    rows = [
        (i + 1, f"{prefix}{i:016x}", TOPIC, None, encode(p), None, now)
        for i, p in enumerate(payloads(events, small=small))
    ]
    with temp_dir() as directory:
        conn = _ceiling_log(directory)
        try:
            with timed() as meter:
                meter.start()
                for start in range(0, len(rows), per_txn):
                    conn.execute("BEGIN IMMEDIATE")
                    conn.executemany(_INSERT_EVENT, rows[start : start + per_txn])
                    conn.execute("COMMIT")
                seconds, cpu = meter.stop()
            tally = Tally(events)
            decode = msgspec.msgpack.Decoder(dict[str, object]).decode
            for (blob,) in conn.execute("SELECT payload FROM events ORDER BY seq"):
                tally.add(cast(int, decode(blob)["amount"]))
        finally:
            conn.close()
    how = (
        f"sqlite3 executemany of pre-encoded rows, {per_txn:,} per transaction, WAL,"
        " synchronous=NORMAL, main thread; no consumer (the durable ceiling)"
    )
    return Outcome(seconds, cpu, tally.count, tally.total, how, sqlite3.sqlite_version)


def sqlite_inline_ceiling(events: int) -> Outcome:
    """What a durable bus with one sequential producer can reach at best: one
    transaction per event at ``synchronous=NORMAL`` in the main thread, each
    appending the event and acknowledging the previous one (its cursor rides on the
    next commit), and the event handled as soon as it is committed."""
    encode = msgspec.msgpack.Encoder().encode
    decode = msgspec.msgpack.Decoder(dict[str, object]).decode
    prefix = os.urandom(8).hex()
    items = payloads(events)
    ack = "UPDATE subscriptions SET cursor = ?, updated_at = ? WHERE name = 'count'"
    tally = Tally(events)
    with temp_dir() as directory:
        conn = _ceiling_log(directory)
        try:
            conn.execute(
                "INSERT INTO subscriptions (name, topics, cursor, updated_at)"
                " VALUES ('count', '*', 0, 0)"
            )
            with timed() as meter:
                meter.start()
                for i, item in enumerate(items):
                    payload = encode(item)
                    now = time.time()
                    conn.execute("BEGIN IMMEDIATE")
                    row = (i + 1, f"{prefix}{i:016x}", TOPIC, None, payload, None, now)
                    conn.execute(_INSERT_EVENT, row)
                    conn.execute(ack, (i, now))
                    conn.execute("COMMIT")
                    tally.add(cast(int, decode(payload)["amount"]))
                conn.execute(ack, (events, time.time()))
                seconds, cpu = meter.stop()
        finally:
            conn.close()
    how = (
        "sqlite3, one transaction per event (insert it, acknowledge the previous one),"
        " WAL, synchronous=NORMAL, main thread, handled once committed: the durable"
        " limit for a sequential producer"
    )
    return Outcome(seconds, cpu, tally.count, tally.total, how, sqlite3.sqlite_version)


async def queue_ceiling(events: int, *, small: bool = False) -> Outcome:
    """A bounded ``asyncio.Queue`` hand-off: one producer task awaiting each ``put``,
    one consumer task counting (the in-memory ceiling)."""
    items = payloads(events, small=small)
    capacity = BusConfig().channel_capacity
    queue: asyncio.Queue[dict[str, object] | None] = asyncio.Queue(capacity)
    tally = Tally(events)

    async def produce() -> None:
        for item in items:
            await queue.put(item)
        await queue.put(None)

    async def consume() -> None:
        while (item := await queue.get()) is not None:
            tally.add(cast(int, item["amount"]))

    with timed() as meter:
        meter.start()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(consume())
            tg.create_task(produce())
        seconds, cpu = meter.stop()
    how = (
        f"asyncio.Queue(maxsize={capacity}), one producer task awaiting put(), one"
        " consumer task; no durability (the in-memory ceiling)"
    )
    return Outcome(seconds, cpu, tally.count, tally.total, how, "stdlib")


# -- in-memory peers ----------------------------------------------------------------


async def pyee_run(events: int) -> Outcome:
    """pyee's ``AsyncIOEventEmitter`` with a coroutine handler: ``emit()`` schedules the
    handler as a task and returns (nothing to await); timed until the last handler ran
    and ``wait_for_complete()`` returned."""
    pyee_asyncio = peer("pyee.asyncio", "pyee")
    items = payloads(events)
    tally = Tally(events)
    emitter = pyee_asyncio.AsyncIOEventEmitter(loop=asyncio.get_running_loop())

    async def handler(item: dict[str, int]) -> None:
        tally.add(item["amount"])

    emitter.on("event", handler)
    emit = emitter.emit
    with timed() as meter:
        meter.start()
        for item in items:
            emit("event", item)
        await emitter.wait_for_complete()
        seconds, cpu = meter.stop()
    how = (
        "AsyncIOEventEmitter, coroutine handler; emit() schedules a task per event and"
        " returns; in memory, no durability"
    )
    return Outcome(seconds, cpu, tally.count, tally.total, how, version("pyee"))


ABX_BATCH = 512  # events emitted before awaiting them, as abxbus's own benchmark does


async def abxbus_run(events: int) -> Outcome:
    """abxbus's ``EventBus`` (in memory) with an async handler, driven as its own
    benchmark drives it (tests/performance_scenarios.py, "50k events"): ``emit()`` of
    ``ABX_BATCH`` pydantic events, then ``gather`` them and ``wait_until_idle()``, with a
    history of 512 that drops completed events. Emitting all events at once instead
    makes each emit scan the pending queue: 20,000 events ran at ~100/s."""
    abx = peer("abxbus")
    fields = {"__annotations__": {"i": int, "amount": int, "pad": str}}
    event_type: Any = type("PeerEvent", (abx.BaseEvent,), fields)
    items = payloads(events)
    tally = Tally(events)
    bus = abx.EventBus(
        name="peers_bench", max_history_size=ABX_BATCH, max_history_drop=True, middlewares=[]
    )

    async def handler(event: Any) -> None:
        tally.add(event.amount)

    bus.on(event_type, handler)
    emit = bus.emit
    try:
        with timed() as meter:
            meter.start()
            for start in range(0, events, ABX_BATCH):
                batch = [emit(event_type(**item)) for item in items[start : start + ABX_BATCH]]
                await asyncio.gather(*batch)
                await bus.wait_until_idle(timeout=WAIT)
            seconds, cpu = meter.stop()
    finally:
        await bus.destroy(clear=True)
    how = (
        f"EventBus(max_history_size={ABX_BATCH}, max_history_drop=True), async handler;"
        f" emit() of a pydantic event per publish, {ABX_BATCH} at a time, then gather()"
        " and wait_until_idle() (as its own benchmark); in memory, no durability"
    )
    return Outcome(seconds, cpu, tally.count, tally.total, how, version("abxbus"))


# -- durable peers: synchronous libraries, a producer thread and a consumer thread ----


def _threads(
    produce: Callable[[], None], consume: Callable[[], None], tally: Tally
) -> tuple[float, float]:
    """Run ``consume`` in a thread and ``produce`` in this one, both timed, until the
    consumer has handled the last event."""
    failure: list[BaseException] = []

    def consumer() -> None:
        try:
            consume()
        except Exception as exc:  # noqa: BLE001  (raised again in the timing thread)
            failure.append(exc)
            tally.done.set()

    thread = threading.Thread(target=consumer, name="peers-consumer", daemon=True)
    with timed() as meter:
        meter.start()
        thread.start()
        produce()
        if not tally.done.wait(WAIT):
            raise RuntimeError(f"the consumer handled {tally.count} events in {WAIT:.0f} s")
        seconds, cpu = meter.stop()
    thread.join(WAIT)
    if failure:
        raise failure[0]
    return seconds, cpu


PQ_CLEAR_EVERY = 100  # acks between persist-queue's clear_acked_data() calls


def _synchronous(conn: sqlite3.Connection) -> str:
    """Set the run's ``synchronous`` on a peer's connection; what it runs with."""
    if SYNCHRONOUS is not None:
        conn.execute(f"PRAGMA synchronous = {SYNCHRONOUS}")
    ((level,),) = conn.execute("PRAGMA synchronous").fetchall()
    ((mode,),) = conn.execute("PRAGMA journal_mode").fetchall()
    return f"journal_mode={mode} synchronous={_LEVELS.get(level, level)}"


_LEVELS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


def _set_by(default: str) -> str:
    return f"set by the bench; its default {default}" if SYNCHRONOUS else "its default"


def persist_queue_run(events: int) -> Outcome:
    """persist-queue's ``SQLiteAckQueue`` (``multithreading=True``: a connection each for
    put and get): ``put()`` commits; the consumer thread's blocking ``get()`` marks the
    item unacked (a commit), then ``ack()`` (another commit); every ``PQ_CLEAR_EVERY``
    acks it deletes the acked rows with ``clear_acked_data()``."""
    pq = peer("persistqueue", "persist-queue")
    items = payloads(events)
    tally = Tally(events)
    with temp_dir() as directory:
        queue = pq.SQLiteAckQueue(directory, multithreading=True, auto_commit=True)
        settings = {_synchronous(conn) for conn in (queue._putter, queue._getter)}
        try:

            def produce() -> None:
                put = queue.put
                for item in items:
                    put(item)

            def consume() -> None:
                get, ack = queue.get, queue.ack
                while tally.count < events:
                    raw = get(block=True, raw=True)
                    tally.add(raw["data"]["amount"])
                    ack(id=raw["pqid"])
                    if tally.count % PQ_CLEAR_EVERY == 0:
                        # get() scans past every acked row still in the table: without
                        # this its cost grows with the rows handled (20,000 events: 3x
                        # slower). The call its maintainers point users to.
                        queue.clear_acked_data(max_delete=None, keep_latest=None)

            seconds, cpu = _threads(produce, consume, tally)
        finally:
            queue.close()
    how = (
        f"SQLiteAckQueue(multithreading=True): {', '.join(sorted(settings))}"
        f" ({_set_by('FULL')}); put() returns after its commit; consumer thread get() +"
        f" ack() (a commit each), clear_acked_data() every {PQ_CLEAR_EVERY} acks; pickled"
        " payloads"
    )
    return Outcome(seconds, cpu, tally.count, tally.total, how, version("persist-queue"))


LOCK_TIMEOUT = 60.0  # seconds litequeue's connections wait for SQLite's lock


def litequeue_run(events: int) -> Outcome:
    """litequeue's ``LiteQueue`` (it sets WAL and ``synchronous=NORMAL``): ``put()`` of
    a JSON string commits (autocommit); a consumer thread with its own ``LiteQueue`` on
    the file polls ``pop()`` (a commit), sleeping 1 ms when empty, then ``done()``."""
    lq = peer("litequeue")
    items = [json.dumps(item) for item in payloads(events)]
    tally = Tally(events)
    with temp_dir() as directory:
        path = os.path.join(directory, "litequeue.db")
        # Its connections wait for SQLite's lock at most 5 s (sqlite3's default): with a
        # backlog the consumer's pop() holds it long enough, often enough, that the
        # producer's put() gave up ("database is locked"); the constructor passes its
        # keyword arguments to sqlite3.connect.
        producer_q = lq.LiteQueue(path, timeout=LOCK_TIMEOUT)
        consumer_q = lq.LiteQueue(path, timeout=LOCK_TIMEOUT)
        try:

            def produce() -> None:
                put = producer_q.put
                for item in items:
                    put(item)

            def consume() -> None:
                pop, done = consumer_q.pop, consumer_q.done
                while tally.count < events:
                    message = pop()
                    if message is None:
                        time.sleep(0.001)
                        continue
                    tally.add(json.loads(message.data)["amount"])
                    done(message.message_id)

            seconds, cpu = _threads(produce, consume, tally)
        finally:
            producer_q.close()
            consumer_q.close()
    how = (
        "LiteQueue: WAL, synchronous=NORMAL (set by it); put() of a JSON string returns"
        " after its commit; consumer thread (own connection) pop() + done(), 1 ms sleep"
        f" when empty; sqlite3.connect(timeout={LOCK_TIMEOUT:g})"
    )
    return Outcome(seconds, cpu, tally.count, tally.total, how, version("litequeue"))


def localqueue_run(events: int) -> Outcome:
    """localqueue's ``SimpleQueue`` (default ``DurabilityMode.RELAXED``: WAL,
    ``synchronous=NORMAL``): ``put()`` commits; a consumer thread calls the blocking
    ``get()`` (it polls, backing off 10-250 ms) and ``ack()`` on the same queue object,
    which its docs say threads may share. (With a queue object each, one run in three
    failed with "database is locked".)"""
    lq = peer("localqueue")
    items = payloads(events)
    tally = Tally(events)
    with temp_dir() as directory:
        queue = lq.SimpleQueue(directory)
        try:

            def produce() -> None:
                put = queue.put
                for item in items:
                    put(item)

            def consume() -> None:
                get, ack = queue.get, queue.ack
                while tally.count < events:
                    job = get()
                    tally.add(job.data["amount"])
                    ack(job)

            seconds, cpu = _threads(produce, consume, tally)
        finally:
            queue.close()
    how = (
        "SimpleQueue, DurabilityMode.RELAXED (default): WAL, synchronous=NORMAL; put()"
        " returns after its commit; consumer thread get() + ack() on the same queue object;"
        " JSON payloads"
    )
    return Outcome(seconds, cpu, tally.count, tally.total, how, version("localqueue"))


HUEY_DELAY = 0.001  # the consumer's --delay: its first poll interval when the queue is empty
HUEY_MAX_DELAY = 0.01  # its --max-delay


def huey_run(events: int) -> Outcome:
    """huey's ``SqliteHuey`` (WAL; ``fsync=None`` leaves SQLite's default
    ``synchronous=FULL``, which :data:`SYNCHRONOUS` overrides on its one shared
    connection): calling the task enqueues it with a commit; huey's own consumer,
    started in this process (one worker thread), runs the task."""
    huey_mod = peer("huey")
    items = payloads(events)
    tally = Tally(events)
    with temp_dir() as directory:
        huey = huey_mod.SqliteHuey(
            "peers-bench", filename=os.path.join(directory, "huey.db"), results=False
        )

        def handle(i: int, amount: int, pad: str) -> None:
            tally.add(amount)

        task = huey.task()(handle)
        settings = _synchronous(huey.storage.conn)  # the one connection, shared by threads
        consumer = huey.create_consumer(
            workers=1,
            worker_type="thread",
            periodic=False,
            initial_delay=HUEY_DELAY,
            max_delay=HUEY_MAX_DELAY,
            check_worker_health=False,
        )
        with timed() as meter:
            meter.start()
            consumer.start()
            for item in items:
                task(**item)
            finished = tally.done.wait(WAIT)
            seconds, cpu = meter.stop()
        consumer.stop(graceful=True)
        huey.storage.close()
        if not finished:
            raise RuntimeError(f"huey's consumer handled {tally.count} tasks in {WAIT:.0f} s")
    how = (
        f"SqliteHuey(results=False): {settings} ({_set_by('FULL, fsync=None')});"
        " calling the task enqueues it and returns after the commit; huey's consumer"
        f" in-process, 1 worker thread, --delay {HUEY_DELAY} --max-delay {HUEY_MAX_DELAY}"
    )
    return Outcome(seconds, cpu, tally.count, tally.total, how, version("huey"))


DBOS_POLL = 0.1  # the queue's polling_interval_sec (DBOS's default is 1 s)


async def dbos_run(events: int) -> Outcome:
    """DBOS Transact on SQLite: ``enqueue_async`` of a workflow per event on a DBOS
    queue (the durable record is committed before it returns); DBOS's queue runner
    starts them on this loop; timed until every workflow's result is recorded."""
    dbos = peer("dbos")
    items = payloads(events)
    tally = Tally(events)
    with temp_dir() as directory:
        path = os.path.join(directory, "dbos.sqlite")
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("PRAGMA journal_mode = WAL")  # persists in the file
        # bench/peers_workflows.py's connection factory: sets SYNCHRONOUS on each of
        # DBOS's connections and reads back what they run with.
        probe = load_script("peers_workflows")._Probe(SYNCHRONOUS)
        config = {
            "name": "eventbus-peers",
            "system_database_url": f"sqlite:///{path}",
            "db_engine_kwargs": {"connect_args": {"factory": probe.factory()}},
            "log_level": "WARNING",
        }

        async def handle(item: dict[str, int]) -> None:
            tally.add(item["amount"])

        workflow = _dbos_workflow(dbos, handle)
        dbos.DBOS(config=config)
        try:
            dbos.DBOS.launch()
            queue = await dbos.DBOS.register_queue_async(
                "peers-bench", polling_interval_sec=DBOS_POLL
            )
            with timed() as meter:
                meter.start()
                handles = [await queue.enqueue_async(workflow, item) for item in items]
                for h in handles:
                    await h.get_result()
                seconds, cpu = meter.stop()
        finally:
            dbos.DBOS.destroy()
    how = (
        "DBOS queue, a workflow per event: enqueue_async() returns after the workflow's"
        f" record is committed; polling_interval_sec={DBOS_POLL}; system database SQLite,"
        f" its connections {probe.described()} ({_set_by('FULL')}); timed until every"
        " result"
    )
    return Outcome(seconds, cpu, tally.count, tally.total, how, version("dbos"))


_DBOS_WORKFLOWS: list[Any] = []


def _dbos_workflow(dbos: Any, handle: Callable[[dict[str, int]], Awaitable[None]]) -> Any:
    """Register the counting workflow with DBOS (its registry is global: once)."""
    if not _DBOS_WORKFLOWS:

        async def count(item: dict[str, int]) -> None:
            await _DBOS_HANDLER[0](item)

        _DBOS_WORKFLOWS.append(dbos.DBOS.workflow(name="peers_count")(count))
    _DBOS_HANDLER[:] = [handle]
    return _DBOS_WORKFLOWS[0]


_DBOS_HANDLER: list[Callable[[dict[str, int]], Awaitable[None]]] = []


# -- the table of drivers -----------------------------------------------------------

Driver = Callable[[int], Outcome]


def _on_loop(make: Callable[[int], Awaitable[Outcome]]) -> Driver:
    """A driver for an asyncio system: run on uvloop through ``eventbus.run``."""

    def drive(events: int) -> Outcome:
        async def main() -> Outcome:
            return await make(events)

        return eventbus.run(main())

    return drive


DRIVERS: dict[str, Driver] = {
    "eventbus-file": _on_loop(lambda n: eventbus_throughput(n, memory=False)),
    "eventbus-memory": _on_loop(lambda n: eventbus_throughput(n, memory=True)),
    "eventbus-file-64": _on_loop(
        lambda n: eventbus_throughput(n, memory=False, publishers=64, small=True)
    ),
    "eventbus-file-64-batch": _on_loop(
        lambda n: eventbus_throughput(n, memory=False, publishers=64, batch=True, small=True)
    ),
    "eventbus-memory-64": _on_loop(
        lambda n: eventbus_throughput(n, memory=True, publishers=64, small=True)
    ),
    "eventbus-memory-64-batch": _on_loop(
        lambda n: eventbus_throughput(n, memory=True, publishers=64, batch=True, small=True)
    ),
    "eventbus-latency": _on_loop(eventbus_latency),
    "ceiling-sqlite": lambda n: sqlite_ceiling(n),
    "ceiling-sqlite-inline": sqlite_inline_ceiling,
    "ceiling-queue": _on_loop(lambda n: queue_ceiling(n)),
    "ceiling-sqlite-small": lambda n: sqlite_ceiling(n, small=True),
    "ceiling-queue-small": _on_loop(lambda n: queue_ceiling(n, small=True)),
    "persist-queue": persist_queue_run,
    "litequeue": litequeue_run,
    "localqueue": localqueue_run,
    "huey": huey_run,
    "dbos": _on_loop(dbos_run),
    "abxbus": _on_loop(abxbus_run),
    "pyee": _on_loop(pyee_run),
}
