"""An asyncio event loop on a virtual clock: when nothing is ready to run, time jumps
to the next timer instead of passing, so a test of timing behaviour (backoff, a
breaker's cool-down, a reconcile lease) runs in no wall time.

The bus reads time from its loop (monotonic waits, and wall time derived from it), so
a bus opened on this loop runs on the virtual clock as a whole. Real I/O still
completes as usual: before each jump the loop polls for it; a jump happens only when
nothing has come in for ``threshold`` real seconds. Tests on this loop use
``:memory:`` logs, whose storage never waits on a thread.

Only what runs on the loop's clock is virtual: ``anyio.sleep``, timeouts, the bus's
retries, its breaker and workflow sleeps. ``time.time()`` in your own code is not.

The kit's fixtures and :func:`~eventbus.testing.open_kit` run on it; outside pytest,
``asyncio.Runner(loop_factory=VirtualClockLoop).run(main())``.
"""

from __future__ import annotations

import asyncio
import selectors
import time


class _JumpingSelector(selectors.DefaultSelector):
    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.offset = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            return super().select(timeout)
        wait = self.threshold if timeout is None else min(self.threshold, timeout)
        ready = super().select(wait)
        if ready:
            return ready
        if timeout is None:
            return super().select(None)  # no timer: wait for I/O
        self.offset += max(0.0, timeout - wait)  # idle until the next timer: jump to it
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps over idle time (see the module docstring).

    Args:
        threshold: Real seconds the loop waits for I/O before it jumps to its next
            timer.
    """

    #: Tells the bus to derive wall time from this loop's clock.
    virtual_clock = True

    def __init__(self, threshold: float = 0.002) -> None:
        self._jumping = _JumpingSelector(threshold)
        super().__init__(self._jumping)

    def time(self) -> float:
        return time.monotonic() + self._jumping.offset

    @property
    def skipped(self) -> float:
        """Seconds of idle time the clock jumped over."""
        return self._jumping.offset
