"""Testing your handlers: an in-memory bus, drained with ``raise_failures=True``.

Copy this file beside your tests. It needs pytest and anyio's pytest plugin (which
comes with anyio, a dependency of eventbus): ``pytest examples/test_handlers.py``.
"""

from __future__ import annotations

import pytest

from eventbus import Bus, BusConfig, Context, DeadLettered, Event, RetryPolicy

# A test wants a failure at once, not after five attempts spaced by backoff.
TEST_CONFIG = BusConfig(retry=RetryPolicy(max_attempts=1))


def register_billing(bus: Bus) -> None:
    """The code under test: the application registers its handlers on a bus."""

    @bus.subscribe("orders", name="billing")
    async def bill(event: Event[dict[str, int]], ctx: Context) -> None:
        amount, customer = event.payload["amount"], event.key or ""
        if amount <= 0:
            raise ValueError(f"order for {customer}: amount must be positive, got {amount}")
        total = await ctx.state.get(customer, 0)
        assert isinstance(total, int)  # state values come back as msgspec decodes them
        ctx.state.set(customer, total + amount)
        await ctx.publish("invoices", {"amount": amount}, key=customer)


@pytest.mark.anyio
async def test_billing_adds_up_per_customer_and_publishes_an_invoice() -> None:
    async with Bus.open(":memory:", config=TEST_CONFIG) as bus:
        register_billing(bus)
        invoices: list[int] = []

        @bus.subscribe("invoices", name="invoices-seen")
        async def seen(event: Event[dict[str, int]], ctx: Context) -> None:
            invoices.append(event.payload["amount"])

        await bus.publish("orders", {"amount": 5}, key="c-1")
        await bus.publish("orders", {"amount": 7}, key="c-1")
        await bus.drain(timeout=5, raise_failures=True)  # a failure raises here

        assert await bus.state("billing").get("c-1", 0) == 12
        assert invoices == [5, 7]


@pytest.mark.anyio
async def test_a_bad_order_fails_the_test_instead_of_passing_silently() -> None:
    async with Bus.open(":memory:", config=TEST_CONFIG) as bus:
        register_billing(bus)
        await bus.publish("orders", {"amount": 0}, key="c-2")
        with pytest.raises(DeadLettered) as caught:
            await bus.drain(timeout=5, raise_failures=True)
        assert isinstance(caught.value.__cause__, ValueError)  # the handler's own error
        assert caught.value.count == 1
