"""Dispatch: the per-subscription scheduler (pure), its async shell, and what a handler
sees (its context and keyed state)."""

from ._buffer import CallBuffer
from ._context import Context, Encoder
from ._handler import Handler, is_batch_handler, make_controller
from ._scheduler import Pending, Scheduler
from ._state import State, StateCache, StateReader
from ._subscription import RunningCall, Subscription

__all__ = [
    "CallBuffer",
    "Context",
    "Encoder",
    "Handler",
    "Pending",
    "RunningCall",
    "Scheduler",
    "State",
    "StateCache",
    "StateReader",
    "Subscription",
    "is_batch_handler",
    "make_controller",
]
