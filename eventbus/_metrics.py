"""In-process counters and latency samples, and their frozen snapshots."""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Iterable

import msgspec

_SAMPLES = 2048  # latest samples kept per series: recent behaviour, bounded memory

#: Upper bounds (seconds) of the latency histograms' buckets: sub-millisecond
#: handlers to minutes of backlog.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
#: Upper bounds of the size histograms' buckets (events per call or commit).
SIZE_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(14))  # 1 .. 8192


class Histogram(msgspec.Struct, frozen=True):
    """A cumulative histogram since the bus opened, as Prometheus and OpenTelemetry
    export one.

    Attributes:
        bounds: The buckets' upper bounds, increasing.
        counts: Observations per bucket: ``counts[i]`` fell in
            ``(bounds[i-1], bounds[i]]``; the last, one longer than ``bounds``,
            counts those above the last bound.
        sum: The sum of every observation.
        count: How many observations.
    """

    bounds: tuple[float, ...] = ()
    counts: tuple[int, ...] = (0,)
    sum: float = 0.0
    count: int = 0

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` per bucket, ending with
        ``(inf, count)``: Prometheus's ``le`` buckets."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class HistogramRecorder:
    """Counts observations into fixed buckets (O(log buckets) per observation)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> Histogram:
        """The counts so far, as a frozen :class:`Histogram`."""
        counts = tuple(self.counts)
        return Histogram(self.bounds, counts, self.sum, sum(counts))


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


class SubscriptionRecorder:
    """Counts and samples one subscription's batches (cheap: O(1) per batch)."""

    def __init__(self) -> None:
        self.handled = 0
        self.batches = 0
        self.failed_attempts = 0
        self.dead_lettered = 0
        self.batch_sizes: deque[int] = deque(maxlen=_SAMPLES)
        self.handler_latency: deque[float] = deque(maxlen=_SAMPLES)
        self.end_to_end: deque[float] = deque(maxlen=_SAMPLES)
        self._window: deque[tuple[float, int]] = deque(maxlen=_SAMPLES)
        # Since open, for exporters: per call, never per event.
        self.handler_seconds = HistogramRecorder(LATENCY_BUCKETS)
        self.end_to_end_seconds = HistogramRecorder(LATENCY_BUCKETS)
        self.call_sizes = HistogramRecorder(SIZE_BUCKETS)

    def batch(
        self,
        size: int,
        handler_seconds: float,
        oldest_created: float,
        newest_created: float,
        wall: float,
        now: float,
    ) -> None:
        """Record a handled call: its size, handler time, and the publish times of its
        oldest and newest events (end-to-end latency is measured to ``wall``, unix
        time; ``now`` is the monotonic time)."""
        self.handled += size
        self.batches += 1
        self.batch_sizes.append(size)
        self.handler_latency.append(handler_seconds)
        self.handler_seconds.observe(handler_seconds)
        self.call_sizes.observe(size)
        oldest = wall - oldest_created
        self.end_to_end.append(oldest)
        self.end_to_end_seconds.observe(oldest)
        if newest_created != oldest_created:
            self.end_to_end.append(wall - newest_created)
            self.end_to_end_seconds.observe(wall - newest_created)
        self._window.append((now, size))

    def throughput(self, now: float) -> float:
        """Events per second over the recent calls (0 when idle for 5 s)."""
        if not self._window:
            return 0.0
        recent = [(t, n) for t, n in self._window if now - t <= 5.0]
        if len(recent) < 2:
            return 0.0
        span = max(now - recent[0][0], 1e-6)
        return sum(n for _, n in recent[1:]) / span


class CommitRecorder:
    """Counts and samples the log writer's commits: a tuple per commit, folded into
    the counters, samples and histograms in bulk (a commit made at once, for one
    publish, must cost next to nothing to record)."""

    _FOLD = 256  # commits recorded before they are folded

    def __init__(self) -> None:
        self._commits = 0
        self._committed_events = 0
        self._unfolded: list[tuple[int, int, float]] = []
        self.sizes: deque[int] = deque(maxlen=_SAMPLES)
        self.acks: deque[int] = deque(maxlen=_SAMPLES)
        self.latency: deque[float] = deque(maxlen=_SAMPLES)
        self.seconds = HistogramRecorder(LATENCY_BUCKETS)
        self.appended = HistogramRecorder(SIZE_BUCKETS)

    @property
    def commits(self) -> int:
        """Transactions committed so far."""
        return self._commits + len(self._unfolded)

    @property
    def committed_events(self) -> int:
        """Events appended by them."""
        return self._committed_events + sum(appended for appended, _, _ in self._unfolded)

    def commit(self, appended: int, acks: int, seconds: float) -> None:
        """Record a committed transaction: events appended (publishes and outbox
        events), acknowledgements merged into it, and how long the commit took."""
        unfolded = self._unfolded
        unfolded.append((appended, acks, seconds))
        if len(unfolded) >= self._FOLD:
            self.fold()

    def fold(self) -> None:
        """Bring the counters, samples and histograms up to date."""
        unfolded, self._unfolded = self._unfolded, []
        if not unfolded:
            return
        self._commits += len(unfolded)
        sizes, size_counts, size_bounds = self.sizes, self.appended.counts, self.appended.bounds
        seconds_counts, seconds_bounds = self.seconds.counts, self.seconds.bounds
        events = 0
        total_seconds = 0.0
        for appended, _, seconds in unfolded:
            if appended:  # acknowledgement-only commits say nothing about group commit
                events += appended
                sizes.append(appended)
                size_counts[bisect_left(size_bounds, appended)] += 1
            seconds_counts[bisect_left(seconds_bounds, seconds)] += 1
            total_seconds += seconds
        self._committed_events += events
        self.appended.sum += events
        self.seconds.sum += total_seconds
        self.acks.extend([acks for _, acks, _ in unfolded])
        self.latency.extend([seconds for _, _, seconds in unfolded])

    def snapshot(self, target: int) -> LogMetrics:
        """The recorded commits as :class:`LogMetrics`; ``target`` is the size the
        commit-size controller proposes next."""
        self.fold()
        return LogMetrics(
            commits=self.commits,
            committed_events=self.committed_events,
            commit_target=target,
            commit_size_p50=median(self.sizes),
            commit_size_max=max(self.sizes, default=0),
            acks_per_commit_p50=median(self.acks),
            commit_latency=summarize(self.latency),
            commit_seconds=self.seconds.snapshot(),
            commit_sizes=self.appended.snapshot(),
        )


def median(samples: Iterable[int]) -> float:
    """The median of ``samples`` (0.0 when there are none)."""
    values = sorted(samples)
    if not values:
        return 0.0
    middle = len(values) // 2
    return float(values[middle]) if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


class LatencySummary(msgspec.Struct, frozen=True):
    """Percentiles of recent samples, in seconds."""

    p50: float
    p99: float
    max: float


def summarize(samples: deque[float]) -> LatencySummary:
    values = sorted(samples)
    return LatencySummary(
        _percentile(values, 0.5), _percentile(values, 0.99), values[-1] if values else 0.0
    )


class SubscriptionMetrics(msgspec.Struct, frozen=True):
    """One subscription's counters and recent latencies.

    ``lag`` is the distance in sequence numbers from the log head to the last
    finished position (0 when caught up); ``lag_seconds`` the age of the oldest event
    read and not finished yet (0 when none is: caught up, or only events in the
    retry lane left). Latencies cover the latest calls.

    ``handler_seconds``, ``end_to_end_seconds`` and ``call_sizes`` are histograms
    since the bus opened, recorded per call (not per event): how long each handler
    call took, how old its oldest and newest events were when it ended (measured
    from their publish), and how many events it handled.

    What is not finished, and why: ``buffered`` events read and waiting for a
    worker, ``in_flight`` handler calls, ``retries_waiting`` events in the retry lane
    with a due time (``retries_due`` of them due now, held by the retry budget, the
    circuit breaker or a suspect running alone), and ``parked`` events waiting in
    the retry lane behind an earlier event of their key. ``breaker_state`` is the
    circuit breaker's (``"closed"``, ``"open"``, ``"half_open"``; ``"closed"`` when
    the subscription has none) and ``breaker_trips`` how often it opened.
    """

    handled: int
    batches: int
    failed_attempts: int
    dead_lettered: int
    acked: int
    lag: int
    buffered: int
    live: bool
    batch_target: int
    throughput: float
    batch_size_p50: float
    batch_size_max: int
    handler_latency: LatencySummary
    end_to_end_latency: LatencySummary
    in_flight: int = 0
    retries_waiting: int = 0
    retries_due: int = 0
    parked: int = 0
    concurrency: int = 1
    breaker_state: str = "closed"
    breaker_trips: int = 0
    lag_seconds: float = 0.0
    handler_seconds: Histogram = msgspec.field(default_factory=Histogram)
    end_to_end_seconds: Histogram = msgspec.field(default_factory=Histogram)
    call_sizes: Histogram = msgspec.field(default_factory=Histogram)


class LogMetrics(msgspec.Struct, frozen=True):
    """The log writer's group commits: one transaction per cycle, holding every
    waiting publish (up to ``commit_target`` events) and every waiting
    acknowledgement. Sizes and latencies cover the latest commits. On an in-memory
    log, where each publish is appended at once, the publishes handed on together
    (once the event loop turns, or when the head or the metrics are read) count as
    one commit, taking no time.

    Attributes:
        commits: Transactions committed.
        committed_events: Events appended by them (publishes and outbox events).
        commit_target: Events the commit-size controller lets into the next commit.
        commit_size_p50: Median events appended per commit (of those that appended).
        commit_size_max: Most events appended by one commit.
        acks_per_commit_p50: Median acknowledgements merged into one commit.
        commit_latency: Seconds one commit took (the storage transaction, as the
            writer awaited it), over every commit.
        commit_seconds: The same, as a histogram since the bus opened.
        commit_sizes: Events appended per commit (of those that appended), as a
            histogram since the bus opened.
    """

    commits: int
    committed_events: int
    commit_target: int
    commit_size_p50: float
    commit_size_max: int
    acks_per_commit_p50: float
    commit_latency: LatencySummary
    commit_seconds: Histogram = msgspec.field(default_factory=Histogram)
    commit_sizes: Histogram = msgspec.field(default_factory=Histogram)


class ReconcileMetrics(msgspec.Struct, frozen=True):
    """The latest reconciliation pass (periodic or ``bus.reconcile()``).

    Attributes:
        runs: Passes since the bus opened.
        last_run_at: Unix time the latest pass started; None before the first.
        last_duration: Seconds it took.
        lost: Events it found lost (0 on a sound log).
        stuck: Events it found held by handler calls running past the lease.
        overdue: Retries it found due long ago that nothing would run.
        repaired: What it repaired (lost re-dispatched, stuck cancelled, overdue
            re-armed, workflow runs resumed).
        repaired_total: What all passes repaired.
        flags: Inconsistencies the user reconcilers flagged in their latest runs.
        reconciler_errors: User reconcilers whose latest run failed.
        dead_letters: Dead letters in the log per subscription, as the latest pass
            counted them (every subscription in the log, also those of other
            processes on a shared PostgreSQL log).
    """

    runs: int = 0
    last_run_at: float | None = None
    last_duration: float = 0.0
    lost: int = 0
    stuck: int = 0
    overdue: int = 0
    repaired: int = 0
    repaired_total: int = 0
    flags: int = 0
    reconciler_errors: int = 0
    dead_letters: dict[str, int] = msgspec.field(default_factory=dict)


class WorkflowMetrics(msgspec.Struct, frozen=True):
    """Workflow runs in this process since the bus opened.

    ``running`` runs execute now (``queued`` more wait for a slot, see
    ``BusConfig.workflow_concurrency``); the rest count runs and steps that ended
    here. ``step_retries`` counts failed step attempts that were tried again.
    """

    running: int
    queued: int
    started: int
    completed: int
    failed: int
    cancelled: int
    steps_run: int
    steps_replayed: int
    step_retries: int
    steps_failed: int


class BusMetrics(msgspec.Struct, frozen=True):
    """The bus's counters at one moment.

    ``log`` describes the group commits (None from a bus that does not report it);
    ``reconcile`` the latest reconciliation pass; ``workflows`` the workflow runs;
    ``published`` the events committed per topic since ``bus.count_topics()`` was
    first called (empty until then).
    """

    head: int
    pending_publishes: int
    commits: int
    committed_events: int
    subscriptions: dict[str, SubscriptionMetrics]
    log: LogMetrics | None = None
    reconcile: ReconcileMetrics | None = None
    workflows: WorkflowMetrics | None = None
    published: dict[str, int] = msgspec.field(default_factory=dict)
