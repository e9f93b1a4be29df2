"""A service under ``eventbus.run``, stopped by a signal in test_graceful_stop.py.

It publishes one order and says ``handling`` once its handler has started; the handler
then waits for a line on stdin before it writes state and an outbox event. When the
signal lands the body queues one more event with ``publish_nowait`` and says
``stopping``; the bus then closes, waiting for that handler.

Usage: ``_term_worker.py LOG [single|batch] [CLOSE_TIMEOUT] [wait|hang]``: the handler
of one event or a batch handler; ``hang`` makes the handler never finish, so the
close gives up on it after ``close_timeout``.
"""

from __future__ import annotations

import asyncio
import sys

import eventbus
from eventbus import Bus, BusConfig, Context, Event


def say(*words: object) -> None:
    sys.stdout.write(" ".join(map(str, words)) + "\n")
    sys.stdout.flush()


async def main(path: str, kind: str, close_timeout: float, hang: bool) -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async def handle(payload: int, ctx: Context) -> None:
        say("handling", payload)
        if hang:
            await asyncio.Event().wait()
        await stdin.readline()  # the test lets the in-flight work finish
        ctx.state.set("billed", payload)
        await ctx.publish("invoices", payload)

    async with Bus.open(path, config=BusConfig(close_timeout=close_timeout)) as bus:
        if kind == "batch":

            @bus.subscribe("orders", name="billing")
            async def bill_batch(events: list[Event[int]], ctx: Context) -> None:
                for event in events:
                    await handle(event.payload, ctx)

        else:

            @bus.subscribe("orders", name="billing")
            async def bill(event: Event[int], ctx: Context) -> None:
                await handle(event.payload, ctx)

        await bus.publish("orders", 7)
        try:
            await asyncio.Event().wait()  # serve until stopped
        finally:
            bus.publish_nowait("audit", "stopping")  # queued during the stop: flushed
            say("stopping")


if __name__ == "__main__":
    args = sys.argv[1:]
    eventbus.run(
        main(
            args[0],
            args[1] if len(args) > 1 else "single",
            float(args[2]) if len(args) > 2 else 30.0,
            len(args) > 3 and args[3] == "hang",
        )
    )
