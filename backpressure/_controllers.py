"""Batch-size controllers: pure state machines that pick the next batch size.

None of them sleeps or reads a clock: the caller passes every measurement in a
:class:`BatchSample`, so they behave the same under a fake clock in tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class BatchSample:
    """What one batch measured.

    Attributes:
        size: Items in the batch.
        service_time: Seconds the consumer spent on the batch.
        wait_time: Seconds the oldest item waited before the batch started.
        queue_depth: Items still waiting when the batch finished.
        now: The caller's clock reading (monotonic seconds) when the batch finished.
    """

    size: int
    service_time: float
    wait_time: float
    queue_depth: int
    now: float


@runtime_checkable
class BatchController(Protocol):
    """Proposes the next batch size and learns from each finished batch."""

    @property
    def min_size(self) -> int: ...

    @property
    def max_size(self) -> int: ...

    def target(self) -> int:
        """The batch size to take next, within ``[min_size, max_size]``."""

    def linger(self) -> float:
        """Seconds to wait for ``target()`` items once at least one is ready (0: never)."""

    def observe(self, sample: BatchSample) -> None:
        """Record a finished batch."""


def _check_bounds(min_size: int, max_size: int) -> None:
    if min_size < 1:
        raise ValueError(f"min_size must be at least 1, got {min_size}")
    if max_size < min_size:
        raise ValueError(f"max_size ({max_size}) must not be below min_size ({min_size})")


class NaturalController:
    """Take whatever is ready, up to ``max_size``; never wait for more.

    Batches grow by themselves under load (more arrives while a batch is served)
    and shrink to one under light load.
    """

    def __init__(self, min_size: int = 1, max_size: int = 512) -> None:
        _check_bounds(min_size, max_size)
        self._min = min_size
        self._max = max_size

    @property
    def min_size(self) -> int:
        return self._min

    @property
    def max_size(self) -> int:
        return self._max

    def target(self) -> int:
        return self._max

    def linger(self) -> float:
        return 0.0

    def observe(self, sample: BatchSample) -> None:
        return None


class FixedController(NaturalController):
    """Wait up to ``max_wait`` seconds to fill ``max_size`` items (a producer linger)."""

    def __init__(self, max_size: int = 512, max_wait: float = 0.005, min_size: int = 1) -> None:
        super().__init__(min_size, max_size)
        if not (max_wait >= 0 and math.isfinite(max_wait)):
            raise ValueError(f"max_wait must be a finite number >= 0, got {max_wait}")
        self._max_wait = max_wait

    def linger(self) -> float:
        return self._max_wait


class AIMDController(NaturalController):
    """Additive increase while batches come back full and fast, multiplicative
    decrease when they come back short or slower than ``target_latency``."""

    def __init__(
        self,
        min_size: int = 1,
        max_size: int = 512,
        target_latency: float = 0.05,
        increase: int = 8,
        decrease: float = 0.5,
    ) -> None:
        super().__init__(min_size, max_size)
        if not (target_latency > 0 and math.isfinite(target_latency)):
            raise ValueError(f"target_latency must be a positive number, got {target_latency}")
        if not 0 < decrease < 1:
            raise ValueError(f"decrease must be between 0 and 1, got {decrease}")
        self._target_latency = target_latency
        self._increase = increase
        self._decrease = decrease
        self._limit = float(min_size)

    def target(self) -> int:
        return max(self._min, min(self._max, int(self._limit)))

    def observe(self, sample: BatchSample) -> None:
        if sample.service_time > self._target_latency:
            self._limit = max(float(self._min), self._limit * self._decrease)
        elif sample.size >= self.target() and sample.queue_depth > 0:
            self._limit = min(float(self._max), self._limit + self._increase)
        elif sample.size < self.target() * self._decrease:
            self._limit = max(float(self._min), self._limit * self._decrease)


class GradientController(NaturalController):
    """The adaptive default: a latency-feedback limit on the batch size.

    In the spirit of TCP Vegas and the gradient concurrency limit: it keeps a smoothed
    batch service time, compares it with ``target_latency``, and scales the limit by that
    gradient (bounded to at most halving per step, so a single slow batch cannot
    collapse it). While a backlog is waiting and latency has room, the limit grows
    by a square-root step; without a backlog batches are as small as what is ready,
    so light load keeps its latency low. A dead band of 10% around the target is the
    hysteresis that stops it oscillating.
    """

    def __init__(
        self,
        min_size: int = 1,
        max_size: int = 512,
        target_latency: float = 0.05,
        smoothing: float = 0.2,
    ) -> None:
        super().__init__(min_size, max_size)
        if not (target_latency > 0 and math.isfinite(target_latency)):
            raise ValueError(f"target_latency must be a positive number, got {target_latency}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self._target_latency = target_latency
        self._alpha = smoothing
        self._latency: float | None = None
        # Start open: batches are never bigger than what is ready, so light load
        # still gets single-event batches; the limit only matters once latency does.
        self._limit = float(max_size)

    def target(self) -> int:
        return max(self._min, min(self._max, int(self._limit)))

    def observe(self, sample: BatchSample) -> None:
        if sample.size <= 0:
            return
        # Service time, not wait time: waiting grows with the backlog whatever the
        # batch size, while the service time is what the batch size controls.
        lat = sample.service_time
        self._latency = (
            lat
            if self._latency is None
            else (self._alpha * lat + (1 - self._alpha) * self._latency)
        )
        ratio = self._target_latency / max(self._latency, 1e-9)
        if ratio < 0.9:
            self._limit *= max(0.5, ratio)
        elif ratio > 1.1 and sample.queue_depth > 0 and sample.size >= self.target():
            self._limit += max(1.0, math.sqrt(self._limit))
        self._limit = min(float(self._max), max(float(self._min), self._limit))
