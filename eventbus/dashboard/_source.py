"""Where the dashboard reads and acts: a live bus in this process, or a log file that a
bus in another process may own (read-only, changes queued for the owner)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import anyio
import msgspec

from eventbus.storage import LogStats

from .._bus import Bus
from .._config import BusConfig
from .._log_access import (
    LogReader,
    Outcome,
    cancel_workflow,
    change_dead_letters,
    open_read_only,
)
from .._metrics import ReconcileMetrics, SubscriptionMetrics
from ..reconcile import ReconcileReport, check_log
from ..storage import SQLiteStorage

Action = Literal["redrive", "purge"]


class SubscriptionView(msgspec.Struct, frozen=True):
    """One subscription as the overview shows it. Fields a log file alone cannot
    tell (what runs in the owning process) are None there."""

    name: str
    topics: tuple[str, ...]
    cursor: int
    lag: int
    retries: int
    dead: int
    lag_seconds: float | None = None
    throughput: float | None = None
    handler_p99: float | None = None
    in_flight: int | None = None
    retries_due: int | None = None
    parked: int | None = None
    breaker: str | None = None


class Snapshot(msgspec.Struct, frozen=True):
    """The overview at one moment."""

    at: float
    live: bool
    head: int
    events: int
    size_bytes: int
    wal_bytes: int
    subscriptions: tuple[SubscriptionView, ...]


class Source(Protocol):
    """What the pages need from a bus or a log file."""

    #: Whether in-process metrics (throughput, latency, in flight, breakers) exist.
    live: bool

    async def reader(self) -> LogReader:
        """Read access to the log."""

    async def snapshot(self) -> Snapshot:
        """The overview's numbers."""

    async def change_dead_letters(
        self,
        action: Action,
        subscription: str | None,
        ids: Sequence[str] | None,
        error_type: str | None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Outcome:
        """Redrive or purge the matching dead letters; ``on_progress`` is told how many
        are done after each transaction of a long redrive."""

    async def cancel(self, workflow_id: str) -> Outcome:
        """Cancel a workflow run."""

    async def reconcile(self) -> ReconcileReport:
        """Run one reconciliation pass."""

    def periodic(self) -> ReconcileMetrics | None:
        """The bus's own latest reconciliation pass, when there is a live bus."""

    async def close(self) -> None:
        """Release what the source holds."""


def _view(name: str, topics: tuple[str, ...], cursor: int, stats: LogStats) -> SubscriptionView:
    return SubscriptionView(
        name=name,
        topics=topics,
        cursor=cursor,
        lag=stats.lag.get(name, 0),
        retries=stats.retries.get(name, 0),
        dead=stats.dead_letters.get(name, 0),
    )


def _with_metrics(view: SubscriptionView, m: SubscriptionMetrics) -> SubscriptionView:
    return msgspec.structs.replace(
        view,
        lag=m.lag,
        lag_seconds=m.lag_seconds,
        throughput=m.throughput,
        handler_p99=m.handler_latency.p99,
        in_flight=m.in_flight,
        retries=m.retries_waiting + m.parked,
        retries_due=m.retries_due,
        parked=m.parked,
        breaker=m.breaker_state,
    )


class BusSource:
    """A live bus in this process: its metrics, its log, its own dead-letter, workflow
    and reconciliation API. Call it on the bus's event loop."""

    live = True

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._reader = bus.log_reader()

    async def reader(self) -> LogReader:
        return self._reader

    async def snapshot(self) -> Snapshot:
        stats = await self._bus.stats(exact=False)
        metrics = self._bus.metrics()
        views = []
        for info in stats.subscriptions:
            view = _view(info.name, info.topics, info.cursor, stats)
            m = metrics.subscriptions.get(info.name)
            views.append(view if m is None else _with_metrics(view, m))
        return Snapshot(
            at=time.time(),
            live=True,
            head=max(stats.head, metrics.head),
            events=stats.events,
            size_bytes=stats.size_bytes,
            wal_bytes=stats.wal_bytes,
            subscriptions=tuple(views),
        )

    async def change_dead_letters(
        self,
        action: Action,
        subscription: str | None,
        ids: Sequence[str] | None,
        error_type: str | None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Outcome:
        dead = self._bus.dead_letters
        if action == "redrive":
            n = await dead.redrive(subscription, ids=ids, error_type=error_type)
        else:
            n = await dead.purge(subscription, ids=ids, error_type=error_type)
        return Outcome(count=n)

    async def cancel(self, workflow_id: str) -> Outcome:
        handle = await self._bus.get_workflow(workflow_id)
        return Outcome(count=int(await handle.cancel()))

    async def reconcile(self) -> ReconcileReport:
        return await self._bus.reconcile()

    def periodic(self) -> ReconcileMetrics | None:
        return self._bus.metrics().reconcile

    async def close(self) -> None:
        """The bus is its owner's to close."""


class FileSource:
    """A log file, read-only; changes go through the same path as the command line's
    (directly when no bus owns the file, else queued for the owner)."""

    live = False

    def __init__(self, path: str, *, lease: float | None = None) -> None:
        self.path = path
        self._lease = BusConfig().reconcile_lease if lease is None else lease
        self._store: SQLiteStorage | None = None
        self._lock = anyio.Lock()

    async def _opened(self) -> SQLiteStorage:
        async with self._lock:
            if self._store is None:
                self._store = await open_read_only(self.path)
            return self._store

    async def reader(self) -> LogReader:
        return LogReader(await self._opened())

    async def snapshot(self) -> Snapshot:
        reader = await self.reader()
        stats = await reader.stats(exact=False)
        now = time.time()
        views = []
        for info in stats.subscriptions:
            view = _view(info.name, info.topics, info.cursor, stats)
            if view.lag:
                # The oldest event not finished yet: one read on the primary key.
                topics = None if "*" in info.topics else frozenset(info.topics)
                first = await reader.read(info.cursor, stats.head, topics, 1)
                if first:
                    view = msgspec.structs.replace(
                        view, lag_seconds=max(0.0, now - first[0].created_at)
                    )
            views.append(view)
        return Snapshot(
            at=now,
            live=False,
            head=stats.head,
            events=stats.events,
            size_bytes=stats.size_bytes,
            wal_bytes=stats.wal_bytes,
            subscriptions=tuple(views),
        )

    async def change_dead_letters(
        self,
        action: Action,
        subscription: str | None,
        ids: Sequence[str] | None,
        error_type: str | None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Outcome:
        return await change_dead_letters(
            self.path,
            action,
            subscription,
            ids=ids,
            error_type=error_type,
            on_progress=on_progress,
        )

    async def cancel(self, workflow_id: str) -> Outcome:
        return await cancel_workflow(self.path, workflow_id)

    async def reconcile(self) -> ReconcileReport:
        return await check_log(await self._opened(), lease=self._lease)

    def periodic(self) -> ReconcileMetrics | None:
        return None

    async def close(self) -> None:
        async with self._lock:
            if self._store is not None:
                await self._store.close()
            self._store = None
