"""The ``eventbus`` command line: inspect a log file, even while a bus runs on it."""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Sequence

import anyio
import msgspec

import storage as _storage
from storage import DeadRecord, LogStats, SQLiteStorage, StepRecord, WorkflowRecord

from .._config import BusConfig
from ..failures import CONTROL_ENCODER, ControlCommand
from ..reconcile import check_log

_JSON = msgspec.json.Encoder()
_MSGPACK: msgspec.msgpack.Decoder[object] = msgspec.msgpack.Decoder()


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


async def _open(path: str) -> SQLiteStorage:
    store = SQLiteStorage(path, read_only=True)
    await store.open()
    return store


def _print_stats(stats: LogStats) -> None:
    print(f"head seq      {stats.head}")
    print(f"events kept   {stats.events} (oldest seq {stats.oldest_seq})")
    print(f"file size     {_size(stats.size_bytes)} (+ WAL {_size(stats.wal_bytes)})")
    print(f"dead letters  {sum(stats.dead_letters.values())}")
    if not stats.subscriptions:
        print("subscriptions (none)")
        return
    print()
    width = max(len("subscription"), *(len(s.name) for s in stats.subscriptions))
    print(
        f"{'subscription':<{width}}  {'cursor':>10}  {'lag':>10}  {'retrying':>8}  "
        f"{'dead':>6}  topics"
    )
    for s in stats.subscriptions:
        print(
            f"{s.name:<{width}}  {s.cursor:>10}  {stats.lag.get(s.name, 0):>10}  "
            f"{stats.retries.get(s.name, 0):>8}  {stats.dead_letters.get(s.name, 0):>6}  "
            f"{', '.join(s.topics)}"
        )


def _dead_to_dict(d: DeadRecord) -> dict[str, object]:
    return {
        "subscription": d.subscription,
        "seq": d.record.seq,
        "id": d.record.id,
        "topic": d.record.topic,
        "key": d.record.key,
        "payload": _decoded(d.record.payload),
        "attempts": d.attempts,
        "error_type": d.error_type,
        "error_message": d.error_message,
        "traceback": d.traceback,
        "first_failed_at": d.first_failed_at,
        "last_failed_at": d.last_failed_at,
    }


def _seconds(text: str) -> float:
    """A positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _timestamp(text: str) -> float:
    """A unix time, or an ISO 8601 date/time (UTC unless it says otherwise)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a unix time nor an ISO date such as 2026-11-27T03:00"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def _decoded(raw: bytes | None) -> object:
    if raw is None:
        return None
    try:
        return _MSGPACK.decode(raw)
    except msgspec.DecodeError:
        return raw.hex()


def _run_to_dict(w: WorkflowRecord, steps: list[StepRecord] | None = None) -> dict[str, object]:
    item: dict[str, object] = {
        "id": w.id,
        "name": w.name,
        "status": w.status,
        "runs": w.runs,
        "created_at": w.created_at,
        "updated_at": w.updated_at,
        "deadline": w.deadline,
        "input": _decoded(w.input),
        "output": _decoded(w.output),
        "error_type": w.error_type,
        "error_message": w.error_message,
    }
    if steps is not None:
        item["steps"] = [
            {
                "position": s.position,
                "name": s.name,
                "status": s.status,
                "attempts": s.attempts,
                "started_at": s.started_at,
                "finished_at": s.finished_at,
                "output": _decoded(s.output),
                "error_type": s.error_type,
                "error_message": s.error_message,
            }
            for s in steps
        ]
    return item


async def _workflows(store: SQLiteStorage, args: argparse.Namespace) -> int:
    if args.workflows_command == "list":
        runs = await store.workflows(
            name=args.name, status=args.status, after=args.after, limit=args.limit
        )
        if args.json:
            print(_JSON.encode([_run_to_dict(w) for w in runs]).decode())
            return 0
        if not runs:
            print("no workflow runs")
        for w in runs:
            done = sum(1 for s in await store.steps(w.id) if s.status == "done")
            problem = f"  {w.error_type}: {w.error_message}" if w.error_message else ""
            print(
                f"{w.num:>8}  {w.name}  {w.id}  {w.status:<9}  steps done={done}  "
                f"runs={w.runs}  updated {_when(w.updated_at)}{problem}"
            )
        return 0
    run = await store.workflow(args.id)
    if run is None:
        print(f"eventbus: no workflow run with id {args.id!r}", file=sys.stderr)
        return 1
    steps = await store.steps(run.id)
    item = _run_to_dict(run, steps)
    if args.json:
        print(_JSON.encode(item).decode())
        return 0
    for key, value in item.items():
        if key in ("created_at", "updated_at", "deadline") and isinstance(value, float):
            value = f"{_when(value)} UTC"
        if key != "steps":
            print(f"{key:<14}{value}")
    print("steps")
    for s in steps:
        took = "" if s.finished_at is None else f"  {s.finished_at - s.started_at:.3f}s"
        problem = f"  {s.error_type}: {s.error_message}" if s.error_message else ""
        print(
            f"  {s.position:>3}  {s.name:<20}  {s.status:<7}  attempts={s.attempts}{took}{problem}"
        )
    if not steps:
        print("  (none yet)")
    if run.traceback:
        print(f"traceback\n{run.traceback}")
    return 0


async def _change_dead_letters(args: argparse.Namespace) -> int:
    """redrive / purge: directly when no bus owns the file, else queued for its owner."""
    ids = args.id or None
    store = SQLiteStorage(args.file)
    try:
        await store.open()
    except _storage.LogLocked as exc:
        command = ControlCommand(args.dlq_command, args.subscription, ids, args.error_type)
        await anyio.to_thread.run_sync(
            _storage.submit_control, args.file, CONTROL_ENCODER.encode(command)
        )
        message = (
            f"queued {args.dlq_command} for the bus that owns {args.file} ({exc.owner}); "
            "it applies it within a second (BusConfig.control_interval)"
        )
        print(_JSON.encode({"queued": True}).decode() if args.json else message)
        return 0
    try:
        if args.dlq_command == "redrive":
            moved = await store.redrive(
                args.subscription, ids=ids, error_type=args.error_type, due_at=time.time()
            )
            count = len(moved)
        else:
            count = await store.purge(args.subscription, ids=ids, error_type=args.error_type)
    finally:
        await store.close()
    verb = "re-injected" if args.dlq_command == "redrive" else "purged"
    print(_JSON.encode({verb: count}).decode() if args.json else f"{verb} {count} dead letters")
    return 0


async def _run(args: argparse.Namespace) -> int:
    if args.command == "dlq" and args.dlq_command in ("redrive", "purge"):
        try:
            return await _change_dead_letters(args)
        except _storage.StorageError as exc:
            print(f"eventbus: {exc}", file=sys.stderr)
            return 2
    try:
        store = await _open(args.file)
    except _storage.StorageError as exc:
        print(f"eventbus: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "stats":
            stats = await store.stats()
            if args.json:
                print(_JSON.encode(stats).decode())
            else:
                _print_stats(stats)
            return 0
        if args.command == "dlq":
            show = args.dlq_command == "show"
            rows = await store.dead_letters(
                args.subscription,
                args.limit,
                args.after_seq,
                error_type=args.error_type,
                since=args.since,
                until=args.until,
                ids=[args.id] if show and not args.id.isdigit() else None,
            )
            if show:
                rows = [r for r in rows if r.record.id == args.id or str(r.record.seq) == args.id]
                if not rows:
                    print(f"eventbus: no dead letter with id or seq {args.id!r}", file=sys.stderr)
                    return 1
            items = [_dead_to_dict(r) for r in rows]
            if args.json:
                print(_JSON.encode(items).decode())
            elif show:
                for item in items:
                    for key, value in item.items():
                        if key != "traceback":
                            print(f"{key:<16}{value}")
                    print(f"traceback\n{item['traceback']}")
            else:
                for d in rows:
                    print(
                        f"{d.record.seq:>10}  {d.subscription}  {d.record.topic}  "
                        f"attempts={d.attempts}  {_when(d.last_failed_at)}  "
                        f"{d.error_type}: {d.error_message}"
                    )
                if not rows:
                    print("no dead letters")
            return 0
        if args.command == "workflows":
            return await _workflows(store, args)
        if args.command == "reconcile":
            report = await check_log(store, lease=args.lease)
            print(_JSON.encode(report.to_dict()).decode() if args.json else report.format())
            return 0 if report.ok else 1
        raise AssertionError(f"unhandled command {args.command}")  # pragma: no cover
    except _storage.StorageError as exc:
        print(f"eventbus: {exc}", file=sys.stderr)
        return 2
    finally:
        await store.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventbus",
        description="Inspect an eventbus log file (safe while a bus runs): stats, dead "
        "letters, workflow runs, reconciliation.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    stats = sub.add_parser("stats", help="head, size, and each subscription's cursor and lag")
    stats.add_argument("file")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    dlq = sub.add_parser("dlq", help="dead letters: list, show, redrive, purge")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    commands = (
        ("list", "list dead letters"),
        ("show", "show one dead letter with its traceback"),
        ("redrive", "re-inject dead letters into their subscriptions (attempts reset)"),
        ("purge", "delete dead letters for good"),
    )
    for name, text in commands:
        p = dlq_sub.add_parser(name, help=text)
        p.add_argument("file")
        if name == "show":
            p.add_argument("id", help="the event id or seq")
        p.add_argument("--subscription", "-s", help="only this subscription")
        p.add_argument("--error-type", help="only this error type (e.g. ValueError)")
        if name in ("list", "show"):
            p.add_argument("--since", type=_timestamp, help="last failure at or after")
            p.add_argument("--until", type=_timestamp, help="last failure before")
            p.add_argument("--limit", type=int, default=100)
            p.add_argument("--after-seq", type=int, default=0, help="page after this seq")
        else:
            p.add_argument("--id", action="append", help="only this event id (repeatable)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
    workflows = sub.add_parser("workflows", help="workflow runs and their steps")
    wf_sub = workflows.add_subparsers(dest="workflows_command", required=True)
    wf_list = wf_sub.add_parser("list", help="list workflow runs")
    wf_list.add_argument("file")
    wf_list.add_argument("--name", help="only runs of this workflow")
    wf_list.add_argument(
        "--status", choices=("running", "completed", "failed", "cancelled"), help="only these"
    )
    wf_list.add_argument("--limit", type=int, default=100)
    wf_list.add_argument("--after", type=int, default=0, help="page after this run number")
    wf_list.add_argument("--json", action="store_true", help="machine-readable output")
    wf_show = wf_sub.add_parser("show", help="one run with each step's status")
    wf_show.add_argument("file")
    wf_show.add_argument("id", help="the workflow id")
    wf_show.add_argument("--json", action="store_true", help="machine-readable output")
    reconcile = sub.add_parser(
        "reconcile",
        help="account for every event of every subscription; exit status 1 if any is lost",
    )
    reconcile.add_argument("file")
    reconcile.add_argument(
        "--lease",
        type=_seconds,
        default=BusConfig().reconcile_lease,
        help="seconds past due after which a retry counts as overdue (default: %(default)s)",
    )
    reconcile.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``eventbus`` and ``python -m eventbus``."""
    args = build_parser().parse_args(argv)
    return anyio.run(_run, args)
