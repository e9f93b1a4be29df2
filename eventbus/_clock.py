"""The bus's one clock: monotonic time for waits, wall time for what is persisted.

Monotonic time is the event loop's own (``loop.time()``), the time every ``anyio``
sleep and timeout uses, so a loop with a virtual clock makes the whole bus run on it.
Wall time (``created_at``, a retry's ``due_at``) follows the loop's clock too: it is
the system's wall time shifted by however far the loop's clock has run ahead of the
real monotonic clock, so the two never disagree about how long something waited.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """What the bus reads time from."""

    def now(self) -> float:
        """Monotonic seconds, comparable with the event loop's deadlines."""

    def wall(self) -> float:
        """Unix time, for what is written to the log."""


class LoopClock:
    """The running event loop's clock (see the module docstring)."""

    __slots__ = ("now",)

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.now = (loop or asyncio.get_running_loop()).time

    def wall(self) -> float:
        return time.time() + (self.now() - time.monotonic())
