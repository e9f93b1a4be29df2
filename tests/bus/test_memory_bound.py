"""Memory stays bounded when a producer outruns its consumer ten to one.

Guarantee 7: consumer lag is absorbed by the log. A subscription that falls behind
reads its backlog from the file in pages instead of buffering it, so the process's
memory does not grow with the backlog.
"""

from __future__ import annotations

import asyncio
import gc
import re
import sys
import time
from pathlib import Path

import pytest

from eventbus import BatchPolicy, Bus, Context, Event, Message

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform != "linux", reason="reads the RSS from /proc"),
]

EVENTS = 200_000
CHUNK = 1_000  # events per publish_many
RATIO = 10  # the producer publishes this many events per event the consumer handles
PAYLOAD = {"order": "o-123456", "amount": 12_345, "note": "x" * 64}  # ~100 bytes encoded
# What 200,000 such events would hold if anything buffered them all: well over
# 200 MiB as decoded Events, ~60 MiB even as encoded records. The bus's own buffers
# are bounded by its settings (writer queue, channel, recent-events window, SQLite's
# page cache), a few tens of MiB at most with the defaults.
BOUND = 48 * 1024 * 1024


def rss() -> int:
    """The resident set size of this process, in bytes."""
    with open("/proc/self/status") as f:
        match = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.MULTILINE)
    assert match is not None
    return int(match.group(1)) * 1024


async def test_memory_stays_bounded_with_a_producer_ten_times_faster_than_its_consumer(
    log_path: Path,
) -> None:
    published = 0
    handled = 0
    producer_done = False
    progress = asyncio.Event()
    peak = 0
    lag_seen = 0
    read_from_log = False

    gc.collect()
    async with Bus.open(log_path) as bus:

        @bus.subscribe("orders", name="slow", batch=BatchPolicy(mode="natural"))
        async def slow(events: list[Event[dict[str, object]]], ctx: Context) -> None:
            nonlocal handled
            # The consumer may only have handled a tenth of what was published.
            while not producer_done and (handled + len(events)) * RATIO > published:
                progress.clear()
                await progress.wait()
            handled += len(events)

        async def sample() -> None:
            nonlocal peak, lag_seen, read_from_log
            while True:
                peak = max(peak, rss())
                metrics = bus.metrics().subscriptions["slow"]
                lag_seen = max(lag_seen, metrics.lag)
                read_from_log = read_from_log or not metrics.live
                await asyncio.sleep(0.01)

        baseline = rss()
        started = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            sampler = tg.create_task(sample())
            for _ in range(EVENTS // CHUNK):
                await bus.publish_many([Message("orders", PAYLOAD)] * CHUNK)
                published += CHUNK
                progress.set()
            produced_in = time.monotonic() - started
            handled_while_producing = handled
            producer_done = True
            progress.set()
            await bus.drain(timeout=60)
            sampler.cancel()
        peak = max(peak, rss())

    assert handled == EVENTS
    # Ten to one while the producer ran: the backlog went to the log, not to memory.
    assert handled_while_producing * RATIO <= EVENTS
    assert lag_seen >= EVENTS * 0.8
    assert read_from_log
    growth = peak - baseline
    assert growth < BOUND, (
        f"RSS grew by {growth / 2**20:.1f} MiB (limit {BOUND / 2**20:.0f} MiB) while "
        f"{EVENTS} events were published in {produced_in:.1f} s"
    )
