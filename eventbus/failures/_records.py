"""What a failure leaves behind: the stored form of an event, retry records and dead
letters with their error type, message and traceback."""

from __future__ import annotations

import time
import traceback

import msgspec

from eventbus.storage import DeadRecord, Record, RetryRecord

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


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"
# Exceptions of a chain kept in a record: the latest ones, where the cause is.
_MAX_CHAIN = 8


def format_error(exc: BaseException, limit: int = 30) -> str:
    """The traceback of ``exc`` with its chain (``raise ... from cause`` and the
    exception being handled when it was raised), oldest first as Python prints it,
    without the column carets that Python 3.11 computes by parsing source (hundreds
    of microseconds each: too slow for every failure)."""
    chain: list[tuple[BaseException, str]] = []  # (exception, how it led to the next)
    seen: set[int] = set()
    current: BaseException | None = exc
    link = ""
    while current is not None and id(current) not in seen and len(chain) < _MAX_CHAIN:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, _CONTEXT
        else:
            current = None
    lines: list[str] = []
    for error, leads_on in reversed(chain):
        _format_one(error, limit, lines)
        lines.append(leads_on)
    return "".join(lines)


def _format_one(exc: BaseException, limit: int, lines: list[str]) -> None:
    lines.append("Traceback (most recent call last):\n")
    for frame in traceback.extract_tb(exc.__traceback__, limit=-limit):
        lines.append(f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}\n')
        if frame.line:
            lines.append(f"    {frame.line}\n")
    lines.append(f"{error_type_name(exc)}: {exc}\n")
    if isinstance(exc, BaseExceptionGroup):
        for i, inner in enumerate(exc.exceptions, 1):
            lines.append(f"  +-- {i}: {error_type_name(inner)}: {inner}\n")


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
