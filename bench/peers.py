"""eventbus against the libraries a user would pick instead, and three ceilings, one run.

    pip install -e '.[peers,bench]'                        # the peers and matplotlib
    .venv/bin/python bench/peers.py --repeat 3             # the full run (a few minutes)
    .venv/bin/python bench/peers.py --quick                # 2,000 events, 1 round (smoke)
    .venv/bin/python bench/peers.py --only eventbus-file,litequeue --events 5000
    .venv/bin/python bench/peers.py --readme               # README table from the JSON

Workloads (events ``{"i": i, "amount": <int>, "pad": <100-byte str>}``):

* **one producer**: 20,000 events (``--events``) from one producer that waits for each
  publish to return, one subscriber counting them and summing ``amount``; eventbus on a
  SQLite file (default durability) and on ``:memory:``, persist-queue, litequeue,
  localqueue, huey, DBOS Transact (capped at 2,000 events: it does a few hundred a
  second), abxbus and pyee, and three ceilings: ``sqlite3`` ``executemany`` (1,000 rows
  per transaction, WAL, ``synchronous=NORMAL``), ``sqlite3`` with one transaction per
  event that appends it and acknowledges the one before (what a sequential producer's
  durable publish costs at least), and an ``asyncio.Queue`` hand-off;
* **64 publishers**: the same number of small events (``{"i", "amount"}``) from 64
  tasks each awaiting ``publish``, eventbus on a file and on ``:memory:``, each with a
  per-event and with a batch subscription, and both ceilings on the same small rows;
* **light load**: 2,000 events on a durable file, one publish every ~1 ms; the latency
  from just before ``publish`` to the handler (p50, p99).

Each measurement runs in a fresh child process (``--child NAME``) that prints one JSON
result: wall time and process CPU time (``resource.getrusage``, all threads) of the
timed part, and the subscriber's count and sum. The parent checks both against what was
published: a mismatch, a crash or a timeout is reported as a failure, never as a number;
a peer that is not installed is reported with the reason. With ``--repeat K`` every
system runs once per round, rounds in turn; figures are medians, ratios the median of the
ratios paired within a round. How each system is driven (and how durable a publish is)
is in bench/_peers_systems.py and printed with the table. Every SQLite system runs in
WAL mode at ``synchronous=NORMAL``, the bus's default: persist-queue, huey and DBOS,
which leave SQLite's ``FULL``, get it set on their connections (``--peer-defaults``
leaves them at ``FULL``).

Results go to ``bench/results/peers.json``, ``peers.md`` (the tables, which the
documentation site shows) and ``peers.png`` (``--output DIR``); ``--readme`` rewrites
README.md's section between ``<!-- peers:begin -->`` and ``<!-- peers:end -->`` (and
``peers.md``) from that JSON. Exit status: 0, 1 when a target FAILs, 2 when a
measurement failed its count and sum check or crashed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _support import BENCH, add_quiet, machine, median, steps

RESULTS = BENCH / "results"
README = BENCH.parent / "README.md"
BEGIN, END = "<!-- peers:begin -->", "<!-- peers:end -->"
MARK = "PEERS-RESULT "  # the child's result line (peers may print on stdout too)
CHILD_TIMEOUT = 900.0  # seconds one child may run


@dataclass(frozen=True)
class System:
    """One row of the table: a system driven one way on one workload."""

    name: str  # the --only name and the driver's key in _peers_systems.DRIVERS
    label: str
    workload: str  # "one producer", "64 publishers", "light load"
    durability: str  # how durable a publish is when it returns
    cap: int | None = None  # at most this many events (slow systems)


ONE, MANY, LIGHT = "one producer", "64 publishers", "light load"
WORKLOADS = (ONE, MANY, LIGHT)
DBOS_CAP = 2000
LATENCY_EVENTS = 2000

BUS_FILE = (
    "SQLite file, WAL, synchronous=NORMAL (the default durability);"
    " publish() returns after the group commit"
)
NORMAL_PUT = "SQLite, WAL, synchronous=NORMAL; put() returns after its commit"
FULL_PUT = "SQLite, WAL, {peer_sync}; put() returns after its commit"
NONE = "none: in memory"
SQLITE_CEILING = "SQLite, WAL, synchronous=NORMAL; 1,000 rows per commit"

SYSTEMS: tuple[System, ...] = (
    System("eventbus-file", "eventbus, SQLite file", ONE, BUS_FILE),
    System("persist-queue", "persist-queue SQLiteAckQueue", ONE, FULL_PUT),
    System("litequeue", "litequeue", ONE, NORMAL_PUT),
    System("localqueue", "localqueue SimpleQueue", ONE, NORMAL_PUT),
    System(
        "huey",
        "huey SqliteHuey",
        ONE,
        "SqliteHuey, WAL, {peer_sync}; enqueue returns after its commit",
    ),
    System(
        "dbos",
        "DBOS Transact, SQLite",
        ONE,
        "SQLite, WAL, {peer_sync}; enqueue_async() returns after the workflow's record"
        " is committed",
        cap=DBOS_CAP,
    ),
    System("ceiling-sqlite", "ceiling: sqlite3 executemany", ONE, SQLITE_CEILING),
    System(
        "ceiling-sqlite-inline",
        "ceiling: sqlite3, a commit per event",
        ONE,
        "SQLite, WAL, synchronous=NORMAL; one commit per event, the ack on the next",
    ),
    System("eventbus-memory", "eventbus, :memory:", ONE, NONE),
    System("abxbus", "abxbus", ONE, NONE),
    System("pyee", "pyee AsyncIOEventEmitter", ONE, NONE),
    System("ceiling-queue", "ceiling: asyncio.Queue", ONE, NONE),
    System("eventbus-file-64", "eventbus, file, per-event", MANY, BUS_FILE),
    System("eventbus-file-64-batch", "eventbus, file, batch", MANY, BUS_FILE),
    System("ceiling-sqlite-small", "ceiling: sqlite3 executemany", MANY, SQLITE_CEILING),
    System("eventbus-memory-64", "eventbus, :memory:, per-event", MANY, NONE),
    System("eventbus-memory-64-batch", "eventbus, :memory:, batch", MANY, NONE),
    System("ceiling-queue-small", "ceiling: asyncio.Queue", MANY, NONE),
    System("eventbus-latency", "eventbus, SQLite file, ~1 publish/ms", LIGHT, BUS_FILE),
)
BY_NAME = {s.name: s for s in SYSTEMS}


@dataclass(frozen=True)
class Target:
    """A ratio the project aims for: ``system`` over ``baseline`` at least ``ratio``."""

    system: str
    baseline: str
    ratio: float
    text: str


TARGETS: tuple[Target, ...] = (
    Target("eventbus-file", "litequeue", 6.0, "durable, one producer: eventbus >= 6x litequeue"),
    Target(
        "eventbus-file",
        "ceiling-sqlite-inline",
        0.5,
        "durable, one producer: eventbus >= 0.5x a bare commit per event",
    ),
    Target("eventbus-memory", "pyee", 1.0, ":memory:, one producer: eventbus >= 1x pyee"),
    Target(
        "eventbus-file-64",
        "ceiling-sqlite-small",
        0.25,
        "durable, 64 publishers: eventbus >= 0.25x the sqlite3 executemany ceiling",
    ),
    Target(
        "eventbus-memory-64",
        "ceiling-queue-small",
        0.20,
        ":memory:, 64 publishers: eventbus >= 0.2x the asyncio.Queue ceiling",
    ),
)
LATENCY_TARGETS = (("p50", 0.5), ("p99", 2.0))  # ms, eventbus-latency


# -- the child ------------------------------------------------------------------------


PEER_SYNC = {
    True: "synchronous=FULL (SQLite's default, which it keeps)",
    False: "synchronous=NORMAL (set by the bench, like for like; its default is FULL)",
}


def child(name: str, events: int, *, peer_defaults: bool = False) -> int:
    """Measure one system once and print its result line (status ok, failed or
    unavailable, with the reason)."""
    import _peers_systems as ps

    if peer_defaults:
        ps.SYNCHRONOUS = None

    result: dict[str, object] = {"system": name, "events": events}
    try:
        outcome = ps.DRIVERS[name](events)
    except ps.Unavailable as exc:
        result.update(status="unavailable", reason=str(exc))
    except Exception as exc:  # noqa: BLE001  (any crash is reported, never a number)
        result.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
    else:
        result.update(outcome.to_json(events))
        result.update(check(outcome.count, outcome.total, *ps.expected(events)))
    print(MARK + json.dumps(result), flush=True)
    return 0


def check(count: int, total: int, want_count: int, want_total: int) -> dict[str, object]:
    """``status`` ok when the subscriber's count and sum are what was published, else
    failed with the difference as the reason."""
    if count == want_count and total == want_total:
        return {"status": "ok"}
    return {
        "status": "failed",
        "reason": f"the subscriber counted {count:,} events summing {total:,};"
        f" published {want_count:,} summing {want_total:,}",
    }


# -- the parent -----------------------------------------------------------------------


def run_child(system: System, events: int, *, peer_defaults: bool = False) -> dict[str, Any]:
    """One measurement in a fresh process; a crash or a timeout becomes a failed result."""
    n = min(events, system.cap) if system.cap else events
    command = [sys.executable, str(Path(__file__).resolve()), "--child", system.name]
    command += ["--events", str(n)] + (["--peer-defaults"] if peer_defaults else [])
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return _failed(system, n, f"no result within {CHILD_TIMEOUT:.0f} s")
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return _failed(system, n, f"the child exited {done.returncode} with no result: {tail}")
    result: dict[str, Any] = json.loads(lines[-1][len(MARK) :])
    return result


def _failed(system: System, events: int, reason: str) -> dict[str, Any]:
    return {"system": system.name, "events": events, "status": "failed", "reason": reason}


def measure(
    systems: Sequence[System],
    *,
    events: int,
    latency_events: int,
    repeat: int,
    progress: Callable[[str], None],
    peer_defaults: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Every system once per round, rounds in turn; returns each system's runs."""
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in systems}
    for round_no in range(1, repeat + 1):
        for system in systems:
            done = runs[system.name]
            if done and done[0]["status"] == "unavailable":  # not installed: once is enough
                progress(f"round {round_no}/{repeat} {system.name}: unavailable, not run again")
                continue
            n = latency_events if system.workload == LIGHT else events
            result = run_child(system, n, peer_defaults=peer_defaults)
            done.append(result)
            progress(f"round {round_no}/{repeat} {system.name}: {_brief(result)}")
    return runs


def _brief(result: dict[str, Any]) -> str:
    if result["status"] != "ok":
        return f"{result['status'].upper()}: {result.get('reason', '')}"
    rate = result["events"] / result["seconds"]
    cpu = result["cpu_seconds"] / result["events"] * 1e6
    text = f"{rate:,.0f} events/s, {cpu:,.1f} us CPU/event"
    if "latency_ms" in result:
        lat = result["latency_ms"]
        text += f", p50 {lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms"
    return text


def summarise(
    system: System, runs: list[dict[str, Any]], *, peer_defaults: bool = False
) -> dict[str, Any]:
    """One row: medians over the runs, or why there is no number."""
    row: dict[str, Any] = {
        "system": system.name,
        "label": system.label,
        "workload": system.workload,
        "durability": system.durability.format(peer_sync=PEER_SYNC[peer_defaults]),
    }
    bad = [r for r in runs if r["status"] != "ok"]
    ok = [r for r in runs if r["status"] == "ok"]
    if ok:
        row.update(how=ok[0]["how"], version=ok[0]["version"], events=ok[0]["events"])
    if bad:
        # Any failed check fails the row; unavailable only when no run worked.
        status = "failed" if any(r["status"] == "failed" for r in bad) else "unavailable"
        row.update(status=status, reason=bad[0].get("reason", ""), runs=len(runs))
        return row
    rates = [r["events"] / r["seconds"] for r in ok]
    row.update(
        status="ok",
        rate=median(rates),
        rates=rates,
        cpu_us_per_event=median([r["cpu_seconds"] / r["events"] * 1e6 for r in ok]),
        checked=f"count {ok[0]['count']:,} and sum {ok[0]['sum']:,} as published, every run",
    )
    if "latency_ms" in ok[0]:
        row["latency_ms"] = {
            q: median([r["latency_ms"][q] for r in ok]) for q in ("p50", "p99", "max")
        }
    return row


def verdicts(
    rows: dict[str, dict[str, Any]], runs: dict[str, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """PASS, FAIL or SKIP per target, with the measured value."""
    out: list[dict[str, Any]] = []
    for target in TARGETS:
        mine, theirs = rows.get(target.system), rows.get(target.baseline)
        entry: dict[str, Any] = {"target": target.text, "value": None}
        if mine is None or theirs is None:
            entry.update(verdict="SKIP", note="not measured in this run")
        elif mine["status"] != "ok":
            entry.update(verdict="FAIL", note=f"{target.system} {mine['status']}")
        elif theirs["status"] != "ok":
            entry.update(
                verdict="SKIP", note=f"{target.baseline} {theirs['status']}: {theirs['reason']}"
            )
        else:
            ratio = median(_paired(runs[target.system], runs[target.baseline]))
            ok = ratio >= target.ratio
            entry.update(verdict="PASS" if ok else "FAIL", value=ratio, note=f"{ratio:.2f}x")
        out.append(entry)
    row = rows.get("eventbus-latency")
    for quantile, limit in LATENCY_TARGETS:
        text = f"durable light-load latency: {quantile} <= {limit:g} ms"
        entry = {"target": text, "value": None}
        if row is None:
            entry.update(verdict="SKIP", note="not measured in this run")
        elif row["status"] != "ok":
            entry.update(verdict="FAIL", note=f"eventbus-latency {row['status']}")
        else:
            value = row["latency_ms"][quantile]
            entry.update(
                verdict="PASS" if value <= limit else "FAIL", value=value, note=f"{value:.3f} ms"
            )
        out.append(entry)
    return out


def _paired(mine: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> list[float]:
    """The ratio of the rates, round by round (the machine's speed drifts between rounds;
    events may differ, as for a capped peer: rates are per event)."""
    return [
        (a["events"] / a["seconds"]) / (b["events"] / b["seconds"])
        for a, b in zip(mine, theirs, strict=True)
    ]


# -- reporting ------------------------------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"eventbus and its peers: {report['events']:,} events per throughput run,"
        f" {report['repeat']} round(s), medians; {report['machine']}",
        "",
    ]
    for workload in WORKLOADS:
        rows = [r for r in report["systems"] if r["workload"] == workload]
        if not rows:
            continue
        lines.append(f"{workload}:")
        header = f"  {'system':<36} {'events/s':>10} {'CPU us/ev':>10}  how"
        lines += [header, "  " + "-" * (len(header) + 40)]
        for row in rows:
            lines.append(f"  {row['label']:<36} {_cells(row)}  {_how(row)}")
        lines.append("")
    for entry in report["targets"]:
        lines.append(f"{entry['verdict']} {entry['target']}: {entry['note']}")
    return "\n".join(lines)


def _cells(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['status'].upper():>10} {'':>10}"
    text = f"{row['rate']:>10,.0f} {row['cpu_us_per_event']:>10,.1f}"
    if "latency_ms" in row:
        lat = row["latency_ms"]
        text += f"  p50 {lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms, max {lat['max']:.1f} ms;"
    return text


def _how(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return str(row.get("reason", ""))
    events = f" [{row['events']:,} events]" if row.get("capped") else ""
    return f"{row['how']} ({row['version']}){events}"


def write_chart(report: dict[str, Any], path: Path) -> str:
    """Bars of events/s (log scale), one panel per throughput workload; returns what
    happened (matplotlib is optional: the bench extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib is not installed (pip install -e '.[bench]')"
    panels = [w for w in (ONE, MANY) if any(r["workload"] == w for r in report["systems"])]
    if not panels:
        return "chart skipped: no throughput workload measured"
    heights = [sum(1 for r in report["systems"] if r["workload"] == w) for w in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(9, 1.2 + 0.42 * sum(heights)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, workload in zip(axes[:, 0], panels, strict=True):
        rows = [r for r in report["systems"] if r["workload"] == workload][::-1]
        labels = [r["label"] for r in rows]
        values = [r["rate"] if r["status"] == "ok" else 0.0 for r in rows]
        colors = [_color(r) for r in rows]
        positions = list(range(len(rows)))
        ax.barh(positions, values, color=colors)
        ax.set_yticks(positions, labels)
        ax.set_xscale("log")
        for y, row in zip(positions, rows, strict=True):
            if row["status"] == "ok":
                ax.text(row["rate"] * 1.05, y, f"{row['rate']:,.0f}", va="center", fontsize=8)
            else:
                ax.text(1.0, y, f" {row['status']}", va="center", fontsize=8, color="firebrick")
        top = max([r["rate"] for r in report["systems"] if r["status"] == "ok"], default=10.0)
        ax.set_xlim(1.0, top * 6)  # room for the figures at the bars' ends
        ax.set_title(f"{workload}: events/s (log scale)", fontsize=10)
        ax.grid(axis="x", which="major", alpha=0.3)
    fig.suptitle(
        f"eventbus and its peers, {report['events']:,} events, median of {report['repeat']}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"


def _color(row: dict[str, Any]) -> str:
    if row["system"].startswith("ceiling"):
        return "0.6"
    if row["system"].startswith("eventbus"):
        return "tab:blue"
    return "tab:orange"


def readme_section(report: dict[str, Any]) -> str:
    """The generated part of README.md's peer comparison."""
    out = [
        BEGIN,
        "<!-- generated by `python bench/peers.py --readme` from bench/results/peers.json;"
        " edit there, not here -->",
        "",
        tables(report),
        "![events/s, log scale](bench/results/peers.png)",
        "",
        END,
    ]
    return "\n".join(out)


def tables(report: dict[str, Any]) -> str:
    """The results as Markdown: a table per workload, then the targets (also
    ``bench/results/peers.md``, which the documentation site shows)."""
    out = [
        f"Measured {report['date']} with `{report['command']}` ({report['machine']}).",
        "",
    ]
    for workload in WORKLOADS:
        rows = [r for r in report["systems"] if r["workload"] == workload]
        if not rows:
            continue
        latency = workload == LIGHT
        extra = " p50 / p99 ms |" if latency else ""
        out.append(f"| {workload} | events/s | CPU µs/event |{extra} how durable |")
        out.append(f"|---|---:|---:|{'---:|' if latency else ''}---|")
        for row in rows:
            name = f"**{row['label']}**" if row["system"].startswith("eventbus") else row["label"]
            if row["status"] != "ok":
                cells = f"{row['status']} | |{' |' if latency else ''} {row.get('reason', '')}"
            else:
                cells = f"{row['rate']:,.0f} | {row['cpu_us_per_event']:,.1f} |"
                if latency:
                    lat = row["latency_ms"]
                    cells += f" {lat['p50']:.2f} / {lat['p99']:.2f} |"
                capped = f" ({row['events']:,} events)" if row.get("capped") else ""
                cells += f" {row['durability']}{capped}"
            out.append(f"| {name} ({row.get('version', '?')}) | {cells} |")
        out.append("")
    out.append("Targets:")
    out.append("")
    for entry in report["targets"]:
        out.append(f"- **{entry['verdict']}** {entry['target']}: {entry['note']}")
    out.append("")
    return "\n".join(out)


def rewrite_readme(report: dict[str, Any], readme: Path) -> None:
    text = readme.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} section to rewrite")
    readme.write_text(text[:start] + readme_section(report) + text[end + len(END) :])


# -- the command line -----------------------------------------------------------------


def select(only: str | None) -> list[System]:
    if not only:
        return list(SYSTEMS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    return [s for s in SYSTEMS if s.name in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, help="events per throughput run (default 20,000)")
    parser.add_argument("--only", help="comma-separated system names (default: all)")
    parser.add_argument("--repeat", type=int, help="rounds, medians reported (default 1)")
    parser.add_argument("--quick", action="store_true", help="2,000 events, 1 round: a smoke run")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where peers.json/png go")
    parser.add_argument("--readme", action="store_true", help="rewrite README.md from the JSON")
    parser.add_argument("--list", action="store_true", help="list the systems and exit")
    parser.add_argument(
        "--peer-defaults",
        action="store_true",
        help="leave persist-queue, huey and DBOS at SQLite's synchronous=FULL (their"
        " default) instead of the like-for-like NORMAL",
    )
    add_quiet(parser)
    parser.add_argument("--child", metavar="NAME", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.events is None:
            parser.error("--child needs --events")
        return child(args.child, args.events, peer_defaults=args.peer_defaults)
    if args.list:
        for s in SYSTEMS:
            print(f"{s.name:<26} {s.workload:<14} {s.label}")
        return 0
    if args.readme:
        recorded = json.loads((args.output / "peers.json").read_text())
        rewrite_readme(recorded, README)
        (args.output / "peers.md").write_text(tables(recorded))
        print(f"rewrote the peers section of {README} and {args.output / 'peers.md'}")
        return 0
    events = args.events or (2000 if args.quick else 20_000)
    latency_events = min(LATENCY_EVENTS, 200 if args.quick else LATENCY_EVENTS)
    repeat = max(1, args.repeat or 1)
    systems = select(args.only)
    started = time.monotonic()
    with steps("peers", repeat * len(systems), quiet=args.quiet) as say:
        runs = measure(
            systems,
            events=events,
            latency_events=latency_events,
            repeat=repeat,
            progress=say,
            peer_defaults=args.peer_defaults,
        )
    rows = {s.name: summarise(s, runs[s.name], peer_defaults=args.peer_defaults) for s in systems}
    for system in systems:
        row = rows[system.name]
        row["capped"] = bool(system.cap and "events" in row and row["events"] < events)
    report: dict[str, Any] = {
        "command": "python bench/peers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": machine("uvloop for the asyncio systems"),
        "platform": platform.platform(),
        "events": events,
        "latency_events": latency_events,
        "repeat": repeat,
        "peer_defaults": args.peer_defaults,
        "seconds": round(time.monotonic() - started, 1),
        "systems": [rows[s.name] for s in systems],
        "targets": verdicts(rows, runs),
        "runs": runs,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "peers.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.output / "peers.md").write_text(tables(report))
    print(format_report(report))
    chart = write_chart(report, args.output / "peers.png")
    print(f"\nresults: {args.output / 'peers.json'}; {chart}")
    if any(r["status"] == "failed" for r in rows.values()):
        return 2
    return 1 if any(t["verdict"] == "FAIL" for t in report["targets"]) else 0


if __name__ == "__main__":
    sys.exit(main())
