"""Random interleavings of publish, handle, crash and reopen: no lost or doubled effect.

A crash is modelled at the storage boundary, which is where kill -9 bites: the log
stops accepting commits at a chosen point (everything committed before it stays,
nothing after it lands), the bus is torn down without a clean close, and a new bus
opens on what was committed. Publishers whose publish did not return retry with
the same idempotency key, as a client would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eventbus.storage as _storage
from eventbus import BatchPolicy, Bus, BusConfig, Context, Event, RetryPolicy
from eventbus.storage import MemoryStorage, Receipt, WriteBatch


class CrashableStorage(MemoryStorage):
    """An in-memory log that can be made to "die" after a number of commits."""

    def __init__(self) -> None:
        super().__init__()
        self.commits = 0
        self.crash_at: int | None = None
        self.crashed = anyio.Event()

    async def commit(self, batch: WriteBatch) -> list[Receipt]:
        if self.crash_at is not None and self.commits >= self.crash_at:
            self.crashed.set()
            raise _storage.StorageError("simulated crash: the process is gone")
        self.commits += 1
        return await super().commit(batch)

    def revive(self) -> None:
        self.crash_at = None
        self.crashed = anyio.Event()


@dataclass
class Model:
    totals: dict[str, int] = field(default_factory=dict)
    published: int = 0


Op = tuple[str, int, int]

ops = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(0, 3), st.integers(1, 20)),
        st.tuples(st.just("publish_many"), st.integers(1, 30), st.integers(0, 3)),
        st.tuples(st.just("handle"), st.integers(1, 40), st.just(0)),
        st.tuples(st.just("crash"), st.integers(0, 12), st.just(0)),
        st.tuples(st.just("reopen"), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=25,
)

CONFIG = BusConfig(
    close_timeout=0.5,
    breaker=None,
    retry=RetryPolicy(max_attempts=100, initial_delay=0.0, max_delay=0.0),
    batch=BatchPolicy(mode="natural", max_size=8),
)


async def scenario(program: list[Op]) -> None:
    log = CrashableStorage()
    model = Model()
    counter = 0
    unconfirmed: dict[str, tuple[str, int]] = {}  # idempotency key -> (key, amount)
    handled = 0
    progress = anyio.Event()

    def subscribe(bus: Bus) -> None:
        @bus.subscribe("orders", name="totals")
        async def total(event: Event[int], ctx: Context) -> None:
            nonlocal handled, progress
            key = event.key or ""
            ctx.state.set(key, await ctx.state.get(key, 0) + event.payload)  # type: ignore[operator]
            await ctx.publish("receipts", event.payload, key=key)
            handled += 1
            progress.set()
            progress = anyio.Event()

        @bus.subscribe("receipts", name="ledger")
        async def ledger(events: list[Event[int]], ctx: Context) -> None:
            for event in events:
                key = event.key or ""
                ctx.state.set(key, await ctx.state.get(key, 0) + event.payload)  # type: ignore[operator]

    async def publish(bus: Bus, ikey: str, key: str, amount: int) -> None:
        unconfirmed[ikey] = (key, amount)
        try:
            await bus.publish("orders", amount, key=key, idempotency_key=ikey)
        except Exception:  # noqa: BLE001 - the crash: retried after reopen
            return
        unconfirmed.pop(ikey, None)

    async def run_once(todo: list[Op]) -> list[Op]:
        """Run ops on one bus until a crash; return the ops not yet run."""
        async with anyio.create_task_group() as tg:

            async def life() -> None:
                nonlocal counter
                async with Bus.open(":memory:", config=CONFIG, storage=log) as bus:
                    subscribe(bus)
                    for ikey, (key, amount) in list(unconfirmed.items()):
                        await publish(bus, ikey, key, amount)
                    while todo:
                        op, a, b = todo.pop(0)
                        if op == "publish":
                            counter += 1
                            model.totals[f"k{a}"] = model.totals.get(f"k{a}", 0) + b
                            model.published += 1
                            await publish(bus, f"p{counter}", f"k{a}", b)
                        elif op == "publish_many":
                            for i in range(a):
                                counter += 1
                                key = f"k{(b + i) % 4}"
                                model.totals[key] = model.totals.get(key, 0) + i + 1
                                model.published += 1
                                await publish(bus, f"p{counter}", key, i + 1)
                        elif op == "handle":
                            target = handled + a
                            # Bounded: fewer events than asked for may be waiting.
                            with anyio.move_on_after(0.2):
                                while handled < target and not log.crashed.is_set():
                                    await progress.wait()
                        elif op == "crash":
                            log.crash_at = log.commits + a
                            # Bounded: an idle bus commits nothing more; it dies anyway.
                            with anyio.move_on_after(0.2):
                                await log.crashed.wait()
                            log.crash_at = log.commits  # dead from here on
                            break
                        elif op == "reopen":
                            break
                    if log.crash_at is not None:
                        tg.cancel_scope.cancel()  # torn down, no clean close
                    else:
                        await bus.drain(timeout=10)

            tg.start_soon(life)
        log.revive()
        return todo

    todo = list(program)
    while True:
        todo = await run_once(todo)
        if not todo:
            break
    # A last life to finish everything.
    async with Bus.open(":memory:", config=CONFIG, storage=log) as bus:
        subscribe(bus)
        for ikey, (key, amount) in list(unconfirmed.items()):
            await publish(bus, ikey, key, amount)
        assert not unconfirmed
        await bus.drain(timeout=20)
        for name in ("totals", "ledger"):
            state = bus.state(name)
            got = {k: v async for k, v in state.items()}
            assert got == model.totals, f"{name}: {got} != {model.totals}"
        stats = await bus.stats()
        assert stats.lag == {"totals": 0, "ledger": 0}
        assert stats.head == 2 * model.published  # each order once, each receipt once
        assert await bus.dead_letters.list() == []


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops)
def test_no_effect_is_lost_or_doubled_across_crashes(program: list[Op]) -> None:
    logging.getLogger("eventbus").setLevel(logging.CRITICAL)
    try:
        anyio.run(scenario, program)
    finally:
        logging.getLogger("eventbus").setLevel(logging.NOTSET)
