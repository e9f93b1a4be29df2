"""Cancelling the task that owns a bus closes it at once; the calls it abandons are
released, not counted as deaths; the cancellation and the body's own exceptions
leave ``Bus.open`` as they are."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import pytest

from eventbus import Bus, BusConfig, Context, DrainTimeout, Event, RetryPolicy

pytestmark = pytest.mark.anyio

# Long enough that waiting for it would time the test out.
PATIENT = BusConfig(close_timeout=3600)


async def _hang_in_a_handler(path: Path, started: anyio.Event) -> None:
    async with Bus.open(path, config=PATIENT) as bus:

        @bus.subscribe("t", name="s", retry=RetryPolicy(max_attempts=1))
        async def handler(event: Event[int], ctx: Context) -> None:
            started.set()
            await anyio.sleep_forever()

        await bus.publish("t", 1)
        await anyio.sleep_forever()


async def _handled_after_reopen(path: Path) -> tuple[list[int], int]:
    attempts: list[int] = []
    async with Bus.open(path) as bus:

        @bus.subscribe("t", name="s", retry=RetryPolicy(max_attempts=1))
        async def handler(event: Event[int], ctx: Context) -> None:
            attempts.append(ctx.attempt)

        await bus.drain(timeout=10)
        dead = len(await bus.dead_letters.list("s"))
    return attempts, dead


async def test_task_cancel_closes_at_once_and_the_abandoned_call_is_not_a_death(
    log_path: Path,
) -> None:
    started = anyio.Event()
    task = asyncio.get_running_loop().create_task(_hang_in_a_handler(log_path, started))
    with anyio.fail_after(10):
        await started.wait()
    task.cancel()
    with anyio.fail_after(10):  # not close_timeout (an hour)
        with pytest.raises(asyncio.CancelledError):
            await task
    # max_attempts=1: a death counted against it would dead-letter it unhandled.
    assert await _handled_after_reopen(log_path) == ([1], 0)


async def test_an_enclosing_cancel_scope_closes_at_once_too(log_path: Path) -> None:
    started = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_hang_in_a_handler, log_path, started)
            await started.wait()
            tg.cancel_scope.cancel()
    assert await _handled_after_reopen(log_path) == ([1], 0)


async def test_the_bodys_own_exception_leaves_as_it_is() -> None:
    class Mine(Exception):
        pass

    async def body() -> None:
        async with Bus.open(":memory:") as bus:

            @bus.subscribe("t", name="s")
            async def handler(event: Event[int], ctx: Context) -> None:
                pass

            await bus.publish("t", 1)
            raise Mine("raised in the body")

    with pytest.raises(Mine):
        await body()


async def test_a_drain_timeout_can_be_caught_with_a_plain_except() -> None:
    caught: list[DrainTimeout] = []
    try:
        async with Bus.open(":memory:", config=BusConfig(close_timeout=0.1)) as bus:

            @bus.subscribe("t", name="s")
            async def handler(event: Event[int], ctx: Context) -> None:
                await anyio.sleep_forever()

            await bus.publish("t", 1)
            await bus.drain(timeout=0.05)
    except DrainTimeout as exc:  # a plain except, no exception group
        caught.append(exc)
    assert len(caught) == 1
    assert "1 calls in flight" in str(caught[0])
