"""A keyed workload with failures on the same keys as healthy traffic, and a recorder.

The recorder sees every handler call from the inside: which keys are running at the
same moment, which events of a key succeeded and in what order, and what `ctx.state`
held for the key when the call read it. Everything the tests assert is checked
against what was published, not against the bus's own bookkeeping.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from eventbus import BatchPolicy, Bus, BusConfig, Context, Event, Message, RetryPolicy


class Boom(Exception):
    """The failure a plan injects."""


@dataclass
class Plan:
    """Which events fail, on which attempts; which calls are slow."""

    keys: int = 8
    per_key: int = 40
    # (key, index) -> number of calls that fail before one succeeds
    failures: dict[tuple[str, int], int] = field(default_factory=dict)
    slow_keys: frozenset[str] = frozenset()
    seed: int = 0

    @classmethod
    def make(cls, *, keys: int = 8, per_key: int = 40, seed: int = 0) -> Plan:
        rng = random.Random(seed)
        plan = cls(keys=keys, per_key=per_key, seed=seed)
        # Half of the keys carry failures, among their healthy events: a first event
        # that fails, events in the middle that fail once or twice, and back-to-back
        # failures of one key.
        for k in range(0, keys, 2):
            key = f"k{k}"
            plan.failures[(key, 0)] = 1
            for idx in rng.sample(range(1, per_key), per_key // 6):
                plan.failures[(key, idx)] = rng.choice((1, 1, 2))
            mid = per_key // 2
            plan.failures[(key, mid)] = 2
            plan.failures[(key, mid + 1)] = 1
        plan.slow_keys = frozenset({"k1", "k2"})
        return plan

    def messages(self) -> list[Message]:
        """Every event, keys interleaved at random, each key's indices increasing."""
        rng = random.Random(self.seed + 1)
        left = {f"k{k}": list(range(self.per_key)) for k in range(self.keys)}
        out: list[Message] = []
        while left:
            key = rng.choice(sorted(left))
            idx = left[key].pop(0)
            if not left[key]:
                del left[key]
            out.append(Message("work", {"i": idx}, key=key))
        return out


@dataclass
class Recorder:
    plan: Plan
    running: Counter[str] = field(default_factory=Counter)
    overlaps: list[str] = field(default_factory=list)
    done: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    calls: Counter[tuple[str, int]] = field(default_factory=Counter)
    state_mismatches: list[str] = field(default_factory=list)
    # calls that started with an event whose predecessor of its key was not done
    early: list[str] = field(default_factory=list)
    batches: list[list[tuple[str, int]]] = field(default_factory=list)
    # outbox events seen downstream, per (key, index): one each, none from a failure
    echoes: Counter[tuple[str, int]] = field(default_factory=Counter)
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    def enter(self, keys: list[str], indices: list[int] | None = None) -> None:
        if indices is not None:
            # The first event of each key in a call must follow the key's last success;
            # the key's further events in the call must follow it one by one.
            nxt: dict[str, int] = {}
            for key, idx in zip(keys, indices, strict=True):
                want = nxt.get(key, (self.done[key][-1] if self.done[key] else -1) + 1)
                if idx != want:
                    self.early.append(f"{key}#{idx} started while {key}#{want} was not done")
                nxt[key] = idx + 1
        for key in set(keys):
            self.running[key] += 1
            if self.running[key] > 1:
                self.overlaps.append(f"{key}: {self.running[key]} calls at once")

    def leave(self, keys: list[str]) -> None:
        for key in set(keys):
            self.running[key] -= 1

    def should_fail(self, key: str, idx: int) -> bool:
        self.calls[(key, idx)] += 1
        return self.calls[(key, idx)] <= self.plan.failures.get((key, idx), 0)

    async def pause(self, keys: list[str]) -> None:
        if self.plan.slow_keys.intersection(keys):
            await asyncio.sleep(0.02)
        else:
            await asyncio.sleep(self.rng.random() * 0.002)

    async def check_state(self, ctx: Context, key: str, idx: int) -> None:
        """State must hold the index of the key's last success (-1 before any)."""
        seen = await ctx.state.get(key, -1)
        expected = self.done[key][-1] if self.done[key] else -1
        if seen != expected:
            self.state_mismatches.append(f"{key}#{idx}: state {seen}, last success {expected}")

    # -- what the tests assert ---------------------------------------------------

    def order_violations(self) -> dict[str, list[int]]:
        return {key: seq for key, seq in sorted(self.done.items()) if seq != sorted(seq)}

    def outbox_not_exactly_once(self) -> dict[tuple[str, int], int]:
        want = {(f"k{k}", i): 1 for k in range(self.plan.keys) for i in range(self.plan.per_key)}
        got = dict(self.echoes)
        return {e: got.get(e, 0) for e in set(want) | set(got) if got.get(e, 0) != 1}

    def not_exactly_once(self) -> dict[str, str]:
        bad: dict[str, str] = {}
        for k in range(self.plan.keys):
            key = f"k{k}"
            counts = Counter(self.done.get(key, []))
            missing = [i for i in range(self.plan.per_key) if counts[i] == 0]
            twice = [i for i, c in counts.items() if c > 1]
            if missing or twice:
                bad[key] = f"missing {missing}, handled twice {twice}"
        return bad


def per_event_handler(rec: Recorder) -> Callable[[Event[dict[str, int]], Context], Awaitable[None]]:
    async def handle(event: Event[dict[str, int]], ctx: Context) -> None:
        key, idx = event.key or "?", event.payload["i"]
        rec.enter([key], [idx])
        try:
            await rec.check_state(ctx, key, idx)
            # Written before the decision to fail: a failed attempt must leave no trace.
            ctx.state.set(key, idx)
            await ctx.publish("echo", {"i": idx}, key=key)
            await rec.pause([key])
            if rec.should_fail(key, idx):
                raise Boom(f"{key}#{idx}")
            rec.done[key].append(idx)
        finally:
            rec.leave([key])

    return handle


def batch_handler(
    rec: Recorder, *, use_fail: bool
) -> Callable[[list[Event[dict[str, int]]], Context], Awaitable[None]]:
    """A batch handler. With `use_fail`, a failing event is failed with `ctx.fail` and,
    as `Context.fail` asks of a handler that cares about order, so is the rest of its
    key in the batch; otherwise the whole call raises (the bus splits the batch)."""

    async def handle(events: list[Event[dict[str, int]]], ctx: Context) -> None:
        keys = [e.key or "?" for e in events]
        rec.batches.append([(e.key or "?", e.payload["i"]) for e in events])
        rec.enter(keys, [e.payload["i"] for e in events])
        try:
            await rec.pause(keys)
            succeeded: list[tuple[str, int]] = []
            failed_keys: set[str] = set()
            for event in events:
                key, idx = event.key or "?", event.payload["i"]
                if key in failed_keys:
                    ctx.fail(event, Boom(f"{key}#{idx} behind a failure of its key"))
                    continue
                if rec.should_fail(key, idx):
                    if use_fail:
                        failed_keys.add(key)
                        ctx.fail(event, Boom(f"{key}#{idx}"))
                        continue
                    raise Boom(f"{key}#{idx}")
                # This call's own earlier writes first, then committed state.
                seen = await ctx.state.get(key, -1)
                before = [i for k, i in succeeded if k == key]
                expected = before[-1] if before else (rec.done[key][-1] if rec.done[key] else -1)
                if seen != expected:
                    rec.state_mismatches.append(f"{key}#{idx}: state {seen}, expected {expected}")
                ctx.state.set(key, idx)
                if not use_fail:
                    await ctx.publish("echo", {"i": idx}, key=key)
                succeeded.append((key, idx))
            for key, idx in succeeded:
                rec.done[key].append(idx)
                if use_fail:
                    # Context.fail: publish nothing for an event you fail.
                    await ctx.publish("echo", {"i": idx}, key=key)
        finally:
            rec.leave(keys)

    return handle


async def run_workload(
    path: Path,
    plan: Plan,
    *,
    kind: str,
    concurrency: int,
    ordered: bool = True,
    drain_timeout: float = 60.0,
) -> Recorder:
    """Publish the plan's events in ragged chunks while the subscription works, with
    failures retried after a few milliseconds, and wait for everything to finish."""
    rec = Recorder(plan)
    handler: Callable[..., Awaitable[None]]
    if kind == "event":
        handler = per_event_handler(rec)
    elif kind == "batch-raise":
        handler = batch_handler(rec, use_fail=False)
    elif kind == "batch-fail":
        handler = batch_handler(rec, use_fail=True)
    else:
        raise ValueError(kind)
    retry = RetryPolicy(max_attempts=20, initial_delay=0.005, max_delay=0.03, budget_floor=1000.0)
    config = BusConfig(reconcile_interval=0)
    async with Bus.open(path, config=config) as bus:
        bus.subscribe(
            "work",
            name="worker",
            retry=retry,
            breaker=None,
            concurrency=concurrency,
            ordered=ordered,
            batch=BatchPolicy(mode="natural", max_size=16),
        )(handler)

        @bus.subscribe("echo", name="echo-check", batch=BatchPolicy(mode="natural"))
        async def echo(events: list[Event[dict[str, int]]], ctx: Context) -> None:
            rec.echoes.update((e.key or "?", e.payload["i"]) for e in events)

        messages = plan.messages()
        rng = random.Random(plan.seed + 2)
        pos = 0
        while pos < len(messages):
            size = rng.choice((1, 1, 2, 5, 9, 17))
            chunk = messages[pos : pos + size]
            pos += size
            if len(chunk) == 1:
                m = chunk[0]
                await bus.publish(m.topic, m.payload, key=m.key)
            else:
                await bus.publish_many(chunk)
            await asyncio.sleep(rng.random() * 0.004)
        await bus.drain(timeout=drain_timeout)
        dead = await bus.dead_letters.list(subscription="worker")
        assert not dead, [d.error_message for d in dead]
        committed = {k: v async for k, v in bus.state("worker").items()}
    for k in range(plan.keys):
        key = f"k{k}"
        if committed.get(key) != plan.per_key - 1 and ordered:
            rec.state_mismatches.append(
                f"{key}: committed state {committed.get(key)}, last index {plan.per_key - 1}"
            )
    return rec
