"""The handler's view of the bus while it handles an event or a batch."""

from __future__ import annotations

from collections.abc import Callable

from storage import NewRecord

from ._event import Event
from ._state import State

Encoder = Callable[[str, object, str | None, dict[str, str] | None], NewRecord]


class Context:
    """Passed to every handler call.

    Attributes:
        subscription: The subscription's name.
        attempt: Which attempt this is for the current event (1 on first delivery).
        state: This subscription's keyed state (:class:`State`), committed with the
            acknowledgement.
    """

    __slots__ = ("_encode", "_event", "_failed", "_outbox", "attempt", "state", "subscription")

    def __init__(self, subscription: str, encode: Encoder, state: State) -> None:
        self.subscription = subscription
        self.state = state
        self.attempt = 1
        self._encode = encode
        self._event: Event[object] | None = None
        self._outbox: list[NewRecord] = []
        self._failed: dict[int, Exception] = {}

    @property
    def idempotency_key(self) -> str:
        """A key for outside calls, stable across redeliveries of this event to this
        subscription. In a batch handler use :meth:`idempotency_key_for`."""
        if self._event is None:
            raise RuntimeError(
                "ctx.idempotency_key names one event; a batch handler must call "
                "ctx.idempotency_key_for(event)"
            )
        return self.idempotency_key_for(self._event)

    def idempotency_key_for(self, event: Event[object]) -> str:
        """The stable idempotency key of ``event`` for this subscription."""
        return f"{self.subscription}:{event.id}"

    async def publish(
        self,
        topic: str,
        payload: object,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Publish downstream through the outbox: the event is committed in the same
        transaction as this handler call's acknowledgement, so it exists exactly
        when the handled event counts as done.

        Raises:
            PayloadError: The payload cannot be encoded.
            EventTooLarge: The encoded event exceeds ``max_event_bytes``.

        Cancellation: nothing is written until the acknowledgement commits.
        """
        self._outbox.append(self._encode(topic, payload, key, headers))

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
        self._failed[event.seq] = exc

    # -- used by the dispatcher -----------------------------------------------------

    def _begin(self, event: Event[object] | None, attempt: int) -> tuple[int, int]:
        self._event = event
        self.attempt = attempt
        self._failed.clear()
        return self._mark()

    def _mark(self) -> tuple[int, int]:
        return len(self._outbox), self.state._mark()

    def _rollback_to(self, mark: tuple[int, int]) -> None:
        del self._outbox[mark[0] :]
        self.state._rollback_to(mark[1])

    def _take_outbox(self) -> list[NewRecord]:
        out, self._outbox = self._outbox, []
        return out
