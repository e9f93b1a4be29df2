"""Dispatch: the per-subscription scheduler (pure), its async shell, and what a handler
sees (its context and keyed state)."""

from ._buffer import CallBuffer
from ._context import Context, Encoder
from ._handler import (
    REPLAY_WARNING,
    Handler,
    check_handler,
    check_topics,
    is_batch_handler,
    make_controller,
    subscription_name,
    warn_of_replay,
)
from ._runtime import SubscriptionRuntime
from ._scheduler import Pending, Scheduler
from ._shared import SharedSubscription
from ._state import State, StateCache, StateReader
from ._subscription import RunningCall, Subscription

__all__ = [
    "REPLAY_WARNING",
    "CallBuffer",
    "Context",
    "Encoder",
    "Handler",
    "Pending",
    "RunningCall",
    "Scheduler",
    "SharedSubscription",
    "State",
    "StateCache",
    "StateReader",
    "Subscription",
    "SubscriptionRuntime",
    "check_handler",
    "check_topics",
    "is_batch_handler",
    "make_controller",
    "subscription_name",
    "warn_of_replay",
]
