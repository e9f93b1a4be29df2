"""README, Draining and closing: "Cancelling the task that owns the bus (`task.cancel()`
or an enclosing cancel scope) closes it at once, without waiting for handlers; the
cancellation, or an exception raised in the body, then leaves `Bus.open` as it is
(never wrapped in an exception group)." Guarantee 4: "cancelling or closing the bus is
never counted as" a failed attempt; Retries and dead letters: "Calls abandoned because
the bus closed or its owner was cancelled are released, never counted as deaths."

Each test leaves handler calls blocked in flight with a long `close_timeout`, stops the
owner, then reopens the log with `RetryPolicy(max_attempts=1)`: an abandoned call
counted as a failure or a death would dead-letter its event.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import anyio
import pytest

import eventbus
from eventbus import Bus, BusConfig, Context, Event, Message, RetryPolicy

CLOSE_TIMEOUT = 30.0
IN_FLIGHT = 3
EVENTS = 20
ONE_ATTEMPT = RetryPolicy(max_attempts=1)


class Mine(Exception):
    pass


async def _owner(
    path: Path, started: asyncio.Event, body: str, close_timeout: float = CLOSE_TIMEOUT
) -> None:
    """Opens the bus, subscribes a handler that blocks, publishes, then waits in
    `drain` (the usual place for an owner to be when it is stopped) or raises."""
    config = BusConfig(close_timeout=close_timeout, reconcile_interval=0)
    async with Bus.open(path, config=config) as bus:
        running = 0

        @bus.subscribe("t", name="s", retry=ONE_ATTEMPT, concurrency=IN_FLIGHT)
        async def hang(event: Event[dict[str, int]], ctx: Context) -> None:
            nonlocal running
            running += 1
            if running == IN_FLIGHT:
                started.set()
            await asyncio.Event().wait()

        await bus.publish_many([Message("t", {"n": n}, key=f"k{n}") for n in range(EVENTS)])
        if body == "raise":
            await started.wait()
            raise Mine("raised in the body")
        await bus.drain(timeout=3600)


async def _reopen(path: Path) -> tuple[list[int], int, list[int], int]:
    """Handles what is left with one attempt each: (events handled, dead letters,
    attempts seen, failed attempts counted)."""
    handled: list[int] = []
    attempts: list[int] = []
    async with Bus.open(path, config=BusConfig(reconcile_interval=0)) as bus:

        @bus.subscribe("t", name="s", retry=ONE_ATTEMPT, concurrency=IN_FLIGHT)
        async def ok(event: Event[dict[str, int]], ctx: Context) -> None:
            handled.append(event.payload["n"])
            attempts.append(ctx.attempt)

        await bus.drain(timeout=30)
        dead = await bus.dead_letters.count()
        failed = bus.metrics().subscriptions["s"].failed_attempts
    return handled, dead, attempts, failed


def _check_nothing_blamed(path: Path) -> None:
    handled, dead, attempts, failed = asyncio.run(_reopen(path))
    assert (dead, failed) == (0, 0), "an abandoned call was counted as a failed attempt"
    assert sorted(handled) == list(range(EVENTS))
    assert set(attempts) == {1}, "an abandoned call was counted as an attempt"


def test_cancelling_the_owner_task_closes_the_bus_at_once_and_the_cancellation_leaves_as_is(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log.db"

    async def main() -> tuple[float, BaseException | None, bool]:
        started = asyncio.Event()
        task = asyncio.create_task(_owner(path, started, "drain"))
        await asyncio.wait_for(started.wait(), timeout=10)
        t0 = time.monotonic()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT / 3)
        elapsed = time.monotonic() - t0
        if not done:
            await asyncio.wait({task})
        error = None if task.cancelled() else task.exception()
        return elapsed, error, task.cancelled()

    elapsed, error, cancelled = asyncio.run(main())
    assert error is None, f"the cancellation left as {error!r}"
    assert cancelled
    assert elapsed < 5, f"closing took {elapsed:.1f}s with close_timeout={CLOSE_TIMEOUT}"
    _check_nothing_blamed(path)


def test_an_anyio_cancel_scope_around_the_owner_closes_the_bus_at_once(tmp_path: Path) -> None:
    path = tmp_path / "log.db"

    async def main() -> tuple[float, bool]:
        started = asyncio.Event()
        with anyio.CancelScope() as scope:

            async def stop_when_started() -> None:
                await started.wait()
                scope.cancel()

            waiter = asyncio.create_task(stop_when_started())
            t0 = time.monotonic()
            await _owner(path, started, "drain")
        elapsed = time.monotonic() - t0
        await waiter
        return elapsed, scope.cancelled_caught

    # Whatever escapes the scope (a CancelledError, an exception group) fails here.
    elapsed, caught = anyio.run(main)
    assert caught
    assert elapsed < 5, f"closing took {elapsed:.1f}s with close_timeout={CLOSE_TIMEOUT}"
    _check_nothing_blamed(path)


def test_an_anyio_move_on_after_around_the_owner_closes_the_bus_at_once(tmp_path: Path) -> None:
    path = tmp_path / "log.db"

    async def main() -> tuple[float, bool]:
        started = asyncio.Event()
        deadline = 1.0
        t0 = time.monotonic()
        with anyio.move_on_after(deadline) as scope:
            await _owner(path, started, "drain")
        assert started.is_set(), "the handlers had not all started before the deadline"
        return time.monotonic() - t0 - deadline, scope.cancelled_caught

    late, caught = anyio.run(main)
    assert caught
    assert late < 5, f"closing took {late:.1f}s past the deadline, close_timeout={CLOSE_TIMEOUT}"
    _check_nothing_blamed(path)


def test_an_exception_raised_in_the_body_leaves_bus_open_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    config_timeout = 0.5

    async def main() -> None:
        started = asyncio.Event()
        config = BusConfig(close_timeout=config_timeout, reconcile_interval=0)
        async with Bus.open(path, config=config) as bus:
            running = 0

            @bus.subscribe("t", name="s", retry=ONE_ATTEMPT, concurrency=IN_FLIGHT)
            async def hang(event: Event[dict[str, int]], ctx: Context) -> None:
                nonlocal running
                running += 1
                if running == IN_FLIGHT:
                    started.set()
                await asyncio.Event().wait()

            await bus.publish_many([Message("t", {"n": n}, key=f"k{n}") for n in range(EVENTS)])
            await asyncio.wait_for(started.wait(), timeout=10)
            raise Mine("raised in the body")

    caught: BaseException | None = None
    try:
        asyncio.run(main())
    except Mine as exc:  # a plain except, as a user writes it
        caught = exc
    assert type(caught) is Mine
    assert str(caught) == "raised in the body"
    # The calls still running after close_timeout were abandoned: not failures.
    _check_nothing_blamed(path)


def test_an_exception_raised_in_the_body_under_a_task_group_is_not_wrapped_twice(
    tmp_path: Path,
) -> None:
    # The body's exception leaves Bus.open as it is; a user's own task group wraps it
    # once, never an exception group inside an exception group.
    path = tmp_path / "log.db"

    async def main() -> None:
        started = asyncio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_owner, path, started, "raise", 0.5)

    with pytest.raises(ExceptionGroup) as info:
        anyio.run(main)
    assert [type(e) for e in info.value.exceptions] == [Mine]
    _check_nothing_blamed(path)


@pytest.mark.parametrize("runner", ["asyncio", "eventbus.run"])
def test_cancelling_the_owner_while_retries_run_does_not_count_them_as_attempts(
    tmp_path: Path, runner: str
) -> None:
    # Every event fails its first attempt; the retries block. Cancelling the owner
    # abandons calls of the retry lane: with max_attempts=2 the next open must still
    # give each of them its second attempt, not dead-letter it.
    path = tmp_path / "log.db"
    two = RetryPolicy(max_attempts=2, initial_delay=0.01, jitter="none")

    async def owner(started: asyncio.Event) -> None:
        config = BusConfig(close_timeout=CLOSE_TIMEOUT, reconcile_interval=0)
        async with Bus.open(path, config=config) as bus:
            retrying = 0

            @bus.subscribe("t", name="s", retry=two, concurrency=IN_FLIGHT, breaker=None)
            async def flaky(event: Event[dict[str, int]], ctx: Context) -> None:
                nonlocal retrying
                if ctx.attempt == 1:
                    raise Mine("first attempt")
                retrying += 1
                if retrying == IN_FLIGHT:
                    started.set()
                await asyncio.Event().wait()

            await bus.publish_many([Message("t", {"n": n}, key=f"k{n}") for n in range(EVENTS)])
            await bus.drain(timeout=3600)

    async def main() -> tuple[float, bool]:
        started = asyncio.Event()
        task = asyncio.create_task(owner(started))
        await asyncio.wait_for(started.wait(), timeout=20)
        t0 = time.monotonic()
        task.cancel()
        await asyncio.wait({task}, timeout=CLOSE_TIMEOUT * 2)
        return time.monotonic() - t0, task.cancelled()

    if runner == "asyncio":
        elapsed, cancelled = asyncio.run(main())
    else:
        elapsed, cancelled = eventbus.run(main())
    assert cancelled
    assert elapsed < 5, f"closing took {elapsed:.1f}s with close_timeout={CLOSE_TIMEOUT}"

    async def reopen() -> tuple[list[int], int]:
        handled: list[int] = []
        async with Bus.open(path, config=BusConfig(reconcile_interval=0)) as bus:

            @bus.subscribe("t", name="s", retry=two, concurrency=IN_FLIGHT, breaker=None)
            async def ok(event: Event[dict[str, int]], ctx: Context) -> None:
                handled.append(event.payload["n"])

            await bus.drain(timeout=30)
            return handled, await bus.dead_letters.count()

    handled, dead = asyncio.run(reopen())
    assert dead == 0, "an abandoned retry was counted as its event's last attempt"
    assert sorted(handled) == list(range(EVENTS))
