"""What a subscription's runtime needs of the log and of the log writer: the narrow
interfaces it is built on, so that a subscription on a log shared by several
processes can give it a view of only the partitions it holds (``_shared``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from eventbus.storage import CallSlots, Receipt, Record, RetryRecord, WriteBatch

from ..publish import Source


class DispatchLog(Protocol):
    """The reads a subscription makes of the log (a :class:`storage.Storage` is
    one)."""

    async def read(
        self, after: int, upto: int, topics: frozenset[str] | None, limit: int
    ) -> list[Record]: ...

    async def retries(self, subscription: str) -> list[RetryRecord]: ...

    async def finished_ahead(self, subscription: str, after: int) -> list[tuple[int, int]]: ...

    def calls(self, subscription: str, slots: int, width: int) -> CallSlots: ...

    async def get_state(self, subscription: str, keys: Sequence[str]) -> dict[str, bytes]: ...


class DispatchWriter(Protocol):
    """What a subscription asks of the log writer (a
    :class:`~eventbus.publish.LogWriter` is one)."""

    @property
    def committed_head(self) -> int:
        """The last event known committed: the subscription reads up to it."""

    def notify(self, source: Source) -> None:
        """``source`` has writes pending: take them in the next group commit."""

    async def commit(self, batch: WriteBatch) -> list[Receipt]:
        """Commit ``batch`` in the next group commit."""
