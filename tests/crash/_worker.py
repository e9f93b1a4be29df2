"""A crash-test worker: publishes numbered events through a bus on a log (a SQLite
file or a PostgreSQL URL) and records what it saw, so that a parent can SIGKILL it at
any moment and check the log.

    python _worker.py LOG HANDLED ACKED COUNT PUBLISHERS

- The subscription ``sink`` appends each handled event's id to HANDLED before the
  handler returns (so before its acknowledgement can commit).
- Each of PUBLISHERS tasks takes the next number ``i`` in ``range(COUNT)`` and
  publishes it with ``idempotency_key=f"evt-{i}"``; once ``publish`` returns it
  appends ``"i seq id duplicate"`` to ACKED.
- Once every number is published it drains the bus and exits 0.

Both files are line-buffered: every line is one ``write`` system call, so a SIGKILL
leaves whole lines in the page cache (a torn last line is possible only in theory,
and the parent ignores one). No fsync: a killed process loses nothing the kernel has.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from eventbus import Bus, BusConfig, Context, Event

TOPIC = "orders"
SUBSCRIPTION = "sink"
KEYS = 7


async def run(log: str, handled: TextIO, acked: TextIO, count: int, publishers: int) -> None:
    config = BusConfig(durability="normal")
    async with Bus.open(log, config=config) as bus:

        @bus.subscribe(TOPIC, name=SUBSCRIPTION)
        async def sink(event: Event[object], ctx: Context) -> None:
            handled.write(f"{event.id}\n")

        numbers = iter(range(count))  # shared: each number is taken by one publisher

        async def publisher() -> None:
            for i in numbers:
                receipt = await bus.publish(
                    TOPIC, {"i": i}, key=f"k{i % KEYS}", idempotency_key=f"evt-{i}"
                )
                acked.write(f"{i} {receipt.seq} {receipt.id} {int(receipt.duplicate)}\n")

        async with asyncio.TaskGroup() as tg:
            for _ in range(publishers):
                tg.create_task(publisher())
        await bus.drain(timeout=60)


def main(argv: list[str]) -> int:
    log, handled_path, acked_path, count, publishers = argv
    with (
        open(handled_path, "a", buffering=1, encoding="utf-8") as handled,
        open(acked_path, "a", buffering=1, encoding="utf-8") as acked,
    ):
        asyncio.run(run(log, handled, acked, int(count), int(publishers)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
