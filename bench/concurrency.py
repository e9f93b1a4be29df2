"""Key-ordered concurrency: a handler waiting on outside I/O, from 1 to 64 calls at once.

    .venv/bin/python bench/concurrency.py             # 3 rounds (about a minute)
    .venv/bin/python bench/concurrency.py --quick     # a smoke run, a few seconds
    .venv/bin/python bench/concurrency.py --levels 1 --levels 64 --rounds 5

Workload: a per-event handler that awaits 1 ms of outside I/O (``anyio.sleep(0.001)``
stands for it: a call to a database or an HTTP API), events on 256 keys (event ``i``
has key ``k{i % 256}``), one subscription on a SQLite file with ``durability="normal"``,
subscribed with ``concurrency=`` 1, 4, 16 and 64.

Two measurements per concurrency level:

* **backlog**: every event is published first (one task, ``publish_many`` in chunks of
  1,000, so the log holds them in index order), then the subscription is registered
  and drains them; timed from ``subscribe`` until ``drain()`` returns. A level gets
  ``--events`` events per call it may run at once (1,000 at concurrency 1, up to
  ``--max-events``), so each measurement lasts a few seconds;
* **paced**: a fresh bus, events published with ``publish_nowait`` at half the rate
  the level reached on the backlog (median over rounds), for ``--paced-seconds``;
  reports the end-to-end latency, from just before the publish to the return of the
  handler (the 1 ms of I/O included), and the rate handled.

The ceiling, measured in the same round just before each backlog run: a bare worker
pool, as many asyncio tasks as the level taking event indices from a bounded
``asyncio.Queue`` and awaiting the same ``anyio.sleep(0.001)`` (no log, no ordering,
no acknowledgement). uvloop's timers have millisecond granularity, so one such sleep
lasts about 1.5 ms and one task reaches about 650 calls per second; the ceiling shows
what the loop itself allows at each level on this machine at this moment.

Two columns say what held a run back: ``cpu``, the event loop thread's CPU time over
the run's wall time, and ``wait``, the time that thread was ready to run but had no
CPU (Linux schedstat), over the wall time: the machine's other work taking the loop's
core. A level whose cpu and wait add up to about 100% is bound by the CPU, not by the
handlers' waits; the wait part of it is the share a quieter machine would give back.
``us/ev`` is the loop thread's CPU time per event (``pool``: the same for the bare
pool), what an event costs whatever share of a core the machine gave the run.

Checked in every run (backlog and paced), by the handler itself: no two events of one
key were ever in the handler at once (the keys in flight are tracked), each key's
events were handled in publish order (index order), and every event was handled
exactly once. Target: concurrency 64 reaches at least 25 times the events/s of
concurrency 1 on the backlog (the median of the ratios paired within a round). A
FAIL line, for a check or for the target, makes the exit status 1.

Levels run in a rotated order each round (the machine's speed drifts when other work
shares it); rates and ratios reported are medians over rounds. Everything runs on
uvloop through ``eventbus.run``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import anyio
from _support import (
    ThreadTimes,
    add_quiet,
    frozen_gc,
    loop_name,
    machine,
    median,
    steps,
    temp_dir,
)

import eventbus
from eventbus import Bus, BusConfig, BusFull, Context, Event, Message

TOPIC = "jobs"
SUBSCRIPTION = "worker"
KEYS = 256  # distinct ordering keys; event i has key KEY_NAMES[i % KEYS]
KEY_NAMES = tuple(f"k{k}" for k in range(KEYS))
IO_SECONDS = 0.001  # the outside I/O each handler call awaits
CHUNK = 1000  # messages per publish_many call while filling the backlog
LEVELS = (1, 4, 16, 64)

# The target: the backlog rate at TARGET_LEVEL, at least TARGET_RATIO times the rate at
# concurrency 1, measured in the same round.
TARGET_LEVEL = 64
TARGET_RATIO = 25.0
PACED_SHARE = 0.5  # the paced load, as a share of the level's backlog rate


def key_of(i: int) -> str:
    return KEY_NAMES[i % KEYS]


class Checker:
    """What the handler saw, checked as it happens: keys in the handler at once,
    per-key order, and how often each event arrived.

    ``enter(i, key)`` as a call of event ``i`` starts, ``leave(key)`` as it ends.
    """

    def __init__(self, events: int) -> None:
        self.events = events
        self.seen = array("I", bytes(4 * events))  # times each event was handled
        self.in_flight: set[str] = set()
        self.last: dict[str, int] = {}  # per key: the index handled last
        self.overlaps = 0  # a call started while another of its key was in the handler
        self.out_of_order = 0  # an event handled after a later one of its key
        self.calls = 0
        self.peak = 0  # most calls in the handler at once

    def enter(self, i: int, key: str) -> None:
        in_flight = self.in_flight
        if key in in_flight:
            self.overlaps += 1
        in_flight.add(key)
        if len(in_flight) > self.peak:
            self.peak = len(in_flight)
        if self.last.get(key, -1) >= i:
            self.out_of_order += 1
        self.last[key] = i
        self.seen[i] += 1
        self.calls += 1

    def leave(self, key: str) -> None:
        self.in_flight.discard(key)

    @property
    def missing(self) -> int:
        return self.seen.count(0)

    @property
    def repeated(self) -> int:
        return sum(1 for n in self.seen if n > 1)

    @property
    def clean(self) -> bool:
        return not (self.overlaps or self.out_of_order or self.missing or self.repeated)


@dataclass
class Checks:
    """The checkers' findings summed over runs."""

    runs: int = 0
    events: int = 0
    overlaps: int = 0
    out_of_order: int = 0
    missing: int = 0
    repeated: int = 0

    def add(self, checker: Checker) -> None:
        self.runs += 1
        self.events += checker.events
        self.overlaps += checker.overlaps
        self.out_of_order += checker.out_of_order
        self.missing += checker.missing
        self.repeated += checker.repeated


@dataclass(frozen=True)
class Measurement:
    """One timed backlog drain (or a ceiling run)."""

    level: int
    events: int
    seconds: float
    peak: int  # most handler calls seen in flight at once
    cpu: float  # the event loop thread's CPU time over the wall time
    cpu_wait: float | None  # its time ready to run but without a CPU, over the wall time

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")

    @property
    def cpu_per_event(self) -> float:
        """The event loop thread's CPU time per event, in microseconds: what the run
        costs whatever share of a core the machine gave it."""
        return self.cpu * self.seconds / self.events * 1e6


@dataclass(frozen=True)
class Paced:
    """One paced run: the offered and handled rates and the end-to-end latencies."""

    level: int
    offered: float
    handled: float
    p50_ms: float
    p99_ms: float
    peak: int
    cpu: float  # the event loop thread's CPU time over the wall time, publishing included
    cpu_wait: float | None  # its time ready to run but without a CPU, over the wall time


Handler = Callable[[Event[tuple[int, float]], Context], Awaitable[None]]


def _handler(checker: Checker, io_seconds: float) -> Handler:
    """The backlog's handler: check, then wait on the I/O."""
    sleep = anyio.sleep

    async def handle(event: Event[tuple[int, float]], ctx: Context) -> None:
        i = event.payload[0]
        key = event.key
        assert key is not None
        checker.enter(i, key)
        try:
            await sleep(io_seconds)
        finally:
            checker.leave(key)

    return handle


async def backlog_run(
    path: str, level: int, events: int, io_seconds: float = IO_SECONDS
) -> tuple[Measurement, Checker]:
    """Publish ``events`` events to a fresh bus at ``path``, then subscribe with
    ``concurrency=level`` and time until ``drain()`` returns."""
    checker = Checker(events)
    async with Bus.open(path, config=BusConfig(durability="normal")) as bus:
        for start in range(0, events, CHUNK):
            await bus.publish_many(
                Message(TOPIC, (i, 0.0), key=key_of(i))
                for i in range(start, min(start + CHUNK, events))
            )
        with frozen_gc():
            times = ThreadTimes()
            started = time.perf_counter()
            bus.subscribe(TOPIC, name=SUBSCRIPTION, concurrency=level)(
                _handler(checker, io_seconds)
            )
            await bus.drain(timeout=600)
            elapsed = time.perf_counter() - started
            cpu, wait = times.since()
        _check_metrics(bus, events)
    return Measurement(level, events, elapsed, checker.peak, *_shares(cpu, wait, elapsed)), checker


async def paced_run(
    path: str, level: int, rate: float, seconds: float, io_seconds: float = IO_SECONDS
) -> tuple[Paced, Checker]:
    """Publish at ``rate`` events/s for ``seconds`` to a subscription running at
    ``concurrency=level``; latencies from just before each publish to the return of
    its handler call."""
    events = max(1, round(rate * seconds))
    checker = Checker(events)
    latencies = array("d", bytes(8 * events))
    perf = time.perf_counter
    sleep = anyio.sleep
    handled_at = 0.0

    async def handle(event: Event[tuple[int, float]], ctx: Context) -> None:
        nonlocal handled_at
        i, published_at = event.payload
        key = event.key
        assert key is not None
        checker.enter(i, key)
        try:
            await sleep(io_seconds)
        finally:
            checker.leave(key)
        handled_at = perf()
        latencies[i] = handled_at - published_at

    async with Bus.open(path, config=BusConfig(durability="normal")) as bus:
        bus.subscribe(TOPIC, name=SUBSCRIPTION, concurrency=level)(handle)
        with frozen_gc():
            times = ThreadTimes()
            first = perf()
            i = 0
            while i < events:
                # Publish every event whose time has come, then sleep until the next:
                # the loop's timers are too coarse for one sleep per event.
                due = min(events, int((perf() - first) * rate) + 1)
                while i < due:
                    try:
                        bus.publish_nowait(TOPIC, (i, perf()), key=key_of(i))
                    except BusFull:
                        await sleep(0.001)
                        continue
                    i += 1
                await sleep(max(0.0, first + i / rate - perf()))
            published = perf() - first
            await bus.drain(timeout=600)
            cpu, wait = times.since()
            wall = perf() - first
        _check_metrics(bus, events)
    elapsed = handled_at - first
    cpu_share, wait_share = _shares(cpu, wait, wall)
    ordered = sorted(latencies)
    return (
        Paced(
            level,
            offered=events / published if published > 0 else float("inf"),
            handled=events / elapsed if elapsed > 0 else float("inf"),
            p50_ms=_percentile(ordered, 0.50) * 1000,
            p99_ms=_percentile(ordered, 0.99) * 1000,
            peak=checker.peak,
            cpu=cpu_share,
            cpu_wait=wait_share,
        ),
        checker,
    )


async def pool_ceiling(level: int, events: int, io_seconds: float = IO_SECONDS) -> Measurement:
    """A bare worker pool: ``level`` tasks take event indices from a bounded
    ``asyncio.Queue`` and await the same I/O; no log, no order, no acknowledgement."""
    queue: asyncio.Queue[int | None] = asyncio.Queue(BusConfig().channel_capacity)
    sleep = anyio.sleep
    in_flight = peak = 0

    async def worker() -> None:
        nonlocal in_flight, peak
        while True:
            item = await queue.get()
            if item is None:
                return
            in_flight += 1
            peak = max(peak, in_flight)
            await sleep(io_seconds)
            in_flight -= 1

    async def produce() -> None:
        for i in range(events):
            await queue.put(i)
        for _ in range(level):
            await queue.put(None)

    with frozen_gc():
        times = ThreadTimes()
        started = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(level):
                tg.create_task(worker())
            tg.create_task(produce())
        elapsed = time.perf_counter() - started
        cpu, wait = times.since()
    return Measurement(level, events, elapsed, peak, *_shares(cpu, wait, elapsed))


def _shares(cpu: float, wait: float | None, elapsed: float) -> tuple[float, float | None]:
    if elapsed <= 0:
        return 0.0, None
    return cpu / elapsed, None if wait is None else wait / elapsed


def _check_metrics(bus: Bus, events: int) -> None:
    m = bus.metrics().subscriptions[SUBSCRIPTION]
    if m.handled != events or m.failed_attempts or m.dead_lettered or m.in_flight:
        raise RuntimeError(
            f"subscription metrics after drain: handled {m.handled} of {events}, "
            f"{m.failed_attempts} failed attempts, {m.dead_lettered} dead-lettered, "
            f"{m.in_flight} calls in flight"
        )


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * (len(sorted_values) - 1)))]


# -- running and reporting ---------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How much each measurement does."""

    levels: tuple[int, ...] = LEVELS
    events_per_call: int = 1000  # backlog events per call a level may run at once
    max_events: int = 40_000  # cap on one backlog
    rounds: int = 3
    paced_seconds: float = 2.0
    io_seconds: float = IO_SECONDS

    def events(self, level: int) -> int:
        return max(1, min(self.max_events, self.events_per_call * level))


QUICK = Plan(events_per_call=40, max_events=1280, rounds=1, paced_seconds=0.25)


@dataclass
class Report:
    plan: Plan
    backlog: dict[int, list[Measurement]] = field(default_factory=dict)  # level -> rounds
    ceiling: dict[int, list[Measurement]] = field(default_factory=dict)
    paced: dict[int, Paced] = field(default_factory=dict)
    checks: Checks = field(default_factory=Checks)

    def rate(self, level: int) -> float:
        return median([m.rate for m in self.backlog[level]])

    def ceiling_rate(self, level: int) -> float:
        return median([m.rate for m in self.ceiling[level]])

    def paired_ratios(self, level: int, base: int) -> list[float]:
        """``level``'s rate over ``base``'s, round by round."""
        return [
            a.rate / b.rate for a, b in zip(self.backlog[level], self.backlog[base], strict=True)
        ]


async def measure(plan: Plan, progress: Callable[[str], None] | None = None) -> Report:
    """Every level's backlog (after its ceiling) in each round, levels rotated between
    rounds; then each level paced at half its median backlog rate. Call it inside
    ``eventbus.run`` (uvloop)."""
    say = progress or (lambda _msg: None)
    report = Report(plan)
    levels = plan.levels
    with temp_dir() as directory:
        runs = 0

        def fresh() -> str:
            nonlocal runs
            runs += 1
            return os.path.join(directory, f"run{runs}.db")

        for r in range(max(1, plan.rounds)):
            shift = r % len(levels)
            for level in levels[shift:] + levels[:shift]:
                n = plan.events(level)
                ceiling = await pool_ceiling(level, n, plan.io_seconds)
                run, checker = await backlog_run(fresh(), level, n, plan.io_seconds)
                report.ceiling.setdefault(level, []).append(ceiling)
                report.backlog.setdefault(level, []).append(run)
                report.checks.add(checker)
                say(
                    f"round {r + 1} concurrency {level}: {run.rate:,.0f} ev/s"
                    f" (pool {ceiling.rate:,.0f}), peak {run.peak} in flight"
                )
        for level in levels:
            rate = PACED_SHARE * report.rate(level)
            paced, checker = await paced_run(
                fresh(), level, rate, plan.paced_seconds, plan.io_seconds
            )
            report.paced[level] = paced
            report.checks.add(checker)
            say(
                f"paced concurrency {level}: {paced.handled:,.0f} of {paced.offered:,.0f} ev/s,"
                f" p50 {paced.p50_ms:.2f} ms, p99 {paced.p99_ms:.2f} ms"
            )
    return report


def verdicts(report: Report) -> list[tuple[str, bool | None]]:
    """The PASS/FAIL lines: (text, passed); passed is None when not measured."""
    c = report.checks
    out: list[tuple[str, bool | None]] = []

    def line(ok: bool, text: str) -> None:
        out.append((f"{'PASS' if ok else 'FAIL'} {text}", ok))

    line(
        c.overlaps == 0,
        f"no two events of one key in the handler at once: {c.overlaps} overlaps",
    )
    line(
        c.out_of_order == 0,
        f"each key's events handled in publish order: {c.out_of_order} out of order",
    )
    line(
        c.missing == 0 and c.repeated == 0,
        f"every event handled exactly once: {c.missing} missing, {c.repeated} repeated"
        f" ({c.events:,} events in {c.runs} runs)",
    )
    label = f"concurrency {TARGET_LEVEL} >= {TARGET_RATIO:g}x the events/s of concurrency 1"
    if TARGET_LEVEL not in report.backlog or 1 not in report.backlog:
        out.append((f"SKIP {label}: not measured", None))
    else:
        ratios = report.paired_ratios(TARGET_LEVEL, 1)
        ratio = median(ratios)
        runs = ", ".join(f"{x:.1f}x" for x in ratios)
        line(ratio >= TARGET_RATIO, f"{label}: {ratio:.1f}x (rounds: {runs})")
    return out


def format_report(report: Report) -> str:
    plan = report.plan
    levels = [lv for lv in plan.levels if lv in report.backlog]
    lines = [
        f"eventbus concurrency: a per-event handler awaiting {plan.io_seconds * 1000:g} ms"
        f" of I/O, {KEYS} keys, one subscription",
        machine(loop_name()),
        'SQLite file, durability "normal"; backlog published first, then drained;'
        f" {_rounds(plan.rounds)}, medians",
        "",
        f"{'concurrency':>11} {'events':>7} {'events/s':>9} {'vs c=1':>7}"
        f" {'pool ev/s':>10} {'vs pool':>8} {'peak':>5} {'cpu':>5} {'wait':>5}"
        f" {'us/ev':>6} {'pool':>5}  runs (ev/s)",
    ]
    base = report.rate(1) if 1 in report.backlog else None
    for level in levels:
        rate = report.rate(level)
        vs1 = "-" if base is None else f"{median(report.paired_ratios(level, 1)):.1f}x"
        pool = report.ceiling_rate(level)
        peak = max(m.peak for m in report.backlog[level])
        cpu = median([m.cpu for m in report.backlog[level]])
        wait = _share([m.cpu_wait for m in report.backlog[level]])
        us = median([m.cpu_per_event for m in report.backlog[level]])
        pool_us = median([m.cpu_per_event for m in report.ceiling[level]])
        runs = " ".join(f"{m.rate:,.0f}" for m in report.backlog[level])
        lines.append(
            f"{level:>11} {plan.events(level):>7,} {rate:>9,.0f} {vs1:>7}"
            f" {pool:>10,.0f} {rate / pool:>8.0%} {peak:>5} {cpu:>5.0%} {wait:>5}"
            f" {us:>6.1f} {pool_us:>5.1f}  {runs}"
        )
    if report.paced:
        lines += [
            "",
            f"paced at {PACED_SHARE:.0%} of each level's backlog rate for"
            f" {plan.paced_seconds:g} s (latency: publish to handler return):",
            f"{'concurrency':>11} {'offered/s':>10} {'handled/s':>10} {'p50 ms':>8}"
            f" {'p99 ms':>8} {'peak':>5} {'cpu':>5} {'wait':>5}",
        ]
        for level in levels:
            p = report.paced.get(level)
            if p is not None:
                lines.append(
                    f"{level:>11} {p.offered:>10,.0f} {p.handled:>10,.0f} {p.p50_ms:>8.2f}"
                    f" {p.p99_ms:>8.2f} {p.peak:>5} {p.cpu:>5.0%} {_share([p.cpu_wait]):>5}"
                )
    lines.append("")
    lines += [text for text, _ in verdicts(report)]
    return "\n".join(lines)


def _share(values: list[float | None]) -> str:
    """The median of known shares as a percentage ("-" when none is known)."""
    known = [v for v in values if v is not None]
    return f"{median(known):.0%}" if known else "-"


def _rounds(n: int) -> str:
    n = max(1, n)
    return f"{n} round" if n == 1 else f"{n} rounds"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny backlogs, 1 round: a smoke run")
    parser.add_argument(
        "--levels", type=int, action="append", help=f"concurrency levels (default {LEVELS})"
    )
    parser.add_argument("--events", type=int, help="backlog events per concurrent call (1000)")
    parser.add_argument("--max-events", type=int, help="cap on one backlog (40000)")
    parser.add_argument("--rounds", type=int, help="rounds, medians reported (default 3)")
    parser.add_argument("--paced-seconds", type=float, help="length of each paced run (2)")
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio loop")
    add_quiet(parser)
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    plan = Plan(
        levels=tuple(sorted(set(args.levels))) if args.levels else plan.levels,
        events_per_call=args.events or plan.events_per_call,
        max_events=args.max_events or plan.max_events,
        rounds=args.rounds or plan.rounds,
        paced_seconds=args.paced_seconds or plan.paced_seconds,
    )

    # Each round's backlog runs, then one paced run per level.
    total = (max(1, plan.rounds) + 1) * len(plan.levels)

    async def run() -> Report:
        with steps("concurrency", total, quiet=args.quiet) as say:
            report = await measure(plan, progress=say)
        print(format_report(report))  # inside the loop, so the header names it
        return report

    report = eventbus.run(run(), use_uvloop=not args.no_uvloop)
    return 1 if any(ok is False for _, ok in verdicts(report)) else 0


if __name__ == "__main__":
    sys.exit(main())
