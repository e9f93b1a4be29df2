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
    inflight_upto: int = 0


class RetryRecord(msgspec.Struct, frozen=True, gc=False):
    """An event waiting in a subscription's retry lane.

    The record carries its own copy of the event, so compaction of the main log
    never takes a pending retry's payload away.

    Attributes:
        attempt: The attempt that runs next (2 after one failure).
        due_at: Unix time when it is due; None while it waits behind an earlier
            event of the same key.
        running: True while an attempt runs: found true on open, the process died
            during that attempt.
    """

    subscription: str
    record: Record
    attempt: int
    due_at: float | None
    first_failed_at: float | None = None
    error_type: str = ""
    error_message: str = ""
    traceback: str = ""
    running: bool = False


class WriteBatch(msgspec.Struct, gc=False):
    """Everything one transaction writes: applied all together or not at all.

    ``acks`` maps a subscription name to its new cursor; cursors only move forward.
    ``subscriptions`` registers subscriptions (an existing one keeps its cursor).
    ``retries`` are written (replacing the same subscription and seq), then
    ``settled`` ones removed from the retry lane. ``inflight`` records, per
    subscription, the last seq handed to a handler before its acknowledgement.
    """

    appends: list[NewRecord] = msgspec.field(default_factory=list)
    acks: dict[str, int] = msgspec.field(default_factory=dict)
    subscriptions: list[SubscriptionInfo] = msgspec.field(default_factory=list)
    dead: list[DeadRecord] = msgspec.field(default_factory=list)
    retries: list[RetryRecord] = msgspec.field(default_factory=list)
    settled: list[tuple[str, int]] = msgspec.field(default_factory=list)
    inflight: dict[str, int] = msgspec.field(default_factory=dict)
    state: list[tuple[str, str, bytes | None]] = msgspec.field(default_factory=list)
    effects: list[tuple[str, bytes]] = msgspec.field(default_factory=list)

    def is_empty(self) -> bool:
        return not (
            self.appends
            or self.acks
            or self.subscriptions
            or self.dead
            or self.retries
            or self.settled
            or self.inflight
            or self.state
            or self.effects
        )

    def merge(self, other: WriteBatch) -> None:
        """Fold ``other`` into this batch (later acks win only if they are further)."""
        self.appends.extend(other.appends)
        for name, cursor in other.acks.items():
            if cursor > self.acks.get(name, -1):
                self.acks[name] = cursor
        self.subscriptions.extend(other.subscriptions)
        self.dead.extend(other.dead)
        self.retries.extend(other.retries)
        self.settled.extend(other.settled)
        self.inflight.update(other.inflight)
        self.state.extend(other.state)
        self.effects.extend(other.effects)


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
    retries: dict[str, int] = msgspec.field(default_factory=dict)
