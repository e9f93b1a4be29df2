"""The ``eventbus`` command line: inspect and repair a log file, even while a bus runs
on it; copy one into PostgreSQL (``migrate``).

Every command refuses a file that is not an existing log (a typo never creates an
empty one). Reads open the file read-only. Changes (``dlq redrive``, ``dlq purge``,
``subscriptions drop``) apply directly when no bus owns the file, and are otherwise
queued in it for the owner, which applies them within ``control_interval``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import anyio

import eventbus.storage as _storage
from eventbus.storage import DeadRecord, SQLiteStorage

from .._log_access import change_dead_letters, open_for_change, open_read_only, queue
from ..failures import ControlCommand
from ..progress import Progress
from ..reconcile import check_log
from . import _output as out
from ._parser import build_parser

# The exit status of a command whose reader went away (`eventbus dlq list F | head`),
# as for one killed by SIGPIPE.
_PIPE_CLOSED = 128 + 13


_open = open_read_only


def _queued(args: argparse.Namespace, command: str, owner: str) -> int:
    if args.json:
        out.emit({"queued": True})
    else:
        print(
            f"queued {command} for the bus that owns {args.file} ({owner}); it applies "
            "it within a second (BusConfig.control_interval) and logs what it did"
        )
    return 0


# -- reading ------------------------------------------------------------------------


async def _stats(store: SQLiteStorage, args: argparse.Namespace) -> int:
    stats = await store.stats()
    if args.json:
        out.emit(stats)
    else:
        out.print_stats(stats)
    return 0


async def _list_subscriptions(store: SQLiteStorage, args: argparse.Namespace) -> int:
    stats = await store.stats()
    if args.json:
        out.emit([out.subscription_to_dict(s, stats) for s in stats.subscriptions])
        return 0
    if stats.subscriptions:
        out.print_subscriptions(stats)
    else:
        print("no subscriptions")
    return 0


def _dead_cursor(last: DeadRecord, following: DeadRecord) -> str:
    """Where the next page starts: the seq alone, unless the page ends between two
    subscriptions' letters of one event."""
    if following.record.seq != last.record.seq:
        return str(last.record.seq)
    return f"{last.record.seq}:{last.subscription}"


async def _list_dead_letters(store: SQLiteStorage, args: argparse.Namespace) -> int:
    after_seq, after_subscription = args.after_seq
    rows = await store.dead_letters(
        args.subscription,
        args.limit + 1,  # one more, to know whether another page follows
        after_seq,
        after_subscription=after_subscription,
        error_type=args.error_type,
        since=args.since,
        until=args.until,
    )
    total = await store.count_dead_letters(
        args.subscription, error_type=args.error_type, since=args.since, until=args.until
    )
    page, following = rows[: args.limit], rows[args.limit :]
    if args.json:
        out.emit([out.dead_to_dict(r) for r in page])
    else:
        for row in page:
            out.print_dead_line(row)
    next_page = f"--after-seq {_dead_cursor(page[-1], following[0])}" if following else None
    out.shown(len(page), total, "dead letters", next_page, json=args.json)
    return 0


async def _show_dead_letter(store: SQLiteStorage, args: argparse.Namespace) -> int:
    rows = await store.dead_letters(args.subscription, 10_000, 0, ids=[args.id])
    if args.id.isdigit():
        seq = int(args.id)
        by_seq = await store.dead_letters(args.subscription, 10_000, seq - 1)
        rows += [r for r in by_seq if r.record.seq == seq]
    unique = {(r.record.seq, r.subscription): r for r in rows}
    if not unique:
        print(f"eventbus: no dead letter with id or seq {args.id!r}", file=sys.stderr)
        return 1
    items = [out.dead_to_dict(r) for _, r in sorted(unique.items())]
    if args.json:
        out.emit(items)
    else:
        for item in items:
            out.print_dead_letter(item)
    return 0


async def _list_workflows(store: SQLiteStorage, args: argparse.Namespace) -> int:
    runs = await store.workflows(
        name=args.name, status=args.status, after=args.after, limit=args.limit + 1
    )
    total = await store.count_workflows(name=args.name, status=args.status)
    page, following = runs[: args.limit], runs[args.limit :]
    if args.json:
        out.emit([out.run_to_dict(w) for w in page])
    else:
        for w in page:
            done = sum(1 for s in await store.steps(w.id) if s.status == "done")
            problem = f"  {w.error_type}: {w.error_message}" if w.error_message else ""
            print(
                f"{w.num:>8}  {w.name}  {w.id}  {w.status:<9}  steps done={done}  "
                f"runs={w.runs}  updated {out.when(w.updated_at)}{problem}"
            )
    next_page = f"--after {page[-1].num}" if following else None
    out.shown(len(page), total, "workflow runs", next_page, json=args.json)
    return 0


async def _show_workflow(store: SQLiteStorage, args: argparse.Namespace) -> int:
    run = await store.workflow(args.id)
    if run is None:
        print(f"eventbus: no workflow run with id {args.id!r}", file=sys.stderr)
        return 1
    steps = await store.steps(run.id)
    if args.json:
        out.emit(out.run_to_dict(run, steps))
    else:
        out.print_run(run, steps)
    return 0


async def _reconcile(store: SQLiteStorage, args: argparse.Namespace) -> int:
    report = await check_log(store, lease=args.lease)
    if args.json:
        out.emit(report.to_dict())
    else:
        print(report.format())
    return 0 if report.ok else 1


async def _read(args: argparse.Namespace) -> int:
    store = await _open(args.file)
    try:
        if args.command == "stats":
            return await _stats(store, args)
        if args.command == "subscriptions":
            return await _list_subscriptions(store, args)
        if args.command == "dlq":
            if args.dlq_command == "show":
                return await _show_dead_letter(store, args)
            return await _list_dead_letters(store, args)
        if args.command == "workflows":
            if args.workflows_command == "show":
                return await _show_workflow(store, args)
            return await _list_workflows(store, args)
        return await _reconcile(store, args)
    finally:
        await store.close()


# -- changing -----------------------------------------------------------------------


async def _change_dead_letters(args: argparse.Namespace) -> int:
    """``dlq redrive`` and ``dlq purge``."""
    ids = args.id or None
    if args.dlq_command == "purge" and not (
        args.all or args.subscription or args.error_type or ids
    ):
        print(
            "eventbus: dlq purge deletes dead letters for good: give a filter (-s, "
            "--error-type, --id) or --all for every one; --dry-run says how many first",
            file=sys.stderr,
        )
        return 2
    verb = "re-inject" if args.dlq_command == "redrive" else "purge"
    if args.dry_run:
        n = await _count(args.file, args.subscription, args.error_type, ids)
        if args.json:
            out.emit({"dry_run": True, "matching": n})
        else:
            print(f"would {verb} {n} dead letters (dry run: nothing changed)")
        return 0
    if args.dlq_command == "redrive":
        total = await _count(args.file, args.subscription, args.error_type, ids)
        with Progress("redrive", total, unit="dead letters", quiet=args.quiet) as progress:
            outcome = await change_dead_letters(
                args.file,
                "redrive",
                args.subscription,
                ids=ids,
                error_type=args.error_type,
                on_progress=progress.update,
            )
    else:
        outcome = await change_dead_letters(
            args.file, "purge", args.subscription, ids=ids, error_type=args.error_type
        )
    if outcome.owner is not None:
        return _queued(args, args.dlq_command, outcome.owner)
    done = "re-injected" if args.dlq_command == "redrive" else "purged"
    if args.json:
        out.emit({done: outcome.count})
    else:
        print(f"{done} {outcome.count} dead letters")
    return 0


async def _count(
    path: str, subscription: str | None, error_type: str | None, ids: list[str] | None
) -> int:
    store = await _open(path)
    try:
        return await store.count_dead_letters(subscription, error_type=error_type, ids=ids)
    finally:
        await store.close()


async def _drop_subscription(args: argparse.Namespace) -> int:
    store = await _open(args.file)
    try:
        stats = await store.stats()
    finally:
        await store.close()
    info = next((s for s in stats.subscriptions if s.name == args.name), None)
    if info is None:
        print(
            f"eventbus: no subscription named {args.name!r} in {args.file}; "
            "`eventbus subscriptions list FILE` shows them",
            file=sys.stderr,
        )
        return 1
    found = out.subscription_to_dict(info, stats)
    what = (
        f"subscription {args.name!r} (cursor {info.cursor}, {found['lag']} events behind, "
        f"{found['retrying']} retrying, {found['dead_letters']} dead letters, and its state)"
    )
    if args.dry_run:
        if args.json:
            out.emit({"dry_run": True, "subscription": found})
        else:
            print(f"would drop {what} (dry run: nothing changed)")
        return 0
    try:
        writer = await open_for_change(args.file)
    except _storage.LogLocked as exc:
        await queue(args.file, ControlCommand("drop", args.name))
        return _queued(args, "drop", exc.owner)
    try:
        await writer.drop_subscription(args.name)
    finally:
        await writer.close()
    if args.json:
        out.emit({"dropped": found})
    else:
        print(f"dropped {what}")
    return 0


async def _migrate(args: argparse.Namespace) -> int:
    """Copy a SQLite log into a new PostgreSQL log."""
    if not _storage.is_postgres_url(args.target):
        print(
            f"eventbus: the target {args.target!r} is not a PostgreSQL URL "
            "(postgresql://user@host/db?schema=name)",
            file=sys.stderr,
        )
        return 2
    await (await _open(args.source)).close()  # an existing log, or refused as is
    try:
        from eventbus.storage._migrate import migrate_sqlite_to_postgres
    except ImportError as exc:  # pragma: no cover - without the postgres extra
        print(f"eventbus: {exc}; install it with pip install 'eventbus[postgres]'", file=sys.stderr)
        return 2
    counts = await migrate_sqlite_to_postgres(args.source, args.target)
    if args.json:
        out.emit(counts)
    else:
        copied = ", ".join(f"{n} {table}" for table, n in counts.items()) or "nothing"
        print(f"copied {args.source} into {args.target}: {copied}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """``eventbus serve``: the dashboard, until interrupted."""
    try:
        anyio.run(_check_log, args.file)
    except _storage.StorageError as exc:
        print(f"eventbus: {exc}", file=sys.stderr)
        return 2
    try:
        from eventbus import dashboard
    except ImportError as exc:
        print(
            f"eventbus: {exc}; the dashboard needs its extra: pip install 'eventbus[dashboard]'",
            file=sys.stderr,
        )
        return 2
    mode = "actions allowed" if args.allow_actions else "read-only"
    print(f"eventbus: dashboard of {args.file} at http://{args.host}:{args.port}/ ({mode})")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.token:
        print(
            f"eventbus: warning: listening on {args.host} without --token: anyone who can reach "
            "it can read the log",
            file=sys.stderr,
        )
    dashboard.serve(
        args.file,
        host=args.host,
        port=args.port,
        allow_actions=args.allow_actions,
        token=args.token,
    )
    return 0


async def _check_log(path: str) -> None:
    await (await _open(path)).close()  # an existing log, or refused as is


async def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "migrate":
            return await _migrate(args)
        if args.command == "dlq" and args.dlq_command in ("redrive", "purge"):
            return await _change_dead_letters(args)
        if args.command == "subscriptions" and args.subscriptions_command == "drop":
            return await _drop_subscription(args)
        return await _read(args)
    except _storage.StorageError as exc:
        print(f"eventbus: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``eventbus`` and ``python -m eventbus``."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    try:
        return anyio.run(_run, args)
    except BrokenPipeError:
        # The reader stopped reading (`| head`): end quietly. Point stdout at devnull
        # so that the interpreter's last flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return _PIPE_CLOSED
