"""A worker whose handler kills the whole process on one event (like a segfault).

    python _poison_worker.py LOG_FILE HANDLED_FILE

Publishes events 0..19 once (idempotently), subscribes "sink", and exits 0 once
every event is done or dead-lettered. Handling event 7 calls os._exit(13).
"""

from __future__ import annotations

import os
import sys

import anyio

from eventbus import Bus, Context, Event, Message, RetryPolicy


async def main(path: str, handled_path: str) -> None:
    retry = RetryPolicy(max_attempts=3, initial_delay=0.0, max_delay=0.0)
    # Line-buffered and written before the handler returns: survives the process.
    with open(handled_path, "a", buffering=1) as handled:  # noqa: ASYNC230 - a test log
        async with Bus.open(path) as bus:

            @bus.subscribe("t", name="sink", retry=retry)
            async def sink(event: Event[int], ctx: Context) -> None:
                if event.payload == 7:
                    os._exit(13)  # the point: the process dies mid-handler
                handled.write(f"{event.payload}\n")

            await bus.publish_many(
                Message("t", i, key=f"k{i % 3}", idempotency_key=f"e-{i}") for i in range(20)
            )
            await bus.drain(timeout=30)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])
