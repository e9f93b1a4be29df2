"""The ``eventbus`` command line's arguments: every one with a help line."""

from __future__ import annotations

import argparse
import datetime
import os
from importlib import metadata

from .._config import BusConfig

FILE_HELP = "the log file (the SQLite file a bus was opened on); it must exist"


def _seconds(text: str) -> float:
    """A positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _count(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
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


def _dead_cursor(text: str) -> tuple[int, str | None]:
    """``SEQ`` or ``SEQ:SUBSCRIPTION``: where the previous page of dead letters ended."""
    seq, sep, subscription = text.partition(":")
    if not seq.isdigit() or (sep and not subscription):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not SEQ or SEQ:SUBSCRIPTION (as the previous page's last line says)"
        )
    return int(seq), subscription if sep else None


def version() -> str:
    try:
        return metadata.version("eventbus")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "unknown"


def _json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _dead_filters(parser: argparse.ArgumentParser, *, times: bool) -> None:
    parser.add_argument("--subscription", "-s", help="only this subscription's dead letters")
    parser.add_argument(
        "--error-type", help="only this error type: qualified or its last part (ValueError)"
    )
    if times:
        parser.add_argument(
            "--since", type=_timestamp, help="only those whose last failure is at or after this"
        )
        parser.add_argument(
            "--until", type=_timestamp, help="only those whose last failure is before this"
        )


def _dlq(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dlq = sub.add_parser("dlq", help="dead letters: list, show, redrive, purge")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="COMMAND")

    p = dlq_sub.add_parser("list", help="list dead letters, a page at a time")
    p.add_argument("file", help=FILE_HELP)
    _dead_filters(p, times=True)
    p.add_argument(
        "--limit", type=_count, default=100, help="at most this many (default: %(default)s)"
    )
    p.add_argument(
        "--after-seq",
        type=_dead_cursor,
        default=(0, None),
        metavar="SEQ[:SUBSCRIPTION]",
        help="the next page: after this letter, as the previous page's last line says",
    )
    _json(p)

    p = dlq_sub.add_parser("show", help="show one event's dead letters with their tracebacks")
    p.add_argument("file", help=FILE_HELP)
    p.add_argument("id", help="the event's id or its seq")
    p.add_argument("--subscription", "-s", help="only this subscription's letter of it")
    _json(p)

    for name, text, verb in (
        (
            "redrive",
            "re-inject dead letters into their subscriptions (attempts reset)",
            "re-inject",
        ),
        ("purge", "delete dead letters for good (needs a filter, or --all)", "delete"),
    ):
        p = dlq_sub.add_parser(name, help=text)
        p.add_argument("file", help=FILE_HELP)
        _dead_filters(p, times=False)
        p.add_argument(
            "--id", action="append", help=f"only this event id (repeatable): {verb} just these"
        )
        if name == "purge":
            p.add_argument(
                "--all", action="store_true", help="every dead letter: needed when no filter"
            )
        p.add_argument(
            "--dry-run", action="store_true", help=f"say how many it would {verb}; change nothing"
        )
        if name == "redrive":
            p.add_argument(
                "--quiet",
                "-q",
                action="store_true",
                help="no progress line (it shows only on a terminal, and never under CI)",
            )
        _json(p)


def _subscriptions(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    subs = sub.add_parser("subscriptions", help="subscriptions in the log: list, drop")
    subs_sub = subs.add_subparsers(dest="subscriptions_command", required=True, metavar="COMMAND")
    p = subs_sub.add_parser("list", help="each subscription: topics, cursor, lag, retries, dead")
    p.add_argument("file", help=FILE_HELP)
    _json(p)
    p = subs_sub.add_parser(
        "drop",
        help="forget a subscription no handler runs any more (renamed or removed): its "
        "cursor, retries, dead letters and state",
    )
    p.add_argument("file", help=FILE_HELP)
    p.add_argument("name", help="the subscription's name, as `subscriptions list` shows it")
    p.add_argument("--dry-run", action="store_true", help="say what it would drop; change nothing")
    _json(p)


def _workflows(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    workflows = sub.add_parser("workflows", help="workflow runs and their steps")
    wf_sub = workflows.add_subparsers(dest="workflows_command", required=True, metavar="COMMAND")
    p = wf_sub.add_parser("list", help="list workflow runs, a page at a time")
    p.add_argument("file", help=FILE_HELP)
    p.add_argument("--name", help="only runs of this workflow")
    p.add_argument(
        "--status",
        choices=("running", "completed", "failed", "cancelled"),
        help="only runs in this state",
    )
    p.add_argument(
        "--limit", type=_count, default=100, help="at most this many (default: %(default)s)"
    )
    p.add_argument(
        "--after", type=int, default=0, help="the next page: after this run number", metavar="N"
    )
    _json(p)
    p = wf_sub.add_parser("show", help="one run with each step's status")
    p.add_argument("file", help=FILE_HELP)
    p.add_argument("id", help="the workflow id")
    _json(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventbus",
        description="Inspect and repair an eventbus log file, also while a bus runs on it: "
        "stats, subscriptions, dead letters, workflow runs, reconciliation.",
        epilog="Exit status: 0 done, 1 not found (or, for reconcile, events lost), 2 an "
        "error (no such log, bad arguments).",
    )
    parser.add_argument("--version", action="version", version=f"eventbus {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    stats = sub.add_parser("stats", help="head, size, and each subscription's cursor and lag")
    stats.add_argument("file", help=FILE_HELP)
    _json(stats)
    _subscriptions(sub)
    _dlq(sub)
    _workflows(sub)
    reconcile = sub.add_parser(
        "reconcile",
        help="account for every event of every subscription; exit status 1 if any is lost",
    )
    reconcile.add_argument("file", help=FILE_HELP)
    reconcile.add_argument(
        "--lease",
        type=_seconds,
        default=BusConfig().reconcile_lease,
        help="seconds past due after which a retry counts as overdue (default: %(default)s)",
    )
    _json(reconcile)
    serve = sub.add_parser(
        "serve",
        help="a web dashboard of the log: lag, dead letters, workflow runs, reconciliation "
        "(needs the dashboard extra: pip install 'eventbus[dashboard]')",
    )
    serve.add_argument("file", help=FILE_HELP)
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on (default: %(default)s, this machine only)",
    )
    serve.add_argument(
        "--port", type=int, default=8765, help="the port to listen on (default: %(default)s)"
    )
    serve.add_argument(
        "--allow-actions",
        action="store_true",
        help="offer redrive, purge, cancel and reconcile (read-only without it)",
    )
    serve.add_argument(
        "--token",
        default=os.environ.get("EVENTBUS_DASHBOARD_TOKEN"),
        help="a token every request must carry (default: $EVENTBUS_DASHBOARD_TOKEN, which "
        "keeps it out of the process list); open the dashboard once as ...?token=TOKEN",
    )
    migrate = sub.add_parser(
        "migrate",
        help="copy a SQLite log into a new PostgreSQL log (stop the bus on it first)",
    )
    migrate.add_argument("source", help=FILE_HELP)
    migrate.add_argument(
        "target",
        help="the PostgreSQL log to create: postgresql://user@host/db?schema=name "
        "(a schema that is empty or missing)",
    )
    _json(migrate)
    return parser
