"""OpenTelemetry for a bus: :func:`instrument` (needs the ``otel`` extra).

    import eventbus.otel

    async with Bus.open("app.db") as bus:
        eventbus.otel.instrument(bus)   # the global tracer and meter providers

Traces, built on the bus's hooks (:class:`eventbus.Hook`):

- ``publish <topic>`` (a PRODUCER span) for each event published, the child of
  whatever span is current where it is published. Its context goes into the
  event's headers as W3C ``traceparent`` (and ``tracestate``, ``baggage``: whatever
  the propagator writes), so it is stored in the log with the event.
- ``handle <subscription>`` (CONSUMER) for each handler call: the child of the
  event's publish span for a per-event handler; for a batch handler, the child of
  the current span, linked to each event's publish span. It is current while the
  handler runs, so an outbox ``ctx.publish`` is its child, and so on down a chain:
  one trace from the first publish to the last handler, also when a bus reopened
  on the same log handles events published before a restart.
- ``workflow <name>`` for each execution of a workflow run in this process (the
  child of the span that started it, when it starts in this process) and
  ``step <name>`` for each attempt of a step, its child. A run resumed after a
  restart starts a new trace.

Metrics, as observable instruments read at collection time from
:meth:`Bus.metrics` (nothing recorded per event): the same numbers as
:mod:`eventbus.prometheus`, named ``eventbus.*`` (``eventbus.events.handled``,
``eventbus.subscription.lag``, ...) with the attribute ``subscription`` or ``topic``.
OpenTelemetry has no observable histogram, so each histogram is three instruments:
``<name>.count``, ``<name>.sum`` and ``<name>.bucket`` (cumulative counts per
upper bound ``le``, as in Prometheus).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping

try:
    from opentelemetry import propagate, trace
    from opentelemetry.context import Context as OtelContext
    from opentelemetry.metrics import (
        CallbackOptions,
        Meter,
        MeterProvider,
        Observation,
        get_meter,
    )
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, TracerProvider
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "eventbus.otel needs opentelemetry-api: pip install 'eventbus[otel]'"
    ) from exc

from ._bus import Bus
from ._errors import BusClosed
from ._export import FAMILIES, Family
from ._hooks import HandlerCall, Hook, Publishing
from ._metrics import BusMetrics, Histogram
from .workflows import StepInfo, Workflow

__all__ = ["Instrumentation", "instrument"]

_SCOPE = "eventbus"
_SYSTEM = "eventbus"


class Instrumentation(Hook):
    """What :func:`instrument` registered on a bus: the tracing hook and the
    metric instruments. :meth:`uninstrument` takes them back."""

    def __init__(
        self,
        bus: Bus,
        *,
        tracer_provider: TracerProvider | None,
        meter_provider: MeterProvider | None,
        propagator: TextMapPropagator | None,
        traces: bool,
        metrics: bool,
    ) -> None:
        self.bus = bus
        self._tracer = trace.get_tracer(_SCOPE, tracer_provider=tracer_provider)
        self._propagator = propagator
        self._traces = traces
        self._metrics = metrics
        self._snapshots = _Snapshots(bus)
        self._active = True
        if metrics:
            bus.count_topics()
            meter = get_meter(_SCOPE, meter_provider=meter_provider)
            for family in FAMILIES:
                _register(meter, family, self._observe)
        if traces:
            bus.hooks.add(self)

    def uninstrument(self) -> None:
        """Stop tracing (the hook is removed) and stop reporting metrics (the
        instruments stay with the meter, observing nothing). Idempotent."""
        if not self._active:
            return
        self._active = False
        if self._traces:
            self.bus.hooks.remove(self)

    def _observe(self, instrument: str) -> BusMetrics | None:
        return self._snapshots.take(instrument) if self._active else None

    # -- propagation --------------------------------------------------------------

    def _inject(self, headers: dict[str, str], span: Span) -> None:
        propagator = self._propagator or propagate.get_global_textmap()
        propagator.inject(headers, context=trace.set_span_in_context(span))

    def _extract(self, headers: Mapping[str, str]) -> OtelContext | None:
        """The context an event's headers carry, or None if they carry none."""
        if not headers:
            return None
        propagator = self._propagator or propagate.get_global_textmap()
        found = propagator.extract(headers)
        if not trace.get_current_span(found).get_span_context().is_valid:
            return None
        return found

    # -- hooks ----------------------------------------------------------------------

    def before_publish(self, publishing: Publishing) -> None:
        """Start the ``publish <topic>`` span; put its context in the headers."""
        attributes: dict[str, str | int] = {
            "messaging.system": _SYSTEM,
            "messaging.operation.type": "send",
            "messaging.operation.name": publishing.kind,
            "messaging.destination.name": publishing.topic,
        }
        if publishing.key is not None:
            attributes["messaging.message.conversation_id"] = publishing.key
        span = self._tracer.start_span(
            f"publish {publishing.topic}", kind=SpanKind.PRODUCER, attributes=attributes
        )
        publishing.notes[self] = span
        self._inject(publishing.headers, span)

    def after_publish(self, publishing: Publishing) -> None:
        """End the publish span, with the receipt or the error."""
        span = publishing.notes.pop(self, None)
        if not isinstance(span, Span):
            return
        receipt = publishing.receipt
        if receipt is not None:
            span.set_attribute("messaging.message.id", receipt.id)
            span.set_attribute("eventbus.seq", receipt.seq)
            if receipt.duplicate:
                span.set_attribute("eventbus.duplicate", True)
        if publishing.error is not None:
            _failed(span, publishing.error)
        span.end()

    @contextlib.asynccontextmanager
    async def around_call(self, call: HandlerCall) -> AsyncIterator[None]:
        """The ``handle <subscription>`` span around one handler call."""
        parents = [self._extract(event.headers) for event in call.events]
        attributes: dict[str, str | int] = {
            "messaging.system": _SYSTEM,
            "messaging.operation.type": "process",
            "messaging.consumer.group.name": call.subscription,
            "eventbus.attempt": call.attempt,
        }
        links: list[Link] = []
        parent: OtelContext | None = None
        if call.batch:
            attributes["messaging.batch.message_count"] = len(call.events)
            for found in parents:
                if found is not None:
                    links.append(Link(trace.get_current_span(found).get_span_context()))
        else:
            (event,) = call.events
            parent = parents[0]
            attributes["messaging.destination.name"] = event.topic
            attributes["messaging.message.id"] = event.id
            attributes["eventbus.seq"] = event.seq
        span = self._tracer.start_span(
            f"handle {call.subscription}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
        )
        with trace.use_span(span, end_on_exit=True, record_exception=False):
            try:
                yield
            except BaseException as exc:
                _failed(span, exc)
                raise
            failed = call.failed
            if failed:
                span.set_attribute("eventbus.failed_events", len(failed))

    @contextlib.asynccontextmanager
    async def around_workflow(self, wf: Workflow) -> AsyncIterator[None]:
        """The ``workflow <name>`` span around one execution of a run."""
        with self._span(
            f"workflow {wf.name}",
            {"eventbus.workflow.name": wf.name, "eventbus.workflow.id": wf.id},
        ):
            yield

    @contextlib.asynccontextmanager
    async def around_step(self, step: StepInfo) -> AsyncIterator[None]:
        """The ``step <name>`` span around one attempt of a step."""
        with self._span(
            f"step {step.step}",
            {
                "eventbus.workflow.name": step.workflow,
                "eventbus.workflow.id": step.workflow_id,
                "eventbus.step.position": step.position,
                "eventbus.attempt": step.attempt,
            },
        ):
            yield

    @contextlib.contextmanager
    def _span(self, name: str, attributes: dict[str, str | int]) -> Iterator[None]:
        span = self._tracer.start_span(name, attributes=attributes)
        with trace.use_span(span, end_on_exit=True, record_exception=False):
            try:
                yield
            except BaseException as exc:
                _failed(span, exc)
                raise


def instrument(
    bus: Bus,
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    propagator: TextMapPropagator | None = None,
    traces: bool = True,
    metrics: bool = True,
) -> Instrumentation:
    """Trace ``bus``'s publishes, handler calls and workflows, and report its
    metrics, through OpenTelemetry (see the module docstring).

    Args:
        bus: An open bus.
        tracer_provider: Where spans go; the global tracer provider by default.
        meter_provider: Where metrics go; the global meter provider by default.
        propagator: How span contexts are written to and read from event headers;
            the global propagator by default (W3C ``traceparent`` and baggage,
            unless configured otherwise).
        traces: Register the tracing hook.
        metrics: Register the observable instruments (this also turns on the
            per-topic publish counts, :meth:`Bus.count_topics`).

    Returns:
        The instrumentation; ``uninstrument()`` stops it.

    Raises:
        HookError: The bus is instrumented already by this instrumentation.
    """
    return Instrumentation(
        bus,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        propagator=propagator,
        traces=traces,
        metrics=metrics,
    )


def _failed(span: Span, error: BaseException) -> None:
    if isinstance(error, Exception):
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    else:
        span.set_status(Status(StatusCode.ERROR, f"abandoned ({type(error).__name__})"))


class _Snapshots:
    """One :meth:`Bus.metrics` snapshot per collection: every instrument's callback
    of one collection reads the same snapshot; a callback that already read it
    means a new collection has begun (as does a snapshot older than a second)."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._lock = threading.Lock()
        self._snapshot: BusMetrics | None = None
        self._taken = 0.0
        self._served: set[str] = set()

    def take(self, name: str) -> BusMetrics | None:
        with self._lock:
            now = time.monotonic()
            if self._snapshot is None or name in self._served or now - self._taken > 1.0:
                try:
                    self._snapshot = self._bus.metrics_threadsafe()
                except (BusClosed, TimeoutError):
                    self._snapshot = None
                    return None
                self._taken = now
                self._served = set()
            self._served.add(name)
            return self._snapshot


# The snapshot for a collection, given the name of the instrument that reads it.
Observe = Callable[[str], BusMetrics | None]


def _register(meter: Meter, family: Family, observe: Observe) -> None:
    """The observable instrument(s) of one family on ``meter``."""
    if family.kind == "gauge":
        meter.create_observable_gauge(
            family.otel_name, [_plain(family, observe)], family.unit, family.help
        )
    elif family.kind == "counter":
        meter.create_observable_counter(
            family.otel_name, [_plain(family, observe)], family.unit, family.help
        )
    else:
        for part, unit in (("count", "1"), ("sum", family.unit), ("bucket", "1")):
            meter.create_observable_counter(
                f"{family.otel_name}.{part}",
                [_histogram(family, observe, part)],
                unit,
                f"{family.help} ({part})",
            )


def _plain(family: Family, observe: Observe) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        snapshot = observe(family.otel_name)
        if snapshot is None:
            return []
        return [
            Observation(value, dict(zip(family.labels, labels, strict=True)))
            for labels, value in family.read(snapshot)
            if not isinstance(value, Histogram)
        ]

    return callback


def _histogram(
    family: Family, observe: Observe, part: str
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        snapshot = observe(f"{family.otel_name}.{part}")
        out: list[Observation] = []
        if snapshot is None:
            return out
        for labels, value in family.read(snapshot):
            if not isinstance(value, Histogram):
                continue
            attributes: dict[str, str] = dict(zip(family.labels, labels, strict=True))
            if part == "count":
                out.append(Observation(value.count, attributes))
            elif part == "sum":
                out.append(Observation(value.sum, attributes))
            else:
                for bound, n in value.cumulative():
                    le = "+Inf" if bound == float("inf") else repr(bound)
                    out.append(Observation(n, {**attributes, "le": le}))
        return out

    return callback
