"""A small billing service, as an application would write it: a typed handler that
charges each order and publishes an invoice through the outbox. Its tests are in
test_billing.py (``pytest examples/users_tests``)."""

from __future__ import annotations

import msgspec

from eventbus import Bus, Context, Event, RetryPolicy
from eventbus.testing import faults


class Order(msgspec.Struct, frozen=True):
    id: str
    amount: int


class Invoice(msgspec.Struct, frozen=True):
    order: str
    total: int


class Payments:
    """Stands for a payment provider's client."""

    def __init__(self) -> None:
        self.charged: dict[str, int] = {}

    async def charge(self, order: Order, *, idempotency_key: str) -> None:
        await faults.point("payments.charge")  # a no-op outside tests
        self.charged.setdefault(idempotency_key, order.amount)


def register(bus: Bus, payments: Payments, retry: RetryPolicy | None = None) -> None:
    """Subscribe the billing handler (five attempts, unless ``retry`` says otherwise)."""

    @bus.subscribe("orders", name="billing", retry=retry or RetryPolicy(max_attempts=5))
    async def billing(event: Event[Order], ctx: Context) -> None:
        order = event.payload  # an Order: decoded by the bus
        if order.amount <= 0:
            raise ValueError(f"order {order.id} has no amount to charge")
        await payments.charge(order, idempotency_key=ctx.idempotency_key)
        await ctx.publish("invoices", Invoice(order.id, order.amount), key=event.key)
