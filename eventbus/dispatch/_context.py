"""The handler's view of the bus while it handles an event or a batch.

A :class:`Context` writes into a :class:`~._buffer.CallBuffer` that the subscription
owns: the outbox events, state writes and per-event failures of the call in progress.
The subscription moves them into its next acknowledgement when the call succeeds, and
drops them when it fails.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from eventbus.storage import NewRecord

from .._event import Event
from ._buffer import CallBuffer
from ._state import State, StateCache

Encoder = Callable[[str, object, str | None, dict[str, str] | None], NewRecord]


class _Done:
    """What ``ctx.publish`` returns: already done, awaiting it returns at once."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # a generator that finishes at once


_DONE = _Done()


class Context:
    """Passed to every handler call.

    Attributes:
        subscription: The subscription's name.
        state: This subscription's keyed state (:class:`State`), committed with the
            acknowledgement.
    """

    __slots__ = ("_buffer", "_encode", "state", "subscription")

    def __init__(self, subscription: str, encode: Encoder, cache: StateCache) -> None:
        self.subscription = subscription
        self._encode = encode
        self._buffer = buffer = CallBuffer()
        self.state = State(cache, buffer)

    @property
    def buffer(self) -> CallBuffer:
        """What the call in progress has produced (for the subscription)."""
        return self._buffer

    @property
    def attempt(self) -> int:
        """Which attempt this is for the current event (1 on first delivery)."""
        return self._buffer.attempt

    @property
    def idempotency_key(self) -> str:
        """A key for outside calls, stable across redeliveries of this event to this
        subscription. In a batch handler use :meth:`idempotency_key_for`."""
        event = self._buffer.event
        if event is None:
            raise RuntimeError(
                "ctx.idempotency_key names one event; a batch handler must call "
                "ctx.idempotency_key_for(event)"
            )
        return self.idempotency_key_for(event)

    def idempotency_key_for(self, event: Event[object]) -> str:
        """The stable idempotency key of ``event`` for this subscription."""
        return f"{self.subscription}:{event.id}"

    def publish(
        self,
        topic: str,
        payload: object,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> _Done:
        """Publish downstream through the outbox: the event is committed in the same
        transaction as this handler call's acknowledgement, so it exists exactly
        when the handled event counts as done.

        The event is taken when this is called; awaiting the result (``await
        ctx.publish(...)``) returns at once, and forgetting the ``await`` loses
        nothing.

        Raises:
            PayloadError: The payload cannot be encoded.
            EventTooLarge: The encoded event exceeds ``max_event_bytes``.

        Cancellation: nothing is written until the acknowledgement commits.
        """
        self._buffer.outbox.append(self._encode(topic, payload, key, headers))
        return _DONE

    def fail(self, event: Event[object], exc: Exception) -> None:
        """In a batch handler: mark one event as failed, so it goes to the retry lane
        (or the dead letters) while the rest of the batch is acknowledged.

        The batch's outbox publishes and state writes are committed with the rest of
        the batch, so make none for an event you fail: they would apply again when it
        is retried. Later events of the failed event's key in the same batch are
        acknowledged as handled: a handler that fails an event should skip the rest
        of its key if order matters.
        """
        if not isinstance(exc, Exception):
            raise TypeError(f"ctx.fail needs an exception instance, got {exc!r}")
        self._buffer.failed[event.seq] = exc
