"""Protection under prolonged failure: a circuit breaker and a retry budget.

Both are pure state machines: every method takes the caller's monotonic ``now``.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

from .._config import BreakerPolicy

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Opens when the failure ratio over a time window crosses a threshold.

    Closed: everything runs. Open: nothing runs until the cool-down ends. Half-open:
    one probe runs; success closes the breaker, failure opens it again with the
    cool-down doubled (up to ``max_cooldown``).
    """

    def __init__(self, policy: BreakerPolicy) -> None:
        self.policy = policy
        self.state: State = "closed"
        self._outcomes: deque[tuple[float, int, int]] = deque()  # (when, ok, failed)
        self._ok = 0
        self._failed = 0
        self._opened_until = 0.0
        self._cooldown = policy.cooldown
        self.trips = 0

    def _expire(self, now: float) -> None:
        horizon = now - self.policy.window
        while self._outcomes and self._outcomes[0][0] < horizon:
            _, ok, failed = self._outcomes.popleft()
            self._ok -= ok
            self._failed -= failed

    def _reset_window(self) -> None:
        self._outcomes.clear()
        self._ok = self._failed = 0

    def record(self, ok: int, failed: int, now: float) -> None:
        """Record outcomes: ``ok`` events handled, ``failed`` events that failed."""
        if self.state == "half_open":
            if failed:
                self._open(now)
            elif ok:
                self.state = "closed"
                self._cooldown = self.policy.cooldown
                self._reset_window()
            return
        if self.state == "open":
            return
        self._outcomes.append((now, ok, failed))
        self._ok += ok
        self._failed += failed
        self._expire(now)
        calls = self._ok + self._failed
        if calls >= self.policy.min_calls and self._failed / calls >= self.policy.failure_ratio:
            self._open(now)

    def _open(self, now: float) -> None:
        if self.state == "half_open":
            self._cooldown = min(self._cooldown * 2, self.policy.max_cooldown)
        self.state = "open"
        self.trips += 1
        self._opened_until = now + self._cooldown
        self._reset_window()

    def wait_time(self, now: float) -> float:
        """Seconds until work may run (0 when it may run now). Moving from open to
        half-open happens here, once the cool-down has passed."""
        if self.state == "open":
            if now < self._opened_until:
                return self._opened_until - now
            self.state = "half_open"
        return 0.0

    @property
    def probing(self) -> bool:
        return self.state == "half_open"


class RetryBudget:
    """A token bucket: each fresh event earns ``ratio`` retry tokens, and a floor of
    ``floor_per_second`` tokens accrue with time, so retries cannot outgrow a fraction
    of fresh traffic, yet are never starved outright."""

    def __init__(self, ratio: float, floor_per_second: float, burst: float, now: float) -> None:
        self.ratio = ratio
        self.floor = floor_per_second
        self.burst = burst
        self.tokens = burst
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            self.tokens = min(self.burst, self.tokens + (now - self._last) * self.floor)
            self._last = now

    def earn(self, fresh_events: int) -> None:
        """Fresh events were handled: each earns ``ratio`` tokens."""
        self.tokens = min(self.burst, self.tokens + fresh_events * self.ratio)

    def refund(self) -> None:
        """A retry succeeded: its token comes back. A dependency that has recovered
        then drains its retries at handler speed, while one that still fails is held
        to the floor (each failure keeps its token)."""
        self.tokens = min(self.burst, self.tokens + 1.0 + self.ratio)

    def wait_time(self, now: float) -> float:
        """Seconds until one token is available (0 if one is available now)."""
        self._refill(now)
        if self.tokens >= 1.0:
            return 0.0
        if self.floor <= 0:
            return float("inf")
        return (1.0 - self.tokens) / self.floor

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
