"""Batch-size controllers on a fake clock: bounds, convergence, reaction to latency.

Every test drives a controller with ``BatchSample``s whose latencies come from a cost
model (a fixed part per call plus a part per item), with the clock advanced by hand:
no event loop, no sleeping.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventbus.backpressure import (
    AIMDController,
    BatchController,
    BatchSample,
    CostModel,
    FixedController,
    GradientController,
    NaturalController,
)

Cost = Callable[[int], float]


class FakeConsumer:
    """Feeds a controller as the bus would: batches of ``min(target, ready)`` items,
    each taking ``cost(size)`` seconds on a clock that only moves when told."""

    def __init__(self, controller: BatchController, cost: Cost) -> None:
        self.controller = controller
        self.cost = cost
        self.now = 0.0
        self.sizes: list[int] = []

    def batch(self, ready: int, behind: int = 0) -> int:
        """Take one batch from ``ready`` items; ``behind`` more wait after them."""
        size = min(self.controller.target(), ready)
        latency = self.cost(size)
        self.now += latency
        self.controller.observe(BatchSample(size, latency, 0.0, ready - size + behind, self.now))
        self.sizes.append(size)
        return size

    def saturate(self, batches: int) -> list[int]:
        """A backlog that never runs dry."""
        for _ in range(batches):
            self.batch(10**9)
        return self.sizes[-batches:]


def linear(fixed: float, per_item: float) -> Cost:
    return lambda size: fixed + per_item * size


def ideal(fixed: float, per_item: float, target: float, low: int, high: int) -> float:
    """The size the adaptive controller should settle at for a linear cost."""
    allowed = max(target, 2 * fixed)
    return min(float(high), max(float(low), (allowed - fixed) / per_item))


def all_controllers(low: int, high: int) -> list[BatchController]:
    return [
        NaturalController(low, high),
        FixedController(high, 0.01, low),
        AIMDController(low, high, target_latency=0.05),
        GradientController(low, high, target_latency=0.05),
    ]


# -- every controller --------------------------------------------------------------

samples = st.lists(
    st.tuples(
        st.integers(-5, 5000),  # size (0 and below: nothing was taken)
        st.one_of(
            st.floats(0, 10, allow_nan=False),
            st.sampled_from([math.nan, math.inf, -1.0, 0.0, 1e-9]),
        ),  # service time, with the values a broken clock produces
        st.floats(0, 10, allow_nan=False),  # wait time
        st.integers(0, 100_000),  # queue depth
    ),
    max_size=200,
)


@given(st.integers(1, 64), st.integers(0, 1000), samples)
def test_the_target_always_stays_within_bounds(low: int, extra: int, feed: list) -> None:
    high = low + extra
    for controller in all_controllers(low, high):
        assert isinstance(controller, BatchController)
        now = 0.0
        for size, service, wait, depth in feed:
            now += 0.001
            controller.observe(BatchSample(size, service, wait, depth, now))
            assert low <= controller.target() <= high
            linger = controller.linger()
            assert linger >= 0
            assert math.isfinite(linger)


@pytest.mark.parametrize(
    "make",
    [
        lambda: NaturalController(0, 5),
        lambda: NaturalController(5, 4),
        lambda: FixedController(8, -1.0),
        lambda: FixedController(8, math.nan),
        lambda: AIMDController(target_latency=0),
        lambda: AIMDController(increase=0),
        lambda: AIMDController(decrease=1.0),
        lambda: GradientController(target_latency=math.inf),
        lambda: GradientController(smoothing=0),
        lambda: GradientController(tolerance=1.0),
        lambda: GradientController(1, 8, initial_size=9),
        lambda: CostModel(memory=1.5),
    ],
)
def test_impossible_settings_are_rejected(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match="must"):
        make()


# -- natural, fixed, AIMD ----------------------------------------------------------


def test_natural_takes_whatever_is_ready_and_never_waits() -> None:
    c = NaturalController(2, 8)
    assert (c.min_size, c.max_size, c.target(), c.linger()) == (2, 8, 8, 0.0)
    c.observe(BatchSample(8, 10.0, 0.0, 100, 1.0))
    assert c.target() == 8


def test_fixed_lingers_to_fill_its_size() -> None:
    c = FixedController(64, 0.25)
    assert (c.target(), c.linger()) == (64, 0.25)


def test_aimd_grows_additively_while_full_and_halves_when_slow() -> None:
    c = AIMDController(1, 100, target_latency=0.05, increase=10)
    for i in range(5):
        c.observe(BatchSample(c.target(), 0.001, 0.0, 1000, float(i)))
    assert c.target() == 51
    c.observe(BatchSample(c.target(), 0.5, 0.0, 1000, 10.0))
    assert c.target() == 25


def test_aimd_halves_when_batches_come_back_short_and_holds_when_in_between() -> None:
    c = AIMDController(1, 100, target_latency=0.05, increase=30)
    for i in range(3):
        c.observe(BatchSample(c.target(), 0.001, 0.0, 1000, float(i)))
    assert c.target() == 91
    c.observe(BatchSample(60, 0.001, 0.0, 0, 4.0))  # short, but over half the limit
    assert c.target() == 91
    c.observe(BatchSample(10, 0.001, 0.0, 0, 5.0))  # load fell
    assert c.target() == 45


# -- the cost model ----------------------------------------------------------------


def test_cost_model_recovers_a_linear_cost_from_varied_sizes() -> None:
    model = CostModel()
    assert (model.per_item, model.predict(10)) == (0.0, 0.0)
    for size in [1, 2, 4, 8, 16, 32, 64, 32, 16]:
        model.add(size, 0.002 + 0.0001 * size)
    assert model.identified
    assert model.fixed == pytest.approx(0.002, rel=1e-6)
    assert model.per_item == pytest.approx(0.0001, rel=1e-6)
    assert model.predict(100) == pytest.approx(0.012, rel=1e-6)


def test_cost_model_cannot_tell_the_fixed_part_from_one_size() -> None:
    model = CostModel()
    for _ in range(50):
        model.add(10, 0.02)
    assert not model.identified
    assert model.fixed == 0.0
    assert model.per_item == pytest.approx(0.002)  # all of it, conservatively


def test_cost_model_clips_an_outlier_before_learning_it() -> None:
    model = CostModel()
    for size in [1, 2, 4, 8, 16, 8, 4]:
        model.add(size, 0.001 + 0.001 * size)
    before = model.predict(8)
    model.add(8, 10.0)  # a 10 s pause: a GC, a descheduled thread
    assert model.predict(8) < 1.5 * before


def test_cost_model_never_takes_the_fixed_part_above_the_recent_latency() -> None:
    model = CostModel(smoothing=1.0)
    for size in [1, 2, 4, 8]:
        model.add(size, 0.01)  # latency independent of size: all fixed
    assert model.fixed == pytest.approx(0.009)  # capped below the mean latency
    assert model.per_item > 0


# -- the adaptive controller -------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    fixed=st.floats(0, 0.03),
    per_item=st.floats(1e-6, 2e-3),
    target=st.floats(0.005, 0.2),
    low=st.integers(1, 16),
    extra=st.integers(0, 2048),
)
def test_adaptive_converges_to_the_size_that_meets_its_target_under_steady_load(
    fixed: float, per_item: float, target: float, low: int, extra: int
) -> None:
    high = low + extra
    consumer = FakeConsumer(GradientController(low, high, target), linear(fixed, per_item))
    consumer.saturate(40)
    settled = consumer.saturate(100)
    assert all(low <= s <= high for s in consumer.sizes)
    # Converged: one size, no oscillation ...
    assert len(set(settled)) == 1, settled
    # ... within the dead band (and integer rounding) of the size that meets the target.
    want = ideal(fixed, per_item, target, low, high)
    assert abs(settled[0] - want) <= 0.1 * want + 1, (settled[0], want)


@pytest.mark.parametrize("seed", range(10))
def test_adaptive_holds_a_band_around_the_target_under_noisy_latency(seed: int) -> None:
    rng = random.Random(seed)
    cost = linear(0.0005, 0.0003)
    c = GradientController(1, 512, target_latency=0.05)
    consumer = FakeConsumer(c, lambda n: cost(n) * rng.uniform(0.7, 1.3))
    consumer.saturate(100)
    settled = consumer.saturate(300)
    want = ideal(0.0005, 0.0003, 0.05, 1, 512)  # 165
    assert min(settled) >= 0.6 * want
    assert max(settled) <= 1.4 * want
    changes = sum(a != b for a, b in itertools.pairwise(settled))
    assert changes < len(settled) / 4  # the dead band keeps it still most of the time


def test_adaptive_grows_to_max_size_when_size_costs_little() -> None:
    consumer = FakeConsumer(GradientController(1, 512, 0.05), linear(0.001, 0.000002))
    sizes = consumer.saturate(12)
    assert sizes[:3] == [1, 2, 4]  # slow start until the model is identified ...
    assert sizes[-1] == 512  # ... then straight to the size the model allows


def test_adaptive_never_waits_and_stays_small_under_light_load() -> None:
    c = GradientController(1, 512, 0.05)
    consumer = FakeConsumer(c, linear(0.001, 0.000002))
    for i in range(500):
        ready = 1 + (i % 7 == 0)  # mostly one event, now and then two
        consumer.batch(ready)
        assert c.linger() == 0.0
    assert max(consumer.sizes) <= 2
    assert c.target() <= 4  # grew only as far as batches came back full with a backlog


def test_adaptive_drops_back_to_small_batches_when_load_falls() -> None:
    c = GradientController(1, 512, 0.05)
    consumer = FakeConsumer(c, linear(0.001, 0.000002))
    consumer.saturate(30)
    assert c.target() == 512
    sizes = [consumer.batch(1) for _ in range(20)]
    assert sizes == [1] * 20  # a batch is what is ready: no waiting for the limit
    assert c.linger() == 0.0


def test_adaptive_lingers_only_with_a_full_batch_waiting_and_at_most_one_call() -> None:
    c = GradientController(1, 512, 0.05)
    consumer = FakeConsumer(c, linear(0.002, 0.000002))
    consumer.saturate(30)
    assert c.linger() == pytest.approx(0.002, rel=0.01)  # one call's fixed cost
    consumer.batch(10)
    assert c.linger() == 0.0
    slow = GradientController(1, 512, 0.05)
    FakeConsumer(slow, linear(0.04, 0.000002)).saturate(30)
    assert slow.linger() == pytest.approx(0.005)  # capped at a tenth of the target


def test_adaptive_shrinks_within_a_few_batches_when_items_get_slower() -> None:
    per_item = [0.0001]
    c = GradientController(1, 512, 0.02)
    consumer = FakeConsumer(c, lambda n: 0.001 + per_item[0] * n)
    consumer.saturate(30)
    assert c.target() == pytest.approx(190, abs=20)
    per_item[0] = 0.0004  # four times slower per item
    consumer.saturate(10)
    assert c.target() == pytest.approx(47.5, rel=0.15)
    per_item[0] = 0.0001
    consumer.saturate(20)  # and back
    assert c.target() == pytest.approx(190, abs=20)


def test_one_slow_batch_does_not_collapse_the_adaptive_limit() -> None:
    c = GradientController(1, 512, 0.05)
    consumer = FakeConsumer(c, linear(0.0005, 0.0003))
    consumer.saturate(30)
    before = c.target()
    c.observe(BatchSample(before, 2.0, 0.0, 1000, consumer.now + 2.0))  # a 2 s stall
    assert c.target() >= 0.75 * before
    consumer.saturate(10)
    assert c.target() == pytest.approx(before, rel=0.1)


def test_adaptive_aims_at_twice_the_call_cost_when_the_target_is_out_of_reach() -> None:
    # One call takes 60 ms and the target is 50 ms: rather than collapse to one item
    # per call, it lets the items take as long as the call.
    consumer = FakeConsumer(GradientController(1, 512, 0.05), linear(0.06, 0.001))
    settled = consumer.saturate(40)[-10:]
    assert settled == [60] * 10


def test_adaptive_is_deterministic() -> None:
    def run() -> list[int]:
        rng = random.Random(7)
        cost = linear(0.001, 0.0002)
        consumer = FakeConsumer(GradientController(1, 256, 0.02), lambda n: cost(n) * rng.random())
        for i in range(300):
            consumer.batch(1 + (i * 37) % 400, behind=i % 3)
        return consumer.sizes

    assert run() == run()


def test_adaptive_ignores_batches_that_measured_nothing() -> None:
    c = GradientController(1, 64, 0.05, initial_size=16)
    for sample in [
        BatchSample(0, 0.01, 0.0, 100, 1.0),
        BatchSample(16, math.nan, 0.0, 100, 1.0),
        BatchSample(16, -0.5, 0.0, 100, 1.0),
    ]:
        c.observe(sample)
    assert c.model.samples == 0
    assert c.target() == 16
    assert c.target_latency == 0.05
    assert c.ideal_size() == math.inf  # nothing learnt: no reason to stay small
