"""Push 100,000 order events through two subscriptions on a SQLite log.

    python examples/demo.py [--events N] [--path FILE] [--durability normal|full|off]

"billing" handles one event at a time and keeps a running total per customer;
"audit" takes batches. A progress line shows throughput; at the end every
published event is accounted for in both subscriptions, from the log file itself.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anyio

from eventbus import Bus, BusConfig, Context, Event, Message, run

CUSTOMERS = 100


async def main(events: int, path: Path, durability: str) -> int:
    config = BusConfig.from_dict({"durability": durability})
    totals: dict[str, int] = {}
    audited = 0
    started = time.perf_counter()
    async with Bus.open(path, config=config) as bus:

        @bus.subscribe("orders", name="billing")
        async def bill(event: Event[dict[str, int]], ctx: Context) -> None:
            customer = event.key or "?"
            totals[customer] = totals.get(customer, 0) + event.payload["amount"]

        @bus.subscribe("orders", name="audit")
        async def audit(batch: list[Event[dict[str, int]]], ctx: Context) -> None:
            nonlocal audited
            audited += len(batch)

        async def report() -> None:
            while True:
                await anyio.sleep(0.5)
                m = bus.metrics()
                done = min(s.handled for s in m.subscriptions.values())
                rate = done / (time.perf_counter() - started)
                sys.stdout.write(
                    f"\r  published {m.head:>8,}  handled {done:>8,}  {rate:>9,.0f} events/s"
                )
                sys.stdout.flush()

        async with anyio.create_task_group() as tg:
            tg.start_soon(report)
            chunk = 1000
            for first in range(0, events, chunk):
                await bus.publish_many(
                    Message(
                        "orders",
                        {"amount": i % 50 + 1, "n": i},
                        key=f"customer-{i % CUSTOMERS}",
                    )
                    for i in range(first, min(first + chunk, events))
                )
            await bus.drain(timeout=600)
            tg.cancel_scope.cancel()
        elapsed = time.perf_counter() - started
        stats = await bus.stats()
    expected_total = sum(i % 50 + 1 for i in range(events))
    sys.stdout.write("\r" + " " * 72 + "\r")
    print(
        f"  published {events:,} events in {elapsed:.2f}s: {events / elapsed:,.0f} events/s"
        " (publish -> handled -> acknowledged, two subscriptions)"
    )
    print("accounting (read back from the log file):")
    print(f"  log head seq           {stats.head:,}")
    for sub in stats.subscriptions:
        print(
            f"  {sub.name:<8} cursor {sub.cursor:>10,}  lag {stats.lag[sub.name]:>6}  "
            f"dead {stats.dead_letters.get(sub.name, 0)}"
        )
    print(f"  billing total          {sum(totals.values()):,} (expected {expected_total:,})")
    print(f"  audit saw              {audited:,} events")
    ok = (
        sum(totals.values()) == expected_total
        and audited == events
        and all(lag == 0 for lag in stats.lag.values())
    )
    print("OK: every event handled exactly once by each subscription" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--path", type=Path, default=None, help="log file (default: a temp file)")
    parser.add_argument("--durability", default="normal", choices=["normal", "full", "off"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.path or Path(tmp) / "demo.db"
        sys.exit(run(main(args.events, path, args.durability)))
