"""Batch-size controllers on a fake clock: bounds, convergence, reaction to latency."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backpressure import (
    AIMDController,
    BatchController,
    BatchSample,
    FixedController,
    GradientController,
    NaturalController,
)

samples = st.lists(
    st.tuples(
        st.integers(0, 2000),  # size
        st.floats(0, 5, allow_nan=False),  # service time
        st.floats(0, 5, allow_nan=False),  # wait time
        st.integers(0, 100_000),  # queue depth
    ),
    max_size=200,
)


def controllers(min_size: int, max_size: int) -> list[BatchController]:
    return [
        NaturalController(min_size, max_size),
        FixedController(max_size, 0.01, min_size),
        AIMDController(min_size, max_size, target_latency=0.05),
        GradientController(min_size, max_size, target_latency=0.05),
    ]


@given(st.integers(1, 64), st.integers(0, 1000), samples)
def test_the_target_always_stays_within_bounds(low: int, extra: int, feed: list) -> None:
    high = low + extra
    for controller in controllers(low, high):
        now = 0.0
        for size, service, wait, depth in feed:
            now += service
            controller.observe(BatchSample(size, service, wait, depth, now))
            assert low <= controller.target() <= high


def test_adaptive_shrinks_when_batches_get_slow_and_grows_back_under_load() -> None:
    c = GradientController(1, 512, target_latency=0.01)
    now = 0.0
    # Cost grows with size: 1 ms + 0.1 ms per item -> the target is met at ~90 items.
    for _ in range(200):
        size = c.target()
        service = 0.001 + 0.0001 * size
        now += service
        c.observe(BatchSample(size, service, 0.0, 10_000, now))
    settled = [c.target()]
    for _ in range(50):
        size = c.target()
        service = 0.001 + 0.0001 * size
        now += service
        c.observe(BatchSample(size, service, 0.0, 10_000, now))
        settled.append(c.target())
    # Converged: within a band around the size that meets the latency target.
    assert all(40 <= s <= 130 for s in settled), settled
    assert max(settled) - min(settled) <= 60


def test_aimd_grows_additively_while_full_and_halves_when_slow() -> None:
    c = AIMDController(1, 100, target_latency=0.05, increase=10)
    for i in range(5):
        c.observe(BatchSample(c.target(), 0.001, 0.0, 1000, float(i)))
    assert c.target() == 51
    c.observe(BatchSample(c.target(), 0.5, 0.0, 1000, 10.0))
    assert c.target() == 25


def test_natural_never_waits_and_fixed_lingers() -> None:
    assert NaturalController(1, 8).linger() == 0
    assert FixedController(8, 0.25).linger() == 0.25
    assert NaturalController(1, 8).target() == 8


@pytest.mark.parametrize(
    "make",
    [
        lambda: NaturalController(0, 5),
        lambda: NaturalController(5, 4),
        lambda: FixedController(8, -1.0),
        lambda: AIMDController(target_latency=0),
        lambda: GradientController(smoothing=0),
    ],
)
def test_impossible_settings_are_rejected(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="must"):
        make()
