"""An asyncio event loop on a virtual clock: when nothing is ready to run, time jumps
to the next timer instead of passing, so a test of timing behaviour (backoff, a
breaker's cool-down, a reconcile lease) runs in no wall time.

The bus reads time from its loop (monotonic waits, and wall time derived from it), so
a bus opened on this loop runs on the virtual clock as a whole. Real I/O still
completes as usual: before each jump the loop polls for it; a jump happens only when
nothing has come in for ``threshold`` real seconds. Tests on this loop use
``:memory:`` logs, whose storage never waits on a thread.

Use it with ``@pytest.mark.virtual_clock`` (see ``conftest.py``).
"""

from __future__ import annotations

import asyncio
import selectors
import time
from typing import Any


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.offset = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[Any, int]]:
        if timeout is not None and timeout <= 0:
            return super().select(timeout)  # type: ignore[no-any-return]
        wait = self.threshold if timeout is None else min(self.threshold, timeout)
        ready = super().select(wait)
        if ready:
            return ready  # type: ignore[no-any-return]
        if timeout is None:
            return super().select(None)  # type: ignore[no-any-return]  # no timer: wait for I/O
        self.offset += max(0.0, timeout - wait)  # idle until the next timer: jump to it
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps over idle time (see the module docstring)."""

    def __init__(self, threshold: float = 0.002) -> None:
        self._jumping = _JumpingSelector(threshold)
        super().__init__(self._jumping)

    def time(self) -> float:
        return time.monotonic() + self._jumping.offset

    @property
    def skipped(self) -> float:
        """Seconds of idle time the clock jumped over."""
        return self._jumping.offset
