"""Tests of billing.py with the test kit: ``pytest examples/users_tests``."""

from __future__ import annotations

import time

import anyio
import pytest
from billing import Order, Payments, register

from eventbus import Bus, PayloadValidationError, RetryPolicy
from eventbus.testing import Faults, Recorder


async def test_an_order_is_charged_once_and_invoiced(bus: Bus, recorder: Recorder) -> None:
    payments = Payments()
    register(bus, payments)
    await bus.publish("orders", Order("o-1", 5), key="o-1")
    await bus.drain()
    assert list(payments.charged.values()) == [5]
    assert [e.payload for e in recorder.published("invoices")] == [{"order": "o-1", "total": 5}]


async def test_a_payment_outage_is_retried_until_it_passes(bus: Bus, faults: Faults) -> None:
    payments = Payments()
    register(bus, payments)
    faults.fail("payments.charge", times=3, exc=TimeoutError("payments timed out"))
    await bus.publish("orders", Order("o-1", 5), key="o-1")
    await bus.drain()  # four attempts, with backoff, in no time
    assert faults.fired("payments.charge") == 3
    assert list(payments.charged.values()) == [5]


async def test_a_retry_an_hour_later_completes_at_once(bus: Bus, faults: Faults) -> None:
    payments = Payments()
    register(bus, payments, retry=RetryPolicy(initial_delay=3600, max_delay=3600, jitter="none"))
    faults.fail("payments.charge", times=1, exc=TimeoutError("payments timed out"))
    started, wall = anyio.current_time(), time.monotonic()
    await bus.publish("orders", Order("o-1", 5), key="o-1")
    await bus.drain()
    assert list(payments.charged.values()) == [5]
    assert anyio.current_time() - started >= 3600  # an hour on the bus's clock...
    assert time.monotonic() - wall < 30  # ...and seconds at most on the wall's


async def test_an_order_without_an_amount_fails_the_test_with_the_handlers_error(
    bus: Bus,
) -> None:
    register(bus, Payments())
    await bus.publish("orders", Order("o-1", 0), key="o-1")
    with pytest.raises(ValueError, match="no amount to charge"):
        await bus.drain()


async def test_a_malformed_order_is_refused_with_the_field_at_fault(bus: Bus) -> None:
    register(bus, Payments())
    await bus.publish("orders", {"id": "o-1", "amount": "5"}, key="o-1")
    with pytest.raises(PayloadValidationError, match=r"at `\$\.amount`"):
        await bus.drain()
