"""The adaptive batch-size controller: the largest batch that meets a latency target.

A consumer whose cost per call is ``fixed + per_item * size`` (a database write, an
HTTP call with a body, a bulk insert) gains throughput from bigger batches only while
the fixed part is a noticeable share of the call; past that point a bigger batch
only makes every item in it wait longer. :class:`CostModel` learns the two parts from
the batches as they happen; :class:`GradientController` sizes batches so that one
takes ``target_latency``, and never waits for a batch to fill, so under light load a
batch is whatever is ready (usually one item).
"""

from __future__ import annotations

import math

from ._controllers import BatchSample, NaturalController, check_latency

# A sample more than this many times slower than the model predicts is set aside, and
# learnt only if the next one is too: one GC pause or descheduled thread must not
# halve the batch size, but a lasting slowdown counts from its second batch on.
_OUTLIER = 2.0
# The fixed part is accepted from the fit only while its standard error is below this
# share of the mean latency: with near-constant sizes, or while the costs are changing
# (the samples then disagree with any one line), intercept and slope cannot be told
# apart and the last accepted fixed part is kept.
_CONFIDENCE = 0.1
# Latencies this far (relative) from the model, twice in a row, restart the fit.
_CHANGED = 0.25
# A batch more than _SLOWER times slower than predicted weighs _ATTACK in the means.
_SLOWER = 1.1
_ATTACK = 0.5
# The fixed part is never taken as more than this share of the recent mean latency,
# so the per-item part the controller divides by stays positive.
_FIXED_SHARE = 0.9


class CostModel:
    """A batch's service time as ``fixed + per_item * size``, learned online.

    The per-item part follows the recent batches: it is ``(mean_latency - fixed) /
    mean_size`` over exponentially weighted averages (weight ``smoothing`` for a new
    batch). The fixed part, the call's overhead, comes from an exponentially weighted
    least-squares fit of latency on size (weight ``memory`` for a new batch) and is
    only updated when the fit is trustworthy: sizes varied enough (they do while the
    controller ramps up, and under light load) and the samples lie near a line.
    Until then it is 0, which overstates the per-item part: the safe side, as it
    keeps batches smaller than they could be. A batch more than twice as slow as
    predicted is set aside unless the next one is too; batches slower than predicted
    weigh more in the averages (fast attack); two batches in a row far off the model
    restart the fit, as points from before and after a change of costs fit no line.

    The fixed part sets how fast the controller converges, not where: as both means
    cover the same batches, an error in it moves the per-item part the other way and
    the predicted latency at the recent mean size stays right.

    Args:
        smoothing: Weight of a new sample in the averages, in (0, 1].
        memory: Weight of a new sample in the fit, in (0, 1].
    """

    def __init__(self, smoothing: float = 0.2, memory: float = 0.1) -> None:
        for name, value in (("smoothing", smoothing), ("memory", memory)):
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        self._alpha = smoothing
        self._keep = 1.0 - memory
        self.samples = 0
        self.identified = False  # whether a fixed part was ever accepted
        self.mean_size = 0.0
        self.mean_latency = 0.0
        self._fixed = 0.0
        self._held: tuple[int, float, bool] | None = None  # a possible outlier
        self._off = 0  # batches in a row far from the model
        # The fit: total weight, weighted means, and weighted co-moments
        # sum(w * (x - mean_x) * (y - mean_y)), updated as in Welford's algorithm.
        self._w = 0.0
        self._mn = self._ms = 0.0
        self._cnn = self._css = self._cns = 0.0

    @property
    def fixed(self) -> float:
        """Seconds a call costs whatever its size (0 until the fit is trustworthy)."""
        return min(self._fixed, _FIXED_SHARE * self.mean_latency)

    @property
    def per_item(self) -> float:
        """Seconds each item adds to a call."""
        if self.samples == 0:
            return 0.0
        return (self.mean_latency - self.fixed) / self.mean_size

    def predict(self, size: float) -> float:
        """The expected service time of a batch of ``size`` items."""
        return self.fixed + self.per_item * size

    def add(self, size: int, latency: float, *, fit: bool = True) -> None:
        """Learn from one batch of ``size >= 1`` items that took ``latency >= 0`` s.

        Pass ``fit=False`` when a feedback loop chose ``size`` from the latencies
        themselves: a controller that holds latency at its target while the costs
        drift produces sizes that change at constant latency, which a fit would read
        as "size costs nothing". Such batches still update the averages.
        """
        if self.samples and latency > _OUTLIER * self.predict(size) > 0:
            if self._held is None:
                # Perhaps an outlier (a GC pause, a descheduled thread): set it aside
                # until the next batch tells whether the costs changed.
                self._held = (size, latency, fit)
                return
            held, self._held = self._held, None
            self._learn(*held)  # two in a row: the costs changed, both count
        else:
            self._held = None
        self._learn(size, latency, fit)

    def _learn(self, size: int, latency: float, fit: bool) -> None:
        if self.samples:
            predicted = self.predict(size)
            # Two batches in a row far from the model: the costs changed. Points from
            # before and after a change would lie on no line the fit could trust (two
            # clusters always fit one exactly), so the fit starts over.
            off = abs(latency - predicted) > _CHANGED * predicted
            self._off = self._off + 1 if off else 0
            if self._off >= 2 and self.identified:
                self._w = self._mn = self._ms = 0.0
                self._cnn = self._css = self._cns = 0.0
            # Fast attack: a batch slower than predicted weighs more, so a lasting
            # slowdown shrinks batches within a few of them; the same weight for both
            # means keeps them describing the same batches.
            alpha = max(self._alpha, _ATTACK) if latency > predicted * _SLOWER else self._alpha
            self.mean_size += alpha * (size - self.mean_size)
            self.mean_latency += alpha * (latency - self.mean_latency)
        else:
            self.mean_size = float(size)
            self.mean_latency = latency
        self.samples += 1
        if fit:
            self._fit(float(size), latency)

    def _fit(self, n: float, s: float) -> None:
        k = self._keep
        self._w = k * self._w + 1.0
        dn = n - self._mn
        ds = s - self._ms
        self._mn += dn / self._w
        self._ms += ds / self._w
        self._cnn = k * self._cnn + dn * (n - self._mn)
        self._css = k * self._css + ds * (s - self._ms)
        self._cns = k * self._cns + dn * (s - self._ms)
        if self._w <= 2.5 or self._cnn <= 0:
            return
        slope = max(0.0, self._cns / self._cnn)
        residual = max(0.0, self._css - 2 * slope * self._cns + slope * slope * self._cnn)
        spread = residual / (self._w - 2) * (1 / self._w + self._mn * self._mn / self._cnn)
        if spread <= (_CONFIDENCE * self._ms) ** 2:
            self._fixed = max(0.0, self._ms - slope * self._mn)
            self.identified = True


class GradientController(NaturalController):
    """The adaptive default: the largest batch whose service time meets ``target_latency``.

    In the spirit of TCP Vegas and Netflix's gradient concurrency limit, it compares
    what a batch costs with what it is allowed to cost, and moves a limit on the batch
    size. Rather than probe blindly, it learns the latency gradient, how service
    time grows with size (:class:`CostModel`: a fixed part per call plus a part per
    item), and aims the limit at the size predicted to take ``target_latency``:

    * A batch is ``min(limit, ready)``: under light load batches are as small as what
      is ready, and latency stays low whatever the limit.
    * It grows only while batches come back full with a backlog behind them (the
      limit, not the arrivals, set their size). Until sizes have varied enough to
      tell the fixed part from the per-item part it doubles per batch (slow start
      from ``initial_size``, ``min_size`` by default); then it moves to the size the
      model predicts.
    * It shrinks as soon as the prediction falls below the limit, at most halving per
      batch; an isolated outlier is set aside rather than learnt, so one slow batch
      (a GC pause) cannot collapse it.
    * A dead band of ``tolerance`` around the limit is the hysteresis that keeps it
      still under steady load. The model's fit learns only from batches whose size
      the arrivals chose (or the slow start's fixed doubling), not from full batches
      sized by the controller itself: holding latency at the target while costs
      drift, those would make "size costs nothing" look true.
    * When one call alone costs more than half of ``target_latency``, meeting the
      target would leave batches too small to pay for their calls. It then aims at
      twice the fixed cost instead (half the best throughput, at twice the smallest
      latency possible) rather than collapse to ``min_size``.
    * While a full batch or more is waiting it lingers up to one call's fixed cost
      (at most a tenth of the target) so the batch is topped up with what was
      committed meanwhile; otherwise it never waits.

    Args:
        min_size: Smallest limit.
        max_size: Largest limit, and the largest batch taken.
        target_latency: Seconds a batch's service time should take at most.
        smoothing: Weight of each new batch in the cost model's averages, in (0, 1].
        tolerance: Relative dead band around the limit, in [0, 1).
        initial_size: The limit before any batch was observed (``min_size``).
    """

    def __init__(
        self,
        min_size: int = 1,
        max_size: int = 512,
        target_latency: float = 0.05,
        smoothing: float = 0.2,
        tolerance: float = 0.1,
        initial_size: int | None = None,
    ) -> None:
        super().__init__(min_size, max_size)
        check_latency(target_latency)
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        if not 0 <= tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
        initial = min_size if initial_size is None else initial_size
        if not min_size <= initial <= max_size:
            raise ValueError(
                f"initial_size must be within [{min_size}, {max_size}], got {initial_size}"
            )
        self._target_latency = target_latency
        self._tolerance = tolerance
        self.model = CostModel(smoothing, memory=smoothing / 2)
        self._limit = float(initial)
        self._target = max(self._min, min(self._max, initial))  # target(), cached
        self._backlog = False

    @property
    def target_latency(self) -> float:
        return self._target_latency

    def target(self) -> int:
        return self._target

    def linger(self) -> float:
        if not self._backlog:
            return 0.0
        return min(self.model.fixed, 0.1 * self._target_latency)

    def ideal_size(self) -> float:
        """The size the cost model predicts to take ``target_latency`` (unbounded:
        ``inf`` when size costs nothing)."""
        fixed = self.model.fixed
        per_item = self.model.per_item
        if per_item <= 0:
            return math.inf
        allowed = max(self._target_latency, 2 * fixed)
        return (allowed - fixed) / per_item

    def observe(self, sample: BatchSample) -> None:
        size = sample.size
        latency = sample.service_time
        if size <= 0 or not (latency >= 0 and math.isfinite(latency)):
            return
        # Full: the limit, not the arrivals, decided this batch's size. Once the model
        # is identified the limit follows the latencies, so full batches would bias
        # its fit (closed-loop data); smaller ones, sized by the arrivals, and the
        # fixed doubling of the slow start, do not.
        full = size >= self._target
        wanted = full and sample.queue_depth > 0
        self.model.add(size, latency, fit=not (full and self.model.identified))
        ideal = self.ideal_size()
        limit = self._limit
        low, high = limit * (1 - self._tolerance), limit * (1 + self._tolerance)
        if ideal < low and limit > self._min:
            limit = max(ideal, limit / 2)
        elif wanted and not self.model.identified:
            # Slow start, and a probe when stuck at min_size: batches of other sizes
            # are what tells the fixed part from the per-item part.
            if ideal > high or limit <= self._min:
                limit = 2 * limit
        elif wanted and ideal > high:
            limit = ideal
        self._limit = min(float(self._max), max(float(self._min), limit))
        self._target = max(self._min, min(self._max, int(self._limit)))
        self._backlog = sample.queue_depth >= self._target
