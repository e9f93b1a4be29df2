"""A crash right after republishing known idempotency keys loses no later event.

Regression test, found by ``test_sigkill.py``: every restart there republishes from
0, so its first group commits hold only duplicates. A crash-loop marker that once rode
on group commits pointed past the head then, and recovery skipped the events that
later took those sequence numbers for good. Deaths are now blamed through the call
journal, on exact events; this pins that nothing after such a crash is skipped.

The crash is taken in-process: the database, its WAL and the call journal are copied
while the bus is open (what a SIGKILL leaves on disk), and a new bus opens the copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from eventbus import Bus, Context, Event
from eventbus.storage import SQLiteStorage

pytestmark = pytest.mark.anyio

KNOWN = 16


def _copy_log(src: Path, dst: Path) -> None:
    """What a SIGKILL leaves: the database, its WAL and the call journal."""
    shutil.copy(src, dst)
    for suffix in ("-wal", "-calls"):
        extra = Path(f"{src}{suffix}")
        if extra.exists():
            shutil.copy(extra, f"{dst}{suffix}")


async def _head(path: Path) -> int:
    log = SQLiteStorage(path, read_only=True)
    await log.open()
    try:
        return log.head
    finally:
        await log.close()


async def test_events_published_after_a_crash_that_follows_duplicate_publishes_are_delivered(
    tmp_path: Path,
) -> None:
    path, crashed = tmp_path / "events.db", tmp_path / "crashed.db"
    async with Bus.open(path) as bus:

        @bus.subscribe("orders", name="sink")
        async def sink(event: Event[int], ctx: Context) -> None:
            pass

        for i in range(KNOWN):
            await bus.publish("orders", i, idempotency_key=f"evt-{i}")
        await bus.drain(timeout=10)
        # A restarted producer publishes again what it is not sure of.
        for i in range(KNOWN):
            receipt = await bus.publish("orders", i, idempotency_key=f"evt-{i}")
            assert receipt.duplicate
        await bus.drain(timeout=10)
        _copy_log(path, crashed)  # the process dies here

    assert await _head(crashed) == KNOWN

    seen: list[int] = []
    async with Bus.open(crashed) as bus:

        @bus.subscribe("orders", name="sink")
        async def sink_again(event: Event[int], ctx: Context) -> None:
            seen.append(event.seq)

        await bus.drain(timeout=10)
        for i in range(KNOWN, KNOWN + 4):
            await bus.publish("orders", i, idempotency_key=f"evt-{i}")
        await bus.drain(timeout=10)

    # Events published after the restart reach the subscription, in order, once.
    assert seen == list(range(KNOWN + 1, KNOWN + 5))
