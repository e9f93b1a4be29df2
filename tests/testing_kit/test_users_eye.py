"""The test kit as a user meets it: only ``eventbus.testing`` (enabled in conftest.py
with ``pytest_plugins = ["eventbus.testing"]``) and the public API, nothing from this
project's tests."""

from __future__ import annotations

import asyncio
import time

import anyio
import msgspec
import pytest

from eventbus import Bus, Context, Event, PayloadValidationError, RetryPolicy, Workflow
from eventbus.testing import Faults, Recorder, VirtualClockLoop, faults, open_kit


class Order(msgspec.Struct, frozen=True):
    id: str
    amount: int


class CardDeclined(Exception):
    pass


# Application code, as it would live in the user's package.
charged: list[str] = []


async def charge(order: Order) -> None:
    await faults.point("charge")  # a no-op in production
    charged.append(order.id)


def register_billing(bus: Bus) -> None:
    @bus.subscribe("orders", name="billing", retry=RetryPolicy(max_attempts=4))
    async def billing(event: Event[Order], ctx: Context) -> None:
        await charge(event.payload)
        await ctx.publish("invoices", {"order": event.payload.id, "total": event.payload.amount})


@pytest.fixture(autouse=True)
def _no_charges_yet() -> None:
    charged.clear()


async def test_a_failing_handler_fails_the_test_with_its_own_exception(bus: Bus) -> None:
    @bus.subscribe("orders", name="billing")
    async def billing(event: Event[Order], ctx: Context) -> None:
        raise CardDeclined(f"card declined for {event.payload.id}")

    await bus.publish("orders", Order("o-1", 5), key="o-1")
    with pytest.raises(CardDeclined, match="card declined for o-1") as failure:
        await bus.drain()
    note = " ".join(getattr(failure.value, "__notes__", []))
    assert "subscription 'billing' dead-lettered event" in note
    assert "after 5 attempt(s)" in note  # the default policy's retries ran, in no time


async def test_a_payload_that_does_not_decode_fails_the_test_saying_which_field(bus: Bus) -> None:
    register_billing(bus)
    await bus.publish("orders", {"id": "o-1", "amount": "five"}, key="o-1")
    with pytest.raises(PayloadValidationError, match=r"Expected `int`, got `str` - at `\$.amount`"):
        await bus.drain()
    assert charged == []


async def test_a_retry_an_hour_later_completes_at_once(bus: Bus) -> None:
    attempts: list[float] = []

    @bus.subscribe("orders", retry=RetryPolicy(initial_delay=3600, max_delay=3600, jitter="none"))
    async def billing(event: Event[Order], ctx: Context) -> None:
        attempts.append(anyio.current_time())
        if ctx.attempt == 1:
            raise TimeoutError("the payments API timed out")

    started = time.monotonic()
    await bus.publish("orders", Order("o-1", 5), key="o-1")
    await bus.drain()
    assert len(attempts) == 2
    assert attempts[1] - attempts[0] >= 3600  # an hour on the bus's clock...
    assert time.monotonic() - started < 30  # ...and seconds at most on the wall's


async def test_published_events_and_outbox_events_can_be_asserted(
    bus: Bus, recorder: Recorder
) -> None:
    register_billing(bus)
    await bus.publish("orders", Order("o-1", 5), key="o-1")
    await bus.publish("orders", Order("o-2", 7), key="o-2")
    await bus.drain()
    assert [e.payload for e in recorder.published("orders")] == [
        {"id": "o-1", "amount": 5},
        {"id": "o-2", "amount": 7},
    ]
    invoices = recorder.published("invoices")  # published by the handler, through its outbox
    assert [e.payload for e in invoices] == [
        {"order": "o-1", "total": 5},
        {"order": "o-2", "total": 7},
    ]
    assert [e.topic for e in recorder.published()] == ["orders", "orders", "invoices", "invoices"]


async def test_fault_injection_makes_a_handler_retry_then_succeed(
    bus: Bus, recorder: Recorder, faults: Faults
) -> None:
    register_billing(bus)
    faults.fail("billing", times=2, exc=TimeoutError("the payments API timed out"))
    await bus.publish("orders", Order("o-1", 5), key="o-1")
    await bus.drain()  # no exception: the third attempt succeeded
    assert faults.fired("billing") == 2
    assert charged == ["o-1"]
    assert len(recorder.published("invoices")) == 1
    assert await bus.dead_letters.count() == 0


async def test_a_fault_point_in_application_code_fails_where_it_stands(
    bus: Bus, faults: Faults
) -> None:
    register_billing(bus)
    faults.fail("charge", times=3, exc=ConnectionError)
    await bus.publish("orders", Order("o-1", 5), key="o-1")
    await bus.publish("orders", Order("o-2", 7), key="o-2")
    await bus.drain()
    assert faults.fired("charge") == 3
    assert sorted(charged) == ["o-1", "o-2"]


async def test_a_fault_that_outlasts_the_retries_fails_the_test(bus: Bus, faults: Faults) -> None:
    register_billing(bus)
    faults.fail("charge", times=10, exc=ConnectionError("the payments API is down"))
    await bus.publish("orders", Order("o-1", 5), key="o-1")
    with pytest.raises(ConnectionError, match="payments API is down"):
        await bus.drain()
    assert faults.fired("charge") == 4  # RetryPolicy(max_attempts=4)


async def test_a_workflow_that_sleeps_for_a_day_finishes_at_once(bus: Bus) -> None:
    @bus.workflow("remind")
    async def remind(wf: Workflow, order: Order) -> str:
        await wf.sleep(86_400)
        return await wf.step("send", send_reminder, order.id)

    async def send_reminder(order_id: str) -> str:
        return f"reminded {order_id}"

    started = time.monotonic()
    handle = await bus.start_workflow("remind", Order("o-1", 5))
    assert await handle.result(timeout=2 * 86_400) == "reminded o-1"
    assert time.monotonic() - started < 30


def test_the_kit_opens_without_pytest_fixtures_on_a_virtual_clock_loop() -> None:
    async def main() -> list[object]:
        async with open_kit() as kit:
            register_billing(kit.bus)
            await kit.bus.publish("orders", Order("o-1", 5), key="o-1")
            await kit.bus.drain()
            return [e.payload for e in kit.recorder.published("invoices")]

    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        assert runner.run(main()) == [{"order": "o-1", "total": 5}]
