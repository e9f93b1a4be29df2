"""What the runbook (docs/operations/runbook.md) tells an operator to do works."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import pytest

from eventbus import Bus, Context, Event, Message


def vacuum_into(source: Path, target: Path) -> None:
    """The runbook's one-liner: a consistent copy from one read transaction."""
    conn = sqlite3.connect(source)
    try:
        conn.execute("VACUUM INTO ?", (str(target),))
    finally:
        conn.close()


def subscribe_totals(bus: Bus) -> None:
    @bus.subscribe("orders", name="totals")
    async def total(event: Event[int], ctx: Context) -> None:
        key = event.key or ""
        current = await ctx.state.get(key, 0)
        assert isinstance(current, int)
        ctx.state.set(key, current + event.payload)


@pytest.mark.anyio
async def test_a_live_log_backed_up_with_vacuum_into_opens_as_a_consistent_log(
    tmp_path: Path,
) -> None:
    log, backup = tmp_path / "app.db", tmp_path / "backup.db"
    async with Bus.open(log) as bus:
        subscribe_totals(bus)

        async def publish(first: int, n: int) -> None:
            for start in range(first, first + n, 100):
                await bus.publish_many(
                    Message("orders", 1, key=f"k{i % 7}") for i in range(start, start + 100)
                )

        await publish(0, 1000)
        # The copy runs while the bus publishes and handles more.
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish, 1000, 3000)
            await anyio.to_thread.run_sync(vacuum_into, log, backup)
        await bus.drain(timeout=30)
        live = {key: value async for key, value in bus.state("totals").items()}
    assert sum(live.values()) == 4000  # the live bus went on undisturbed

    # The copy is a log in its own right: what it holds is consistent, and a bus on it
    # finishes what had not been handled when the copy was taken.
    async with Bus.open(backup) as restored:
        head = (await restored.stats()).head
        assert 1000 <= head <= 4000
        assert head % 100 == 0  # whole group commits, never part of one
        report = await restored.reconcile()
        assert report.ok, report
        subscribe_totals(restored)
        await restored.drain(timeout=30)
        totals = {key: value async for key, value in restored.state("totals").items()}
    assert sum(totals.values()) == head  # every event in the copy counted once
