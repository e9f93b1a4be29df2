"""What the bus and reconciliation use of a running subscription: a
:class:`Subscription` on a log one process owns, or a :class:`SharedSubscription` on
a log shared by several processes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio

from eventbus.storage import RetryRecord

from .._metrics import SubscriptionMetrics
from ._context import Context
from ._scheduler import Pending
from ._state import StateCache
from ._subscription import RunningCall


class SubscriptionRuntime(Protocol):
    """A running subscription, as the bus drives it."""

    name: str
    topics: frozenset[str]
    is_batch: bool
    #: The handler as subscribed.
    handler: Callable[[object, Context], Awaitable[None]]
    finished: anyio.Event

    @property
    def started(self) -> bool: ...

    @property
    def state_cache(self) -> StateCache | None: ...

    async def run(self) -> None: ...

    def wake(self) -> None: ...

    def call_through(self, wrapper: Callable[[object, Context], Awaitable[None]] | None) -> None:
        """From the next call on, call ``wrapper`` instead of the handler."""

    def stop(self) -> None: ...

    def cancel(self) -> None: ...

    def add_retries(self, records: list[RetryRecord]) -> None: ...

    def holds(self, seq: int) -> bool: ...

    def retry_seqs(self) -> set[int]: ...

    def finished_upto(self) -> int: ...

    def settled(self) -> bool: ...

    def pending(self) -> Pending: ...

    def flush_position(self) -> None: ...

    def running_calls(self, lease: float) -> list[RunningCall]: ...

    def cancel_stuck(self, call: RunningCall, lease: float) -> bool: ...

    def metrics(self, head: int) -> SubscriptionMetrics: ...
