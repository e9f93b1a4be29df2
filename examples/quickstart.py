"""The quickstart from the README: publish orders, bill them, publish invoices."""

from __future__ import annotations

import tempfile
from pathlib import Path

from eventbus import Bus, Context, Event, RetryPolicy, run


async def main(path: Path) -> None:
    async with Bus.open(path) as bus:

        @bus.subscribe("orders", name="billing", retry=RetryPolicy(max_attempts=5))
        async def bill(event: Event[dict[str, int]], ctx: Context) -> None:
            # Outbox: committed in the same transaction as this event's acknowledgement.
            await ctx.publish("invoices", {"amount": event.payload["amount"]}, key=event.key)

        @bus.subscribe("invoices", name="mailer")
        async def mail(events: list[Event[dict[str, int]]], ctx: Context) -> None:
            for event in events:
                print(f"invoice for {event.key}: {event.payload['amount']}")

        receipt = await bus.publish("orders", {"amount": 5}, key="o-1", idempotency_key="req-1")
        again = await bus.publish("orders", {"amount": 5}, key="o-1", idempotency_key="req-1")
        assert again.duplicate
        assert again.seq == receipt.seq
        await bus.drain(timeout=30)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        run(main(Path(tmp) / "app.db"))
