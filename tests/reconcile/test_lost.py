"""Reconciliation accounts for every event: an acknowledgement removed behind the bus's
back is found lost, with its seqs, and re-dispatched; a sound log, however busy, is
never reported lost."""

from __future__ import annotations

import random
import sqlite3
import time
from collections import Counter
from pathlib import Path

import anyio
import asyncpg
import pytest

from eventbus import BatchPolicy, Bus, BusConfig, Context, Event, Message, RetryPolicy
from eventbus.storage import MemoryStorage, is_postgres_url
from eventbus.storage._pg_url import parse
from tests import postgres

pytestmark = pytest.mark.anyio

# Only explicit passes, so each test decides when reconciliation looks.
MANUAL = BusConfig(reconcile_interval=0)


def _without(ranges: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for first, last in ranges:
        if last < lo or first > hi:
            out.append((first, last))
            continue
        if first < lo:
            out.append((first, lo - 1))
        if last > hi:
            out.append((hi + 1, last))
    return out


def punch_hole(target: Path | str | MemoryStorage, subscription: str, lo: int, hi: int) -> None:
    """Forget that ``subscription`` handled seqs lo..hi, as a bug or a hand-edit
    would: the acknowledgement ledger loses them, nothing else changes."""
    if isinstance(target, MemoryStorage):
        ranges = target._acked[subscription]
        kept = _without(list(zip(ranges.los, ranges.his, strict=True)), lo, hi)
        ranges.los, ranges.his = [a for a, _ in kept], [b for _, b in kept]
        return
    if is_postgres_url(str(target)):
        postgres.run_aside(_punch_pg_hole(parse(str(target)).schema, subscription, lo, hi))
        return
    conn = sqlite3.connect(target, timeout=10, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute(
            "SELECT lo, hi FROM acked WHERE subscription = ? ORDER BY lo", (subscription,)
        ).fetchall()
        conn.execute("DELETE FROM acked WHERE subscription = ?", (subscription,))
        conn.executemany(
            "INSERT INTO acked (subscription, lo, hi) VALUES (?, ?, ?)",
            [(subscription, a, b) for a, b in _without(rows, lo, hi)],
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


async def _punch_pg_hole(schema: str, subscription: str, lo: int, hi: int) -> None:
    conn = await asyncpg.connect(postgres.SERVER, server_settings={"search_path": schema})
    try:
        async with conn.transaction():
            rows = await conn.fetch(
                "SELECT lo, hi FROM acked WHERE subscription = $1 ORDER BY lo", subscription
            )
            await conn.execute("DELETE FROM acked WHERE subscription = $1", subscription)
            await conn.executemany(
                "INSERT INTO acked (subscription, lo, hi) VALUES ($1, $2, $3)",
                [(subscription, a, b) for a, b in _without([tuple(r) for r in rows], lo, hi)],
            )
            # Its cursors passed them as done: the record of that is forgotten too.
            await conn.execute(
                "INSERT INTO holes (subscription, seq) SELECT $1, seq FROM events"
                " WHERE seq BETWEEN $2 AND $3 ON CONFLICT DO NOTHING",
                subscription,
                lo,
                hi,
            )
    finally:
        await conn.close()


BACKENDS = ["sqlite", "memory", pytest.param("postgres", marks=pytest.mark.postgres)]


def _target(backend: str, log_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return ":memory:" if backend == "memory" else str(log_path)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_deleted_acknowledgement_is_found_lost_and_re_dispatched(
    log_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    memory = MemoryStorage() if backend == "memory" else None
    target = _target(backend, log_path, request)
    seen: Counter[int] = Counter()
    async with Bus.open(target, config=MANUAL, storage=memory) as bus:

        @bus.subscribe("orders", name="billing")
        async def bill(event: Event[int], ctx: Context) -> None:
            seen[event.seq] += 1
            total = await ctx.state.get("total", 0)
            ctx.state.set("total", total + event.payload)

        @bus.subscribe("orders", name="audit")
        async def audit(event: Event[int], ctx: Context) -> None:
            pass

        for i in range(12):
            await bus.publish("orders", i, key=f"o-{i % 3}")
            await bus.publish("noise", i)  # other topics interleave: not the subscription's
        await bus.drain(timeout=10)
        clean = await bus.reconcile()
        assert clean.ok, clean.format()
        assert clean.lost == 0
        assert dict(seen) == {seq: 1 for seq in range(1, 24, 2)}

        # Events 7, 9 and 11 (orders) and 8, 10 (noise) lose their acknowledgement.
        punch_hole(memory or target, "billing", 7, 11)
        report = await bus.reconcile()
        assert not report.ok
        billing = report.subscription("billing")
        assert (billing.lost, billing.lost_seqs) == (3, (7, 9, 11))
        assert billing.repaired.lost == 3
        assert report.subscription("audit").lost == 0
        assert report.repaired.lost == 3
        assert "LOST 3 events" in str(report)
        assert "billing: 3 lost (seq 7, 9, 11); 3 re-dispatched" in report.format()

        # Re-dispatched through the retry lane: the handler sees them again.
        await bus.drain(timeout=10)
        assert [seq for seq, n in sorted(seen.items()) if n == 2] == [7, 9, 11]
        again = await bus.reconcile()
        assert again.ok, again.format()
        assert again.repaired.total == 0
        assert bus.metrics().reconcile is not None
        assert bus.metrics().reconcile.repaired_total == 3


async def test_lost_events_of_a_subscription_not_on_this_bus_are_reported_not_repaired(
    log_url: str,
) -> None:
    async with Bus.open(log_url, config=MANUAL) as bus:

        @bus.subscribe("orders", name="billing")
        async def bill(event: Event[int], ctx: Context) -> None:
            pass

        for i in range(6):
            await bus.publish("orders", i)
        await bus.drain(timeout=10)
    punch_hole(log_url, "billing", 3, 4)
    seen: list[int] = []
    async with Bus.open(log_url, config=MANUAL) as bus:
        report = await bus.reconcile()
        billing = report.subscription("billing")
        assert (billing.registered, billing.lost, billing.lost_seqs) == (False, 2, (3, 4))
        assert billing.repaired.lost == 0
        assert (await bus.reconcile()).lost == 2  # still there: nobody repaired it

        # Once it subscribes on this bus, the next pass repairs it.
        @bus.subscribe("orders", name="billing")
        async def bill_again(event: Event[int], ctx: Context) -> None:
            seen.append(event.seq)

        await bus.drain(timeout=10)
        repaired = await bus.reconcile()
        assert repaired.subscription("billing").repaired.lost == 2
        await bus.drain(timeout=10)
        assert sorted(seen) == [3, 4]
        assert (await bus.reconcile()).ok


async def test_a_lost_event_that_keeps_failing_ends_dead_lettered(log_url: str) -> None:
    async with Bus.open(log_url, config=MANUAL) as bus:
        broken = False

        @bus.subscribe("orders", name="billing", retry=RetryPolicy(max_attempts=2, initial_delay=0))
        async def bill(event: Event[int], ctx: Context) -> None:
            if broken and event.payload == 2:
                raise RuntimeError("still broken")

        for i in range(5):
            await bus.publish("orders", i)
        await bus.drain(timeout=10)
        punch_hole(log_url, "billing", 3, 3)
        broken = True
        assert (await bus.reconcile()).subscription("billing").repaired.lost == 1
        await bus.drain(timeout=10)
        (dead,) = await bus.dead_letters.list(subscription="billing")
        assert (dead.event.seq, dead.attempts, dead.error_message) == (3, 2, "still broken")
        report = await bus.reconcile()
        assert report.ok
        assert report.subscription("billing").dead == 1


async def test_the_pass_on_open_repairs_what_an_earlier_run_lost(log_url: str) -> None:
    async with Bus.open(log_url, config=MANUAL) as bus:

        @bus.subscribe("orders", name="billing")
        async def bill(event: Event[int], ctx: Context) -> None:
            pass

        for i in range(6):
            await bus.publish("orders", i)
        await bus.drain(timeout=10)
    punch_hole(log_url, "billing", 2, 5)
    seen: list[int] = []
    all_back = anyio.Event()
    async with Bus.open(log_url) as bus:  # the default: a pass just after open

        @bus.subscribe("orders", name="billing")
        async def bill_again(event: Event[int], ctx: Context) -> None:
            seen.append(event.seq)
            if len(seen) == 4:
                all_back.set()

        with anyio.fail_after(10):
            await all_back.wait()
        await bus.drain(timeout=10)
        assert sorted(seen) == [2, 3, 4, 5]
        report = await bus.reconcile()
        assert report.ok
        metrics = bus.metrics().reconcile
        assert metrics is not None
        assert metrics.runs >= 2
        assert metrics.repaired_total == 4


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_busy_run_reconciles_clean_while_it_runs_and_after(
    log_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    rng = random.Random(11)
    poison = {i for i in range(3000) if rng.random() < 0.02}
    flaky = {i for i in range(3000) if rng.random() < 0.05}
    config = BusConfig(reconcile_interval=0, breaker=None)
    quick = RetryPolicy(max_attempts=3, initial_delay=0.001, max_delay=0.01, budget_ratio=1.0)
    async with Bus.open(_target(backend, log_path, request), config=config) as bus:

        @bus.subscribe("orders", name="billing", retry=quick)
        async def bill(event: Event[int], ctx: Context) -> None:
            if event.payload in poison or (event.payload in flaky and event.attempt == 1):
                raise ValueError(f"event {event.payload} fails")
            await ctx.publish("invoices", event.payload, key=event.key)

        @bus.subscribe(["orders", "invoices"], name="audit", batch=BatchPolicy(max_size=64))
        async def audit(events: list[Event[int]], ctx: Context) -> None:
            for event in events:
                if event.topic == "orders" and event.payload in flaky and event.attempt == 1:
                    ctx.fail(event, ValueError("fails once"))

        reports = []
        for start in range(0, 3000, 100):
            await bus.publish_many(
                [Message("orders", i, key=f"k-{i % 17}") for i in range(start, start + 100)]
            )
            # While handlers, retries and acknowledgements are in flight.
            reports.append(await bus.reconcile(repair=False))
        await bus.drain(timeout=60)
        assert [r.lost for r in reports] == [0] * len(reports)
        final = await bus.reconcile()
        assert final.ok, final.format()
        assert final.repaired.total == 0
        assert (final.pending, final.retrying, final.stuck, final.overdue) == (0, 0, 0, 0)
        assert final.subscription("billing").dead == len(poison)
        assert final.subscription("audit").dead == 0


async def test_an_overdue_retry_the_lane_does_not_hold_is_re_armed(log_path: Path) -> None:
    config = BusConfig(reconcile_interval=0, reconcile_lease=60)
    attempts: list[int] = []
    async with Bus.open(log_path, config=config) as bus:

        @bus.subscribe("orders", name="billing")
        async def bill(event: Event[int], ctx: Context) -> None:
            attempts.append(ctx.attempt)

        receipt = await bus.publish("orders", 1)
        await bus.drain(timeout=10)
        assert attempts == [1]
        # A retry the running lane never heard of (written behind its back, as a bug
        # or an outside tool would), due an hour ago.
        conn = sqlite3.connect(log_path, timeout=10, isolation_level=None)
        conn.execute(
            "INSERT INTO retries SELECT 'billing', seq, id, topic, key, payload, headers,"
            " created_at, 2, ?, ?, 'builtins.ValueError', 'fails once', '', 0"
            " FROM events WHERE seq = ?",
            (time.time() - 3600, time.time() - 3600, receipt.seq),
        )
        conn.close()
        report = await bus.reconcile()
        billing = report.subscription("billing")
        assert (billing.overdue, billing.overdue_seqs) == (1, (receipt.seq,))
        assert billing.repaired.overdue == 1
        assert report.ok  # overdue is not lost: it is in the log's retry lane
        await bus.drain(timeout=10)
        assert attempts == [1, 2]
        assert (await bus.reconcile()).retrying == 0
