"""A write lock held by another connection: bounded by busy_timeout, then a clear,
retryable error that names the holder; the bus keeps serving once it is released."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest

import eventbus
from eventbus import Bus, BusConfig, LogLocked

pytestmark = pytest.mark.anyio

HOLD_LOCK = textwrap.dedent(
    """
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")  # SQLite's write lock, as an operator's shell takes it
    print("locked", flush=True)
    sys.stdin.readline()
    conn.execute("ROLLBACK")
    """
)


def release(proc: subprocess.Popen[str]) -> None:
    proc.communicate("\n", timeout=10)  # and closes the pipes
    assert proc.returncode == 0


async def test_a_publish_blocked_by_a_lock_held_elsewhere_fails_after_busy_timeout(
    log_path: Path,
) -> None:
    # Regression: the commit was retried five times, each waiting busy_timeout: a
    # publish waited about six times busy_timeout, then said only "database is locked".
    async with Bus.open(log_path, config=BusConfig(busy_timeout=0.4)) as bus:
        await bus.publish("orders", 1)  # the WAL exists before the other process starts
        holder = await anyio.to_thread.run_sync(_start_holder, log_path)
        try:
            started = time.monotonic()
            with pytest.raises(eventbus.LogBusy) as info:
                await bus.publish("orders", 2)
            waited = time.monotonic() - started
            # Five retries of busy_timeout each made it more than 4 s.
            assert 0.35 <= waited < 2.0, f"waited {waited:.2f}s for busy_timeout=0.4"
            error = info.value
            assert isinstance(error, eventbus.StorageError)
            assert error.waited == 0.4
            assert f"pid {holder.pid}" in str(error)
            assert [h for h in error.holders if h.startswith(f"pid {holder.pid} (")]
            assert "retryable" in str(error)
            assert "busy_timeout" in str(error)
        finally:
            await anyio.to_thread.run_sync(release, holder)
        receipt = await bus.publish("orders", 3)  # the same bus works again
        assert receipt.seq == 2


def _start_holder(log_path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(log_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "locked\n"
    return proc


async def test_the_log_locked_message_offers_only_what_exists(
    log_path: Path, tmp_path: Path
) -> None:
    # Regression: it suggested "the PostgreSQL backend" before there was one. Now that
    # a log can be shared (BusConfig(shared=True), PostgreSQL), it offers those, and
    # each works as it says.
    async with Bus.open(log_path):
        with pytest.raises(LogLocked) as info:
            async with Bus.open(log_path):
                pass
    message = str(info.value)
    assert f"pid {os.getpid()}" in message
    assert "Stop that process, or use a different file" in message
    assert "BusConfig(shared=True) in every process" in message
    assert "eventbus migrate FILE postgresql://" in message
    shared = tmp_path / "shared.db"
    async with (
        Bus.open(shared, config=BusConfig(shared=True)) as first,
        Bus.open(shared, config=BusConfig(shared=True)) as second,
    ):
        await first.publish("orders", 1)
        assert (await second.publish("orders", 2)).seq == 2
    helped = await anyio.run_process(
        [str(Path(sys.executable).parent / "eventbus"), "migrate", "--help"], check=False
    )
    assert helped.returncode == 0, helped.stderr
    assert "PostgreSQL" in helped.stdout.decode()
