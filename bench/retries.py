"""Healthy events under failure: the retry lane keeps failures off the hot path.

    .venv/bin/python bench/retries.py            # full run (about two minutes)
    .venv/bin/python bench/retries.py --quick    # smoke run (about 15 seconds)

Workload: a per-event handler whose healthy path awaits ``--work`` seconds of I/O
(a database write, say). Failing events fail fast, as a refused call does. Every event
has its own key, so this measures isolation between keys (events of one key wait
behind that key's retry by design).

Runs, on a SQLite file (durability "normal"):

* ``healthy``: H healthy events only.
* ``failing``: the same H healthy events mixed with poison events (10% of all; fail
  every attempt until dead-lettered) and transient ones (20%; fail once, then
  succeed on the retry lane).

For each: healthy events per second (H / time until the last healthy event is
handled) at saturation (everything published at once), and the p50/p99 end-to-end
latency of healthy events (publish to handler) under a paced load at about half of
capacity. Targets: failing-run throughput >= 90% of the healthy run, and its healthy
p99 not raised by the retry delays (within 1.5x, given the machine's noise).

Then ``recovery``, on a fresh file: a dependency that was down comes back. The same
number of events, each with its own key, 10% of them calling the dependency, are
published at once while it is down (the subscription runs 16 calls at once, so the
burst is handled in seconds); every call to it fails fast. Stages:

1. burst: until every healthy event is handled and every dependency event has failed
   its first attempt (its retries fail too, as long as the dependency is down);
2. still failing: the dependency stays down; after a second for the retry budget's
   stored tokens to be spent, the retry attempts over ``--hold`` seconds, per second;
3. recovered: the dependency comes back; retries per second from that moment until
   the last retried event is handled (the retry lane empty, checked after).

The retry policy keeps ``RetryPolicy``'s default budget (``budget_ratio`` 0.2 retries
per fresh event, ``budget_floor`` 10 retries/s) and its default retry concurrency (4);
the other settings keep every event alive and due soon through the outage (50
attempts, delays from 0.05 s capped at 0.25 s), and there is no circuit breaker, so
what holds the retries is the budget alone. A successful retry gives its token back,
so a recovered dependency drains at handler speed while a failing one stays at the
floor. Targets: the recovered drain at least 10x the floor, and the still-failing
rate within 0.5x-1.5x of it.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
from _support import add_quiet, loop_name, machine, steps, temp_dir

import eventbus
from eventbus import BatchPolicy, Bus, BusConfig, Context, Event, Message, RetryPolicy

RETRY = RetryPolicy(max_attempts=5, initial_delay=0.05, max_delay=1.0, budget_ratio=1.0)
# The recovery phase: RetryPolicy's default budget and retry concurrency; enough
# attempts, and short enough delays, that every event outlives the outage and is due
# (held by the budget alone) when the dependency comes back.
RECOVERY_RETRY = RetryPolicy(max_attempts=50, initial_delay=0.05, max_delay=0.25)
RECOVERY_CONCURRENCY = 16  # main-lane calls at once: the burst is handled in seconds
DEPENDENCY_SHARE = 0.10  # events of the recovery burst that call the dependency
SETTLE_SECONDS = 1.0  # before the still-failing window: stored budget tokens spent

THROUGHPUT_SHARE = 0.90  # failing-run healthy throughput, at least, of the healthy run
P99_FACTOR = 1.5  # failing-run healthy p99, at most, times the healthy run's
RECOVERY_TARGET = 10.0  # recovered drain, at least, times the budget floor
HELD_RANGE = (0.5, 1.5)  # still-failing retry rate, times the budget floor


@dataclass
class Result:
    name: str
    healthy_per_s: float
    p50_ms: float
    p99_ms: float
    commits: int
    dead: int


def kinds_for(total: int, failing: bool, seed: int) -> list[str]:
    if not failing:
        return ["ok"] * total
    rng = random.Random(seed)
    return rng.choices(["ok", "poison", "flaky"], [70, 10, 20], k=total)


async def one_run(
    path: Path, kinds: list[str], work: float, rate: float | None
) -> tuple[float, list[float], int, int]:
    """Returns (seconds until the last healthy event, healthy latencies, commits, dead)."""
    healthy_total = kinds.count("ok")
    latencies: list[float] = []
    done = anyio.Event()
    first_publish = 0.0
    last_healthy = 0.0
    config = BusConfig(breaker=None)
    async with Bus.open(path, config=config) as bus:

        @bus.subscribe("t", name="s", retry=RETRY, batch=BatchPolicy(mode="natural"))
        async def handler(event: Event[list[object]], ctx: Context) -> None:
            nonlocal last_healthy
            i, published_at = event.payload
            kind = kinds[int(i)]  # type: ignore[call-overload]
            if kind == "poison":
                raise ConnectionRefusedError("poison: always refused")
            if kind == "flaky" and ctx.attempt == 1:
                raise ConnectionResetError("transient: fails once")
            await anyio.sleep(work)
            if kind == "ok":
                now = time.perf_counter()
                latencies.append(now - float(published_at))  # type: ignore[arg-type]
                last_healthy = now
                if len(latencies) == healthy_total:
                    done.set()

        first_publish = time.perf_counter()
        if rate is None:
            for start in range(0, len(kinds), 1000):
                now = time.perf_counter()
                await bus.publish_many(
                    Message("t", [i, now], key=f"k{i}")
                    for i in range(start, min(start + 1000, len(kinds)))
                )
        else:
            for i in range(len(kinds)):
                target = first_publish + i / rate
                delay = target - time.perf_counter()
                if delay > 0:
                    await anyio.sleep(delay)
                bus.publish_nowait("t", [i, time.perf_counter()], key=f"k{i}")
        with anyio.fail_after(300):
            await done.wait()
        elapsed = last_healthy - first_publish
        await bus.drain(timeout=120)
        dead = len(await bus.dead_letters.list(limit=100_000))
        commits = bus.metrics().commits
    return elapsed, latencies, commits, dead


class Dependency:
    """An outside service the handler calls: while ``down``, every call fails fast."""

    def __init__(self) -> None:
        self.down = True

    async def call(self, work: float) -> None:
        if self.down:
            raise ConnectionRefusedError("dependency down")
        await anyio.sleep(work)


@dataclass
class Recovery:
    """The recovery phase's figures (rates in retries per second)."""

    events: int
    dependency_events: int
    burst_seconds: float  # publish to the last first attempt / healthy event
    burst_retries: int  # retries tried (and failed) during the burst
    held_rate: float  # retry attempts per second while still failing
    held_seconds: float
    held_waiting: int  # retries waiting at the end of the still-failing window
    held_due: int  # of which due, held by the budget
    waiting_at_recovery: int  # retries in the lane (waiting or running) at its return
    drained: int  # retried events handled after it came back
    drain_seconds: float  # from its return to the last of them
    attempts_max: int  # most attempts one event took
    dead: int
    floor: float  # RetryPolicy.budget_floor

    @property
    def drain_rate(self) -> float:
        return self.drained / self.drain_seconds if self.drain_seconds > 0 else float("inf")


async def recovery_run(
    path: Path,
    total: int,
    work: float,
    hold: float,
    *,
    settle: float | None = None,
    seed: int = 7,
    retry: RetryPolicy = RECOVERY_RETRY,
) -> Recovery:
    """A burst of ``total`` events published while a dependency is down, then
    ``hold`` seconds of it still failing, then its recovery (see the module docstring)."""
    rng = random.Random(seed)
    calls_dependency = [rng.random() < DEPENDENCY_SHARE for _ in range(total)]
    dependency_total = sum(calls_dependency)
    healthy_total = total - dependency_total
    dependency = Dependency()
    healthy = first_failures = 0
    retry_attempts: list[float] = []  # when each retry attempt started
    recovered: list[float] = []  # when each dependency event was handled
    attempts_max = 0
    burst_done = anyio.Event()
    all_recovered = anyio.Event()
    perf = time.perf_counter

    async def handler(event: Event[int], ctx: Context) -> None:
        nonlocal healthy, first_failures, attempts_max
        if not calls_dependency[event.payload]:
            await anyio.sleep(work)
            healthy += 1
            if healthy == healthy_total and first_failures == dependency_total:
                burst_done.set()
            return
        attempts_max = max(attempts_max, ctx.attempt)
        if ctx.attempt > 1:
            retry_attempts.append(perf())
        try:
            await dependency.call(work)
        except ConnectionRefusedError:
            if ctx.attempt == 1:
                first_failures += 1
                if healthy == healthy_total and first_failures == dependency_total:
                    burst_done.set()
            raise
        recovered.append(perf())
        if len(recovered) == dependency_total:
            all_recovered.set()

    config = BusConfig(breaker=None)
    async with Bus.open(path, config=config) as bus:
        bus.subscribe("t", name="s", retry=retry, concurrency=RECOVERY_CONCURRENCY)(handler)
        started = perf()
        for start in range(0, total, 1000):
            await bus.publish_many(
                Message("t", i, key=f"k{i}") for i in range(start, min(start + 1000, total))
            )
        with anyio.fail_after(300):
            await burst_done.wait()
        burst_end = perf()
        burst_retries = len(retry_attempts)

        # Still failing: wait for the budget's stored tokens to be spent, then count.
        await anyio.sleep(SETTLE_SECONDS if settle is None else settle)
        counted = len(retry_attempts)
        window_start = perf()
        await anyio.sleep(hold)
        held_seconds = perf() - window_start
        held = sum(1 for t in retry_attempts[counted:] if t >= window_start)
        m = bus.metrics().subscriptions["s"]
        held_waiting, held_due = m.retries_waiting, m.retries_due

        # Recovered.
        dependency.down = False
        back = perf()
        m = bus.metrics().subscriptions["s"]
        waiting_at_recovery = m.retries_waiting + m.in_flight  # a retry call may be running
        with anyio.fail_after(300):
            await all_recovered.wait()
        drain_seconds = recovered[-1] - back
        await bus.drain(timeout=120)
        m = bus.metrics().subscriptions["s"]
        if m.retries_waiting or m.retries_due or m.parked or m.in_flight:
            raise RuntimeError(f"the retry lane is not empty after the drain: {m}")
        dead = len(await bus.dead_letters.list(limit=100_000))
    return Recovery(
        events=total,
        dependency_events=dependency_total,
        burst_seconds=burst_end - started,
        burst_retries=burst_retries,
        held_rate=held / held_seconds,
        held_seconds=held_seconds,
        held_waiting=held_waiting,
        held_due=held_due,
        waiting_at_recovery=waiting_at_recovery,
        drained=sum(1 for t in recovered if t >= back),
        drain_seconds=drain_seconds,
        attempts_max=attempts_max,
        dead=dead,
        floor=retry.budget_floor,
    )


def recovery_verdicts(r: Recovery) -> list[tuple[str, bool]]:
    """The recovery phase's PASS/FAIL lines: (text, passed)."""
    drain = r.drain_rate / r.floor
    held = r.held_rate / r.floor
    low, high = HELD_RANGE
    ok_drain = drain >= RECOVERY_TARGET and r.dead == 0
    ok_held = low <= held <= high
    return [
        (
            f"{'PASS' if ok_drain else 'FAIL'} recovered dependency: retries drain at "
            f"{drain:.0f}x the budget floor (>= {RECOVERY_TARGET:g}x), {r.dead} dead-lettered",
            ok_drain,
        ),
        (
            f"{'PASS' if ok_held else 'FAIL'} still-failing dependency: retries held to "
            f"{held:.2f}x the budget floor ({low:g}x-{high:g}x)",
            ok_held,
        ),
    ]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))] * 1000


#: Runs :func:`measure` makes: saturated and paced, each healthy then failing; recovery.
RUNS = 5


async def measure(
    total: int,
    work: float,
    quick: bool,
    hold: float = 3.0,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Result], Recovery]:
    say = progress or (lambda _msg: None)
    results: list[Result] = []
    with temp_dir() as tmp:
        n = 0

        def fresh() -> Path:
            nonlocal n
            n += 1
            return Path(tmp) / f"run{n}.db"

        healthy_kinds = ["ok"] * kinds_for(total, True, 1).count("ok")
        mixed_kinds = kinds_for(total, True, 1)
        saturated: dict[str, tuple[float, int, int]] = {}
        for name, kinds in (("healthy", healthy_kinds), ("failing", mixed_kinds)):
            t, _, commits, dead = await one_run(fresh(), kinds, work, None)
            saturated[name] = (len(healthy_kinds) / t, commits, dead)
            say(f"saturated {name}: {len(healthy_kinds) / t:,.0f} healthy events/s")
        # Paced: healthy events arrive at half the measured all-healthy capacity in
        # both runs; the failing run adds its failing events on top.
        capacity = saturated["healthy"][0]
        for name, kinds in (("healthy", healthy_kinds), ("failing", mixed_kinds)):
            paced_rate = 0.5 * capacity * len(kinds) / len(healthy_kinds)
            _, lat, _, _ = await one_run(fresh(), kinds, work, paced_rate)
            rate, commits, dead = saturated[name]
            results.append(Result(name, rate, pct(lat, 0.5), pct(lat, 0.99), commits, dead))
            say(f"paced {name}: p99 {pct(lat, 0.99) * 1e3:.2f} ms")
        recovery = await recovery_run(fresh(), total, work, hold)
        say("recovery")
    return results, recovery


def report(results: list[Result], recovery: Recovery, total: int, work: float) -> int:
    print(
        f"eventbus retries benchmark: {total} events, healthy handler awaits {work * 1000:.1f} ms"
    )
    print(machine(loop_name()))
    print("SQLite file, durability normal")
    print("failing run: 10% poison (dead-lettered after 5 attempts), 20% transient (1 retry)")
    print()
    print(
        f"{'run':<20} {'healthy ev/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'commits':>8} {'dead':>6}"
    )
    for r in results[:2]:
        print(
            f"{r.name:<20} {r.healthy_per_s:>12,.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} "
            f"{r.commits:>8} {r.dead:>6}"
        )
    healthy, failing = results[0], results[1]
    ratio = failing.healthy_per_s / healthy.healthy_per_s
    p99_ratio = failing.p99_ms / healthy.p99_ms
    ok_tp = ratio >= THROUGHPUT_SHARE
    ok_lat = p99_ratio <= P99_FACTOR
    rec = recovery
    print()
    print(
        f"recovery: {rec.events:,} events published at once while a dependency is down, "
        f"{rec.dependency_events:,} of them calling it;"
    )
    print(
        f"  default retry budget (ratio {RECOVERY_RETRY.budget_ratio:g} per fresh event, "
        f"floor {rec.floor:g}/s), {RECOVERY_RETRY.concurrency} retries at once, no breaker"
    )
    print(f"{'stage':<16} {'retries':>8} {'seconds':>8} {'retries/s':>10} {'x floor':>8}  notes")
    print(
        f"{'burst':<16} {rec.burst_retries:>8,} {rec.burst_seconds:>8.2f} "
        f"{rec.burst_retries / rec.burst_seconds:>10,.1f} {'':>8}"
        f"  failed, on tokens earned by {rec.events - rec.dependency_events:,} fresh events"
    )
    print(
        f"{'still failing':<16} {round(rec.held_rate * rec.held_seconds):>8,} "
        f"{rec.held_seconds:>8.2f} {rec.held_rate:>10,.1f} {rec.held_rate / rec.floor:>8.2f}"
        f"  {rec.held_waiting:,} waiting, {rec.held_due:,} due and held"
    )
    print(
        f"{'recovered':<16} {rec.drained:>8,} {rec.drain_seconds:>8.2f} "
        f"{rec.drain_rate:>10,.1f} {rec.drain_rate / rec.floor:>8.0f}"
        f"  {rec.drain_rate / rec.held_rate if rec.held_rate else float('inf'):.0f}x the"
        f" still-failing rate; at most {rec.attempts_max} attempts per event"
    )
    print()
    print(
        f"{'PASS' if ok_tp else 'FAIL'} healthy throughput under failure: "
        f"{ratio:.1%} of all-healthy (>= {THROUGHPUT_SHARE:.0%})"
    )
    print(
        f"{'PASS' if ok_lat else 'FAIL'} healthy p99 under failure: "
        f"{p99_ratio:.2f}x of all-healthy (<= {P99_FACTOR:g}x)"
    )
    recovery_lines = recovery_verdicts(recovery)
    for text, _ in recovery_lines:
        print(text)
    return 0 if ok_tp and ok_lat and all(ok for _, ok in recovery_lines) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--work", type=float, default=0.001, help="seconds per healthy event")
    parser.add_argument(
        "--hold", type=float, help="seconds the dependency stays down after the burst (3)"
    )
    parser.add_argument("--quick", action="store_true")
    add_quiet(parser)
    args = parser.parse_args(argv)
    total = 2000 if args.quick and args.events == 20_000 else args.events
    hold = args.hold or (1.0 if args.quick else 3.0)

    async def run() -> int:
        with steps("retries", RUNS, quiet=args.quiet) as say:
            results, recovery = await measure(total, args.work, args.quick, hold, say)
        return report(results, recovery, total, args.work)  # in the loop: it names it

    # The failing runs dead-letter thousands of events on purpose, each logged at
    # WARNING on eventbus.dispatch: keep them off the report (and off the clock).
    dispatch_log = logging.getLogger("eventbus.dispatch")
    level = dispatch_log.level
    dispatch_log.setLevel(logging.ERROR)
    try:
        return eventbus.run(run())
    finally:
        dispatch_log.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
