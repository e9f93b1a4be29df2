"""Healthy events under failure: the retry lane keeps failures off the hot path.

    .venv/bin/python bench/retries.py            # full run (about a minute)
    .venv/bin/python bench/retries.py --quick    # smoke run (a few seconds)

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
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import anyio

import eventbus
from eventbus import BatchPolicy, Bus, BusConfig, Context, Event, Message, RetryPolicy

RETRY = RetryPolicy(max_attempts=5, initial_delay=0.05, max_delay=1.0, budget_ratio=1.0)


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


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))] * 1000


async def measure(total: int, work: float, quick: bool) -> list[Result]:
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
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
        # Paced: healthy events arrive at half the measured all-healthy capacity in
        # both runs; the failing run adds its failing events on top.
        capacity = saturated["healthy"][0]
        for name, kinds in (("healthy", healthy_kinds), ("failing", mixed_kinds)):
            paced_rate = 0.5 * capacity * len(kinds) / len(healthy_kinds)
            _, lat, _, _ = await one_run(fresh(), kinds, work, paced_rate)
            rate, commits, dead = saturated[name]
            results.append(Result(name, rate, pct(lat, 0.5), pct(lat, 0.99), commits, dead))
    return results


def report(results: list[Result], total: int, work: float) -> int:
    print(
        f"eventbus retries benchmark: {total} events, healthy handler awaits {work * 1000:.1f} ms"
    )
    print(f"python {sys.version.split()[0]} on uvloop; SQLite file, durability normal")
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
    ok_tp = ratio >= 0.90
    ok_lat = p99_ratio <= 1.5
    print()
    print(
        f"{'PASS' if ok_tp else 'FAIL'} healthy throughput under failure: "
        f"{ratio:.1%} of all-healthy (>= 90%)"
    )
    print(
        f"{'PASS' if ok_lat else 'FAIL'} healthy p99 under failure: "
        f"{p99_ratio:.2f}x of all-healthy (<= 1.5x)"
    )
    return 0 if ok_tp and ok_lat else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--work", type=float, default=0.001, help="seconds per healthy event")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    total = 2000 if args.quick else args.events
    results = eventbus.run(measure(total, args.work, args.quick))
    return report(results, total, args.work)


if __name__ == "__main__":
    sys.exit(main())
