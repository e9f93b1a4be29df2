"""Handlers: recognising batch handlers and choosing a subscription's batch controller."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable

from backpressure import (
    AIMDController,
    BatchController,
    FixedController,
    GradientController,
    NaturalController,
)

from .._config import BatchPolicy
from .._errors import SubscriptionError
from .._event import Event
from ._context import Context

EventHandler = Callable[[Event[typing.Any], Context], Awaitable[None]]
BatchHandler = Callable[[list[Event[typing.Any]], Context], Awaitable[None]]
Handler = EventHandler | BatchHandler


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
