"""Handlers: recognising batch handlers, choosing a batch controller, and turning a
failure into a retry or a dead letter."""

from __future__ import annotations

import inspect
import time
import traceback
import typing
from collections.abc import Awaitable, Callable

import msgspec

from backpressure import (
    AIMDController,
    BatchController,
    FixedController,
    GradientController,
    NaturalController,
)
from storage import DeadRecord, Record, RetryRecord

from ._config import BatchPolicy
from ._context import Context
from ._errors import SubscriptionError
from ._event import Event

EventHandler = Callable[[Event[typing.Any], Context], Awaitable[None]]
BatchHandler = Callable[[list[Event[typing.Any]], Context], Awaitable[None]]
Handler = EventHandler | BatchHandler

PROCESS_DIED = "eventbus.ProcessDied"


def is_batch_handler(handler: Callable[..., object]) -> bool:
    """True when the handler's first parameter is annotated ``list[...]`` (string
    annotations included)."""
    try:
        params = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError) as exc:
        raise SubscriptionError(f"cannot inspect handler {handler!r}: {exc}") from exc
    if len(params) < 2:
        raise SubscriptionError(
            f"handler {getattr(handler, '__qualname__', handler)!r} must take two "
            "parameters, (event, ctx) or (events: list[Event], ctx)"
        )
    first = params[0]
    annotation: object = first.annotation
    if annotation is inspect.Parameter.empty:
        return False
    if isinstance(annotation, str):
        text = annotation.replace(" ", "").lower()
        try:
            annotation = typing.get_type_hints(handler).get(first.name, annotation)
        except Exception:  # noqa: BLE001 - an unresolvable string: judge it by its text
            return text.startswith(("list[", "typing.list["))
    return bool(typing.get_origin(annotation) is list or annotation is list)


def make_controller(policy: BatchPolicy) -> BatchController:
    if policy.mode == "natural":
        return NaturalController(policy.min_size, policy.max_size)
    if policy.mode == "fixed":
        return FixedController(policy.max_size, policy.max_wait, policy.min_size)
    if policy.mode == "aimd":
        return AIMDController(policy.min_size, policy.max_size, policy.target_latency)
    return GradientController(policy.min_size, policy.max_size, policy.target_latency)


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
