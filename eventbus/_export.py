"""The metrics the exporters publish, read from one :class:`BusMetrics` snapshot.

One table serves :mod:`eventbus.prometheus` and :mod:`eventbus.otel`, so both export
the same numbers under matching names (``eventbus_events_handled_total`` in
Prometheus is ``eventbus.events.handled`` in OpenTelemetry). Reading it costs
nothing per event: every number is a counter or a histogram the bus keeps anyway,
taken when the exporter is scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import msgspec

from ._metrics import BusMetrics, Histogram, SubscriptionMetrics

Kind = Literal["counter", "gauge", "histogram"]
Value = float | Histogram
Samples = Iterator[tuple[tuple[str, ...], Value]]


class Family(msgspec.Struct, frozen=True):
    """One metric: its names, type, unit, help text, labels, and how to read it.

    Attributes:
        name: The Prometheus name, without ``_total`` for counters.
        otel_name: The OpenTelemetry instrument name.
        kind: ``"counter"`` (only goes up while the bus is open), ``"gauge"`` or
            ``"histogram"``.
        unit: The UCUM unit (``"s"``, ``"{event}"``, ``"1"``).
        help: What it measures.
        labels: Label names, in the order :attr:`read` yields their values.
        read: The samples of a snapshot: ``(label values, value)``.
    """

    name: str
    otel_name: str
    kind: Kind
    unit: str
    help: str
    labels: tuple[str, ...]
    read: Callable[[BusMetrics], Iterable[tuple[tuple[str, ...], Value]]]


def _per_sub(
    get: Callable[[SubscriptionMetrics], Value],
) -> Callable[[BusMetrics], Samples]:
    def read(m: BusMetrics) -> Samples:
        for name, sub in sorted(m.subscriptions.items()):
            yield (name,), get(sub)

    return read


def _one(get: Callable[[BusMetrics], Value]) -> Callable[[BusMetrics], Samples]:
    def read(m: BusMetrics) -> Samples:
        yield (), get(m)

    return read


def _breaker_state(m: BusMetrics) -> Samples:
    for name, sub in sorted(m.subscriptions.items()):
        for state in ("closed", "open", "half_open"):
            yield (name, state), 1.0 if sub.breaker_state == state else 0.0


def _published(m: BusMetrics) -> Samples:
    for topic, n in sorted(m.published.items()):
        yield (topic,), float(n)


def _dead_letters(m: BusMetrics) -> Samples:
    if m.reconcile is not None:
        for name, n in sorted(m.reconcile.dead_letters.items()):
            yield (name,), float(n)


def _commit_seconds(m: BusMetrics) -> Samples:
    if m.log is not None:
        yield (), m.log.commit_seconds


def _commit_sizes(m: BusMetrics) -> Samples:
    if m.log is not None:
        yield (), m.log.commit_sizes


def _workflow_active(m: BusMetrics) -> Samples:
    if m.workflows is not None:
        yield ("running",), float(m.workflows.running)
        yield ("queued",), float(m.workflows.queued)


def _workflow_runs(m: BusMetrics) -> Samples:
    w = m.workflows
    if w is not None:
        yield ("started",), float(w.started)
        yield ("completed",), float(w.completed)
        yield ("failed",), float(w.failed)
        yield ("cancelled",), float(w.cancelled)


def _workflow_steps(m: BusMetrics) -> Samples:
    w = m.workflows
    if w is not None:
        yield ("run",), float(w.steps_run)
        yield ("replayed",), float(w.steps_replayed)
        yield ("retried",), float(w.step_retries)
        yield ("failed",), float(w.steps_failed)


def _reconcile(get: Callable[[BusMetrics], float | None]) -> Callable[[BusMetrics], Samples]:
    def read(m: BusMetrics) -> Samples:
        value = get(m) if m.reconcile is not None else None
        if value is not None:
            yield (), float(value)

    return read


_SUB = ("subscription",)
_EVENT = "{event}"
_CALL = "{call}"

FAMILIES: tuple[Family, ...] = (
    # -- per subscription ------------------------------------------------------------
    Family(
        "eventbus_events_handled",
        "eventbus.events.handled",
        "counter",
        _EVENT,
        "Events a subscription handled (acknowledged as done) since the bus opened.",
        _SUB,
        _per_sub(lambda s: float(s.handled)),
    ),
    Family(
        "eventbus_handler_calls",
        "eventbus.handler.calls",
        "counter",
        _CALL,
        "Successful handler calls of the main lane since the bus opened.",
        _SUB,
        _per_sub(lambda s: float(s.batches)),
    ),
    Family(
        "eventbus_failed_attempts",
        "eventbus.handler.failed_attempts",
        "counter",
        _EVENT,
        "Event attempts that failed (each goes to the retry lane or the dead letters).",
        _SUB,
        _per_sub(lambda s: float(s.failed_attempts)),
    ),
    Family(
        "eventbus_dead_lettered",
        "eventbus.events.dead_lettered",
        "counter",
        _EVENT,
        "Events this process dead-lettered since the bus opened.",
        _SUB,
        _per_sub(lambda s: float(s.dead_lettered)),
    ),
    Family(
        "eventbus_lag_events",
        "eventbus.subscription.lag",
        "gauge",
        _EVENT,
        "Events between the log head and the subscription's finished position.",
        _SUB,
        _per_sub(lambda s: float(s.lag)),
    ),
    Family(
        "eventbus_lag_seconds",
        "eventbus.subscription.lag.age",
        "gauge",
        "s",
        "Age of the oldest event the subscription has read and not finished (0 when none).",
        _SUB,
        _per_sub(lambda s: s.lag_seconds),
    ),
    Family(
        "eventbus_buffered_events",
        "eventbus.subscription.buffered",
        "gauge",
        _EVENT,
        "Events read and waiting for a handler call.",
        _SUB,
        _per_sub(lambda s: float(s.buffered)),
    ),
    Family(
        "eventbus_in_flight_calls",
        "eventbus.handler.in_flight",
        "gauge",
        _CALL,
        "Handler calls running now (main lane and retries).",
        _SUB,
        _per_sub(lambda s: float(s.in_flight)),
    ),
    Family(
        "eventbus_retries_waiting",
        "eventbus.retries.waiting",
        "gauge",
        _EVENT,
        "Events in the retry lane with a due time.",
        _SUB,
        _per_sub(lambda s: float(s.retries_waiting)),
    ),
    Family(
        "eventbus_retries_parked",
        "eventbus.retries.parked",
        "gauge",
        _EVENT,
        "Events waiting in the retry lane behind an earlier event of their key.",
        _SUB,
        _per_sub(lambda s: float(s.parked)),
    ),
    Family(
        "eventbus_breaker_state",
        "eventbus.breaker.state",
        "gauge",
        "1",
        "1 for the state the subscription's circuit breaker is in (closed, open, "
        "half_open), 0 for the others.",
        ("subscription", "state"),
        _breaker_state,
    ),
    Family(
        "eventbus_breaker_trips",
        "eventbus.breaker.trips",
        "counter",
        "1",
        "Times the circuit breaker opened since the bus opened.",
        _SUB,
        _per_sub(lambda s: float(s.breaker_trips)),
    ),
    Family(
        "eventbus_batch_target",
        "eventbus.batch.target",
        "gauge",
        _EVENT,
        "The batch size the subscription's controller proposes next.",
        _SUB,
        _per_sub(lambda s: float(s.batch_target)),
    ),
    Family(
        "eventbus_handler_seconds",
        "eventbus.handler.duration",
        "histogram",
        "s",
        "How long handler calls of the main lane took.",
        _SUB,
        _per_sub(lambda s: s.handler_seconds),
    ),
    Family(
        "eventbus_end_to_end_seconds",
        "eventbus.event.end_to_end.duration",
        "histogram",
        "s",
        "From publish to the end of the handler call, for the oldest and newest event "
        "of each call.",
        _SUB,
        _per_sub(lambda s: s.end_to_end_seconds),
    ),
    Family(
        "eventbus_call_size_events",
        "eventbus.handler.call.size",
        "histogram",
        _EVENT,
        "Events handled per handler call (the batch size).",
        _SUB,
        _per_sub(lambda s: s.call_sizes),
    ),
    Family(
        "eventbus_dead_letters",
        "eventbus.dead_letters",
        "gauge",
        _EVENT,
        "Dead letters in the log per subscription, as the latest reconciliation pass counted them.",
        _SUB,
        _dead_letters,
    ),
    # -- per topic -------------------------------------------------------------------
    Family(
        "eventbus_events_published",
        "eventbus.events.published",
        "counter",
        _EVENT,
        "Events committed to the log per topic (publishes and outbox events; "
        "duplicates of an idempotency key not counted) since the exporter started.",
        ("topic",),
        _published,
    ),
    # -- the log writer --------------------------------------------------------------
    Family(
        "eventbus_log_head",
        "eventbus.log.head",
        "gauge",
        "1",
        "The sequence number of the last event committed to the log.",
        (),
        _one(lambda m: float(m.head)),
    ),
    Family(
        "eventbus_pending_publishes",
        "eventbus.publish.pending",
        "gauge",
        _EVENT,
        "Publishes waiting for the log writer.",
        (),
        _one(lambda m: float(m.pending_publishes)),
    ),
    Family(
        "eventbus_commits",
        "eventbus.log.commits",
        "counter",
        "{commit}",
        "Group commits (transactions) since the bus opened.",
        (),
        _one(lambda m: float(m.commits)),
    ),
    Family(
        "eventbus_committed_events",
        "eventbus.log.committed_events",
        "counter",
        _EVENT,
        "Events appended by the group commits since the bus opened.",
        (),
        _one(lambda m: float(m.committed_events)),
    ),
    Family(
        "eventbus_commit_seconds",
        "eventbus.log.commit.duration",
        "histogram",
        "s",
        "How long one group commit took.",
        (),
        _commit_seconds,
    ),
    Family(
        "eventbus_commit_size_events",
        "eventbus.log.commit.size",
        "histogram",
        _EVENT,
        "Events appended per group commit (of those that appended).",
        (),
        _commit_sizes,
    ),
    # -- workflows -------------------------------------------------------------------
    Family(
        "eventbus_workflow_runs_active",
        "eventbus.workflow.runs.active",
        "gauge",
        "{run}",
        "Workflow runs executing (running) or waiting for a slot (queued) in this process.",
        ("status",),
        _workflow_active,
    ),
    Family(
        "eventbus_workflow_runs",
        "eventbus.workflow.runs",
        "counter",
        "{run}",
        "Workflow runs started, completed, failed and cancelled in this process.",
        ("status",),
        _workflow_runs,
    ),
    Family(
        "eventbus_workflow_steps",
        "eventbus.workflow.steps",
        "counter",
        "{step}",
        "Workflow steps run, replayed from a checkpoint, retried and failed.",
        ("outcome",),
        _workflow_steps,
    ),
    # -- reconciliation --------------------------------------------------------------
    Family(
        "eventbus_reconcile_runs",
        "eventbus.reconcile.runs",
        "counter",
        "{run}",
        "Reconciliation passes since the bus opened.",
        (),
        _reconcile(lambda m: m.reconcile.runs if m.reconcile else None),
    ),
    Family(
        "eventbus_reconcile_last_run_timestamp_seconds",
        "eventbus.reconcile.last_run",
        "gauge",
        "s",
        "Unix time the latest reconciliation pass started.",
        (),
        _reconcile(lambda m: m.reconcile.last_run_at if m.reconcile else None),
    ),
    Family(
        "eventbus_reconcile_lost_events",
        "eventbus.reconcile.lost",
        "gauge",
        _EVENT,
        "Events the latest reconciliation pass found lost (0 on a sound log).",
        (),
        _reconcile(lambda m: m.reconcile.lost if m.reconcile else None),
    ),
    Family(
        "eventbus_reconcile_stuck_events",
        "eventbus.reconcile.stuck",
        "gauge",
        _EVENT,
        "Events the latest pass found held by handler calls running past the lease.",
        (),
        _reconcile(lambda m: m.reconcile.stuck if m.reconcile else None),
    ),
)
