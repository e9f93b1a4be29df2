"""What a failure leaves behind: the stored form of an event, retry records and dead
letters with their error type, message and traceback."""

from __future__ import annotations

import time
import traceback

import msgspec

from storage import DeadRecord, Record, RetryRecord

from .._event import Event

#: The error type recorded for an event whose handler call was running when the
#: process died.
PROCESS_DIED = "eventbus.ProcessDied"


def event_record(event: Event[object]) -> Record:
    """The stored form of an event (the payload re-encoded from what the handler saw:
    msgpack round-trips the decoded built-in values exactly)."""
    return Record(
        event.seq,
        event.id,
        event.topic,
        event.key,
        msgspec.msgpack.encode(event.payload),
        msgspec.msgpack.encode(event.headers) if event.headers else None,
        event.created_at,
    )


def format_error(exc: BaseException, limit: int = 30) -> str:
    """The traceback of ``exc``, without the column carets that Python 3.11 computes
    by parsing source (hundreds of microseconds each: too slow for every failure)."""
    lines = ["Traceback (most recent call last):\n"]
    for frame in traceback.extract_tb(exc.__traceback__, limit=-limit):
        lines.append(f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}\n')
        if frame.line:
            lines.append(f"    {frame.line}\n")
    lines.append(f"{error_type_name(exc)}: {exc}\n")
    return "".join(lines)


def error_type_name(exc: BaseException) -> str:
    kind = type(exc)
    return f"{kind.__module__}.{kind.__qualname__}"


def dead_record(
    subscription: str,
    record: Record,
    attempts: int,
    exc: BaseException | None,
    first_failed: float | None,
    *,
    error_type: str = "",
    message: str = "",
    trace: str = "",
) -> DeadRecord:
    now = time.time()
    if exc is not None:
        error_type = error_type_name(exc)
        message = str(exc)
        trace = format_error(exc)
    return DeadRecord(
        subscription=subscription,
        record=record,
        attempts=attempts,
        error_type=error_type,
        error_message=message,
        traceback=trace,
        first_failed_at=first_failed or now,
        last_failed_at=now,
    )


def retry_record(
    subscription: str,
    record: Record,
    next_attempt: int,
    due_at: float | None,
    exc: BaseException | None,
    first_failed: float | None,
) -> RetryRecord:
    if exc is None:
        return RetryRecord(subscription, record, next_attempt, due_at, first_failed)
    return RetryRecord(
        subscription,
        record,
        next_attempt,
        due_at,
        first_failed or time.time(),
        error_type_name(exc),
        str(exc),
        format_error(exc),
    )
