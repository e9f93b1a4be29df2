"""Reactive batching: the adaptive controller against every static setting, in one run.

    .venv/bin/python bench/batching.py             # 5 rounds, about 9 minutes
    .venv/bin/python bench/batching.py --quick     # a smoke run, a few seconds
    .venv/bin/python bench/batching.py --rounds 1 --workload item

Each workload is a batch handler (``list[Event]``) whose cost is a fixed part per call
plus a part per event, as a database write is (a round trip, then rows):

* call-dominated: 1 ms per call + 2 us per event;
* item-dominated: 0.2 ms per call + 300 us per event.

The cost is simulated as an awaited wait, as a database call is from the bus's point
of view: the event loop stays free for the producer, the log writer and the
acknowledgements while the handler waits. uvloop's timers have millisecond
granularity (a 0.3 ms ``sleep`` returns at once, a 2.4 ms one after 2.1 ms) and a
thread hop adds about 0.2 ms of its own, so the wait sleeps for all but its last
1.5 ms and then yields to the loop (``sleep(0)``) until its deadline: other tasks run
in between, and the cost is right to a few microseconds. A calibrated busy loop would
model a CPU-bound handler instead, which blocks the producer and the writer too, and
is not what batching is for.

Each run drives one subscription through three phases, on a fresh bus:

1. light: Poisson arrivals at a rate that keeps the handler ~25% busy at batch size
   one, published with ``publish_nowait``;
2. saturated: a closed-loop producer that keeps ``window`` events in flight (published
   but not yet handled) for the whole phase, so the subscription always has a backlog
   and runs at its capacity, and the backlog, hence the latency, stays bounded;
3. light again, the same arrivals as phase 1, starting once the saturated phase's
   backlog is handled: it shows how fast each controller gets back to low latency.

Every event carries its index; the bench notes the time just before its publish and
the time its handler call returns (``time.perf_counter``), and reports per phase the
p50 and p99 of that end-to-end latency, plus the saturated throughput: events whose
handler call returned during phase 2, per second. Settings: ``adaptive`` (the
default), ``natural``, ``aimd`` and ``fixed`` at 1, 8, 64 and 512 (``max_wait`` 5 ms),
all with ``max_size`` 512 unless fixed. Every setting runs once per round, in a
rotated order (the machine's speed drifts when other work shares it); a throughput is
the median over rounds, a percentile is taken over the latencies of every round
pooled (a p99 of one short light phase rests on a handful of events, and one
scheduling hiccup of the machine decides it). Each figure is also shown as a ratio
to the best static setting (any fixed size, or natural) for that figure.

The cyclic garbage collector is paused during each run (see ``_quiet_gc``; ``--gc``
keeps it on): the in-memory log holds every event of the run, and a full collection
of a few hundred thousand objects stalls the loop long enough to decide a p99 alone.

Done when (issue 3), per workload: adaptive reaches at least 95% of the best static
saturated throughput, and its p99 in every phase is within 1.5x of the best static p99
for that phase.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import math
import random
import statistics
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from _support import add_quiet, loop_name, machine, steps, temp_dir

import eventbus
from eventbus import BatchPolicy, Bus, BusConfig, Context, Event

TOPIC = "work"
SUBSCRIPTION = "worker"
PHASES = ("light", "saturated", "light again")
CHUNK = 64  # events the saturating producer publishes between yields to the loop
# Latencies kept per phase and run, evenly spaced in publish order: the saturated
# phase handles a few hundred thousand events, and pooled rounds are enough with this.
MAX_SAMPLES = 20_000
_RUN_IDS = itertools.count()  # a fresh log file per run with --storage file

THROUGHPUT_SHARE = 0.95  # adaptive's saturated throughput, at least, of the best static
P99_FACTOR = 1.5  # adaptive's p99 per phase, at most, times the best static's
SPIN = 0.0015  # the last part of a simulated cost, waited by yielding to the loop


@dataclass(frozen=True)
class Workload:
    """A handler's cost model and the light-load arrival rate."""

    name: str
    call_cost: float  # seconds per handler call
    item_cost: float  # seconds per event in the call
    light_rate: float  # events per second in the light phases

    def describe(self) -> str:
        return (
            f"{self.call_cost * 1e3:g} ms per call + {self.item_cost * 1e6:g} us per event;"
            f" light load {self.light_rate:g} ev/s"
        )


WORKLOADS = (
    Workload("call-dominated", call_cost=0.001, item_cost=0.000002, light_rate=200.0),
    Workload("item-dominated", call_cost=0.0002, item_cost=0.0003, light_rate=300.0),
)


@dataclass(frozen=True)
class Setting:
    """One batching configuration under test."""

    label: str
    policy: BatchPolicy

    @property
    def static(self) -> bool:
        """Fixed sizes and natural are the static settings adaptive is judged against."""
        return self.policy.mode in ("fixed", "natural")


SETTINGS = (
    Setting("adaptive", BatchPolicy(mode="adaptive")),
    Setting("natural", BatchPolicy(mode="natural")),
    Setting("aimd", BatchPolicy(mode="aimd")),
    *(Setting(f"fixed {n}", BatchPolicy(mode="fixed", max_size=n)) for n in (1, 8, 64, 512)),
)


@dataclass(frozen=True)
class Plan:
    """How long each phase lasts and how hard the saturated phase pushes."""

    light_seconds: float = 2.5
    saturated_seconds: float = 1.5
    window: int = 2048  # events in flight during the saturated phase
    rounds: int = 5
    seed: int = 1
    storage: str = "memory"  # or "file": a SQLite log with durability="normal"
    gc: bool = False  # keep the cyclic garbage collector on during runs


QUICK = Plan(light_seconds=0.1, saturated_seconds=0.15, window=128, rounds=1)


@dataclass
class Run:
    """One setting on one workload, once."""

    workload: str
    setting: str
    throughput: float  # events handled per second during the saturated phase
    latencies: dict[str, array[float]]  # phase -> seconds (sampled, see MAX_SAMPLES)
    batch_mean: dict[str, float]  # phase -> events per handler call
    events: int

    def percentile(self, phase: str, q: float) -> float:
        return _percentile(sorted(self.latencies[phase]), q)


@dataclass
class Cell:
    """One setting on one workload over every round: the median throughput, and
    percentiles of the latencies of all rounds pooled."""

    setting: Setting
    runs: list[Run] = field(default_factory=list)
    _pooled: dict[str, list[float]] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return statistics.median(r.throughput for r in self.runs) if self.runs else math.nan

    def _latencies(self, phase: str) -> list[float]:
        pooled = self._pooled.get(phase)
        if pooled is None:
            pooled = sorted(x for r in self.runs for x in r.latencies[phase])
            self._pooled[phase] = pooled
        return pooled

    def p50(self, phase: str) -> float:
        return _percentile(self._latencies(phase), 0.50)

    def p99(self, phase: str) -> float:
        return _percentile(self._latencies(phase), 0.99)

    def batch_mean(self, phase: str) -> float:
        return statistics.median(r.batch_mean[phase] for r in self.runs) if self.runs else 0.0


def _percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank percentile (NaN for no values)."""
    if not sorted_values:
        return math.nan
    rank = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[rank]


# -- the simulated handler ---------------------------------------------------------


async def io_wait(seconds: float) -> None:
    """Wait ``seconds`` as an awaited I/O call would, to within microseconds: sleep on a
    timer for all but the last ``SPIN`` seconds, then yield to the loop until the
    deadline (other tasks run in between)."""
    deadline = time.perf_counter() + seconds
    if seconds > SPIN:
        await asyncio.sleep(seconds - SPIN)
    while time.perf_counter() < deadline:  # noqa: ASYNC110 - a deadline, not an event
        await asyncio.sleep(0)


class Tracker:
    """Publish times, completion times and in-flight accounting for one run."""

    def __init__(self) -> None:
        self.sent: list[float] = []
        self.done: list[float] = []
        self.completed = 0
        self.progress = asyncio.Event()
        self.phase = 0  # index into PHASES: which counters the handler adds to
        self.calls = [0] * len(PHASES)
        self.handled = [0] * len(PHASES)

    @property
    def published(self) -> int:
        return len(self.sent)

    @property
    def in_flight(self) -> int:
        return self.published - self.completed

    def publish(self, bus: Bus) -> None:
        i = len(self.sent)
        self.sent.append(time.perf_counter())
        self.done.append(math.nan)
        bus.publish_nowait(TOPIC, i)

    def finished(self, events: list[Event[int]]) -> None:
        now = time.perf_counter()
        done = self.done
        for event in events:
            done[event.payload] = now
        self.completed += len(events)
        self.calls[self.phase] += 1
        self.handled[self.phase] += len(events)
        self.progress.set()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.progress.clear()
                await self.progress.wait()


# -- the load ----------------------------------------------------------------------


async def light_load(bus: Bus, tracker: Tracker, rate: float, seconds: float, seed: int) -> None:
    """Poisson arrivals at ``rate`` per second for ``seconds`` (same seed: same gaps)."""
    rng = random.Random(seed)
    start = time.perf_counter()
    at = start
    end = start + seconds
    while True:
        at += rng.expovariate(rate)
        if at >= end:
            break
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tracker.publish(bus)
    delay = end - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


async def saturating_load(bus: Bus, tracker: Tracker, window: int, seconds: float) -> None:
    """Keep ``window`` events in flight for ``seconds``: publish whenever some finish."""
    end = time.perf_counter() + seconds
    while (now := time.perf_counter()) < end:
        room = min(CHUNK, window - tracker.in_flight)
        if room <= 0:
            tracker.progress.clear()
            try:
                async with asyncio.timeout(end - now):
                    await tracker.progress.wait()
            except TimeoutError:
                break
            continue
        for _ in range(room):
            tracker.publish(bus)
        await asyncio.sleep(0)


async def run_one(workload: Workload, setting: Setting, plan: Plan, directory: str) -> Run:
    """Drive one fresh bus through the three phases and measure it."""
    tracker = Tracker()
    call, item = workload.call_cost, workload.item_cost
    path = ":memory:" if plan.storage == "memory" else f"{directory}/log-{next(_RUN_IDS)}.db"
    drain_timeout = 30 + plan.window * (call + item)
    async with Bus.open(path, config=BusConfig(batch=setting.policy)) as bus:

        @bus.subscribe(TOPIC, name=SUBSCRIPTION)
        async def handle(events: list[Event[int]], ctx: Context) -> None:
            await io_wait(call + item * len(events))
            tracker.finished(events)

        bounds = [0]
        await light_load(bus, tracker, workload.light_rate, plan.light_seconds, plan.seed)
        bounds.append(tracker.published)
        tracker.phase = 1
        sat_start = time.perf_counter()
        await saturating_load(bus, tracker, plan.window, plan.saturated_seconds)
        sat_end = time.perf_counter()
        bounds.append(tracker.published)
        await tracker.wait_until(lambda: tracker.in_flight == 0, drain_timeout)
        tracker.phase = 2
        await light_load(bus, tracker, workload.light_rate, plan.light_seconds, plan.seed + 1)
        bounds.append(tracker.published)
        await tracker.wait_until(lambda: tracker.in_flight == 0, drain_timeout)
    handled = sum(1 for t in tracker.done if sat_start <= t <= sat_end)
    latencies: dict[str, array[float]] = {}
    for phase, lo, hi in zip(PHASES, bounds[:-1], bounds[1:], strict=True):
        step = max(1, math.ceil((hi - lo) / MAX_SAMPLES))
        latencies[phase] = array(
            "d", (tracker.done[i] - tracker.sent[i] for i in range(lo, hi, step))
        )
    return Run(
        workload.name,
        setting.label,
        handled / (sat_end - sat_start),
        latencies,
        {
            p: h / c if c else 0.0
            for p, h, c in zip(PHASES, tracker.handled, tracker.calls, strict=True)
        },
        tracker.published,
    )


# -- running and reporting ---------------------------------------------------------


@dataclass
class Report:
    plan: Plan
    workloads: tuple[Workload, ...]
    cells: dict[str, dict[str, Cell]]  # workload -> setting label -> cell

    def static_cells(self, workload: str) -> list[Cell]:
        return [c for c in self.cells[workload].values() if c.setting.static]

    def best_throughput(self, workload: str) -> Cell:
        return max(self.static_cells(workload), key=lambda c: c.throughput)

    def best_p50(self, workload: str, phase: str) -> Cell:
        return min(self.static_cells(workload), key=lambda c: c.p50(phase))

    def best_p99(self, workload: str, phase: str) -> Cell:
        return min(self.static_cells(workload), key=lambda c: c.p99(phase))


async def measure(
    plan: Plan,
    workloads: tuple[Workload, ...] = WORKLOADS,
    settings: tuple[Setting, ...] = SETTINGS,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Run every setting on every workload ``plan.rounds`` times, in a rotated order.
    Call it inside ``eventbus.run`` (uvloop)."""
    say = progress or (lambda _msg: None)
    cells = {w.name: {s.label: Cell(s) for s in settings} for w in workloads}
    with temp_dir("eventbus-batching-") as directory:
        for r in range(max(1, plan.rounds)):
            order = list(settings[r % len(settings) :] + settings[: r % len(settings)])
            for workload in workloads:
                for setting in order:
                    with _quiet_gc(plan.gc):
                        run = await run_one(workload, setting, plan, directory)
                    cells[workload.name][setting.label].runs.append(run)
                    say(
                        f"round {r + 1} {workload.name} {setting.label}: "
                        f"{run.throughput:,.0f} ev/s saturated, p99 "
                        + " / ".join(f"{run.percentile(p, 0.99) * 1e3:.1f}" for p in PHASES)
                        + " ms, mean batch "
                        + " / ".join(f"{run.batch_mean[p]:.0f}" for p in PHASES)
                    )
    return Report(plan, workloads, cells)


def verdicts(report: Report) -> list[tuple[str, bool]]:
    """The PASS/FAIL lines of the Done-when, one per workload: (text, passed)."""
    out: list[tuple[str, bool]] = []
    for workload in report.workloads:
        cells = report.cells[workload.name]
        adaptive = cells.get("adaptive")
        if adaptive is None or not report.static_cells(workload.name):
            continue
        best = report.best_throughput(workload.name)
        share = adaptive.throughput / best.throughput
        ok = share >= THROUGHPUT_SHARE
        parts = [f"throughput {share:.0%} of {best.setting.label}"]
        for phase in PHASES:
            best99 = report.best_p99(workload.name, phase)
            factor = adaptive.p99(phase) / best99.p99(phase)
            ok = ok and factor <= P99_FACTOR
            parts.append(f"p99 {phase} {factor:.2f}x {best99.setting.label}")
        text = (
            f"{'PASS' if ok else 'FAIL'} {workload.name}: adaptive >= {THROUGHPUT_SHARE:.0%}"
            f" of the best static saturated throughput and p99 <= {P99_FACTOR}x the best"
            f" static p99 in every phase ({'; '.join(parts)})"
        )
        out.append((text, ok))
    return out


def statics_meeting_every_cell(report: Report, workload: str) -> list[str]:
    """Static settings that would pass adaptive's own bar against the best static."""
    best = report.best_throughput(workload).throughput
    passing = []
    for cell in report.static_cells(workload):
        ok = cell.throughput >= THROUGHPUT_SHARE * best and all(
            cell.p99(p) <= P99_FACTOR * report.best_p99(workload, p).p99(p) for p in PHASES
        )
        if ok:
            passing.append(cell.setting.label)
    return passing


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.1f}"


def format_report(report: Report) -> str:
    plan = report.plan
    lines = [
        "eventbus batching: one subscription, a batch handler costing a fixed part per call"
        " plus a part per event",
        f"{machine(loop_name())}; storage {plan.storage}",
        f"phases: light {plan.light_seconds:g} s -> saturated {plan.saturated_seconds:g} s"
        f" ({plan.window} in flight) -> light {plan.light_seconds:g} s; {plan.rounds} round(s):"
        " throughput the median, percentiles over all rounds' latencies;"
        f" cyclic GC {'on' if plan.gc else 'paused'} during runs",
        "latency = publish -> handler return, ms; (x) = ratio to the best static setting"
        " (fixed 1/8/64/512, natural) for that figure",
    ]
    for workload in report.workloads:
        cells = report.cells[workload.name]
        best_thr = report.best_throughput(workload.name).throughput
        lines += ["", f"{workload.name}: {workload.describe()}"]
        header = f"{'setting':<10} {'saturated ev/s':>20}"
        for phase in PHASES:
            header += f" | {phase + ' p50 / p99':^31}"
        header += " | mean batch per phase"
        lines += [header, "-" * len(header)]
        for cell in cells.values():
            share = cell.throughput / best_thr
            row = f"{cell.setting.label:<10} {cell.throughput:>11,.0f} ({share:4.2f}x)"
            for phase in PHASES:
                b50 = report.best_p50(workload.name, phase).p50(phase)
                b99 = report.best_p99(workload.name, phase).p99(phase)
                row += (
                    f" | {_ms(cell.p50(phase)):>6} ({cell.p50(phase) / b50:4.2f}x)"
                    f" {_ms(cell.p99(phase)):>6} ({cell.p99(phase) / b99:5.2f}x)"
                )
            row += " | " + " / ".join(f"{cell.batch_mean(p):.1f}" for p in PHASES)
            lines.append(row)
        best_line = f"best static: throughput {report.best_throughput(workload.name).setting.label}"
        for phase in PHASES:
            best_line += f"; p99 {phase} {report.best_p99(workload.name, phase).setting.label}"
        lines.append(best_line)
        statics = statics_meeting_every_cell(report, workload.name)
        lines.append(
            "static settings within adaptive's bar in every cell: "
            + (", ".join(statics) if statics else "none")
        )
    lines.append("")
    lines += [text for text, _ in verdicts(report)]
    return "\n".join(lines)


@contextmanager
def _quiet_gc(enabled: bool) -> Iterator[None]:
    """Start each run from a collected heap and, unless ``enabled``, pause the cyclic
    collector during it. The ``:memory:`` log keeps every event of the run (a few
    hundred thousand objects when saturated); a full collection scans them all,
    stalls the loop for tens of milliseconds at a random moment and, landing on one
    setting's run and not another's, decides the p99 on its own. Reference counting
    still frees everything acyclic; the collector runs between runs."""
    gc.collect()
    if enabled:
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short phases, one round: a smoke run")
    parser.add_argument("--rounds", type=int, help="runs per setting, pooled (default 5)")
    parser.add_argument("--light", type=float, help="seconds of each light phase (default 2.5)")
    parser.add_argument(
        "--saturated", type=float, help="seconds of the saturated phase (default 1.5)"
    )
    parser.add_argument("--window", type=int, help="events in flight when saturated (default 2048)")
    parser.add_argument("--storage", choices=("memory", "file"), default="memory")
    parser.add_argument(
        "--workload",
        action="append",
        help="only workloads whose name has this (repeatable): call, item",
    )
    parser.add_argument(
        "--setting", action="append", help="only these settings, and adaptive (repeatable)"
    )
    parser.add_argument("--gc", action="store_true", help="keep the cyclic GC on during runs")
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio loop")
    add_quiet(parser)
    args = parser.parse_args(argv)
    base = QUICK if args.quick else Plan()
    plan = Plan(
        light_seconds=args.light if args.light is not None else base.light_seconds,
        saturated_seconds=args.saturated if args.saturated is not None else base.saturated_seconds,
        window=args.window if args.window is not None else base.window,
        rounds=args.rounds if args.rounds is not None else base.rounds,
        seed=base.seed,
        storage=args.storage,
        gc=args.gc,
    )
    workloads = tuple(
        w for w in WORKLOADS if not args.workload or any(p in w.name for p in args.workload)
    )
    settings = tuple(
        s for s in SETTINGS if not args.setting or s.label in args.setting or s.label == "adaptive"
    )

    total = max(1, plan.rounds) * len(workloads) * len(settings)

    async def run() -> Report:
        with steps("batching", total, quiet=args.quiet) as say:
            report = await measure(plan, workloads, settings, progress=say)
        print(format_report(report))
        return report

    report = eventbus.run(run(), use_uvloop=not args.no_uvloop)
    failed = any(not ok for _, ok in verdicts(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
