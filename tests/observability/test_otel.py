"""OpenTelemetry: spans from publish to handler and on through the outbox, one trace
across a restart; metrics through observable instruments."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import eventbus.otel
from eventbus import Bus, BusConfig, Context, Event, Message, RetryPolicy, Workflow

pytestmark = pytest.mark.anyio

QUICK = RetryPolicy(max_attempts=3, initial_delay=0.001, max_delay=0.002, budget_ratio=1.0)
CONFIG = BusConfig(breaker=None, retry=QUICK, reconcile_interval=0)


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(spans: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return provider


def by_name(exporter: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        out.setdefault(span.name, []).append(span)
    return out


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


async def test_publish_handle_outbox_publish_handle_is_one_trace(
    spans: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    headers: list[dict[str, str]] = []
    async with Bus.open(":memory:", config=CONFIG) as bus:
        eventbus.otel.instrument(bus, tracer_provider=tracer_provider, metrics=False)

        @bus.subscribe("orders")
        async def first(event: Event[int], ctx: Context) -> None:
            await ctx.publish("invoices", event.payload)

        @bus.subscribe("invoices")
        async def second(event: Event[int], ctx: Context) -> None:
            headers.append(event.headers)

        await bus.publish("orders", 1, key="o-1")
        await bus.drain(timeout=10, raise_failures=True)

    found = by_name(spans)
    (publish,) = found["publish orders"]
    (handle,) = found["handle first"]
    (outbox,) = found["publish invoices"]
    (handle2,) = found["handle second"]
    assert publish.parent is None  # published outside any span: the trace starts here
    assert parent_of(handle) == span_id(publish)
    assert parent_of(outbox) == span_id(handle)
    assert parent_of(handle2) == span_id(outbox)
    assert len({trace_id(s) for s in (publish, handle, outbox, handle2)}) == 1
    assert publish.kind == SpanKind.PRODUCER
    assert handle.kind == SpanKind.CONSUMER
    assert publish.attributes is not None
    assert publish.attributes["messaging.destination.name"] == "orders"
    assert publish.attributes["eventbus.seq"] == 1
    assert handle.attributes is not None
    assert handle.attributes["messaging.consumer.group.name"] == "first"
    assert handle.attributes["eventbus.attempt"] == 1
    # The W3C traceparent travels in the stored headers: version-trace-span-flags.
    (carried,) = headers
    version, trace_hex, span_hex, _ = carried["traceparent"].split("-")
    assert version == "00"
    assert int(trace_hex, 16) == trace_id(outbox)
    assert int(span_hex, 16) == span_id(outbox)


async def test_a_bus_reopened_on_the_same_log_continues_the_trace(
    tmp_path: Path, spans: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    path = tmp_path / "events.db"
    async with Bus.open(path, config=CONFIG) as bus:
        eventbus.otel.instrument(bus, tracer_provider=tracer_provider, metrics=False)

        @bus.subscribe("orders")
        async def first(event: Event[int], ctx: Context) -> None:
            await ctx.publish("invoices", event.payload)

        await bus.publish("orders", 1)
        await bus.drain(timeout=10, raise_failures=True)
    # "invoices" had no subscriber before the restart: its event waits in the log.
    before = {s.name for s in spans.get_finished_spans()}
    assert before == {"publish orders", "handle first", "publish invoices"}

    async with Bus.open(path, config=CONFIG) as bus:
        eventbus.otel.instrument(bus, tracer_provider=tracer_provider, metrics=False)

        @bus.subscribe("invoices")
        async def second(event: Event[int], ctx: Context) -> None:
            pass

        await bus.drain(timeout=10, raise_failures=True)

    found = by_name(spans)
    (publish,) = found["publish orders"]
    (outbox,) = found["publish invoices"]
    (handle2,) = found["handle second"]
    assert parent_of(handle2) == span_id(outbox)
    assert trace_id(handle2) == trace_id(publish)


async def test_a_batch_call_links_to_each_events_publish(
    spans: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    async with Bus.open(":memory:", config=CONFIG) as bus:
        eventbus.otel.instrument(bus, tracer_provider=tracer_provider, metrics=False)
        await bus.publish_many([Message("orders", i) for i in range(3)])

        @bus.subscribe("orders", start="earliest")
        async def audit(events: list[Event[int]], ctx: Context) -> None:
            pass

        await bus.drain(timeout=10, raise_failures=True)

    found = by_name(spans)
    publishes = {span_id(s) for s in found["publish orders"]}
    assert len(publishes) == 3
    linked = {link.context.span_id for call in found["handle audit"] for link in call.links}
    assert linked == publishes
    for call in found["handle audit"]:
        assert call.attributes is not None
        assert call.attributes["messaging.batch.message_count"] == len(call.links)


async def test_a_failed_call_marks_its_span_and_the_retry_is_another_child(
    spans: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    async with Bus.open(":memory:", config=CONFIG) as bus:
        eventbus.otel.instrument(bus, tracer_provider=tracer_provider, metrics=False)

        @bus.subscribe("orders")
        async def flaky(event: Event[int], ctx: Context) -> None:
            if event.attempt == 1:
                raise ConnectionError("try again")

        await bus.publish("orders", 1)
        await bus.drain(timeout=10, raise_failures=True)

    found = by_name(spans)
    (publish,) = found["publish orders"]
    failed, retried = sorted(
        found["handle flaky"], key=lambda s: (s.attributes or {})["eventbus.attempt"]
    )
    assert failed.status.status_code == StatusCode.ERROR
    assert [e.name for e in failed.events] == ["exception"]
    assert retried.status.status_code != StatusCode.ERROR
    assert parent_of(failed) == parent_of(retried) == span_id(publish)


async def test_workflow_steps_are_child_spans_of_the_run(
    spans: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    async with Bus.open(":memory:", config=CONFIG) as bus:
        eventbus.otel.instrument(bus, tracer_provider=tracer_provider, metrics=False)

        async def reserve(n: int) -> int:
            return n + 1

        @bus.workflow("fulfil")
        async def fulfil(wf: Workflow, n: int) -> int:
            r = await wf.step("reserve", reserve, n)
            return await wf.step("charge", reserve, r)

        @bus.subscribe("orders")
        async def start(event: Event[int], ctx: Context) -> None:
            await bus.start_workflow("fulfil", event.payload, workflow_id=event.id)

        await bus.publish("orders", 1)
        await bus.drain(timeout=10, workflows=True, raise_failures=True)

    found = by_name(spans)
    (handle,) = found["handle start"]
    (run,) = found["workflow fulfil"]
    (reserve_span,) = found["step reserve"]
    (charge_span,) = found["step charge"]
    assert parent_of(run) == span_id(handle)  # started from the handler
    assert parent_of(reserve_span) == span_id(run)
    assert parent_of(charge_span) == span_id(run)
    assert trace_id(charge_span) == trace_id(handle)


async def test_uninstrument_stops_the_spans(
    spans: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    async with Bus.open(":memory:", config=CONFIG) as bus:
        instrumentation = eventbus.otel.instrument(
            bus, tracer_provider=tracer_provider, metrics=False
        )
        await bus.publish("orders", 1)
        instrumentation.uninstrument()
        instrumentation.uninstrument()  # idempotent
        await bus.publish("orders", 2)
        assert len(bus.hooks) == 0
    assert [s.name for s in spans.get_finished_spans()] == ["publish orders"]


def points(reader: InMemoryMetricReader, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    data = reader.get_metrics_data()
    assert data is not None
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        key = tuple(sorted((point.attributes or {}).items()))
                        out[key] = point.value  # type: ignore[union-attr]
    return out


async def test_metrics_are_observed_at_collection_time() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        async with Bus.open(":memory:", config=CONFIG) as bus:
            eventbus.otel.instrument(bus, meter_provider=provider, traces=False)

            @bus.subscribe("orders")
            async def handle(event: Event[int], ctx: Context) -> None:
                if event.payload == 3:
                    raise ValueError("three")

            await bus.publish_many([Message("orders", i) for i in range(5)])
            await bus.drain(timeout=10)
            sub = (("subscription", "handle"),)
            assert points(reader, "eventbus.events.handled") == {sub: 4}
            assert points(reader, "eventbus.events.dead_lettered") == {sub: 1}
            assert points(reader, "eventbus.subscription.lag") == {sub: 0}
            assert points(reader, "eventbus.events.published") == {(("topic", "orders"),): 5}
            count = points(reader, "eventbus.handler.duration.count")[sub]
            assert count >= 1
            buckets = points(reader, "eventbus.handler.duration.bucket")
            assert buckets[(("le", "+Inf"), *sub)] == count

            # A later collection, here from another thread, sees what happened since.
            await bus.publish("orders", 10)
            await bus.drain(timeout=10)
            later = await anyio.to_thread.run_sync(points, reader, "eventbus.events.handled")
            assert later == {sub: 5}
    finally:
        provider.shutdown()


FIRST_PROCESS = """
import asyncio, json, sys
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
import eventbus.otel
from eventbus import Bus, Context, Event

async def main(path):
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    async with Bus.open(path) as bus:
        eventbus.otel.instrument(bus, tracer_provider=provider, metrics=False)

        @bus.subscribe("orders")
        async def first(event: Event[int], ctx: Context) -> None:
            await ctx.publish("invoices", event.payload)

        await bus.publish("orders", 1)
        await bus.drain(timeout=30, raise_failures=True)
    print(json.dumps([
        [s.name, s.context.trace_id, s.context.span_id, s.parent and s.parent.span_id]
        for s in spans.get_finished_spans()
    ]))

asyncio.run(main(sys.argv[1]))
"""


async def test_the_trace_goes_on_in_another_process_after_a_restart(
    tmp_path: Path, spans: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    """The first process publishes, handles and publishes through the outbox, then
    exits; this one, with a tracer of its own, handles the outbox event: its span is
    a child of the outbox publish span the other process made, in the same trace.
    Only the log carries the context between them."""
    path = tmp_path / "events.db"
    first = await anyio.run_process([sys.executable, "-c", FIRST_PROCESS, str(path)], check=False)
    assert first.returncode == 0, first.stderr.decode()
    before = {name: (trace, span, parent) for name, trace, span, parent in json.loads(first.stdout)}
    assert set(before) == {"publish orders", "handle first", "publish invoices"}
    assert before["handle first"][2] == before["publish orders"][1]
    assert before["publish invoices"][2] == before["handle first"][1]

    async with Bus.open(path, config=CONFIG) as bus:
        eventbus.otel.instrument(bus, tracer_provider=tracer_provider, metrics=False)

        @bus.subscribe("invoices")
        async def second(event: Event[int], ctx: Context) -> None:
            pass

        await bus.drain(timeout=10, raise_failures=True)

    (handle2,) = by_name(spans)["handle second"]
    trace, outbox_span, _ = before["publish invoices"]
    assert parent_of(handle2) == outbox_span
    assert trace_id(handle2) == trace == before["publish orders"][0]
