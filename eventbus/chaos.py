"""The chaos harness: kill a two-stage pipeline with SIGKILL, restart it, and prove
that nothing was lost, applied twice, reordered, or blamed on the wrong event.

    python -m eventbus.chaos [--events 100000] [--kills 50] [--seed 1] [--concurrency 1]
                             [--publish-first] [--io-ms 0] [--dir DIR] [--json] [--quiet]
                             [--backend sqlite|postgres] [--processes N]
                             [--postgres-url URL] [--lease 2]

A worker process publishes ``--events`` orders (idempotency keys make re-publishing
after a crash harmless) through a two-stage pipeline on one SQLite log:

1. ``enrich`` (per-event handler) awaits a simulated outside call (``--io-ms``; at
   least a yield to the event loop), keeps per-customer totals in ``ctx.state`` and
   publishes a payment through the outbox (same transaction as its acknowledgement).
   Every ``--poison-every``-th order is poison (fails every attempt: it must end in the
   dead letters); every ``--flaky-every``-th fails its first attempt only (a retry on
   the same key as healthy traffic, which must keep its place in the key's order).
2. ``settle`` (batch handler) applies each payment to an outside sink, a separate
   SQLite file standing in for a payments API that deduplicates by idempotency key,
   through ``eventbus.idempotent``; it keeps the last order seen per customer in its
   state to check order per key.

Both subscriptions run ``--concurrency`` handler calls at once. With
``--publish-first`` one unkilled run publishes everything and every killed run only
consumes, starting on a deep backlog; otherwise each run resumes publishing too.

The harness kills the worker ``--kills`` times at random moments (seeded: ``--seed``
replays a run; most a random delay after the run's first handler call, one in four
after its start, so that opening and recovery are killed too), restarts it each time,
lets the last run finish, then checks the books:

- from the log and the sink: every order handled once or dead-lettered, every
  payment applied once, no duplicate outbox event, and each customer's state equal to
  a recomputation from the log;
- order per key: each handler records a ``violation:`` key in its committed state
  when it sees an order not above the last one of its customer, or a call starting on
  a customer another call of its subscription is running; the outbox (payments in log
  order) and the sink (effects in the order applied) must follow each customer's
  order too;
- blame: each handler call writes ``start``/``end`` lines to a file per run
  (line-buffered: they survive the kill), and after each kill the harness reads the
  log's call journal (what the next open charges with ``eventbus.ProcessDied``). Every
  running call must be in the journal, the journal may hold at most one call more
  (the one between its start or end and its handler's first or last line at the
  instant of the kill), every journaled event must be charged, and no other event may
  be: an event that never fails by itself and is seen at attempt 2 or later was
  blamed for a death.

It exits non-zero if any check fails. ``--unordered`` subscribes with
``ordered=False``, which the order checks must catch: a check of the checks.

On a terminal a progress line on stderr counts the orders settled at the sink, with
the run, the kills so far and an ETA (``--quiet``, a pipe or ``CI`` turn it off;
see :mod:`eventbus.progress`).

``--backend postgres`` runs the pipeline on a PostgreSQL log (a new schema of
``--postgres-url``, dropped afterwards) shared by ``--processes`` consumer processes
beside one publisher process: the harness kills one consumer at a time (chosen at
random) with SIGKILL and starts it again, while the others go on and take its
partitions over. The same books are checked, from the PostgreSQL log. Blame is read
from the handlers' own records (there is no journal file: calls in flight are rows
of the log, which the process taking over charges and deletes at once): every call
running at a kill must be charged, and so may the calls that ended in the tenth of
a second before it (a row is deleted a few milliseconds after its call ends), but no
other.

``--backend sqlite --processes N`` runs the same on one SQLite file opened with
``BusConfig(shared=True)`` by one publisher and ``N`` consumer processes: one of the
consumers dispatches at a time, and a kill of that one makes another take over once
the kernel has released its lock. Blame is read as on PostgreSQL (the call journal is
the dispatcher's, and the process taking over charges it at once).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import anyio
import anyio.lowlevel
import msgspec

import eventbus.storage as _storage

# The harness checks the call journal itself against what the handlers say ran, so
# it reads the file the way the log's next open does.
from eventbus.storage._calls import read_journal

from . import _chaos_pg
from ._bus import Bus
from ._config import BatchPolicy, BusConfig, RetryPolicy
from ._effects import idempotent
from ._event import Event, Message
from .dispatch import Context
from .progress import Progress
from .reconcile import check_log

CUSTOMERS = 97
CHUNK = 500
RETRY = RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.05, budget_ratio=1.0)
PROCESS_DIED = _storage.PROCESS_DIED
RUN_TIMEOUT = 60.0  # seconds a run may take to start handling, or to die when killed


class Settings(msgspec.Struct, frozen=True):
    """One chaos run's parameters (the command line's options)."""

    events: int = 100_000
    kills: int = 50
    seed: int = 1
    concurrency: int = 1
    publish_first: bool = False
    io_ms: float = 0.0
    poison_every: int = 1000
    flaky_every: int = 500
    min_wait: float = 0.3
    max_wait: float = 2.0
    ordered: bool = True
    backend: str = "sqlite"
    processes: int = 3
    shared: bool = False  # a SQLite log shared by ``processes`` consumer processes
    url: str = ""  # the PostgreSQL log (set by the harness)
    lease: float = 2.0


class Poison(Exception):
    """An order that can never be processed."""


class Flaky(Exception):
    """An order whose first attempt fails."""


def amount_of(n: int) -> int:
    return n % 13 + 1


def customer_of(n: int) -> str:
    return f"c{n % CUSTOMERS}"


def is_poison(n: int, every: int) -> bool:
    return every > 0 and n % every == every - 1


def is_flaky(n: int, settings: Settings) -> bool:
    every = settings.flaky_every
    return every > 0 and n % every == every // 2 and not is_poison(n, settings.poison_every)


# -- the worker ---------------------------------------------------------------------


class Sink:
    """The outside system: a separate SQLite file that applies an effect once per
    idempotency key (as a payments API does) and counts every call it receives."""

    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(
            path, timeout=30, isolation_level=None, check_same_thread=False
        )
        # WAL stays set in the file, and the harness sets it before any worker starts:
        # processes starting at once would each try to switch, and a switch that
        # finds the file in use fails at once ("database is locked"), without waiting.
        if self._conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS calls (ikey TEXT NOT NULL)")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS effects"
            " (ikey TEXT PRIMARY KEY, order_n INTEGER NOT NULL, customer TEXT NOT NULL)"
        )
        self._lock = threading.Lock()

    def apply(self, ikey: str, order: int, customer: str) -> bool:
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO calls (ikey) VALUES (?)", (ikey,))
            applied = conn.execute(
                "INSERT OR IGNORE INTO effects (ikey, order_n, customer) VALUES (?, ?, ?)",
                (ikey, order, customer),
            ).rowcount
            conn.execute("COMMIT")
            return bool(applied)

    def close(self) -> None:
        self._conn.close()


class CallLog:
    """The handlers' own record of their calls (``start SUB SEQS ATTEMPTS TIME``,
    ``end SUB SEQS TIME``, in monotonic seconds), and of the customers each
    subscription's calls hold right now: a call that starts on a customer another
    call holds is an order violation."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._holding: dict[str, Counter[str]] = {"enrich": Counter(), "settle": Counter()}
        self._quiet = False

    def start(self, sub: str, events: list[Event[dict[str, int]]], ctx: Context) -> None:
        if not self._quiet:  # the harness times its kill from the first call
            self._quiet = True
            sys.stdout.write("handling\n")
            sys.stdout.flush()
        seqs = ",".join(str(e.seq) for e in events)
        attempts = ",".join(str(e.attempt) for e in events)
        self._out.write(f"start {sub} {seqs} {attempts} {time.monotonic():.6f}\n")
        holding = self._holding[sub]
        for customer in {e.key or "" for e in events}:
            if holding[customer]:
                ctx.state.set(f"violation:overlap:{events[0].payload['n']}", customer)
            holding[customer] += 1

    def end(self, sub: str, events: list[Event[dict[str, int]]]) -> None:
        seqs = ",".join(str(e.seq) for e in events)
        self._out.write(f"end {sub} {seqs} {time.monotonic():.6f}\n")
        holding = self._holding[sub]
        for customer in {e.key or "" for e in events}:
            holding[customer] -= 1


async def worker(directory: Path, settings: Settings, life: int, role: str) -> None:
    """One life of the pipeline: resume publishing (unless ``role`` is ``"consume"``),
    handle (unless it is ``"publish"``), exit once all is done."""
    log = settings.url or str(directory / "log.db")
    sink = await anyio.to_thread.run_sync(Sink, str(directory / "sink.db"))
    with open(directory / f"calls-{life}.txt", "a", buffering=1, encoding="utf-8") as out:  # noqa: ASYNC230 - line-buffered appends of a few bytes
        config = BusConfig(batch=BatchPolicy(max_size=256), shared=settings.shared)
        async with Bus.open(log, config=config) as bus:
            if role != "publish":
                _subscribe(bus, sink, CallLog(out), settings)
            if role in ("both", "publish"):
                await _publish(bus, directory / "published", settings)
            if role == "member":
                # One of several consumers: done once everything is published and
                # finished, by whichever of them.
                await _published_all(directory / "published", settings.events)
            await bus.drain(timeout=None)
    sink.close()


def _subscribe(bus: Bus, sink: Sink, calls: CallLog, settings: Settings) -> None:
    io = settings.io_ms / 1000

    @idempotent(bus)
    async def deliver(n: int, customer: str, *, idempotency_key: str) -> bool:
        return await anyio.to_thread.run_sync(sink.apply, idempotency_key, n, customer)

    @bus.subscribe(
        "orders",
        name="enrich",
        retry=RETRY,
        concurrency=settings.concurrency,
        ordered=settings.ordered,
    )
    async def enrich(event: Event[dict[str, int | bool]], ctx: Context) -> None:
        calls.start("enrich", [event], ctx)
        try:
            n = event.payload["n"]
            if event.payload.get("poison"):
                raise Poison(f"order {n} is poison")
            if event.payload.get("flaky") and event.attempt == 1:
                raise Flaky(f"order {n} fails its first attempt")
            # An outside call: the kill can land while it is awaited.
            await (anyio.sleep(io) if io > 0 else anyio.lowlevel.checkpoint())
            customer = event.key or ""
            totals = await ctx.state.get(customer, {"count": 0, "sum": 0, "last": -1})
            assert isinstance(totals, dict)
            if n <= totals["last"]:
                ctx.state.set(f"violation:{n}", totals["last"])
            ctx.state.set(
                customer,
                {"count": totals["count"] + 1, "sum": totals["sum"] + amount_of(n), "last": n},
            )
            await ctx.publish("payments", {"n": n, "amount": amount_of(n)}, key=customer)
        finally:
            calls.end("enrich", [event])

    @bus.subscribe(
        "payments",
        name="settle",
        retry=RETRY,
        concurrency=settings.concurrency,
        ordered=settings.ordered,
    )
    async def settle(batch: list[Event[dict[str, int]]], ctx: Context) -> None:
        calls.start("settle", batch, ctx)
        by_customer: dict[str, list[Event[dict[str, int]]]] = {}
        for event in batch:
            by_customer.setdefault(event.key or "", []).append(event)

        async def one_customer(customer: str, events: list[Event[dict[str, int]]]) -> None:
            for event in events:  # in order within a customer
                n = event.payload["n"]
                last = await ctx.state.get(customer, -1)
                assert isinstance(last, int)
                if n <= last:
                    ctx.state.set(f"violation:{n}", last)
                await deliver(n, customer, idempotency_key=ctx.idempotency_key_for(event))
                ctx.state.set(customer, n)

        try:
            async with anyio.create_task_group() as tg:  # customers in parallel
                for customer, events in by_customer.items():
                    tg.start_soon(one_customer, customer, events)
        finally:
            calls.end("settle", batch)


async def _publish(bus: Bus, progress: Path, settings: Settings) -> None:
    text = progress.read_text() if progress.exists() else ""  # noqa: ASYNC240 - a few bytes, once
    start = int(text) if text.strip() else 0
    for first in range(start, settings.events, CHUNK):
        last = min(first + CHUNK, settings.events)
        await bus.publish_many(
            Message(
                "orders",
                {
                    "n": n,
                    "poison": is_poison(n, settings.poison_every),
                    "flaky": is_flaky(n, settings),
                },
                key=customer_of(n),
                idempotency_key=f"order-{n}",
            )
            for n in range(first, last)
        )
        # After the commit: a kill before this write republishes the chunk,
        # which the idempotency keys turn into no-ops.
        await anyio.to_thread.run_sync(_write_atomically, progress, str(last))


async def _published_all(progress: Path, events: int) -> None:
    while True:
        text = progress.read_text() if progress.exists() else ""  # noqa: ASYNC240 - a few bytes
        if text.strip() and int(text) >= events:
            return
        await anyio.sleep(0.1)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- the harness --------------------------------------------------------------------


class Kill(msgspec.Struct):
    """What one kill interrupted."""

    life: int
    journal: dict[str, list[int]]  # the call journal's calls in flight, per subscription
    running: dict[str, list[int]]  # the handlers' own record of their calls in flight
    window: dict[str, list[int]]  # the call whose end was the handlers' last line
    # Calls that ended but may still be charged (a shared log: each slot's last).
    ended: dict[str, list[int]] = msgspec.field(default_factory=dict)
    at: float = 0.0  # when (the machine's monotonic clock, as the handlers' records)


class Report(msgspec.Struct):
    events: int
    concurrency: int
    publish_first: bool
    kills: int
    restarts: int
    seconds: float
    published: int
    handled: int
    redeliveries: int
    lost: int
    duplicate_state: int
    duplicate_sink_effects: int
    duplicate_outbox: int
    state_mismatches: int
    order_violations: int
    dead_letters: int
    poison_dead_letters: int
    killed_thrice: int
    unexpected_dead_letters: int
    unaccounted: int
    kills_inside_calls: int
    in_flight_at_kills: int
    deaths_charged: int
    blamed: int
    blamed_outside_calls: int
    unblamed_in_flight: int
    running_not_journaled: int
    kills_in_an_instant: int
    journaled_beyond_one_call: int
    backend: str = "sqlite"
    processes: int = 1

    @property
    def ok(self) -> bool:
        return (
            self.published == self.events
            and self.lost == 0
            and self.unaccounted == 0
            and self.duplicate_state == 0
            and self.duplicate_sink_effects == 0
            and self.duplicate_outbox == 0
            and self.state_mismatches == 0
            and self.order_violations == 0
            and self.unexpected_dead_letters == 0
            and self.blamed_outside_calls == 0
            and self.unblamed_in_flight == 0
            and self.running_not_journaled == 0
            and self.journaled_beyond_one_call == 0
        )


def _spawn(directory: Path, settings: Settings, life: int, role: str) -> subprocess.Popen[bytes]:
    # The worker's log goes to a file: a pipe nobody reads while waiting would fill
    # up and block the worker. Its stdout carries one line, when it starts handling.
    with open(directory / f"worker-{life}.log", "wb") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "eventbus.chaos",
                "--worker",
                str(directory),
                "--life",
                str(life),
                "--role",
                role,
                "--settings",
                msgspec.json.encode(settings).decode(),
            ],
            stdout=subprocess.PIPE,
            stderr=log,
        )


def _log_tail(directory: Path, life: int) -> str:
    data = (directory / f"worker-{life}.log").read_bytes()
    return data[-3000:].decode(errors="replace")


def _wait_for_line(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait (on the pipe, up to ``timeout``) for the worker's line on stdout, or for
    the worker to end."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if ready:
        proc.stdout.readline()


def _wait_for_any(procs: dict[int, subprocess.Popen[bytes]], timeout: float) -> set[int]:
    """Wait (up to ``timeout``) until one of ``procs`` (by life) prints its line or
    ends; the lives that did."""
    pipes = {proc.stdout: life for life, proc in procs.items() if proc.stdout is not None}
    ready, _, _ = select.select(list(pipes), [], [], timeout)
    for pipe in ready:
        assert pipe is not None
        pipe.readline()
    return {pipes[pipe] for pipe in ready}


def _close(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdout is not None:
        proc.stdout.close()


def _wait(proc: subprocess.Popen[bytes], timeout: float, tick: Callable[[], None] | None) -> None:
    """``proc.wait(timeout)``, calling ``tick`` about once a second meanwhile (the
    slices share one deadline, so a kill timed by ``timeout`` is not delayed)."""
    if tick is None:
        proc.wait(timeout=timeout)
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            proc.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            return
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                raise
            tick()


def _finish(
    proc: subprocess.Popen[bytes],
    directory: Path,
    life: int,
    tick: Callable[[], None] | None = None,
) -> None:
    _wait(proc, 3600, tick)
    _close(proc)
    if proc.returncode != 0:
        raise _worker_failed(directory, life, proc.returncode)


def _worker_failed(directory: Path, life: int, status: int) -> RuntimeError:
    tail = _log_tail(directory, life)
    return RuntimeError(f"worker run {life} failed (exit {status}):\n{tail}")


def expected_settled(settings: Settings) -> int:
    """Orders that reach the sink when nothing is killed three times: all but the
    poison."""
    return sum(1 for n in range(settings.events) if not is_poison(n, settings.poison_every))


def settled(directory: Path) -> int | None:
    """Orders applied at the sink so far; None before the sink exists. A read beside
    the worker's writes (WAL: it blocks none of them)."""
    path = directory / "sink.db"
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(path, timeout=1)
        try:
            ((n,),) = conn.execute("SELECT count(*) FROM effects").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:  # not created yet, or busy: the next tick reads it
        return None
    return int(n)


def run_harness(directory: Path, settings: Settings, progress: Progress | None = None) -> Report:
    """Run the worker to completion through ``settings.kills`` kills; the books.

    Args:
        directory: Where the log, the sink and each run's files go.
        settings: The run's parameters.
        progress: Where to show the orders settled so far while it runs; read from
            the sink about once a second, only while ``progress.enabled``.
    """
    Sink(str(directory / "sink.db")).close()  # in WAL mode before any worker opens it
    if settings.backend == "postgres" or settings.shared:
        return run_processes(directory, settings)
    rng = random.Random(settings.seed)
    started = time.monotonic()
    kills: list[Kill] = []
    life = 0
    tick: Callable[[], None] | None = None
    if progress is not None and progress.enabled:
        shown = progress

        def tick() -> None:
            n = settled(directory)
            note = f"run {life}, {len(kills)}/{settings.kills} kills"
            if n is None:
                shown.update(shown.done, note=note)
            else:
                shown.update(n, note=note)

    if settings.publish_first:
        _finish(_spawn(directory, settings, life, "publish"), directory, life, tick)
    role = "consume" if settings.publish_first else "both"
    seen_generation: int | None = None
    finished = False
    while len(kills) < settings.kills:
        life += 1
        proc = _spawn(directory, settings, life, role)
        delay = rng.uniform(settings.min_wait, settings.max_wait)
        # Most kills are timed from the run's first handler call (a loaded machine
        # can take longer than the delay to start); one in four from its start, so
        # that opening and recovery get killed too.
        if rng.random() >= 0.25:
            _wait_for_line(proc, RUN_TIMEOUT)
        try:
            _wait(proc, delay, tick)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=RUN_TIMEOUT)
            _close(proc)
            kill, seen_generation = _after_kill(directory, life, seen_generation)
            kills.append(kill)
            if tick is not None:
                tick()
            continue
        _finish(proc, directory, life, tick)
        finished = True  # finished before its kill: nothing left to interrupt
        break
    if not finished:
        life += 1
        _finish(_spawn(directory, settings, life, role), directory, life, tick)
    if tick is not None:
        tick()  # the last count
    starts = life + 1 if settings.publish_first else life
    # What each kill interrupted, for a post-mortem beside the runs' own files.
    (directory / "kills.json").write_bytes(msgspec.json.encode(kills))
    return account(directory, settings, kills, life, starts, time.monotonic() - started)


def run_processes(directory: Path, settings: Settings) -> Report:
    """One publisher and ``settings.processes`` consumers on a shared log (PostgreSQL
    at ``settings.url``, or a SQLite file opened with ``shared=True``): kill a
    consumer chosen at random, ``settings.kills`` times, starting it again each time;
    then let everything finish and check the books."""
    rng = random.Random(settings.seed)
    started = time.monotonic()
    publisher = _spawn(directory, settings, 0, "publish")
    members = [
        (life, _spawn(directory, settings, life, "member"))
        for life in range(1, 1 + max(1, settings.processes))
    ]
    life = len(members)
    kills: list[Kill] = []
    handling: set[int] = set()  # lives seen handling
    try:
        while len(kills) < settings.kills:
            slot = rng.randrange(len(members))
            victim, proc = members[slot]
            # Most kills a random delay after the victim's first handler call (it may
            # wait for partitions to be given up to it); one in four from whenever.
            # On a shared SQLite log one process dispatches at a time: the wait is for
            # whichever does, and the victim may be one waiting its turn.
            if rng.random() >= 0.25:
                if settings.shared:
                    live = dict(members)
                    if not handling & live.keys():
                        handling |= _wait_for_any(live, RUN_TIMEOUT)
                elif victim not in handling:
                    _wait_for_line(proc, RUN_TIMEOUT)
                    handling.add(victim)
            time.sleep(rng.uniform(settings.min_wait, settings.max_wait))
            _check_running(directory, [(0, publisher), *members])
            if proc.poll() is not None:
                break  # finished: everything was handled before the last kill
            killed_at = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=RUN_TIMEOUT)
            _close(proc)
            running, window, _ = _read_calls(directory / f"calls-{victim}.txt")
            ended = _ended_since(directory / f"calls-{victim}.txt", killed_at - _ROW_LINGERS)
            kills.append(Kill(victim, running, running, window, ended, killed_at))
            life += 1
            members[slot] = (life, _spawn(directory, settings, life, "member"))
        _finish(publisher, directory, 0, None)
        for member, proc in members:
            _finish(proc, directory, member, None)
    finally:
        for proc in [publisher, *(p for _, p in members)]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            _close(proc)
    (directory / "kills.json").write_bytes(msgspec.json.encode(kills))
    return account(directory, settings, kills, life, life + 1, time.monotonic() - started)


def _check_running(directory: Path, procs: list[tuple[int, subprocess.Popen[bytes]]]) -> None:
    """Raise if a worker the harness did not kill has failed (instead of waiting for
    the others, which would wait for it)."""
    for life, proc in procs:
        status = proc.poll()
        if status is not None and status != 0:
            raise _worker_failed(directory, life, status)


# A call's row in a shared log is deleted a few milliseconds after it ends (unless
# its slot's next call replaces it first): a kill this soon after may charge it.
_ROW_LINGERS = 0.1


def _ended_since(path: Path, since: float) -> dict[str, list[int]]:
    """Per subscription, the events of the calls that ended at ``since`` or later
    (monotonic time, as the handlers write it: the clock is the machine's)."""
    ended: dict[str, list[int]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").split("\n")[:-1]:
            what, sub, seqs, *rest = line.split()
            if what == "end" and rest and float(rest[-1]) >= since:
                ended.setdefault(sub, []).extend(int(q) for q in seqs.split(","))
    return ended


def _after_kill(directory: Path, life: int, seen: int | None) -> tuple[Kill, int | None]:
    """What the kill of run ``life`` interrupted: the journal the next open will
    charge (unless that one was charged already) and the handlers' own record."""
    journal = read_journal(str(directory / "log.db") + "-calls")
    inflight: dict[str, list[int]] = {}
    generation = seen
    if journal is not None and journal[0] != seen:
        generation, inflight = journal
    running, window, _ = _read_calls(directory / f"calls-{life}.txt")
    return Kill(life, inflight, running, window), generation


def _read_calls(path: Path) -> tuple[dict[str, list[int]], dict[str, list[int]], Counter[str]]:
    """The calls a run's handlers had started and not ended when it stopped, the call
    whose end is the file's last line, and the highest attempt each event was
    started at (``"sub seq"`` keys)."""
    running: Counter[tuple[str, str]] = Counter()
    window: dict[str, list[int]] = {}
    attempts: Counter[str] = Counter()
    if not path.exists():
        return {}, {}, attempts
    # A line torn by the kill (no newline) is dropped.
    for line in path.read_text(encoding="utf-8").split("\n")[:-1]:
        what, sub, seqs, *rest = line.split()
        if what == "start":
            running[sub, seqs] += 1
            window = {}
            for seq, attempt in zip(seqs.split(","), rest[0].split(","), strict=True):
                key = f"{sub} {seq}"
                attempts[key] = max(attempts[key], int(attempt))
        else:
            running[sub, seqs] -= 1
            window = {sub: [int(s) for s in seqs.split(",")]}
    inflight: dict[str, list[int]] = {}
    for (sub, seqs), n in running.items():
        if n > 0:
            inflight.setdefault(sub, []).extend(int(s) for s in seqs.split(","))
    return inflight, window, attempts


class _Log(msgspec.Struct):
    """What the harness reads back from the log file and the sink."""

    orders: dict[int, int]  # n -> seq
    payments: list[tuple[int, int]]  # (seq, n), in log order
    enrich: dict[str, object]  # the committed state, by key
    settle: dict[str, object]
    dead: dict[tuple[str, int], str]  # (subscription, seq) -> error type
    effects: list[int]  # order n, in the order applied
    sink_calls: int


def _read_log(directory: Path, settings: Settings) -> _Log:
    decode = msgspec.msgpack.Decoder().decode
    if settings.url:
        events, state, dead_rows = anyio.run(_chaos_pg.read_books, settings.url)
    else:
        log = sqlite3.connect(f"file:{directory / 'log.db'}?mode=ro", uri=True)
        try:
            events = log.execute(
                "SELECT seq, topic, payload FROM events"
                " WHERE topic IN ('orders', 'payments') ORDER BY seq"
            ).fetchall()
            state = log.execute("SELECT subscription, key, value FROM state").fetchall()
            dead_rows = log.execute(
                "SELECT subscription, seq, error_type FROM dead_letters"
            ).fetchall()
        finally:
            log.close()
    sink = sqlite3.connect(f"file:{directory / 'sink.db'}?mode=ro", uri=True)
    try:
        effects = [row[0] for row in sink.execute("SELECT order_n FROM effects ORDER BY rowid")]
        calls = sink.execute("SELECT count(*) FROM calls").fetchone()[0]
    finally:
        sink.close()
    orders: dict[int, int] = {}
    payments: list[tuple[int, int]] = []
    for seq, topic, payload in events:
        n = decode(payload)["n"]
        if topic == "orders":
            orders[n] = seq
        elif topic == "payments":
            payments.append((seq, n))
    states: dict[str, dict[str, object]] = {"enrich": {}, "settle": {}}
    for sub, key, value in state:
        states.setdefault(sub, {})[key] = decode(value)
    dead = {(sub, seq): error_type for sub, seq, error_type in dead_rows}
    return _Log(orders, payments, states["enrich"], states["settle"], dead, effects, calls)


class _Blame(msgspec.Struct):
    """Deaths and the events they were charged to, against the calls that ran."""

    deaths: Counter[str]  # "sub seq" -> kills that found it in the call journal
    blamed: set[str]  # events seen again at a later attempt, or dead as ProcessDied
    # "sub seq" -> kills that may have charged it without its call running (ended).
    possible: Counter[str] = msgspec.field(default_factory=Counter)
    inside: int = 0  # kills that found a handler call running
    running_not_journaled: int = 0
    in_an_instant: int = 0  # kills between a journal entry and its handler's line
    beyond_one_call: int = 0


def _blame(kills: list[Kill], attempts: dict[str, int], book: _Log, own: set[str]) -> _Blame:
    """Compare each kill's call journal with the handlers' record of the calls running,
    and the deaths charged with the attempts seen after them. ``own``: events that
    fail by themselves (their attempts say nothing about deaths)."""
    died = {f"{sub} {seq}" for (sub, seq), error in book.dead.items() if error == PROCESS_DIED}
    blamed = {k for k, attempt in attempts.items() if attempt > 1 and k not in own} | died
    out = _Blame(Counter(), blamed)
    for kill in kills:
        journal = {f"{sub} {seq}" for sub, seqs in kill.journal.items() for seq in seqs}
        running = {f"{sub} {seq}" for sub, seqs in kill.running.items() for seq in seqs}
        window = {f"{sub} {seq}" for sub, seqs in kill.window.items() for seq in seqs}
        out.deaths.update(journal)
        out.possible.update({f"{sub} {seq}" for sub, seqs in kill.ended.items() for seq in seqs})
        out.inside += bool(running)
        out.running_not_journaled += len(running - journal)
        # At the instant of the kill at most one call can be between its journal entry
        # and its handler's first line, or between its handler's last line and the end
        # of its entry: the one the event loop was running. One event of enrich, or one
        # batch of settle (whose events the handlers' record names only at its end).
        extra = journal - running
        if extra:
            out.in_an_instant += 1
            one_call = extra <= window or len(extra) == 1
            if not one_call and {k.split()[0] for k in extra} != {"settle"}:
                out.beyond_one_call += 1
    return out


def _charged_in_an_instant(
    blame: _Blame, directory: Path, last_life: int, kills: list[Kill]
) -> None:
    """On a shared log, the handlers' records stand for the journal: a call whose row
    was written but whose handler had not yet written its first line when the kill
    landed is charged too, seen first at a later attempt; so is the call whose end is
    the victim's last line (killed after its handler's last line, before the bus
    ended its row). Count those as calls in an instant.

    Each kill may leave one instant per subscription: the calls it caught before their
    first line (charged together, their events run again one at a time: each is put
    with the last kill before it first started), or its last ended call. More than
    two a kill (the pipeline's subscriptions) is journaled beyond one call, counted
    over the run: an event caught at one kill may first run again after the next."""
    # "sub seq" -> (the lowest attempt it started at, when it first did so).
    first: dict[str, tuple[int, float]] = {}
    for life in range(last_life + 1):
        path = directory / f"calls-{life}.txt"
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").split("\n")[:-1]:
            what, sub, seqs, *rest = line.split()
            if what == "start":
                for seq, attempt in zip(seqs.split(","), rest[0].split(","), strict=True):
                    key = f"{sub} {seq}"
                    if key not in first or int(attempt) < first[key][0]:
                        first[key] = (int(attempt), float(rest[1]))
    order = sorted(range(len(kills)), key=lambda n: kills[n].at)
    times = [kills[n].at for n in order]
    unstarted: set[tuple[int, str]] = set()  # (kill, subscription) that caught some
    for key in blame.blamed - set(blame.deaths) - set(blame.possible):
        lowest, started = first.get(key, (2, float("inf")))
        if lowest > 1:
            blame.possible[key] += lowest - 1
            before = bisect_right(times, started)  # the kills at or before its start
            unstarted.add((order[before - 1] if before else -1, key.split()[0]))
    instants = len(unstarted)
    for kill in kills:
        for sub, ended in kill.window.items():
            # A call that ended while its row lingered is possible already (``ended``).
            lingered = {f"{sub} {number}" for number in kill.ended.get(sub, [])}
            keys = {f"{sub} {number}" for number in ended} - lingered
            found = {k for k in keys if k in blame.blamed} - blame.deaths.keys()
            if found:
                blame.possible.update(found)
                instants += 1
    blame.in_an_instant += instants
    blame.beyond_one_call += max(0, instants - 2 * len(kills))


def account(
    directory: Path,
    settings: Settings,
    kills: list[Kill],
    last_life: int,
    starts: int,
    seconds: float,
) -> Report:
    """Read the log, the sink and the handlers' records of runs up to ``last_life``,
    and check the books."""
    book = _read_log(directory, settings)
    n_of_order = {seq: n for n, seq in book.orders.items()}
    n_of_payment = dict(book.payments)
    poison = {n for n in range(settings.events) if is_poison(n, settings.poison_every)}
    flaky = {n for n in range(settings.events) if is_flaky(n, settings)}
    poison_keys = {f"enrich {book.orders[n]}" for n in poison if n in book.orders}
    flaky_keys = {f"enrich {book.orders[n]}" for n in flaky if n in book.orders}

    attempts: dict[str, int] = {}
    for life in range(last_life + 1):
        for key, attempt in _read_calls(directory / f"calls-{life}.txt")[2].items():
            attempts[key] = max(attempts.get(key, 0), attempt)
    blame = _blame(kills, attempts, book, poison_keys | flaky_keys)
    if settings.url or settings.shared:
        _charged_in_an_instant(blame, directory, last_life, kills)
    in_flight = set(blame.deaths) - poison_keys - flaky_keys

    # Dead letters: the poison, and events that killed the process max_attempts times
    # (a flaky order fails once by itself: two deaths may be enough for it).
    limit = RETRY.max_attempts
    must_die = poison_keys | {k for k, deaths in blame.deaths.items() if deaths >= limit}
    may_die = {k for k in flaky_keys if blame.deaths[k] + blame.possible[k] >= limit - 1}
    may_die |= {k for k in blame.possible if blame.deaths[k] + blame.possible[k] >= limit}
    dead = {f"{sub} {seq}" for sub, seq in book.dead}
    dead_orders = {n_of_order[seq] for (sub, seq) in book.dead if sub == "enrich"}
    dead_payments = {n_of_payment[seq] for (sub, seq) in book.dead if sub == "settle"}

    # Effects: every order once, in state, in the outbox and at the sink; each
    # customer's state equal to a recount from the log.
    handled_orders = set(book.orders) - dead_orders
    paid = handled_orders - dead_payments
    want: dict[str, list[int]] = {}
    for n in sorted(handled_orders):
        want.setdefault(customer_of(n), []).append(n)
    handled = duplicate_state = mismatches = 0
    for customer, ns in want.items():
        totals = book.enrich.get(customer)
        count = totals["count"] if isinstance(totals, dict) else 0
        handled += count
        duplicate_state += max(0, count - len(ns))
        expect = {"count": len(ns), "sum": sum(amount_of(n) for n in ns), "last": ns[-1]}
        mismatches += totals != expect
        settled = [n for n in ns if n in paid]
        mismatches += book.settle.get(customer) != (settled[-1] if settled else None)
    payment_ns = [n for _, n in book.payments]
    flagged = [k for k in [*book.enrich, *book.settle] if k.startswith("violation:")]
    return Report(
        events=settings.events,
        concurrency=settings.concurrency,
        publish_first=settings.publish_first,
        kills=len(kills),
        restarts=starts,
        seconds=round(seconds, 1),
        published=len(book.orders),
        handled=handled,
        redeliveries=book.sink_calls - len(set(book.effects)),
        lost=len(paid - set(book.effects)),
        duplicate_state=duplicate_state,
        duplicate_sink_effects=len(book.effects) - len(set(book.effects)),
        duplicate_outbox=len(payment_ns) - len(set(payment_ns)),
        state_mismatches=mismatches,
        order_violations=len(flagged) + _out_of_order(payment_ns) + _out_of_order(book.effects),
        dead_letters=len(book.dead),
        poison_dead_letters=len(poison),
        killed_thrice=len(dead - poison_keys),
        unexpected_dead_letters=len(dead - must_die - may_die) + len(must_die - dead),
        unaccounted=(
            anyio.run(_chaos_pg.unaccounted, settings.url)
            if settings.url
            else anyio.run(_unaccounted, directory / "log.db")
        ),
        kills_inside_calls=blame.inside,
        in_flight_at_kills=len(in_flight),
        deaths_charged=sum(blame.deaths.values()),
        blamed=len(blame.blamed),
        blamed_outside_calls=len(blame.blamed - set(blame.deaths) - set(blame.possible)),
        unblamed_in_flight=len(in_flight - blame.blamed),
        running_not_journaled=blame.running_not_journaled,
        kills_in_an_instant=blame.in_an_instant,
        journaled_beyond_one_call=blame.beyond_one_call,
        backend=settings.backend,
        processes=settings.processes if settings.url or settings.shared else 1,
    )


def _out_of_order(ns: list[int]) -> int:
    """Orders that come after a later order of their customer in ``ns``."""
    last: dict[str, int] = {}
    bad = 0
    for n in ns:
        customer = customer_of(n)
        if n <= last.get(customer, -1):
            bad += 1
        last[customer] = max(n, last.get(customer, -1))
    return bad


async def _unaccounted(path: Path) -> int:
    """Events the log's acknowledgement ledger cannot account for (reconciliation)."""
    store = _storage.SQLiteStorage(path, read_only=True)
    await store.open()
    try:
        report = await check_log(store, lease=3600.0)
    finally:
        await store.close()
    return report.lost


def format_report(report: Report, seed: int) -> str:
    mode = "published first, then consumers killed" if report.publish_first else "publishing"
    if report.backend == "postgres":
        mode = (
            f"PostgreSQL, one publisher and {report.processes} consumer processes, "
            "one consumer killed at a time"
        )
    elif report.processes > 1:
        mode = (
            f"one SQLite file shared by a publisher and {report.processes} consumer "
            "processes, one consumer killed at a time"
        )
    rows = [
        ("events published", report.published, f"of {report.events}"),
        ("kills (SIGKILL)", report.kills, f"{report.restarts} starts, seed {seed}"),
        ("kills inside a handler call", report.kills_inside_calls, "by the handlers' records"),
        (
            "events in flight at the kills",
            report.in_flight_at_kills,
            f"in the call journal; {report.deaths_charged} deaths charged",
        ),
        ("events blamed (ProcessDied)", report.blamed, "seen again at attempt 2+, or dead"),
        ("blamed outside a running call", report.blamed_outside_calls, "must be 0"),
        ("in flight but not blamed", report.unblamed_in_flight, "must be 0"),
        ("running calls not journaled", report.running_not_journaled, "must be 0"),
        (
            "journaled beyond one call",
            report.journaled_beyond_one_call,
            f"must be 0 ({report.kills_in_an_instant} kills in a call's first or last instant)",
        ),
        ("handled by enrich", report.handled, "each once, in state"),
        ("redeliveries seen at the sink", report.redeliveries, "deduplicated by key"),
        ("lost", report.lost, "must be 0"),
        ("unaccounted by reconciliation", report.unaccounted, "must be 0"),
        ("duplicate effects in state", report.duplicate_state, "must be 0"),
        ("duplicate effects at the sink", report.duplicate_sink_effects, "must be 0"),
        ("duplicate outbox events", report.duplicate_outbox, "must be 0"),
        ("state unlike the log's recount", report.state_mismatches, "must be 0"),
        ("order-per-key violations", report.order_violations, "must be 0"),
        (
            "dead letters",
            report.dead_letters,
            f"poison injected: {report.poison_dead_letters}; "
            f"killed the process {RETRY.max_attempts} times: {report.killed_thrice}",
        ),
        ("unexpected dead letters", report.unexpected_dead_letters, "must be 0"),
    ]
    lines = [
        f"chaos run: {report.events} events, concurrency {report.concurrency}, "
        f"{report.kills} kills ({mode}), {report.seconds}s"
    ]
    lines += [f"  {name:<32}{value:>10}   {note}" for name, value, note in rows]
    lines.append("PASS" if report.ok else "FAIL")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eventbus.chaos", description=__doc__.split("\n")[0]
    )
    defaults = Settings()
    parser.add_argument("--events", type=int, default=defaults.events)
    parser.add_argument("--kills", type=int, default=defaults.kills)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=defaults.concurrency,
        help="handler calls each subscription runs at once",
    )
    parser.add_argument(
        "--publish-first",
        action="store_true",
        help="publish everything in an unkilled run first; then kill consumer-only runs",
    )
    parser.add_argument(
        "--io-ms",
        type=float,
        default=defaults.io_ms,
        help="milliseconds of simulated outside I/O that enrich awaits per event",
    )
    parser.add_argument("--poison-every", type=int, default=defaults.poison_every)
    parser.add_argument("--flaky-every", type=int, default=defaults.flaky_every)
    parser.add_argument(
        "--min-wait", type=float, default=defaults.min_wait, help="seconds before a kill, at least"
    )
    parser.add_argument(
        "--max-wait", type=float, default=defaults.max_wait, help="seconds before a kill, at most"
    )
    parser.add_argument(
        "--unordered",
        action="store_true",
        help="subscribe with ordered=False: the order checks must fail (a check of the checks)",
    )
    parser.add_argument(
        "--backend",
        choices=["sqlite", "postgres"],
        default=defaults.backend,
        help="the log: a SQLite file, or PostgreSQL shared by --processes consumers",
    )
    parser.add_argument(
        "--processes",
        type=int,
        help="consumer processes sharing the log, one of them killed at a time (PostgreSQL: "
        f"{defaults.processes} by default; SQLite: given, the file is opened with shared=True "
        "by a publisher and these consumers, otherwise one process publishes and consumes)",
    )
    parser.add_argument(
        "--postgres-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="the PostgreSQL database to run in (a new schema, dropped afterwards)",
    )
    parser.add_argument(
        "--lease",
        type=float,
        default=defaults.lease,
        help="seconds a PostgreSQL partition lease lasts unless renewed",
    )
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no progress line (it shows only on a terminal, and never under CI)",
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--life", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--role", default="both", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        logging.basicConfig(
            level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
        )
        settings = msgspec.json.decode(args.settings, type=Settings)
        anyio.run(worker, args.worker, settings, args.life, args.role)
        return 0
    settings = Settings(
        events=args.events,
        kills=args.kills,
        seed=args.seed,
        concurrency=args.concurrency,
        publish_first=args.publish_first,
        io_ms=args.io_ms,
        poison_every=args.poison_every,
        flaky_every=args.flaky_every,
        min_wait=args.min_wait,
        max_wait=args.max_wait,
        ordered=not args.unordered,
        backend=args.backend,
        processes=args.processes or defaults.processes,
        shared=args.backend == "sqlite" and args.processes is not None,
        lease=args.lease,
    )
    if settings.backend == "postgres":
        settings = msgspec.structs.replace(
            settings, url=_chaos_pg.log_url(args.postgres_url, settings.lease)
        )
    with (
        tempfile.TemporaryDirectory() as tmp,
        Progress("chaos", expected_settled(settings), unit="settled", quiet=args.quiet) as progress,
    ):
        directory = args.dir or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            report = run_harness(directory, settings, progress)
        finally:
            if settings.url:
                anyio.run(_chaos_pg.drop, settings.url)
    print(msgspec.json.encode(report).decode() if args.json else format_report(report, args.seed))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
