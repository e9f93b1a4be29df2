"""A process on a log shared with others (PostgreSQL, or a SQLite file opened with
``shared=True``), for tests/crash/test_shared_processes.py.

    python _shared_worker.py consume URL RECORD [--io S] [--stall N] [--kill N]
    python _shared_worker.py publish URL RECORD --first N --count M

``consume`` subscribes ``work`` to ``orders``: each call appends ``start SEQ N
ATTEMPT PID`` and, once done, ``done SEQ N ATTEMPT PID`` to RECORD (line-buffered:
they survive a kill), awaits ``--io`` seconds, counts the event in ``ctx.state``
under its key and publishes it on ``counted`` (outbox). Order ``--stall`` never
finishes its first attempt; order ``--kill`` ends the process (exit 13) whenever it
is handled. It prints ``ready`` once it handles events, ``drained`` whenever every
event of the log is finished (by any process), and runs until SIGTERM.

``publish`` publishes orders ``first .. first+count-1`` one by one (each its own
commit, with an idempotency key), writing ``published SEQ N`` to RECORD.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import anyio

from eventbus import Bus, BusConfig, Context, Event, RetryPolicy
from eventbus.storage import is_postgres_url

KEYS = 11


def _config(url: str) -> BusConfig:
    return BusConfig(breaker=None, shared=not is_postgres_url(url))


async def consume(url: str, record: str, io: float, stall: int, kill: int) -> None:
    retry = RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.05)
    stop = anyio.Event()
    with open(record, "a", buffering=1) as out:  # noqa: ASYNC230 - a test's record
        async with Bus.open(url, config=_config(url)) as bus:
            ready = False

            @bus.subscribe("orders", name="work", retry=retry)
            async def work(event: Event[int], ctx: Context) -> None:
                nonlocal ready
                n = event.payload
                out.write(f"start {event.seq} {n} {event.attempt} {os.getpid()}\n")
                if not ready:
                    ready = True
                    print(  # noqa: T201 - the test reads it
                        "ready", flush=True
                    )
                if n == kill:
                    os._exit(13)  # the point: whoever handles it dies
                if n == stall and event.attempt == 1:
                    await anyio.sleep_forever()
                if io:
                    await anyio.sleep(io)
                key = event.key or ""
                ctx.state.set(key, await ctx.state.get(key, 0) + 1)
                await ctx.publish("counted", n, key=key)
                out.write(f"done {event.seq} {n} {event.attempt} {os.getpid()}\n")

            with anyio.open_signal_receiver(signal.SIGTERM) as signals:

                async def on_term() -> None:
                    async for _ in signals:
                        stop.set()
                        return

                async with anyio.create_task_group() as tg:
                    tg.start_soon(on_term)
                    while not stop.is_set():
                        with anyio.move_on_after(0.2):
                            await stop.wait()
                        if stop.is_set():
                            break
                        head = (await bus.stats()).head
                        sub = bus._subs["work"]
                        if head and sub.finished_upto() >= head and sub.settled():
                            print(f"drained {head}", flush=True)  # noqa: T201 - read by the test
                    tg.cancel_scope.cancel()


async def publish(url: str, record: str, first: int, count: int) -> None:
    with open(record, "a", buffering=1) as out:  # noqa: ASYNC230 - a test's record
        async with Bus.open(url, config=_config(url)) as bus:
            for n in range(first, first + count):
                receipt = await bus.publish(
                    "orders", n, key=f"k{n % KEYS}", idempotency_key=f"order-{n}"
                )
                out.write(f"published {receipt.seq} {n}\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["consume", "publish"])
    parser.add_argument("url")
    parser.add_argument("record")
    parser.add_argument("--io", type=float, default=0.0)
    parser.add_argument("--stall", type=int, default=-1)
    parser.add_argument("--kill", type=int, default=-1)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    args = parser.parse_args()
    if args.role == "consume":
        anyio.run(consume, args.url, args.record, args.io, args.stall, args.kill)
    else:
        anyio.run(publish, args.url, args.record, args.first, args.count)


if __name__ == "__main__":
    sys.exit(main())
