"""Reconciliation racing the bus: stuck calls that end during a pass, retries that
settle while the pass reads the log, a redrive right after a dead letter commits,
and logs migrated from before the acknowledgement ledger.

Races are made deterministic by widening the window the real code leaves open (an
await in the pass), never by sleeping for something to happen; the only sleeps wait
for the reconcile lease itself to pass, which only the clock changes.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from eventbus import Bus, BusConfig, Context, Event, RetryPolicy
from eventbus.dispatch import Subscription
from eventbus.storage import (
    MemoryStorage,
    NewRecord,
    Receipt,
    RetryRecord,
    SQLiteStorage,
    SubscriptionInfo,
    Unaccounted,
    WriteBatch,
)
from eventbus.storage import _statements as stmts
from tests.conftest import wait_until
from tests.reconcile.test_lost import punch_hole

pytestmark = pytest.mark.anyio

LEASE = 0.2
QUICK = RetryPolicy(max_attempts=3, initial_delay=0.0, max_delay=0.0, jitter="none")


# -- stuck-call cancellation ----------------------------------------------------------


async def test_a_stuck_call_that_ends_during_the_pass_does_not_get_the_next_event_cancelled(
    log_path: Path,
) -> None:
    """The main lane reuses one HandlerCall (and, within a batch, one cancel scope)
    for every event: a pass that awaited between finding a stuck call and cancelling
    it could cancel whichever event runs by then, a healthy one."""
    config = BusConfig(reconcile_interval=0, reconcile_lease=LEASE)
    slow_started = anyio.Event()
    release_slow = anyio.Event()
    next_started = anyio.Event()
    release_next = anyio.Event()
    attempts: list[tuple[str, int]] = []
    started = 0.0
    async with Bus.open(log_path, config=config) as bus:

        @bus.subscribe("orders", name="billing", retry=QUICK)
        async def bill(event: Event[str], ctx: Context) -> None:
            nonlocal started
            attempts.append((event.payload, ctx.attempt))
            if event.payload == "slow" and ctx.attempt == 1:
                started = time.monotonic()
                slow_started.set()
                await release_slow.wait()
            if event.payload == "next" and ctx.attempt == 1:
                next_started.set()
                await release_next.wait()

        old = await bus.publish("orders", "old", key="o")
        await bus.drain(timeout=10)
        punch_hole(log_path, "billing", old.seq, old.seq)  # one lost event to re-dispatch

        await bus.publish("orders", "slow", key="a")
        await bus.publish("orders", "next", key="b")
        with anyio.fail_after(10):
            await slow_started.wait()
        await anyio.sleep_until(started + LEASE + 0.05)  # the lease passes

        reconciler = bus._reconciler
        redispatch = reconciler._redispatch

        async def slow_redispatch(sub: Subscription, lost: Unaccounted, head: int) -> int:
            n = await redispatch(sub, lost, head)
            # Meanwhile (a commit takes a while) the slow call ends by itself and the
            # next event starts.
            release_slow.set()
            with anyio.fail_after(10):
                await next_started.wait()
            return n

        reconciler._redispatch = slow_redispatch  # type: ignore[method-assign]
        report = await bus.reconcile()
        release_next.set()
        await bus.drain(timeout=10)

    assert report.subscription("billing").repaired.lost == 1
    assert report.subscription("billing").repaired.stuck == 1
    # The pass cancels what it found stuck before it awaits anything: "slow" (past
    # its lease) fails its attempt and is retried; "next", which ran for no time at
    # all, is never cancelled.
    assert [a for a in attempts if a[0] == "slow"] == [("slow", 1), ("slow", 2)], attempts
    assert [a for a in attempts if a[0] == "next"] == [("next", 1)], attempts


# -- overdue retries ------------------------------------------------------------------


async def test_a_retry_that_ends_while_the_pass_reads_the_retry_lane_is_not_run_again(
    log_path: Path,
) -> None:
    """The pass reads the log's retry lane, then (after an await on the reader thread)
    asks the running lane whether it holds each overdue retry. One that finished in
    between is 're-armed' and handled a second time: its state is applied twice. (The
    live check also ignores ``running``, which the offline check honours.)"""
    config = BusConfig(reconcile_interval=0, reconcile_lease=LEASE)
    retry = RetryPolicy(max_attempts=5, initial_delay=0.0, max_delay=0.0, jitter="none")
    second = anyio.Event()
    release = anyio.Event()
    attempts: list[int] = []
    started = 0.0
    async with Bus.open(log_path, config=config) as bus:

        @bus.subscribe("orders", name="billing", retry=retry)
        async def bill(event: Event[int], ctx: Context) -> None:
            nonlocal started
            attempts.append(ctx.attempt)
            if ctx.attempt == 1:
                raise ValueError("transient")
            if not second.is_set():
                started = time.monotonic()
                second.set()
                await release.wait()  # a slow second attempt, running=True in the log
            total = await ctx.state.get("count", 0)
            ctx.state.set("count", int(total) + 1)  # type: ignore[call-overload]

        receipt = await bus.publish("orders", 1)
        with anyio.fail_after(10):
            await second.wait()
        await anyio.sleep_until(started + LEASE + 0.05)  # its due time is a lease ago

        sub = bus._subs["billing"]
        log = bus._log
        read_retries = log.retries

        async def retries_read_just_before_it_settles(name: str) -> list[RetryRecord]:
            rows = await read_retries(name)
            if name == "billing" and not release.is_set():
                # The attempt ends while the read is on its way back from the thread.
                release.set()
                await wait_until(bus, lambda: not sub.holds(receipt.seq))
            return rows

        log.retries = retries_read_just_before_it_settles  # type: ignore[method-assign,assignment]
        report = await bus.reconcile()
        await bus.drain(timeout=10)
        count = await bus.state("billing").get("count", 0)

    assert attempts == [1, 2], "the second attempt ran again after it had succeeded"
    assert count == 1  # applied exactly once
    assert report.subscription("billing").repaired.overdue == 0, report.format()


# -- the acknowledgement ledger -------------------------------------------------------


def _downgrade_to_v3(path: Path) -> None:
    """What a log written before the acknowledgement ledger looks like."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.executescript(
            "DROP TABLE acked; DROP TABLE workflow_steps; DROP TABLE workflows;"
            " DROP TABLE workflow_claims; PRAGMA user_version = 3;"
        )
    finally:
        conn.close()


async def test_purging_an_old_dead_letter_after_the_v4_migration_loses_nothing(
    log_path: Path,
) -> None:
    """The v4 seed acknowledges 1..cursor, dead letters and retries included. Settling
    one of them later calls _add_acked(seq, seq), whose INSERT OR REPLACE on (sub, lo)
    replaces the seeded range [1, cursor] by [1, 1] when seq is 1: every other event is
    then 'lost', and the repair hands them all to the handler again."""
    config = BusConfig(reconcile_interval=0)
    async with Bus.open(log_path, config=config) as bus:

        @bus.subscribe("orders", name="billing", retry=RetryPolicy(max_attempts=1))
        async def bill(event: Event[int], ctx: Context) -> None:
            if event.payload == 0:
                raise ValueError("poison")

        for i in range(10):
            await bus.publish("orders", i)
        await bus.drain(timeout=10)
    _downgrade_to_v3(log_path)

    seen: Counter[int] = Counter()
    async with Bus.open(log_path, config=config) as bus:

        @bus.subscribe("orders", name="billing", retry=RetryPolicy(max_attempts=1))
        async def bill_again(event: Event[int], ctx: Context) -> None:
            seen[event.seq] += 1

        await bus.drain(timeout=10)
        assert (await bus.reconcile()).ok
        assert await bus.dead_letters.purge(subscription="billing") == 1
        report = await bus.reconcile()
        await bus.drain(timeout=10)

    assert report.ok, report.format()
    assert seen == Counter(), "events handled before the upgrade were handled again"


# -- cost of a pass ----------------------------------------------------------------


def _vm_steps(conn: sqlite3.Connection, fn: Callable[[], object]) -> int:
    """SQLite virtual-machine steps (in thousands) that ``fn`` runs on ``conn``: a
    measure of the rows it reads that does not depend on the machine's speed."""
    steps = 0

    def tick() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.set_progress_handler(tick, 1000)
    try:
        fn()
    finally:
        conn.set_progress_handler(None, 0)
    return steps


def test_a_pass_reads_only_the_gaps_between_acknowledged_ranges(tmp_path: Path) -> None:
    """The pass used to scan every event up to the cursor on the log's reader
    connection, holding up state reads behind it; it reads the gaps between the
    acknowledged ranges, so its cost follows the holes, not the size of the log."""

    async def build(path: Path, n: int) -> None:
        log = SQLiteStorage(str(path))
        await log.open()
        try:
            record = NewRecord("id", "orders", None, b"\x01", None, time.time())
            await log.commit(
                WriteBatch(subscriptions=[SubscriptionInfo("billing", ("orders",), 0, 0.0)])
            )
            await log.commit(WriteBatch(appends=[record] * n))
            await log.commit(WriteBatch(acks={"billing": n}))
        finally:
            await log.close()

    costs = []
    for n in (20_000, 200_000):
        path = tmp_path / f"log-{n}.db"
        anyio.run(build, path, n)
        with sqlite3.connect(path) as conn:
            conn.execute("DELETE FROM acked")  # acknowledged up to 5, then one hole
            conn.execute("INSERT INTO acked VALUES ('billing', 1, 5), ('billing', 7, ?)", (n,))
            conn.commit()
            found: list[Unaccounted] = []

            def scan(
                conn: sqlite3.Connection = conn, n: int = n, out: list[Unaccounted] = found
            ) -> None:
                out.append(stmts.unaccounted(conn, "billing", n, 10))

            costs.append(_vm_steps(conn, scan))
            conn.commit()
        assert found[0].count == 1
        assert found[0].seqs == (6,)
    # Ten times the log, about the same work (a full scan would be ten times more).
    assert costs[1] < 2 * costs[0] + 5, costs


# -- redrive and the retry lane -------------------------------------------------------


class _DeadLetterSignal(MemoryStorage):
    """An in-memory log that says when a commit has dead-lettered something."""

    def __init__(self) -> None:
        super().__init__()
        self.buried = anyio.Event()

    async def commit(self, batch: WriteBatch) -> list[Receipt]:
        receipts = await super().commit(batch)
        if batch.dead:
            self.buried.set()
        return receipts


async def test_a_dead_letter_redriven_as_soon_as_it_commits_is_not_orphaned() -> None:
    """A redrive that lands right after the dead letter's commit, before the
    subscription has moved on, must reach the subscription: the event runs again
    and nothing is left waiting in the log's retry lane after drain."""
    retry = RetryPolicy(max_attempts=2, initial_delay=0.0, max_delay=0.0, jitter="none")
    fixed = False
    attempts: list[int] = []
    log = _DeadLetterSignal()
    async with Bus.open(":memory:", storage=log, config=BusConfig(reconcile_interval=0)) as bus:

        @bus.subscribe("orders", name="billing", retry=retry)
        async def bill(event: Event[int], ctx: Context) -> None:
            attempts.append(ctx.attempt)
            if not fixed:
                raise ValueError("broken until fixed")

        await bus.publish("orders", 1)
        with anyio.fail_after(10):
            await log.buried.wait()
        fixed = True  # the cause is fixed; an operator redrives at once
        redriven = await bus.dead_letters.redrive(subscription="billing")
        await bus.drain(timeout=10)
        stats = await bus.stats()

    assert redriven == 1
    assert stats.retries == {}, "redriven, yet waiting in the log's retry lane after drain"
    assert attempts == [1, 2, 1]
