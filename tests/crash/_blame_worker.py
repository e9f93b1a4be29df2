"""A crash-test worker for blame: which events does a death count against?

    python _blame_worker.py LOG CALLS [--concurrency N] [--batch] [--max-attempts M]
                            [--events 3000] [--block-call K] [--poison N]

Publishes ``--events`` integers (idempotently: a rerun publishes nothing new) on
``--keys`` keys, all before subscribing, so that the subscription starts on a deep
backlog; then subscribes ``sink`` with ``concurrency`` and ``RetryPolicy(max_attempts=M)``
and exits 0 once every event is done or dead-lettered.

The handler (per event, or a batch handler with ``--batch``) records each call in
CALLS, line-buffered, so the lines survive a SIGKILL:

- ``start SEQS ATTEMPTS`` when it starts (SEQS and ATTEMPTS comma-separated),
- ``end SEQS`` just before it returns.

Every event's effect goes to ``ctx.state``, committed with its acknowledgement:
``h:<seq>`` counts how many times the event was handled (exactly once means 1), and
the event's key holds ``[count, last seq]``; a seq not above the key's last one is
recorded as ``violation:<seq>``.

- ``--block-call K``: the K-th call prints ``blocked SEQS`` on stdout and then never
  returns (the parent kills the process). Other calls go on.
- ``--hold-call K``: the K-th call prints ``holding SEQS`` on stdout and waits for a
  line on stdin before it goes on. Once this life has handled every event (each once:
  nothing fails), the worker prints ``all handled``, after the last call has ended,
  and keeps running until its acknowledgements commit.
- ``--poison N``: handling the event whose payload is N ends the process at once
  (``os._exit(13)``, as a segfaulting library would), on every attempt.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

import anyio
import anyio.lowlevel

from eventbus import BatchPolicy, Bus, Context, Event, Message, RetryPolicy

TOPIC = "numbers"
SUBSCRIPTION = "sink"
CHUNK = 500


async def _apply(event: Event[int], ctx: Context) -> None:
    """The event's effects in state, checked for order per key."""
    key = event.key or ""
    value = await ctx.state.get(key, [0, -1])
    assert isinstance(value, list)
    count, last = value
    if event.seq <= last:
        ctx.state.set(f"violation:{event.seq}", last)
    ctx.state.set(key, [count + 1, event.seq])
    seen = await ctx.state.get(f"h:{event.seq}", 0)
    assert isinstance(seen, int)
    ctx.state.set(f"h:{event.seq}", seen + 1)


async def run(args: argparse.Namespace, calls: TextIO) -> None:
    retry = RetryPolicy(max_attempts=args.max_attempts, initial_delay=0.0, max_delay=0.0)
    n_calls = handled = 0
    all_handled = anyio.Event()

    async def begin(events: list[Event[int]]) -> None:
        nonlocal n_calls
        n_calls += 1
        seqs = ",".join(str(e.seq) for e in events)
        calls.write(f"start {seqs} {','.join(str(e.attempt) for e in events)}\n")
        if n_calls == args.block_call:
            _say(f"blocked {seqs}")
            await anyio.sleep_forever()
        if n_calls == args.hold_call:
            _say(f"holding {seqs}")
            await anyio.to_thread.run_sync(sys.stdin.readline)
        if any(e.payload == args.poison for e in events):
            os._exit(13)  # the point: the process dies inside the handler

    def end(events: list[Event[int]]) -> None:
        nonlocal handled
        calls.write(f"end {','.join(str(e.seq) for e in events)}\n")
        handled += len(events)
        if handled == args.events:
            all_handled.set()

    async def announce() -> None:
        # A task of its own: it runs once the last handler call has returned and the
        # dispatcher has recorded its end.
        await all_handled.wait()
        _say("all handled")

    async with Bus.open(args.log) as bus:
        for first in range(0, args.events, CHUNK):
            await bus.publish_many(
                Message(TOPIC, n, key=f"k{n % args.keys}", idempotency_key=f"n-{n}")
                for n in range(first, min(first + CHUNK, args.events))
            )

        async def batch_sink(events: list[Event[int]], ctx: Context) -> None:
            await begin(events)
            for event in events:
                await _apply(event, ctx)
            await anyio.lowlevel.checkpoint()  # a real await inside the call
            end(events)

        async def sink(event: Event[int], ctx: Context) -> None:
            await begin([event])
            await _apply(event, ctx)
            await anyio.lowlevel.checkpoint()  # a real await inside the call
            end([event])

        subscribe = bus.subscribe(
            TOPIC,
            name=SUBSCRIPTION,
            retry=retry,
            concurrency=args.concurrency,
            batch=BatchPolicy(max_size=args.batch_size),
        )
        if args.batch:
            subscribe(batch_sink)
        else:
            subscribe(sink)
        async with anyio.create_task_group() as tg:
            if args.hold_call:
                tg.start_soon(announce)
            await bus.drain(timeout=120)


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("log")
    parser.add_argument("calls")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--batch", action="store_true")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-attempts", type=int, default=1)
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--keys", type=int, default=101)
    parser.add_argument("--block-call", type=int, default=0)
    parser.add_argument("--hold-call", type=int, default=0)
    parser.add_argument("--poison", type=int, default=-1)
    args = parser.parse_args()
    with open(args.calls, "a", buffering=1, encoding="utf-8") as calls:
        anyio.run(run, args, calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
