"""Batch-size controllers: the Protocol, its sample, and the static and AIMD policies.

None of them sleeps or reads a clock: the caller passes every measurement in a
:class:`BatchSample`, so they behave the same under a fake clock in tests. The
adaptive default, :class:`~backpressure.GradientController`, lives in ``_gradient``.
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
    """Proposes the next batch size and learns from each finished batch.

    The caller takes ``min(target(), ready)`` items; if fewer than ``target()`` are
    ready it may wait up to ``linger()`` seconds for more. After the batch it reports
    what it measured with :meth:`observe`.
    """

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


def check_bounds(min_size: int, max_size: int) -> None:
    """Raise ``ValueError`` unless ``1 <= min_size <= max_size``."""
    if min_size < 1:
        raise ValueError(f"min_size must be at least 1, got {min_size}")
    if max_size < min_size:
        raise ValueError(f"max_size ({max_size}) must not be below min_size ({min_size})")


def check_latency(target_latency: float) -> None:
    """Raise ``ValueError`` unless ``target_latency`` is a finite number above 0."""
    if not (target_latency > 0 and math.isfinite(target_latency)):
        raise ValueError(f"target_latency must be a positive number, got {target_latency}")


class NaturalController:
    """Take whatever is ready, up to ``max_size``; never wait for more.

    Batches grow by themselves under load (more arrives while a batch is served)
    and shrink to one under light load.
    """

    def __init__(self, min_size: int = 1, max_size: int = 512) -> None:
        check_bounds(min_size, max_size)
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
    """Additive increase while batches come back full with a backlog behind them,
    multiplicative decrease when one comes back slower than ``target_latency`` or
    shorter than ``decrease`` times the limit (load fell). Never waits.

    The classic TCP rule: it probes upwards one step per batch, so it reaches a large
    size only after ``max_size / increase`` full batches, and halves on every short
    batch, so under light load it sits near ``min_size``.
    """

    def __init__(
        self,
        min_size: int = 1,
        max_size: int = 512,
        target_latency: float = 0.05,
        increase: int = 8,
        decrease: float = 0.5,
    ) -> None:
        super().__init__(min_size, max_size)
        check_latency(target_latency)
        if increase < 1:
            raise ValueError(f"increase must be at least 1, got {increase}")
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
