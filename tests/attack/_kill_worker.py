"""A process for the kill tests to SIGKILL: `python _kill_worker.py MODE PATH ...`.

publish PATH EVENTS KEYS
    Publish EVENTS orders over KEYS keys, idempotently, and exit.
consume PATH
    Consumer only: two subscriptions keep per-key state and publish through the
    outbox, one per-event (concurrency 4), one batch (concurrency 2). Prints a line
    per handled event (per batch for the batch handler), then `drained` once done.
blame PATH EVENTS CONCURRENCY KIND BLOCK_FROM [MAX_ATTEMPTS]
    Publish EVENTS events (a deep backlog), then a subscription with
    RetryPolicy(max_attempts=MAX_ATTEMPTS, 1 by default): calls for events with
    seq < BLOCK_FROM return at once, the others block forever. Prints `done SEQ...`
    and `start SEQ...` lines (`start SEQ attempt=N` for the per-event handler).
lone PATH FIRST
    One task publishes orders one at a time (each committed at once on the loop's
    thread), from order FIRST on, idempotently, while a subscription keeps a count
    per key in its state and publishes a receipt per order through the outbox.
    Prints `ok SEQ ID` once each publish returned.
lane PATH
    K#0 fails its first attempt (retry in 0.5 s) with K#1..K#3 behind it; once that
    failure is recorded, X is published, and its call blocks forever. Prints
    `failed K#0` and `start X`.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections import Counter
from pathlib import Path

from eventbus import (
    BatchPolicy,
    Bus,
    BusConfig,
    Context,
    Event,
    Message,
    RetryPolicy,
)

CONFIG = BusConfig(reconcile_interval=0)
# Deaths are attempts too: a handler killed in many times must not be dead-lettered
# here, where nothing is poison.
PATIENT = RetryPolicy(max_attempts=1000, initial_delay=0.01, max_delay=0.1)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def publish(path: Path, events: int, keys: int) -> None:
    async with Bus.open(path, config=CONFIG) as bus:
        counters = [0] * keys
        messages = []
        for n in range(events):
            k = (n * 7 + n // 3) % keys
            messages.append(
                Message(
                    "orders",
                    {"i": counters[k], "amount": n % 13 + 1},
                    key=f"c{k}",
                    idempotency_key=f"order-{n}",
                )
            )
            counters[k] += 1
        for start in range(0, events, 500):
            await bus.publish_many(messages[start : start + 500])
    say("published")


def fold(state: object, event: Event[dict[str, int]], name: str) -> dict[str, int]:
    st = dict(state) if isinstance(state, dict) else {"count": 0, "sum": 0, "last": -1, "bad": 0}
    if event.payload["i"] != st["last"] + 1:
        st["bad"] += 1  # out of order, or folded in twice
        say(
            f"out-of-order {name} seq={event.seq} key={event.key} i={event.payload['i']} "
            f"after i={st['last']} attempt={event.attempt}"
        )
    st["count"] += 1
    st["sum"] += event.payload["amount"]
    st["last"] = event.payload["i"]
    return st


async def consume(path: Path) -> None:
    rng = random.Random()
    running: Counter[str] = Counter()
    async with Bus.open(path, config=CONFIG) as bus:

        @bus.subscribe("orders", name="acc", retry=PATIENT, breaker=None, concurrency=4)
        async def acc(event: Event[dict[str, int]], ctx: Context) -> None:
            key = event.key or "?"
            running[key] += 1
            if running[key] > 1:
                say(f"overlap acc key={key}: {running[key]} calls at once")
            try:
                ctx.state.set(key, fold(await ctx.state.get(key), event, "acc"))
                await ctx.publish("acc-out", {"src": event.id}, key=key)
                if rng.random() < 0.3:
                    await asyncio.sleep(0.001)
                say(f"a {event.seq}")
            finally:
                running[key] -= 1

        @bus.subscribe(
            "orders",
            name="agg",
            retry=PATIENT,
            breaker=None,
            concurrency=2,
            batch=BatchPolicy(mode="natural", max_size=64),
        )
        async def agg(events: list[Event[dict[str, int]]], ctx: Context) -> None:
            for event in events:
                key = event.key or "?"
                ctx.state.set(key, fold(await ctx.state.get(key), event, "agg"))
                await ctx.publish("agg-out", {"src": event.id}, key=key)
            if rng.random() < 0.5:
                await asyncio.sleep(0.002)
            say(f"b {len(events)}")

        await bus.drain(timeout=300)
    say("drained")


async def blame(
    path: Path, events: int, concurrency: int, kind: str, block_from: int, max_attempts: int
) -> None:
    async with Bus.open(path, config=CONFIG) as bus:
        for start in range(0, events, 500):
            await bus.publish_many(
                [
                    Message("jobs", {"n": n}, key=f"e{n}")
                    for n in range(start, min(events, start + 500))
                ]
            )
        forever = asyncio.Event()
        options = {
            "name": "victim",
            "retry": RetryPolicy(max_attempts=max_attempts),
            "breaker": None,
            "concurrency": concurrency,
        }
        if kind == "event":

            async def one(event: Event[dict[str, int]], ctx: Context) -> None:
                if event.seq < block_from:
                    say(f"done {event.seq}")
                    return
                say(f"start {event.seq} attempt={event.attempt}")
                await forever.wait()

            bus.subscribe("jobs", **options)(one)  # type: ignore[arg-type]
        else:

            async def many(events: list[Event[dict[str, int]]], ctx: Context) -> None:
                seqs = " ".join(str(e.seq) for e in events)
                if all(e.seq < block_from for e in events):
                    say(f"done {seqs}")
                    return
                say(f"start {seqs}")
                await forever.wait()

            bus.subscribe("jobs", batch=BatchPolicy(mode="natural", max_size=32), **options)(
                many  # type: ignore[arg-type]
            )
        await forever.wait()


async def lane(path: Path) -> None:
    async with Bus.open(path, config=CONFIG) as bus:
        failed = asyncio.Event()
        forever = asyncio.Event()
        retry = RetryPolicy(max_attempts=2, initial_delay=0.5, jitter="none")

        @bus.subscribe("t", name="s", retry=retry, breaker=None, concurrency=2)
        async def h(event: Event[dict[str, int]], ctx: Context) -> None:
            if event.key == "K" and event.payload["i"] == 0 and ctx.attempt == 1:
                say("failed K#0")
                failed.set()
                raise RuntimeError("K#0 fails once")
            if event.key == "X":
                say("start X")
                await forever.wait()

        await bus.publish_many([Message("t", {"i": i}, key="K") for i in range(4)])
        await failed.wait()
        # Returns once a commit holds X, and with it the retry record written before.
        await bus.publish("t", {"i": 0}, key="X")
        await forever.wait()


async def lone(path: Path, first: int) -> None:
    async with Bus.open(path, config=CONFIG) as bus:

        @bus.subscribe("orders", name="count")
        async def count(event: Event[dict[str, int]], ctx: Context) -> None:
            key = event.key or "?"
            done = await ctx.state.get(key, 0)
            assert isinstance(done, int)
            ctx.state.set(key, done + 1)
            await ctx.publish("receipts", {"order": event.payload["i"]}, key=key)

        n = first
        while True:
            receipt = await bus.publish(
                "orders", {"i": n}, key=f"c{n % 5}", idempotency_key=f"order-{n}"
            )
            say(f"ok {receipt.seq} {receipt.id}")
            n += 1


def main() -> None:
    mode, path = sys.argv[1], Path(sys.argv[2])
    args = sys.argv[3:]
    if mode == "publish":
        asyncio.run(publish(path, int(args[0]), int(args[1])))
    elif mode == "consume":
        asyncio.run(consume(path))
    elif mode == "blame":
        attempts = int(args[4]) if len(args) > 4 else 1
        asyncio.run(blame(path, int(args[0]), int(args[1]), args[2], int(args[3]), attempts))
    elif mode == "lone":
        asyncio.run(lone(path, int(args[0])))
    elif mode == "lane":
        asyncio.run(lane(path))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
