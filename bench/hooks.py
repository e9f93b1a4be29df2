"""What hooks cost: the same pipeline with no hook, with no-op hooks, and traced.

    .venv/bin/python bench/hooks.py              # 20 000 events, 5 rounds
    .venv/bin/python bench/hooks.py --events 5000 --rounds 3

The pipeline: ``events`` publishes from 64 concurrent tasks on ``":memory:"``, each
event handled by a per-event subscription that publishes one event through the
outbox to a second subscription. Per event: two publishes and two handler calls, so
two ``before_publish``/``after_publish`` pairs and two ``around_call`` entries.

Scenarios, run in turns (round 1 of each, then round 2 ...), medians reported:

* ``none``: no hook registered (the cost everyone pays: should be nothing);
* ``publish``: a no-op ``before_publish`` and ``after_publish``;
* ``call``: a no-op ``around_call`` (an ``asynccontextmanager``);
* ``both``: the two together.

Measured in CPU time of this process (``time.process_time``), which other load on a
shared machine disturbs less than wall time; ratios are to ``none`` of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator

from _support import median

import eventbus
from eventbus import Bus, BusConfig, Context, Event, HandlerCall, Publishing

SCENARIOS = ("none", "publish", "call", "both")
PRODUCERS = 64


def _noop(publishing: Publishing) -> None:
    pass


@contextlib.asynccontextmanager
async def _around(call: HandlerCall) -> AsyncIterator[None]:
    yield


async def one_run(scenario: str, events: int) -> float:
    """CPU seconds per event of one run of ``scenario``."""
    per_task = max(1, events // PRODUCERS)
    async with Bus.open(":memory:", config=BusConfig(reconcile_interval=0)) as bus:
        if scenario in ("publish", "both"):
            bus.hooks.before_publish(_noop)
            bus.hooks.after_publish(_noop)
        if scenario in ("call", "both"):
            bus.hooks.around_call(_around)

        @bus.subscribe("a")
        async def first(event: Event[object], ctx: Context) -> None:
            await ctx.publish("b", event.payload, key=event.key)

        handled = 0

        @bus.subscribe("b")
        async def second(event: Event[object], ctx: Context) -> None:
            nonlocal handled
            handled += 1

        payload = {"n": 1, "text": "x" * 60}

        async def produce(k: int) -> None:
            for _ in range(per_task):
                await bus.publish("a", payload, key=f"k{k}")

        started = time.process_time()
        async with asyncio.TaskGroup() as tg:
            for k in range(PRODUCERS):
                tg.create_task(produce(k))
        await bus.drain(timeout=600)
        spent = time.process_time() - started
        if handled != per_task * PRODUCERS:
            raise RuntimeError(f"{scenario}: handled {handled} of {per_task * PRODUCERS}")
        return spent / (per_task * PRODUCERS)


async def measure(events: int, rounds: int) -> dict[str, list[float]]:
    """Per scenario, the CPU seconds per event of each round."""
    runs: dict[str, list[float]] = {s: [] for s in SCENARIOS}
    for _ in range(rounds):
        for scenario in SCENARIOS:
            runs[scenario].append(await one_run(scenario, events))
    return runs


def report(runs: dict[str, list[float]], events: int) -> str:
    base = median(runs["none"])
    lines = [
        f"eventbus hooks: {events:,} events, publish -> handler -> outbox -> handler, "
        f"{len(runs['none'])} rounds (medians, CPU time)",
        "",
        f"{'scenario':<10} {'us/event':>9} {'vs none':>8}   rounds (us/event)",
    ]
    for scenario, values in runs.items():
        m = median(values)
        rounds = " ".join(f"{v * 1e6:.1f}" for v in values)
        lines.append(f"{scenario:<10} {m * 1e6:>9.1f} {m / base:>7.2f}x   {rounds}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    runs = eventbus.run(measure(args.events, args.rounds))
    print(report(runs, args.events))
    return 0


if __name__ == "__main__":
    sys.exit(main())
