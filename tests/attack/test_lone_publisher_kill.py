"""SIGKILL of a process whose one task publishes alone, each publish committed at
once on the event loop's thread with the subscriptions' pending acknowledgements.

README, guarantee 1: "A `publish` that returned is in the log ... it survives a killed
process"; guarantee 3: outbox events and `ctx.state` writes commit with the
acknowledgement, so they apply once across kills.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from eventbus import Bus, BusConfig, Context, Event
from tests.attack._proc import Worker

pytestmark = pytest.mark.anyio

ROUNDS = 3
SEED = 20250301


async def test_a_lone_publisher_killed_loses_nothing_it_was_told(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    rng = random.Random(SEED)
    told: dict[int, str] = {}
    first = 0
    for _ in range(ROUNDS):
        worker = Worker("lone", str(path), str(first))
        target = rng.randint(50, 400)
        lines = worker.wait_for(lambda line: line.startswith("ok"), timeout=30)
        while sum(line.startswith("ok") for line in lines) < target:
            lines.append(worker.wait_for(lambda line: line.startswith("ok"), timeout=30)[-1])
        worker.kill()
        # Lines written before the kill and not read yet count too: the publish returned.
        for line in [*lines, *worker.rest()]:
            if line.startswith("ok"):
                _, seq, event_id = line.split()
                told[int(seq)] = event_id
        first += target + 1000  # fresh idempotency keys for the next life

    orders: dict[int, tuple[str, str]] = {}
    receipts: Counter[int] = Counter()
    async with Bus.open(path, config=BusConfig(reconcile_interval=0)) as bus:

        @bus.subscribe("orders", name="count")
        async def count(event: Event[dict[str, int]], ctx: Context) -> None:
            key = event.key or "?"
            done = await ctx.state.get(key, 0)
            assert isinstance(done, int)
            ctx.state.set(key, done + 1)
            await ctx.publish("receipts", {"order": event.payload["i"]}, key=key)

        @bus.subscribe(["orders", "receipts"], name="check", start="earliest")
        async def check(event: Event[dict[str, int]], ctx: Context) -> None:
            if event.topic == "orders":
                orders[event.seq] = (event.id, event.key or "?")
            else:
                receipts[event.payload["order"]] += 1

        await bus.drain(timeout=30)
        state = {key: await bus.state("count").get(key) for key in {k for _, k in orders.values()}}

    missing = {seq: eid for seq, eid in told.items() if orders.get(seq, ("", ""))[0] != eid}
    assert not missing, f"{len(missing)} acknowledged publishes are not in the log"
    per_key = Counter(key for _, key in orders.values())
    assert state == dict(per_key)
    assert len(receipts) == len(orders)
    assert set(receipts.values()) == {1}
