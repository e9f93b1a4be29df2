"""A service under ``eventbus.run``, stopped by a signal in test_graceful_stop.py.

It publishes one order and says ``handling`` once its handler has started; the handler
then waits for a line on stdin before it writes state and an outbox event. When the
signal lands the body queues one more event with ``publish_nowait`` and says
``stopping``; the bus then closes, waiting for that handler.
"""

from __future__ import annotations

import asyncio
import sys

import eventbus
from eventbus import Bus, BusConfig, Context, Event


def say(*words: object) -> None:
    sys.stdout.write(" ".join(map(str, words)) + "\n")
    sys.stdout.flush()


async def main(path: str) -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    async with Bus.open(path, config=BusConfig(close_timeout=30)) as bus:

        @bus.subscribe("orders", name="billing")
        async def bill(event: Event[int], ctx: Context) -> None:
            say("handling", event.payload)
            await stdin.readline()  # the test lets the in-flight work finish
            ctx.state.set("billed", event.payload)
            await ctx.publish("invoices", event.payload)

        await bus.publish("orders", 7)
        try:
            await asyncio.Event().wait()  # serve until stopped
        finally:
            bus.publish_nowait("audit", "stopping")  # queued during the stop: flushed
            say("stopping")


if __name__ == "__main__":
    eventbus.run(main(sys.argv[1]))
