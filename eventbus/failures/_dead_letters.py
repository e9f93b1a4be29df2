"""Dead letters: events a subscription gave up on, and how to look at them."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import Callable, Sequence
from typing import Literal

import msgspec

import storage as _storage
from storage import DeadRecord, Record, RetryRecord

from .._errors import translate_storage_error
from .._event import Event


class DeadLetter(msgspec.Struct, frozen=True):
    """An event that a subscription could not handle.

    Attributes:
        event: The original event (same ``id`` and ``seq``).
        subscription: The subscription that gave up.
        attempts: How many attempts were made.
        error_type: The last error's qualified type name.
        error_message: The last error's message.
        traceback: The last error's formatted traceback.
        first_failed_at: Unix time of the first failure.
        last_failed_at: Unix time of the last failure.
    """

    event: Event[object]
    subscription: str
    attempts: int
    error_type: str
    error_message: str
    traceback: str
    first_failed_at: float
    last_failed_at: float


class ControlCommand(msgspec.Struct, frozen=True, tag=True):
    """A dead-letter command queued in the log file for the bus that owns it."""

    action: Literal["redrive", "purge"]
    subscription: str | None = None
    ids: list[str] | None = None
    error_type: str | None = None


CONTROL_ENCODER = msgspec.msgpack.Encoder()
CONTROL_DECODER = msgspec.msgpack.Decoder(ControlCommand)


class DeadLetters:
    """``bus.dead_letters``: inspect, re-inject and purge dead-lettered events."""

    def __init__(
        self,
        log: _storage.Storage,
        to_event: Callable[[Record], Event[object]],
        write_lock: asyncio.Lock,
        on_redriven: Callable[[list[RetryRecord]], None],
        rate: float,
    ) -> None:
        self._log = log
        self._to_event = to_event
        self._lock = write_lock
        self._on_redriven = on_redriven
        self._rate = rate

    def _convert(self, dead: DeadRecord) -> DeadLetter:
        try:
            event = self._to_event(dead.record)
        except msgspec.DecodeError:
            # Undecodable payloads are kept as raw bytes for the operator to inspect.
            event = Event(
                dead.record.id,
                dead.record.seq,
                dead.record.topic,
                dead.record.key,
                dead.record.payload,
                {},
                dead.record.created_at,
            )
        return DeadLetter(
            event=event,
            subscription=dead.subscription,
            attempts=dead.attempts,
            error_type=dead.error_type,
            error_message=dead.error_message,
            traceback=dead.traceback,
            first_failed_at=dead.first_failed_at,
            last_failed_at=dead.last_failed_at,
        )

    async def list(
        self,
        subscription: str | None = None,
        *,
        error_type: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        after_seq: int = 0,
    ) -> builtins.list[DeadLetter]:
        """Dead letters in log order.

        Args:
            subscription: Only this subscription's.
            error_type: Only this error type: qualified (``"builtins.ValueError"``)
                or its last part (``"ValueError"``).
            since: Only those whose last failure is at or after this unix time.
            until: Only those whose last failure is before this unix time.
            limit: At most this many.
            after_seq: Page on: the last ``event.seq`` of the previous page.

        Cancellation: a read; nothing changes.
        """
        try:
            rows = await self._log.dead_letters(
                subscription, limit, after_seq, error_type=error_type, since=since, until=until
            )
        except _storage.StorageError as exc:
            raise translate_storage_error(exc) from exc
        return [self._convert(d) for d in rows]

    async def get(self, event_id: str) -> builtins.list[DeadLetter]:
        """The dead letters of one event (one per subscription that gave up on it).

        Cancellation: a read; nothing changes.
        """
        try:
            rows = await self._log.dead_letters(None, 1000, 0, ids=[event_id])
        except _storage.StorageError as exc:
            raise translate_storage_error(exc) from exc
        return [self._convert(d) for d in rows]

    async def redrive(
        self,
        subscription: str | None = None,
        *,
        ids: Sequence[str] | None = None,
        error_type: str | None = None,
        rate: float | None = None,
    ) -> int:
        """Re-inject dead letters into the subscription that gave up on them (and
        only that one), with attempts reset. The event keeps its id, so
        ``ctx.idempotency_key`` is the same as before.

        They enter that subscription's retry lane spaced ``1 / rate`` seconds apart
        (``BusConfig.redrive_rate`` by default), so a large redrive cannot swamp live
        traffic. A subscription not running in this process picks them up when it
        next subscribes.

        Returns:
            How many were re-injected.

        Cancellation: the move from dead letters to the retry lane is one
        transaction; if cancelled, it happened entirely or not at all.
        """
        per_second = rate or self._rate
        if not per_second > 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        try:
            async with self._lock:
                records = await self._log.redrive(
                    subscription,
                    ids=ids,
                    error_type=error_type,
                    due_at=time.time(),
                    spacing=1.0 / per_second,
                )
        except _storage.StorageError as exc:
            raise translate_storage_error(exc) from exc
        self._on_redriven(records)
        return len(records)

    async def purge(
        self,
        subscription: str | None = None,
        *,
        ids: Sequence[str] | None = None,
        error_type: str | None = None,
        before: float | None = None,
    ) -> int:
        """Delete dead letters for good; returns how many.

        ``before`` keeps those whose last failure is at or after that unix time.

        Cancellation: one transaction; if cancelled, it happened entirely or not at all.
        """
        try:
            async with self._lock:
                return await self._log.purge(
                    subscription, ids=ids, error_type=error_type, until=before
                )
        except _storage.StorageError as exc:
            raise translate_storage_error(exc) from exc
