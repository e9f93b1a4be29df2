"""The chaos harness: kill a two-stage pipeline with SIGKILL, restart it, and prove
that nothing was lost or applied twice.

    python -m eventbus.chaos [--events 100000] [--kills 50] [--seed 1] [--dir DIR]

A worker process publishes ``--events`` orders (idempotency keys make re-publishing
after a crash harmless) through a two-stage pipeline on one SQLite log:

1. ``enrich`` (per-event handler) keeps per-customer totals in ``ctx.state`` and
   publishes a payment through the outbox (same transaction as its acknowledgement);
   every ``--poison-every``-th order is poison and must end in the dead letters.
2. ``settle`` (batch handler) applies each payment to an outside sink, a separate
   SQLite file standing in for a payments API that deduplicates by idempotency key,
   through ``eventbus.idempotent``; it keeps the last order seen per customer in its
   state to check order per key.

The harness kills the worker at random moments (seeded: ``--seed`` replays a run),
``--kills`` times, restarts it each time, lets the last run finish, then reads the
log and the sink and prints the accounting. It exits non-zero if anything was lost,
doubled or reordered.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import anyio
import msgspec

import storage as _storage

from ._bus import Bus
from ._config import BatchPolicy, BusConfig, RetryPolicy
from ._effects import idempotent
from ._event import Event, Message
from .dispatch import Context
from .reconcile import check_log

CUSTOMERS = 97
CHUNK = 500
RETRY = RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.05, budget_ratio=1.0)


class Poison(Exception):
    """An order that can never be processed."""


def amount_of(n: int) -> int:
    return n % 13 + 1


def is_poison(n: int, every: int) -> bool:
    return every > 0 and n % every == every - 1


# -- the worker ---------------------------------------------------------------------


class Sink:
    """The outside system: a separate SQLite file that applies an effect once per
    idempotency key (as a payments API does) and counts every call it receives."""

    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(
            path, timeout=30, isolation_level=None, check_same_thread=False
        )
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


async def worker(directory: Path, events: int, poison_every: int) -> None:
    """One life of the pipeline: resume publishing, handle, exit once all is done."""
    log_path, sink_path = directory / "log.db", str(directory / "sink.db")
    progress = directory / "published"
    sink = await anyio.to_thread.run_sync(Sink, sink_path)
    config = BusConfig(batch=BatchPolicy(max_size=256))
    async with Bus.open(log_path, config=config) as bus:

        @idempotent(bus)
        async def deliver(n: int, customer: str, *, idempotency_key: str) -> bool:
            return await anyio.to_thread.run_sync(sink.apply, idempotency_key, n, customer)

        @bus.subscribe("orders", name="enrich", retry=RETRY)
        async def enrich(event: Event[dict[str, int]], ctx: Context) -> None:
            n = event.payload["n"]
            if event.payload.get("poison"):
                raise Poison(f"order {n} is poison")
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

        @bus.subscribe("payments", name="settle", retry=RETRY)
        async def settle(batch: list[Event[dict[str, int]]], ctx: Context) -> None:
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

            async with anyio.create_task_group() as tg:  # customers in parallel
                for customer, events in by_customer.items():
                    tg.start_soon(one_customer, customer, events)

        text = progress.read_text() if progress.exists() else ""
        start = int(text) if text.strip() else 0
        for first in range(start, events, CHUNK):
            last = min(first + CHUNK, events)
            await bus.publish_many(
                Message(
                    "orders",
                    {"n": n, "poison": is_poison(n, poison_every)},
                    key=f"c{n % CUSTOMERS}",
                    idempotency_key=f"order-{n}",
                )
                for n in range(first, last)
            )
            # After the commit: a kill before this write republishes the chunk,
            # which the idempotency keys turn into no-ops.
            await anyio.to_thread.run_sync(_write_atomically, progress, str(last))
        await bus.drain(timeout=None)
    sink.close()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- the harness --------------------------------------------------------------------


class Report(msgspec.Struct):
    events: int
    kills: int
    restarts: int
    seconds: float
    published: int
    handled: int
    redeliveries: int
    lost: int
    duplicate_state: int
    duplicate_sink_effects: int
    order_violations: int
    dead_letters: int
    expected_dead_letters: int
    unaccounted: int = 0

    @property
    def ok(self) -> bool:
        return (
            self.published == self.events
            and self.lost == 0
            and self.unaccounted == 0
            and self.duplicate_state == 0
            and self.duplicate_sink_effects == 0
            and self.order_violations == 0
            and self.dead_letters == self.expected_dead_letters
            and self.handled == self.events - self.expected_dead_letters
        )


def _spawn(directory: Path, events: int, poison_every: int) -> subprocess.Popen[bytes]:
    # The worker's log goes to a file: a pipe nobody reads while waiting would fill
    # up and block the worker.
    with open(directory / "worker.log", "ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "eventbus.chaos",
                "--worker",
                str(directory),
                "--events",
                str(events),
                "--poison-every",
                str(poison_every),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def _log_tail(directory: Path) -> str:
    data = (directory / "worker.log").read_bytes()
    return data[-3000:].decode(errors="replace")


def run_harness(
    directory: Path,
    events: int,
    kills: int,
    seed: int,
    poison_every: int,
    min_wait: float,
    max_wait: float,
) -> Report:
    rng = random.Random(seed)
    started = time.monotonic()
    done_kills = restarts = 0
    while done_kills < kills:
        proc = _spawn(directory, events, poison_every)
        restarts += 1
        try:
            proc.wait(timeout=rng.uniform(min_wait, max_wait))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            done_kills += 1
            continue
        if proc.returncode != 0:
            tail = _log_tail(directory)
            raise RuntimeError(f"the worker failed (exit {proc.returncode}):\n{tail}")
        break  # finished before its kill: nothing left to interrupt
    proc = _spawn(directory, events, poison_every)
    restarts += 1
    proc.wait(timeout=3600)
    if proc.returncode != 0:
        tail = _log_tail(directory)
        raise RuntimeError(f"the final run failed (exit {proc.returncode}):\n{tail}")
    return account(
        directory, events, done_kills, restarts, time.monotonic() - started, poison_every
    )


def account(
    directory: Path, events: int, kills: int, restarts: int, seconds: float, poison_every: int
) -> Report:
    """Read the log and the sink, and check the books."""
    decode = msgspec.msgpack.Decoder().decode
    log = sqlite3.connect(f"file:{directory / 'log.db'}?mode=ro", uri=True)
    sink = sqlite3.connect(f"file:{directory / 'sink.db'}?mode=ro", uri=True)
    try:
        published = log.execute("SELECT count(*) FROM events WHERE topic = 'orders'").fetchone()[0]
        enrich = {
            k: decode(v)
            for k, v in log.execute("SELECT key, value FROM state WHERE subscription = 'enrich'")
        }
        settle = {
            k: decode(v)
            for k, v in log.execute("SELECT key, value FROM state WHERE subscription = 'settle'")
        }
        dead = log.execute("SELECT payload FROM dead_letters WHERE subscription = 'enrich'")
        dead_orders = [decode(p)["n"] for (p,) in dead]
        effects = [row[0] for row in sink.execute("SELECT order_n FROM effects")]
        calls = sink.execute("SELECT count(*) FROM calls").fetchone()[0]
    finally:
        log.close()
        sink.close()
    expected = {n for n in range(events) if not is_poison(n, poison_every)}
    per_customer: dict[str, int] = {}
    for n in expected:
        per_customer[f"c{n % CUSTOMERS}"] = per_customer.get(f"c{n % CUSTOMERS}", 0) + 1
    handled = sum(v["count"] for k, v in enrich.items() if not k.startswith("violation:"))
    duplicate_state = sum(
        max(0, enrich.get(c, {"count": 0})["count"] - want) for c, want in per_customer.items()
    )
    violations = sum(1 for k in [*enrich, *settle] if k.startswith("violation:"))
    return Report(
        events=events,
        kills=kills,
        restarts=restarts,
        seconds=round(seconds, 1),
        published=published,
        handled=handled,
        redeliveries=calls - len(set(effects)),
        lost=len(expected - set(effects)),
        duplicate_state=duplicate_state,
        duplicate_sink_effects=len(effects) - len(set(effects)),
        order_violations=violations,
        dead_letters=len(dead_orders),
        expected_dead_letters=events - len(expected),
        unaccounted=anyio.run(_unaccounted, directory / "log.db"),
    )


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
    rows = [
        ("events published", report.published, f"of {report.events}"),
        ("kills (SIGKILL)", report.kills, f"{report.restarts} starts, seed {seed}"),
        ("handled by enrich", report.handled, "each once, in state"),
        ("redeliveries seen at the sink", report.redeliveries, "deduplicated by key"),
        ("lost", report.lost, "must be 0"),
        ("unaccounted by reconciliation", report.unaccounted, "must be 0"),
        ("duplicate effects in state", report.duplicate_state, "must be 0"),
        ("duplicate effects at the sink", report.duplicate_sink_effects, "must be 0"),
        ("order-per-key violations", report.order_violations, "must be 0"),
        ("dead letters", report.dead_letters, f"poison injected: {report.expected_dead_letters}"),
    ]
    lines = [f"chaos run: {report.events} events, {report.kills} kills, {report.seconds}s"]
    lines += [f"  {name:<32}{value:>10}   {note}" for name, value, note in rows]
    lines.append("PASS" if report.ok else "FAIL")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eventbus.chaos", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--poison-every", type=int, default=1000)
    parser.add_argument(
        "--min-wait", type=float, default=0.3, help="seconds before a kill, at least"
    )
    parser.add_argument(
        "--max-wait", type=float, default=2.0, help="seconds before a kill, at most"
    )
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        anyio.run(worker, args.worker, args.events, args.poison_every)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        report = run_harness(
            directory,
            args.events,
            args.kills,
            args.seed,
            args.poison_every,
            args.min_wait,
            args.max_wait,
        )
    print(msgspec.json.encode(report).decode() if args.json else format_report(report, args.seed))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
