"""A graceful stop requested by a signal: how ``eventbus.run`` tells the buses opened
under it that the cancellation it delivers is a request to stop, not an abort.

A plain cancellation of the task that owns a bus closes it at once (its owner no
longer waits for anything); a stop signal under :func:`eventbus.run` closes it as on
a normal exit, letting calls in flight finish for up to ``close_timeout``.
"""

from __future__ import annotations

from contextvars import ContextVar


class StopRequest:
    """Set by a signal handler just before it cancels the main task."""

    __slots__ = ("requested",)

    def __init__(self) -> None:
        self.requested = False


#: The stop request of the ``eventbus.run`` this code runs under, if any.
STOP_REQUEST: ContextVar[StopRequest | None] = ContextVar("eventbus_stop_request", default=None)


def stop_requested() -> bool:
    """Whether a graceful stop was requested for the code running now."""
    request = STOP_REQUEST.get()
    return request is not None and request.requested
