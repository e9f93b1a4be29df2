"""What the ``eventbus`` command line prints: tables for people, dicts for ``--json``."""

from __future__ import annotations

import datetime
import sys

import msgspec

from eventbus._log_access import decoded
from eventbus.storage import DeadRecord, LogStats, StepRecord, SubscriptionInfo, WorkflowRecord

JSON = msgspec.json.Encoder()


def when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def emit(value: object) -> None:
    print(JSON.encode(value).decode())


def shown(count: int, total: int, what: str, next_page: str | None, *, json: bool) -> None:
    """Say how much of a list was shown ("100 of 2345 dead letters shown; the next
    page: ..."): the last line for people; beside JSON, whose stdout stays a plain
    array, on stderr when the list is partial."""
    line = f"{count} of {total} {what} shown" if total else f"no {what}"
    if next_page is not None:
        line += f"; the next page: {next_page}"
    if not json:
        print(line)
    elif count < total:
        print(f"eventbus: {line}", file=sys.stderr)


def print_stats(stats: LogStats) -> None:
    print(f"head seq      {stats.head}")
    print(f"events kept   {stats.events} (oldest seq {stats.oldest_seq})")
    print(f"file size     {size(stats.size_bytes)} (+ WAL {size(stats.wal_bytes)})")
    print(f"dead letters  {sum(stats.dead_letters.values())}")
    if not stats.subscriptions:
        print("subscriptions (none)")
        return
    print()
    print_subscriptions(stats)


def subscription_to_dict(info: SubscriptionInfo, stats: LogStats) -> dict[str, object]:
    return {
        "name": info.name,
        "topics": list(info.topics),
        "cursor": info.cursor,
        "lag": stats.lag.get(info.name, 0),
        "retrying": stats.retries.get(info.name, 0),
        "dead_letters": stats.dead_letters.get(info.name, 0),
        "updated_at": info.updated_at,
    }


def print_subscriptions(stats: LogStats) -> None:
    width = max(len("subscription"), *(len(s.name) for s in stats.subscriptions))
    print(
        f"{'subscription':<{width}}  {'cursor':>10}  {'lag':>10}  {'retrying':>8}  "
        f"{'dead':>6}  {'updated (UTC)':<19}  topics"
    )
    for s in stats.subscriptions:
        print(
            f"{s.name:<{width}}  {s.cursor:>10}  {stats.lag.get(s.name, 0):>10}  "
            f"{stats.retries.get(s.name, 0):>8}  {stats.dead_letters.get(s.name, 0):>6}  "
            f"{when(s.updated_at):<19}  {', '.join(s.topics)}"
        )


def dead_to_dict(d: DeadRecord) -> dict[str, object]:
    return {
        "subscription": d.subscription,
        "seq": d.record.seq,
        "id": d.record.id,
        "topic": d.record.topic,
        "key": d.record.key,
        "payload": decoded(d.record.payload),
        "attempts": d.attempts,
        "error_type": d.error_type,
        "error_message": d.error_message,
        "traceback": d.traceback,
        "first_failed_at": d.first_failed_at,
        "last_failed_at": d.last_failed_at,
    }


def print_dead_line(d: DeadRecord) -> None:
    print(
        f"{d.record.seq:>10}  {d.subscription}  {d.record.topic}  "
        f"attempts={d.attempts}  {when(d.last_failed_at)}  "
        f"{d.error_type}: {d.error_message}"
    )


def print_dead_letter(item: dict[str, object]) -> None:
    for key, value in item.items():
        if key != "traceback":
            print(f"{key:<16}{value}")
    print(f"traceback\n{item['traceback']}")


def run_to_dict(w: WorkflowRecord, steps: list[StepRecord] | None = None) -> dict[str, object]:
    item: dict[str, object] = {
        "id": w.id,
        "name": w.name,
        "status": w.status,
        "runs": w.runs,
        "created_at": w.created_at,
        "updated_at": w.updated_at,
        "deadline": w.deadline,
        "input": decoded(w.input),
        "output": decoded(w.output),
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
                "output": decoded(s.output),
                "error_type": s.error_type,
                "error_message": s.error_message,
            }
            for s in steps
        ]
    return item


def print_run(run: WorkflowRecord, steps: list[StepRecord]) -> None:
    for key, value in run_to_dict(run).items():
        if key in ("created_at", "updated_at", "deadline") and isinstance(value, float):
            value = f"{when(value)} UTC"
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
