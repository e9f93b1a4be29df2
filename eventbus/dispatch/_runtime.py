"""What the bus and reconciliation use of a running subscription: a
:class:`Subscription` on a log one process owns, or a :class:`SharedSubscription` on
a log shared by several processes."""

from __future__ import annotations

from typing import Protocol

import anyio

from storage import RetryRecord

from .._metrics import SubscriptionMetrics
from ._scheduler import Pending
from ._state import StateCache
from ._subscription import RunningCall


class SubscriptionRuntime(Protocol):
    """A running subscription, as the bus drives it."""

    name: str
    finished: anyio.Event

    @property
    def started(self) -> bool: ...

    @property
    def state_cache(self) -> StateCache | None: ...

    async def run(self) -> None: ...

    def wake(self) -> None: ...

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
