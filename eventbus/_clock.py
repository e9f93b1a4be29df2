"""The bus's one clock: monotonic time for waits, wall time for what is persisted.

Monotonic time is the event loop's own (``loop.time()``), the time every ``anyio``
sleep and timeout uses, so a loop with a virtual clock makes the whole bus run on it.
Wall time (``created_at``, a retry's ``due_at``) is the system's. On a loop with a
virtual clock (one whose ``virtual_clock`` attribute is true) it follows the loop's
clock instead: the system's wall time shifted by however far the loop's clock has
run ahead of the real monotonic clock, so the two never disagree about how long
something waited.
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

    __slots__ = ("now", "wall")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        loop = loop or asyncio.get_running_loop()
        self.now = loop.time
        self.wall = self._shifted if getattr(loop, "virtual_clock", False) else time.time

    def _shifted(self) -> float:
        return time.time() + (self.now() - time.monotonic())
