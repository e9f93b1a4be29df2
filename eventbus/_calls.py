"""A handler call in flight, as reconciliation sees it.

Every handler call in flight is visible to reconciliation: when it started, the events
it holds, a cancel scope of its own. Reconciliation cancels one that outlives its
lease; the call then fails with :class:`HandlerStuck`, an attempt like any other, and
the bus closing is still the enclosing scope's business.
"""

from __future__ import annotations

import time

import anyio

from ._event import Event


class HandlerCall:
    """A handler call in flight, as reconciliation sees it.

    The main lane reuses one per subscription for a per-event handler (one cancel
    scope per batch: a scope per event would cost about 4 us, half of what an event
    costs in memory), moving ``index`` and ``started`` from event to event; a batch
    handler's calls and retry attempts get one each.

    Attributes:
        lane: ``"main"`` or ``"retry"``.
        batch: The events of the call (of the batch, while ``index >= 0``).
        index: The event of ``batch`` being handled, or -1 when the call holds all.
        started: When the call (or the event at ``index``) started, monotonic.
        scope: Cancels the call; None once it has finished.
        stuck: The lease it outlived, once reconciliation cancelled it.
    """

    __slots__ = ("batch", "index", "lane", "mark", "scope", "started", "stuck")

    def __init__(self, lane: str, batch: list[Event[object]], index: int = -1) -> None:
        self.lane = lane
        self.batch = batch
        self.index = index
        self.mark = (0, 0)  # the context's buffers before the event at index
        self.started = time.monotonic()
        self.scope: anyio.CancelScope | None = None
        self.stuck: float | None = None

    def seqs(self) -> tuple[int, ...]:
        """The events the call holds."""
        if self.index >= 0:
            return (self.batch[self.index].seq,)
        return tuple(e.seq for e in self.batch)
