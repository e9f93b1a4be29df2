"""Frozen snapshots of the bus's in-process counters."""

from __future__ import annotations

import msgspec


class SubscriptionMetrics(msgspec.Struct, frozen=True):
    """One subscription's counters.

    ``lag`` is the distance in sequence numbers from the log head to the last
    finished position (0 when caught up).
    """

    handled: int
    batches: int
    failed_attempts: int
    dead_lettered: int
    acked: int
    lag: int
    buffered: int
    live: bool
    batch_target: int


class BusMetrics(msgspec.Struct, frozen=True):
    """The bus's counters at one moment."""

    head: int
    pending_publishes: int
    commits: int
    committed_events: int
    subscriptions: dict[str, SubscriptionMetrics]
