"""Records and write batches exchanged between the bus and a storage backend."""

from __future__ import annotations

import msgspec


class NewRecord(msgspec.Struct, frozen=True, gc=False):
    """An event to append: the storage assigns its sequence number.

    ``payload`` and ``headers`` are already encoded; the storage never looks inside.
    """

    id: str
    topic: str
    key: str | None
    payload: bytes
    headers: bytes | None
    created_at: float
    idempotency_key: str | None = None


class Record(msgspec.Struct, frozen=True, gc=False):
    """An event as stored in the log, with its position ``seq``."""

    seq: int
    id: str
    topic: str
    key: str | None
    payload: bytes
    headers: bytes | None
    created_at: float


class Receipt(msgspec.Struct, frozen=True, gc=False):
    """Proof that an event is in the log.

    ``duplicate`` is true when the append carried an idempotency key already in the
    log: ``seq`` and ``id`` are then those of the original event and nothing new was
    written.
    """

    seq: int
    id: str
    duplicate: bool = False


class DeadRecord(msgspec.Struct, frozen=True, gc=False):
    """An event that a subscription gave up on, with why."""

    subscription: str
    record: Record
    attempts: int
    error_type: str
    error_message: str
    traceback: str
    first_failed_at: float
    last_failed_at: float


class SubscriptionInfo(msgspec.Struct, frozen=True, gc=False):
    """A subscription's persisted position: every event with ``seq <= cursor`` is
    finished for it (done or dead-lettered)."""

    name: str
    topics: tuple[str, ...]
    cursor: int
    updated_at: float


class WriteBatch(msgspec.Struct, gc=False):
    """Everything one transaction writes: applied all together or not at all.

    ``acks`` maps a subscription name to its new cursor; cursors only move forward.
    ``subscriptions`` registers subscriptions (an existing one keeps its cursor).
    """

    appends: list[NewRecord] = msgspec.field(default_factory=list)
    acks: dict[str, int] = msgspec.field(default_factory=dict)
    subscriptions: list[SubscriptionInfo] = msgspec.field(default_factory=list)
    dead: list[DeadRecord] = msgspec.field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.appends or self.acks or self.subscriptions or self.dead)

    def merge(self, other: WriteBatch) -> None:
        """Fold ``other`` into this batch (later acks win only if they are further)."""
        self.appends.extend(other.appends)
        for name, cursor in other.acks.items():
            if cursor > self.acks.get(name, -1):
                self.acks[name] = cursor
        self.subscriptions.extend(other.subscriptions)
        self.dead.extend(other.dead)


class LogStats(msgspec.Struct, frozen=True):
    """A snapshot of the log, readable from the file alone."""

    head: int
    events: int
    oldest_seq: int | None
    subscriptions: tuple[SubscriptionInfo, ...]
    lag: dict[str, int]
    dead_letters: dict[str, int]
    size_bytes: int
    wal_bytes: int
