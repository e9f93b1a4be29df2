"""Dead letters: events a subscription gave up on, and how to look at them."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

import storage as _storage
from storage import DeadRecord, Record

from ._errors import translate_storage_error
from ._event import Event


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


class DeadLetters:
    """``bus.dead_letters``: read the dead-letter table."""

    def __init__(self, log: _storage.Storage, to_event: Callable[[Record], Event[object]]) -> None:
        self._log = log
        self._to_event = to_event

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
        self, subscription: str | None = None, *, limit: int = 100, after_seq: int = 0
    ) -> list[DeadLetter]:
        """Dead letters in log order, optionally of one subscription; page with
        ``after_seq`` (the last ``event.seq`` of the previous page)."""
        try:
            rows = await self._log.dead_letters(subscription, limit, after_seq)
        except _storage.StorageError as exc:
            raise translate_storage_error(exc) from exc
        return [self._convert(d) for d in rows]
