"""A two-stage pipeline that stays exactly once across restarts (kill it and rerun).

    python examples/pipeline.py --path pipeline.db [--events 2000]

Stage 1, "billing", keeps each customer's running total in ctx.state and publishes an
invoice through the outbox: both commit with the order's acknowledgement. Stage 2,
"mailer", sends each invoice through an outside call made idempotent with
eventbus.idempotent and ctx.idempotency_key. Orders are published with idempotency
keys, so a restarted run simply publishes them all again.

Kill it at any moment (kill -9) and run it again: at the end every customer's total
is exact, and every invoice was sent once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anyio

import eventbus
from eventbus import Bus, Context, Event, Message, run

CUSTOMERS = 10


async def main(path: Path, events: int) -> int:
    sent = path.with_suffix(".sent")  # the "outside world": one line per invoice sent
    async with Bus.open(path) as bus:

        @eventbus.idempotent(bus)
        async def send_invoice(customer: str, amount: int, *, idempotency_key: str) -> str:
            async with await anyio.open_file(sent, "a") as out:
                await out.write(f"{idempotency_key} {customer} {amount}\n")
            return f"sent:{idempotency_key}"

        @bus.subscribe("orders", name="billing")
        async def bill(event: Event[dict[str, int]], ctx: Context) -> None:
            customer = event.key or "?"
            total = await ctx.state.get(customer, 0)
            assert isinstance(total, int)
            ctx.state.set(customer, total + event.payload["amount"])
            await ctx.publish("invoices", event.payload, key=customer)

        @bus.subscribe("invoices", name="mailer")
        async def mail(event: Event[dict[str, int]], ctx: Context) -> None:
            key = ctx.idempotency_key
            await send_invoice(event.key or "?", event.payload["amount"], idempotency_key=key)

        await bus.publish_many(
            Message(
                "orders",
                {"n": n, "amount": n % 7 + 1},
                key=f"c{n % CUSTOMERS}",
                idempotency_key=f"order-{n}",
            )
            for n in range(events)
        )
        await bus.drain(timeout=300)
        totals = {k: v async for k, v in bus.state("billing").items()}
    expected: dict[str, int] = {}
    for n in range(events):
        expected[f"c{n % CUSTOMERS}"] = expected.get(f"c{n % CUSTOMERS}", 0) + n % 7 + 1
    lines = (await anyio.Path(sent).read_text()).splitlines()
    keys = [line.split()[0] for line in lines]
    print(f"totals exact: {totals == expected}")
    print(f"invoices sent: {len(set(keys))} of {events}; sent twice: {len(keys) - len(set(keys))}")
    ok = totals == expected and len(set(keys)) == events
    print("OK: exactly once" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path", type=Path, required=True)
    parser.add_argument("--events", type=int, default=2000)
    args = parser.parse_args()
    sys.exit(run(main(args.path, args.events)))
