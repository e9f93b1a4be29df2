"""A handler call running longer than the reconcile lease is cancelled as a failed
attempt (HandlerStuck) and retried; the bus closing still abandons calls as before."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from eventbus import Bus, BusConfig, Context, Event, Message, RetryPolicy

pytestmark = pytest.mark.anyio

QUICK = RetryPolicy(max_attempts=3, initial_delay=0.0, max_delay=0.0, jitter="none")
LEASE = 300.0  # seconds of the virtual clock: the tests take no wall time


@pytest.mark.virtual_clock
async def test_a_stuck_call_is_cancelled_by_bus_reconcile_and_succeeds_on_attempt_2() -> None:
    hanging = anyio.Event()
    second = anyio.Event()
    attempts: list[tuple[int, int]] = []
    started = 0.0
    config = BusConfig(reconcile_interval=0, reconcile_lease=LEASE)
    async with Bus.open(":memory:", config=config) as bus:

        @bus.subscribe("orders", name="billing", retry=QUICK)
        async def bill(event: Event[int], ctx: Context) -> None:
            nonlocal started
            attempts.append((event.payload, ctx.attempt))
            if event.payload == 1 and ctx.attempt == 1:
                started = anyio.current_time()
                hanging.set()
                await anyio.Event().wait()  # never set
            if event.payload == 1:
                second.set()
            ctx.state.set(str(event.payload), ctx.attempt)

        receipts = [await bus.publish("orders", i, key=f"k-{i}") for i in range(4)]
        with anyio.fail_after(3600):
            await hanging.wait()
        early = await bus.reconcile()
        assert early.stuck == 0  # not past the lease yet
        # The one condition here that only the clock changes: wait for the lease to pass.
        await anyio.sleep_until(started + LEASE + 0.01)

        report = await bus.reconcile()
        billing = report.subscription("billing")
        assert (billing.stuck, billing.stuck_seqs) == (1, (receipts[1].seq,))
        assert billing.repaired.stuck == 1
        assert report.ok  # stuck is not lost
        with anyio.fail_after(3600):
            await second.wait()
        await bus.drain(timeout=3600)
        assert (1, 2) in attempts
        # The events behind it in the batch were handled once, at their first attempt.
        assert sorted(a for a in attempts if a[0] != 1) == [(0, 1), (2, 1), (3, 1)]
        assert await bus.state("billing").get("1") == 2
        assert await bus.dead_letters.list() == []
        after = await bus.reconcile()
        assert (after.stuck, after.lost, after.retrying) == (0, 0, 0)


@pytest.mark.virtual_clock
async def test_the_periodic_pass_cancels_a_stuck_call_without_being_asked() -> None:
    second = anyio.Event()
    config = BusConfig(reconcile_interval=60, reconcile_lease=LEASE)
    async with Bus.open(":memory:", config=config) as bus:

        @bus.subscribe("orders", name="billing", retry=QUICK)
        async def bill(event: Event[int], ctx: Context) -> None:
            if ctx.attempt == 1:
                await anyio.Event().wait()
            second.set()

        await bus.publish("orders", 1)
        with anyio.fail_after(3600):
            await second.wait()
        await bus.drain(timeout=3600)
        metrics = bus.metrics().reconcile
        assert metrics is not None
        assert metrics.repaired_total == 1
        assert metrics.last_run_at is not None


@pytest.mark.virtual_clock
async def test_a_handler_that_hangs_forever_ends_dead_lettered_as_stuck() -> None:
    calls = 0
    config = BusConfig(reconcile_interval=60, reconcile_lease=LEASE)
    async with Bus.open(":memory:", config=config) as bus:

        @bus.subscribe("orders", name="billing", retry=QUICK)
        async def bill(event: Event[int], ctx: Context) -> None:
            nonlocal calls
            calls += 1
            if event.payload == 0:
                await anyio.Event().wait()

        for i in range(3):
            await bus.publish("orders", i)
        await bus.drain(timeout=3600)  # the main lane, then two retry-lane attempts
        (dead,) = await bus.dead_letters.list(subscription="billing")
        assert dead.event.payload == 0
        assert dead.attempts == QUICK.max_attempts
        assert dead.error_type == "eventbus._errors.HandlerStuck"
        assert "ran longer than the reconcile lease (300s)" in dead.error_message
        assert calls == QUICK.max_attempts + 2


@pytest.mark.virtual_clock
async def test_a_stuck_batch_call_sends_its_events_to_the_retry_lane_one_by_one() -> None:
    batches: list[list[tuple[int, int]]] = []
    config = BusConfig(reconcile_interval=60, reconcile_lease=LEASE)
    async with Bus.open(":memory:", config=config) as bus:

        @bus.subscribe("orders", name="audit", retry=QUICK)
        async def audit(events: list[Event[int]], ctx: Context) -> None:
            batches.append([(e.payload, ctx.attempt) for e in events])
            if ctx.attempt == 1 and any(e.payload == 2 for e in events):
                await anyio.Event().wait()

        await bus.publish_many([Message("orders", i) for i in range(5)])
        await bus.drain(timeout=3600)
        retried = [b for b in batches if b[0][1] == 2]
        stuck_batch = next(b for b in batches if (2, 1) in b)
        # Not split in halves (each could hang a lease): every event of the stuck call
        # ran once more, alone, on the retry lane.
        assert sorted(retried) == sorted([[(p, 2)] for p, _ in stuck_batch])
        assert await bus.dead_letters.list() == []


async def test_closing_the_bus_abandons_a_hanging_call_rather_than_failing_it(
    log_path: Path,
) -> None:
    hanging = anyio.Event()
    config = BusConfig(reconcile_interval=0, close_timeout=0.1)
    async with Bus.open(log_path, config=config) as bus:

        @bus.subscribe("orders", name="billing", retry=QUICK)
        async def bill(event: Event[int], ctx: Context) -> None:
            hanging.set()
            await anyio.Event().wait()

        await bus.publish("orders", 1)
        with anyio.fail_after(10):
            await hanging.wait()
    # Abandoned at close, not a failed attempt: delivered again, at attempt 1.
    seen: list[int] = []
    async with Bus.open(log_path, config=config) as bus:
        assert (await bus.stats()).retries == {}

        @bus.subscribe("orders", name="billing", retry=QUICK)
        async def bill_again(event: Event[int], ctx: Context) -> None:
            seen.append(ctx.attempt)

        await bus.drain(timeout=10)
        assert seen == [1]
