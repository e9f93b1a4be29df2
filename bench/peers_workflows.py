"""Durable workflows against DBOS Transact on SQLite, measured in the same run.

    .venv/bin/pip install dbos             # or: pip install -e '.[peers]'
    .venv/bin/python bench/peers_workflows.py                      # 2 000 runs, 3 rounds
    .venv/bin/python bench/peers_workflows.py --quick              # 200 runs, 1 round (smoke)
    .venv/bin/python bench/peers_workflows.py --durability full    # fsync per commit
    .venv/bin/python bench/peers_workflows.py --no-dbos-defaults   # skip the slow default row
    .venv/bin/python bench/peers_workflows.py --dbos-in-flight 1   # DBOS one run at a time

The workload is bench/workflows.py's: N runs (default 2,000) of a workflow of three
sequential steps (reserve, charge, ship), each an async function doing the same trivial
work and returning a small msgspec Struct, all started at once, each durable on a fresh
SQLite file in a temporary directory. What is timed: from the first start until the last
result; each run's latency is from just before its start to its result.

* **bus**: exactly bench/workflows.py's ``bus_runs`` (imported, not copied), at the
  default ``workflow_concurrency``: a task per run calls ``bus.start_workflow`` and awaits
  ``handle.result()``.
* **DBOS Transact** (``pip install dbos``) with SQLite as its system database
  (``system_database_url="sqlite:///<file>"``): the workflow is an async ``@DBOS.workflow``
  calling three async ``@DBOS.step`` functions; a task per run calls
  ``DBOS.start_workflow_async`` under ``SetWorkflowID`` (the bus's run ids) and awaits
  ``handle.get_result()``. ``start_workflow_async`` returns once the run is durably
  recorded and runs it on the caller's event loop, as ``bus.start_workflow`` does.
  DBOS checkpoints each step's output (pickled) in ``operation_outputs`` before the next
  step starts, and the run's status, input and output in ``workflow_status``,
  ``workflow_input`` and ``workflow_output``; after each measurement the file is opened
  and every completed run and step output counted, or the measurement fails.
  ``--dbos-in-flight N`` lets at most N DBOS runs be in flight (a run's latency then
  includes its wait for a slot), to show what the burst itself costs DBOS.

DBOS is measured twice, each on a fresh file:

* **same pragmas as the bus**: the file is created in WAL mode and each of DBOS's
  connections sets the bus's ``synchronous`` (NORMAL, or FULL with ``--durability full``),
  through a ``sqlite3`` connection factory passed in DBOS's ``db_engine_kwargs``
  (``connect_args``); DBOS's own connection setup (IMMEDIATE transactions, busy
  timeout, foreign keys) is kept. This is the like-for-like comparison;
* **DBOS's defaults**: DBOS sets neither, so its file runs in SQLite's rollback-journal
  mode (``journal_mode=delete``) at SQLite's default ``synchronous`` (FULL): what a user
  gets out of the box. Durable against power loss, so stronger than the bus's default
  ``durability="normal"`` (which survives a killed process, not power loss) and as
  strong as ``"full"``; the bus is not configured to match it (it always runs WAL).

In both, the factory also reads back the settings each of DBOS's connections runs with
(reported) and counts their commits of transactions that wrote; the report also gives
the threads alive at the end of the burst (DBOS runs each blocking database call on a
thread of its executor, which grows to one thread per call in flight) and checks that
``DBOS.destroy()`` ended every thread DBOS started.

Each round runs the bus, then DBOS with the same pragmas, then DBOS with its defaults,
each measurement on a fresh event loop (uvloop, through ``eventbus.run``); rates and the
paired ratios (bus / DBOS, in steps/s) reported are medians over the rounds. When
``dbos`` is not importable the script says how to install it and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

from _support import (
    add_quiet,
    frozen_gc,
    load_script,
    loop_name,
    machine,
    median,
    steps,
    temp_dir,
)

import eventbus

if TYPE_CHECKING:
    import workflows as wb
    from workflows import Charge, Measurement, Order, Reservation, Shipment, Workload


if not TYPE_CHECKING:
    wb = load_script("workflows")

INSTALL_HINT = "pip install dbos  (or: pip install -e '.[peers]')"
BUS_CONCURRENCY = wb.DEFAULT_CONCURRENCY


def dbos_version() -> str | None:
    """The installed DBOS Transact version, or None when ``dbos`` cannot be imported."""
    try:
        import dbos  # noqa: F401
    except ImportError:
        return None
    try:
        return metadata.version("dbos")
    except metadata.PackageNotFoundError:
        return "unknown version"


# -- the DBOS side --------------------------------------------------------------------


async def dbos_reserve(order: Order) -> Reservation:
    return wb.do_reserve(order)


async def dbos_charge(order: Order, reservation: Reservation) -> Charge:
    return wb.do_charge(order, reservation)


async def dbos_ship(reservation: Reservation, charge: Charge) -> Shipment:
    return wb.do_ship(reservation, charge)


_registered: list[Callable[[Order], Coroutine[Any, Any, Shipment]]] = []


def dbos_workflow() -> Callable[[Order], Coroutine[Any, Any, Shipment]]:
    """The benchmarked workflow, registered with DBOS once per process (its registry is
    global and outlives ``DBOS.destroy()``): three sequential async steps."""
    if _registered:
        return _registered[0]
    from dbos import DBOS

    reserve: Callable[[Order], Coroutine[Any, Any, Reservation]]
    charge: Callable[[Order, Reservation], Coroutine[Any, Any, Charge]]
    ship: Callable[[Reservation, Charge], Coroutine[Any, Any, Shipment]]
    reserve = DBOS.step(name=wb.STEPS[0])(dbos_reserve)
    charge = DBOS.step(name=wb.STEPS[1])(dbos_charge)
    ship = DBOS.step(name=wb.STEPS[2])(dbos_ship)

    async def fulfil(order: Order) -> Shipment:
        reservation = await reserve(order)
        charged = await charge(order, reservation)
        return await ship(reservation, charged)

    workflow: Callable[[Order], Coroutine[Any, Any, Shipment]] = DBOS.workflow(name=wb.WORKFLOW)(
        fulfil
    )
    _registered.append(workflow)
    return workflow


@dataclass(frozen=True)
class DbosSetup:
    """How DBOS's SQLite file is set up (``None`` leaves a setting to DBOS and SQLite),
    and how many runs the bench lets it have in flight (0: all at once)."""

    name: str
    journal_mode: str | None
    synchronous: str | None
    in_flight: int = 0


def dbos_setups(
    work: Workload, *, defaults: bool = True, in_flight: int = 0
) -> tuple[DbosSetup, ...]:
    limit = f", {in_flight} in flight" if in_flight > 0 else ""
    same = DbosSetup(
        f"DBOS, WAL + synchronous={work.synchronous}{limit}", "wal", work.synchronous, in_flight
    )
    if not defaults:
        return (same,)
    return (same, DbosSetup(f"DBOS, its defaults{limit}", None, None, in_flight))


_SYNCHRONOUS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


class _Probe:
    """The ``sqlite3`` connection factory handed to DBOS's engine: applies the setup's
    ``synchronous`` to each connection, reads back what each one runs with, and counts
    the commits of transactions that wrote."""

    def __init__(self, synchronous: str | None) -> None:
        self.synchronous = synchronous
        self.settings: set[tuple[str, str]] = set()  # (journal_mode, synchronous)
        self.commits = 0
        self._lock = threading.Lock()

    def factory(self) -> type[sqlite3.Connection]:
        probe = self

        class Connection(sqlite3.Connection):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                if probe.synchronous is not None:
                    self.execute(f"PRAGMA synchronous = {probe.synchronous}")
                ((mode,),) = self.execute("PRAGMA journal_mode").fetchall()
                ((level,),) = self.execute("PRAGMA synchronous").fetchall()
                with probe._lock:
                    probe.settings.add((str(mode).lower(), _SYNCHRONOUS.get(level, str(level))))

            def commit(self) -> None:
                wrote = self.in_transaction  # DBOS begins transactions only to write
                super().commit()
                if wrote:
                    with probe._lock:
                        probe.commits += 1

        return Connection

    def described(self) -> str:
        return ", ".join(f"journal_mode={m} synchronous={s}" for m, s in sorted(self.settings))


class _Warnings(logging.Handler):
    """Counts what DBOS logs at WARNING and above, by the message's first clause."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.kinds: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.kinds[record.getMessage().split(":")[0][:80]] += 1


@dataclass(frozen=True)
class DbosRun:
    measurement: Measurement
    settings: str  # as read back from DBOS's connections
    threads: int  # threads alive at the end of the burst (DBOS's executor keeps them)
    leftover: int  # threads DBOS started still alive after DBOS.destroy() (and 10 s)
    checkpoints: tuple[int, int]  # runs completed, step outputs, counted in the file
    warnings: tuple[tuple[str, int], ...] = ()  # what DBOS logged at WARNING+, counted


async def dbos_runs(work: Workload, setup: DbosSetup) -> DbosRun:
    """Start ``work.runs`` runs at once on a fresh DBOS instance and time until every
    result; then shut DBOS down and count its checkpoints in the SQLite file."""
    from dbos import DBOS, DBOSConfig, SetWorkflowID

    workflow = dbos_workflow()
    inputs = wb.orders(work.runs)
    latencies: list[float] = []
    results: dict[int, object] = {}
    probe = _Probe(setup.synchronous)
    with temp_dir() as directory:
        path = os.path.join(directory, "dbos.sqlite")
        if setup.journal_mode is not None:
            with _closing(sqlite3.connect(path)) as conn:  # the mode persists in the file
                conn.execute(f"PRAGMA journal_mode = {setup.journal_mode}")
        config: DBOSConfig = {
            "name": "eventbus-bench",
            "system_database_url": f"sqlite:///{path}",
            "db_engine_kwargs": {"connect_args": {"factory": probe.factory()}},
            "log_level": "WARNING",
        }
        existing = set(threading.enumerate())
        warned = _Warnings()
        DBOS(config=config)
        dbos_log = logging.getLogger("dbos")
        dbos_log.addHandler(warned)
        try:
            DBOS.launch()
            before = probe.commits

            gate = asyncio.Semaphore(setup.in_flight or work.runs)

            async def one(order: Order) -> None:
                t0 = time.perf_counter()  # before the gate: waiting there is latency too
                async with gate:
                    with SetWorkflowID(f"run-{order.id}"):
                        handle = await DBOS.start_workflow_async(workflow, order)
                    results[order.id] = await handle.get_result()
                latencies.append(time.perf_counter() - t0)

            started = time.perf_counter()
            async with asyncio.TaskGroup() as tg:
                for order in inputs:
                    tg.create_task(one(order))
            elapsed = time.perf_counter() - started
            commits = probe.commits - before
            threads = threading.active_count()
        finally:
            DBOS.destroy()
            dbos_log.removeHandler(warned)
            leftover = _join_threads_since(existing, timeout=10.0)
        checkpoints = _count_checkpoints(path)
    wrong = [order.id for order in inputs if results.get(order.id) != wb.expected(order)]
    if wrong or len(latencies) != work.runs or checkpoints != (work.runs, work.steps):
        raise RuntimeError(
            f"{setup.name}: {len(latencies)} results ({len(wrong)} wrong); the file holds"
            f" {checkpoints[0]} completed runs and {checkpoints[1]} step outputs, expected"
            f" {work.runs} and {work.steps}"
        )
    measurement = wb.Measurement(setup.name, work.runs, elapsed, tuple(sorted(latencies)), commits)
    warnings = tuple(sorted(warned.kinds.items()))
    return DbosRun(measurement, probe.described(), threads, leftover, checkpoints, warnings)


def _join_threads_since(existing: set[threading.Thread], timeout: float) -> int:
    """Wait for the threads started since ``existing`` was taken to end (DBOS.destroy()
    stops its executor without waiting for it); returns how many are still alive."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread not in existing and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))
    return sum(1 for t in threading.enumerate() if t not in existing)


def _count_checkpoints(path: str) -> tuple[int, int]:
    """Completed runs and step outputs DBOS left in its SQLite file."""
    marks = ", ".join("?" for _ in wb.STEPS)
    with _closing(sqlite3.connect(path)) as conn:
        ((runs,),) = conn.execute(
            "SELECT count(*) FROM workflow_status s JOIN workflow_output o USING (workflow_uuid)"
            " WHERE s.status = 'SUCCESS' AND s.name = ? AND o.output IS NOT NULL"
            " AND o.error IS NULL",
            (wb.WORKFLOW,),
        ).fetchall()
        ((steps,),) = conn.execute(
            "SELECT count(*) FROM operation_outputs"
            f" WHERE function_name IN ({marks}) AND output IS NOT NULL AND error IS NULL",
            wb.STEPS,
        ).fetchall()
    return int(runs), int(steps)


@contextmanager
def _closing(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    try:
        yield conn
    finally:
        conn.close()


# -- running and reporting ----------------------------------------------------------


@dataclass(frozen=True)
class PeerRow:
    """One DBOS setup: its median run and the median of the paired bus/DBOS ratios."""

    setup: DbosSetup
    run: DbosRun
    bus_ratio: float  # bus steps/s over DBOS steps/s
    rounds: tuple[float, ...]  # every round's DBOS steps/s
    warnings: tuple[tuple[tuple[str, int], ...], ...]  # every round's DBOS warnings


@dataclass
class Report:
    work: Workload
    repeat: int
    version: str
    bus_runs: list[Measurement] = field(default_factory=list)
    peers: list[PeerRow] = field(default_factory=list)

    @property
    def bus(self) -> Measurement:
        return median(self.bus_runs, key=lambda m: m.seconds)


def measure(
    work: Workload,
    *,
    repeat: int = 3,
    defaults: bool = True,
    in_flight: int = 0,
    use_uvloop: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Each round: the bus, then each DBOS setup, each on a fresh event loop."""
    say = progress or (lambda _msg: None)
    version = dbos_version()
    if version is None:
        raise RuntimeError(f"DBOS Transact is not installed: {INSTALL_HINT}")
    repeat = max(1, repeat)
    report = Report(work, repeat, version)
    setups = dbos_setups(work, defaults=defaults, in_flight=in_flight)
    peer_runs: dict[DbosSetup, list[DbosRun]] = {s: [] for s in setups}
    ratios: dict[DbosSetup, list[float]] = {s: [] for s in setups}
    for round_no in range(1, repeat + 1):
        with frozen_gc():
            bus = eventbus.run(wb.bus_runs(work, BUS_CONCURRENCY), use_uvloop=use_uvloop)
        report.bus_runs.append(bus)
        say(f"round {round_no}: {bus.name} {bus.steps_per_s:,.0f} steps/s")
        for setup in setups:
            with frozen_gc():
                run = eventbus.run(dbos_runs(work, setup), use_uvloop=use_uvloop)
            peer_runs[setup].append(run)
            ratios[setup].append(bus.steps_per_s / run.measurement.steps_per_s)
            say(
                f"round {round_no}: {setup.name} {run.measurement.steps_per_s:,.0f} steps/s"
                f" ({run.settings}; {run.checkpoints[0]:,} runs and {run.checkpoints[1]:,}"
                " step outputs in its file)"
            )
    for setup in setups:
        runs = peer_runs[setup]
        middle = median(runs, key=lambda r: r.measurement.seconds)
        report.peers.append(
            PeerRow(
                setup,
                middle,
                median(ratios[setup]),
                tuple(r.measurement.steps_per_s for r in runs),
                tuple(r.warnings for r in runs),
            )
        )
    return report


def format_report(report: Report, loop: str) -> str:
    w = report.work
    bus = report.bus
    lines = [
        f"eventbus workflows vs DBOS Transact {report.version}: {w.runs:,} runs x"
        f" {len(wb.STEPS)} steps, all started at once, each durable on a fresh SQLite file",
        machine(loop),
        f"bus: durability {w.durability!r} (journal_mode=wal synchronous={w.synchronous}),"
        f" workflow_concurrency {BUS_CONCURRENCY} (default)",
        f"{report.repeat} round(s), each: the bus, then each DBOS setup; medians of rates"
        " and of the paired ratios",
        "",
    ]
    header = (
        f"{'':<46} {'runs/s':>8} {'steps/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
        f" {'commits/step':>12}  {'bus / DBOS':>10}"
    )
    lines += [header, "-" * len(header)]
    lines.append(_row(bus, bus.name))
    for peer in report.peers:
        lines.append(_row(peer.run.measurement, peer.setup.name, f"{peer.bus_ratio:>9.1f}x"))
    lines.append("")
    lines.append("latency: from start to result, per run (a burst: mostly queueing)")
    for peer in report.peers:
        run = peer.run
        lines.append(
            f"{peer.setup.name}: read back from its connections: {run.settings};"
            f" {run.checkpoints[0]:,} completed runs and {run.checkpoints[1]:,} step outputs"
            f" counted in its file; {run.threads:,} threads at the end of the burst,"
            f" {run.leftover} still alive after DBOS.destroy() (waited up to 10 s)"
        )
    every = ", ".join(f"{m.steps_per_s:,.0f}" for m in report.bus_runs)
    lines.append(f"steps/s of every round, bus: {every}")
    for peer in report.peers:
        every = ", ".join(f"{r:,.0f}" for r in peer.rounds)
        lines.append(f"steps/s of every round, {peer.setup.name}: {every}")
    for peer in report.peers:
        counts = ", ".join(str(sum(n for _, n in w)) for w in peer.warnings)
        kinds = sorted({kind for w in peer.warnings for kind, _ in w})
        what = f" ({'; '.join(kinds)})" if kinds else ""
        lines.append(f"warnings DBOS logged in every round, {peer.setup.name}: {counts}{what}")
    defaults = next((p for p in report.peers if p.setup.journal_mode is None), None)
    if defaults is not None and w.durability == "normal":
        lines.append(
            "note: DBOS's defaults (rollback journal, synchronous=FULL) survive power loss;"
            " the bus's durability 'normal' survives a killed process, not power loss."
            " Like for like: the WAL row, or --durability full."
        )
    elif defaults is not None:
        lines.append(
            "note: DBOS's defaults (rollback journal, synchronous=FULL) and the bus's"
            " durability 'full' (WAL, synchronous=FULL) both survive power loss."
        )
    lines.append("")
    for peer in report.peers:
        lines.append(
            f"bus vs {peer.setup.name}: {peer.bus_ratio:.1f}x the steps/s; latency"
            f" p50 {_ratio(peer.run.measurement.latency(0.5), bus.latency(0.5))} and"
            f" p99 {_ratio(peer.run.measurement.latency(0.99), bus.latency(0.99))} lower"
        )
    return "\n".join(lines)


def _row(m: Measurement, name: str, ratio: str = "") -> str:
    return (
        f"{name:<46} {m.runs_per_s:>8,.0f} {m.steps_per_s:>8,.0f}"
        f" {m.latency(0.5) * 1000:>8,.1f} {m.latency(0.99) * 1000:>8,.1f}"
        f" {m.commits_per_step:>12.3f}  {ratio:>10}"
    ).rstrip()


def _ratio(theirs: float, ours: float) -> str:
    return f"{theirs / ours:.1f}x" if ours > 0 else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=2000, help="workflow runs per measurement")
    parser.add_argument("--quick", action="store_true", help="200 runs, 1 round: a smoke run")
    parser.add_argument("--repeat", type=int, help="rounds, medians reported (default 3, quick 1)")
    parser.add_argument("--durability", choices=("normal", "full"), default="normal")
    parser.add_argument(
        "--no-dbos-defaults",
        action="store_true",
        help="measure DBOS with the bus's pragmas only (its defaults are the slow row)",
    )
    parser.add_argument(
        "--dbos-in-flight",
        type=int,
        default=0,
        metavar="N",
        help="let DBOS have at most N runs in flight (default: all started at once)",
    )
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio loops")
    add_quiet(parser)
    args = parser.parse_args(argv)
    if dbos_version() is None:
        print(f"SKIP DBOS Transact is not installed; to compare with it: {INSTALL_HINT}")
        return 0
    runs = 200 if args.quick and args.runs == 2000 else args.runs
    work = wb.Workload(runs=runs, durability=args.durability)
    repeat = args.repeat or (1 if args.quick else 3)
    setups = dbos_setups(work, defaults=not args.no_dbos_defaults, in_flight=args.dbos_in_flight)
    with steps("peers", max(1, repeat) * (1 + len(setups)), quiet=args.quiet) as say:
        report = measure(
            work,
            repeat=repeat,
            defaults=not args.no_dbos_defaults,
            in_flight=args.dbos_in_flight,
            use_uvloop=not args.no_uvloop,
            progress=say,
        )
    print(format_report(report, eventbus.run(_loop_name(), use_uvloop=not args.no_uvloop)))
    return 0


async def _loop_name() -> str:
    return loop_name()


if __name__ == "__main__":
    sys.exit(main())
