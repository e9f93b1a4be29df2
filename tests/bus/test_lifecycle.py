"""Opening, owning and closing a log: locks, bad files, cancellation."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

import eventbus
from eventbus import (
    Bus,
    BusConfig,
    BusError,
    Context,
    Event,
    LogLocked,
    NotALog,
    StorageError,
)

pytestmark = pytest.mark.anyio


async def test_a_second_process_cannot_open_a_log_this_process_owns(log_path: Path) -> None:
    # A SQLite log; processes share a PostgreSQL log (tests/bus/test_shared_log.py).
    log_url = str(log_path)
    script = textwrap.dedent(
        f"""
        import anyio, eventbus
        async def main():
            try:
                async with eventbus.Bus.open({str(log_url)!r}):
                    print("opened")
            except eventbus.LogLocked as exc:
                print("refused:", exc)
        anyio.run(main)
        """
    )
    async with Bus.open(log_url) as bus:
        await bus.publish("t", 1)
        result = await anyio.run_process([sys.executable, "-c", script], check=True)
    out = result.stdout.decode()
    assert out.startswith("refused:")
    assert f"pid {os.getpid()}" in out


async def test_the_lock_is_released_when_the_bus_closes(log_path: Path) -> None:
    log_url = str(log_path)
    async with Bus.open(log_url):
        with pytest.raises(LogLocked) as info:
            async with Bus.open(log_url):
                pass
        assert isinstance(info.value, StorageError)
        assert isinstance(info.value, BusError)
    async with Bus.open(log_url) as bus:
        await bus.publish("t", 1)


async def test_a_foreign_file_is_a_clear_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000))
    with pytest.raises(NotALog, match="not an event log"):
        async with Bus.open(path):
            pass


async def test_cancelling_the_body_closes_the_bus_and_frees_the_log(log_url: str) -> None:
    started = anyio.Event()
    handled: list[int] = []

    async def app() -> None:
        async with Bus.open(log_url) as bus:

            @bus.subscribe("t", name="s")
            async def handler(event: Event[int], ctx: Context) -> None:
                handled.append(event.payload)
                started.set()
                await anyio.sleep_forever()

            await bus.publish("t", 1)
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(app)
        await started.wait()
        tg.cancel_scope.cancel()
    # The log is free again and the abandoned event comes back.
    async with Bus.open(log_url) as bus:

        @bus.subscribe("t", name="s")
        async def again(event: Event[int], ctx: Context) -> None:
            handled.append(event.payload)

        await bus.drain(timeout=10)
    assert handled == [1, 1]


async def test_close_flushes_publish_nowait_events(log_url: str) -> None:
    async with Bus.open(log_url) as bus:
        for i in range(100):
            bus.publish_nowait("t", i)
    async with Bus.open(log_url) as bus:
        assert (await bus.stats()).head == 100


async def test_close_is_idempotent_and_waits_for_in_flight_batches(log_url: str) -> None:
    release = anyio.Event()
    finished: list[int] = []
    async with Bus.open(log_url, config=BusConfig(close_timeout=10)) as bus:

        @bus.subscribe("t", name="s")
        async def handler(event: Event[int], ctx: Context) -> None:
            release.set()
            await anyio.lowlevel.checkpoint()
            finished.append(event.payload)

        await bus.publish("t", 1)
        await release.wait()
        await bus.close()
        await bus.close()
    assert finished == [1]
    async with Bus.open(log_url) as bus:
        stats = await bus.stats()
    assert stats.lag == {"s": 0}


async def test_compaction_removes_only_events_every_subscription_finished(
    log_url: str,
) -> None:
    config = BusConfig(retention=0.0)
    async with Bus.open(log_url, config=config) as bus:
        gate = anyio.Event()
        slow_blocked = anyio.Event()
        fast_done = anyio.Event()

        @bus.subscribe("t", name="fast")
        async def fast(event: Event[int], ctx: Context) -> None:
            if event.payload == 9:
                fast_done.set()

        @bus.subscribe("t", name="slow")
        async def slow(event: Event[int], ctx: Context) -> None:
            if event.payload >= 5:
                slow_blocked.set()
                await gate.wait()

        for i in range(5):
            await bus.publish("t", i)
        await bus.drain(timeout=10)
        for i in range(5, 10):
            await bus.publish("t", i)
        await slow_blocked.wait()
        await fast_done.wait()
        removed = await bus.compact()
        assert removed == 5  # "slow" has not finished events 6..10
        gate.set()
        await bus.drain(timeout=10)
        assert await bus.compact() == 5
        stats = await bus.stats()
    assert stats.events == 0
    assert stats.head == 10


def test_the_public_api_is_listed_sorted_and_importable() -> None:
    assert eventbus.__all__ == sorted(eventbus.__all__)
    for name in eventbus.__all__:
        assert getattr(eventbus, name) is not None
    for name in ("Bus", "BusConfig", "Event", "Context", "RetryPolicy", "BatchPolicy"):
        assert name in eventbus.__all__
    errors = [getattr(eventbus, n) for n in eventbus.__all__ if n.endswith(("Error", "Full"))]
    assert all(issubclass(e, eventbus.BusError) for e in errors)
