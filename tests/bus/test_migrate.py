"""``eventbus migrate SRC DST``: a SQLite log copied into a new PostgreSQL log, which
a bus then goes on with as if nothing had moved: the same sequence numbers, cursors,
state, retries, dead letters, idempotency keys and workflow runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import pytest

from eventbus import Bus, BusConfig, Context, Event, RetryPolicy
from eventbus.cli import main

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

QUICK = RetryPolicy(max_attempts=2, initial_delay=0.01, max_delay=0.02)


async def _sqlite_log(path: Path, seen: list[int]) -> None:
    async with Bus.open(path, config=BusConfig(breaker=None)) as bus:

        @bus.subscribe("orders", name="billing", retry=QUICK)
        async def bill(event: Event[int], ctx: Context) -> None:
            if event.payload == 3:
                raise ValueError("amount 3 is cursed")
            seen.append(event.payload)
            key = event.key or ""
            ctx.state.set(key, await ctx.state.get(key, 0) + event.payload)

        @bus.workflow("double")
        async def double(wf: object, n: int) -> int:
            return n * 2

        for i in range(6):
            await bus.publish("orders", i, key=f"k{i % 2}", idempotency_key=f"order-{i}")
        await bus.drain(timeout=10)
        handle = await bus.start_workflow("double", 21, workflow_id="w-1")
        assert await handle.result(timeout=10) == 42
    # Events the subscription has not seen yet, published by a bus without it.
    async with Bus.open(path) as bus:
        for i in range(6, 9):
            await bus.publish("orders", i, key=f"k{i % 2}", idempotency_key=f"order-{i}")


async def test_a_sqlite_log_moves_to_postgres_and_the_bus_goes_on(
    log_path: Path, pg_url: str
) -> None:
    before: list[int] = []
    await _sqlite_log(log_path, before)
    assert sorted(before) == [0, 1, 2, 4, 5]
    result = await anyio.run_process(
        [sys.executable, "-m", "eventbus", "migrate", str(log_path), pg_url, "--json"],
        check=True,
    )
    copied = json.loads(result.stdout)
    assert copied["events"] == 9
    assert copied["dead_letters"] == 1
    after: list[int] = []
    async with Bus.open(pg_url, config=BusConfig(breaker=None)) as bus:

        @bus.subscribe("orders", name="billing", retry=QUICK)
        async def bill(event: Event[int], ctx: Context) -> None:
            after.append(event.payload)
            key = event.key or ""
            ctx.state.set(key, await ctx.state.get(key, 0) + event.payload)

        duplicate = await bus.publish("orders", 0, key="k0", idempotency_key="order-0")
        assert (duplicate.seq, duplicate.duplicate) == (1, True)
        await bus.drain(timeout=30)
        assert sorted(after) == [6, 7, 8]  # from where the SQLite log's cursor was
        (dead,) = await bus.dead_letters.list("billing")
        assert (dead.event.payload, dead.event.seq, dead.attempts) == (3, 4, 2)
        assert await bus.state("billing").get("k0") == 0 + 2 + 4 + 6 + 8
        assert await bus.state("billing").get("k1") == 1 + 5 + 7
        run = await bus.get_workflow("w-1")
        assert await run.result(timeout=5) == 42
        receipt = await bus.publish("orders", 9, key="k1")
        assert receipt.seq == 10
        report = await bus.reconcile()
        assert report.ok


def test_migrating_into_a_log_that_is_not_empty_is_refused(
    log_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    anyio.run(_sqlite_log, log_path, [])
    assert main(["migrate", str(log_path), pg_url]) == 0
    assert "copied" in capsys.readouterr().out
    assert main(["migrate", str(log_path), pg_url]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["migrate", str(log_path), str(log_path)]) == 2
    assert "not a PostgreSQL URL" in capsys.readouterr().err
