"""What one handler call has produced so far: outbox events, state writes and the
events a batch handler failed. The subscription owns it; the call's :class:`Context`
and :class:`State` write into it."""

from __future__ import annotations

from eventbus.storage import NewRecord

from .._event import Event


class CallBuffer:
    """What one handler call has produced so far (owned by the subscription).

    Attributes:
        event: The event of a per-event call (None in a batch call).
        attempt: The attempt of the call.
        outbox: Events published with ``ctx.publish``.
        writes: ``ctx.state`` writes, in order: ``(subscription, key, value)``.
        overlay: The latest write per key, for reads within the call.
        failed: Events a batch handler failed with ``ctx.fail``, by seq.
    """

    __slots__ = ("attempt", "event", "failed", "outbox", "overlay", "writes")

    def __init__(self) -> None:
        self.event: Event[object] | None = None
        self.attempt = 1
        self.outbox: list[NewRecord] = []
        self.writes: list[tuple[str, str, bytes | None]] = []
        self.overlay: dict[str, bytes | None] = {}
        self.failed: dict[int, Exception] = {}

    def begin(self, event: Event[object] | None, attempt: int) -> None:
        """A call starts: nothing produced yet."""
        self.event = event
        self.attempt = attempt
        if self.outbox or self.writes or self.failed:
            self.clear()

    def clear(self) -> None:
        """Forget what the call produced (it failed)."""
        self.outbox = []
        self.writes = []
        self.overlay = {}
        self.failed = {}
