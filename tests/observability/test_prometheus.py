"""Prometheus: a registry scraped after events flow shows what the bus did."""

from __future__ import annotations

import asyncio
import threading

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest

import eventbus.prometheus
from eventbus import Bus, BusClosed, BusConfig, Context, Event, Message, RetryPolicy
from eventbus._metrics import Histogram, HistogramRecorder
from tests.conftest import wait_until

pytestmark = pytest.mark.anyio

QUICK = RetryPolicy(max_attempts=2, initial_delay=0.001, max_delay=0.002, budget_ratio=1.0)
CONFIG = BusConfig(breaker=None, retry=QUICK, reconcile_interval=0)


async def test_a_scrape_shows_lag_handled_counts_dead_letters_and_latency(log_path) -> None:
    registry = CollectorRegistry()
    release = anyio.Event()
    started = anyio.Event()

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    async with Bus.open(log_path, config=CONFIG) as bus:
        eventbus.prometheus.collector(bus, registry=registry)

        @bus.subscribe("orders", name="billing")
        async def bill(event: Event[int], ctx: Context) -> None:
            started.set()
            await release.wait()
            await ctx.publish("invoices", event.payload)

        @bus.subscribe("orders", name="fragile")
        async def fragile(event: Event[int], ctx: Context) -> None:
            if event.payload % 5 == 0:
                raise ValueError(f"cannot take {event.payload}")

        await bus.publish_many([Message("orders", i, key=f"k{i}") for i in range(20)])
        with anyio.fail_after(10):
            await started.wait()
        # billing holds its first call: the rest of the events wait behind it.
        await wait_until(bus, lambda: bus.metrics().subscriptions["fragile"].lag == 0)
        assert value("eventbus_lag_events", subscription="billing") == 20
        lag_seconds = value("eventbus_lag_seconds", subscription="billing")
        assert lag_seconds is not None
        assert lag_seconds > 0
        assert value("eventbus_in_flight_calls", subscription="billing") == 1

        release.set()
        await bus.drain(timeout=10)
        await bus.reconcile()  # counts the dead letters held in the log

        # A scrape from another thread (as prometheus_client's own HTTP server does)
        # reads the same numbers.
        text = (await anyio.to_thread.run_sync(generate_latest, registry)).decode()
        assert 'eventbus_events_handled_total{subscription="billing"} 20.0' in text

    assert value("eventbus_lag_events", subscription="billing") == 0
    assert value("eventbus_lag_seconds", subscription="billing") == 0
    assert value("eventbus_events_handled_total", subscription="billing") == 20
    assert value("eventbus_events_handled_total", subscription="fragile") == 16
    assert value("eventbus_dead_lettered_total", subscription="fragile") == 4
    assert value("eventbus_dead_letters", subscription="fragile") == 4
    assert value("eventbus_dead_letters", subscription="billing") == 0
    assert value("eventbus_failed_attempts_total", subscription="fragile") == 8
    assert value("eventbus_events_published_total", topic="orders") == 20
    assert value("eventbus_events_published_total", topic="invoices") == 20
    # Latency histograms, per subscription: every call counted once.
    calls = value("eventbus_handler_seconds_count", subscription="billing")
    assert calls is not None
    assert calls >= 1
    assert value("eventbus_handler_seconds_bucket", subscription="billing", le="+Inf") == calls
    assert (value("eventbus_handler_seconds_sum", subscription="billing") or 0) > 0
    # The held call made its events at least as old as the wait.
    e2e = value("eventbus_end_to_end_seconds_count", subscription="billing")
    assert e2e is not None
    assert e2e >= calls
    assert value("eventbus_call_size_events_sum", subscription="billing") == 20
    assert (value("eventbus_commit_seconds_count") or 0) >= 1
    assert value("eventbus_log_head") == 40


async def test_a_closed_bus_still_reports_its_last_counters_from_any_thread() -> None:
    registry = CollectorRegistry()
    async with Bus.open(":memory:", config=CONFIG) as bus:
        eventbus.prometheus.collector(bus, registry=registry)
        await bus.publish("orders", 1)
    snapshot = await anyio.to_thread.run_sync(bus.metrics_threadsafe)
    assert snapshot.head == 1
    assert registry.get_sample_value("eventbus_log_head") == 1


def test_metrics_threadsafe_refuses_once_the_loop_is_gone() -> None:
    async def run() -> Bus:
        async with Bus.open(":memory:", config=CONFIG) as bus:
            await bus.publish("orders", 1)
        return bus

    bus = asyncio.run(run())
    with pytest.raises(BusClosed):
        bus.metrics_threadsafe()
    registry = CollectorRegistry()
    collector = eventbus.prometheus.BusCollector(bus)
    registry.register(collector)
    assert registry.get_sample_value("eventbus_log_head") is None  # no numbers, no error


async def test_each_bus_needs_its_own_registry() -> None:
    registry = CollectorRegistry()
    async with Bus.open(":memory:") as one, Bus.open(":memory:") as two:
        eventbus.prometheus.collector(one, registry=registry)
        with pytest.raises(ValueError, match="Duplicated"):
            eventbus.prometheus.collector(two, registry=registry)


async def test_published_counts_leave_out_duplicates_of_an_idempotency_key() -> None:
    async with Bus.open(":memory:") as bus:
        await bus.publish("before", 1)  # not counted: counting starts when asked
        bus.count_topics()
        await bus.publish("orders", 1, idempotency_key="req-1")
        receipt = await bus.publish("orders", 1, idempotency_key="req-1")
        assert receipt.duplicate
        await bus.publish("invoices", 2)
        assert bus.metrics().published == {"orders": 1, "invoices": 1}


def test_histograms_count_each_observation_in_the_first_bucket_that_holds_it() -> None:
    recorder = HistogramRecorder((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        recorder.observe(v)
    snap = recorder.snapshot()
    assert snap == Histogram((0.1, 1.0), (2, 1, 1), 3.65, 4)
    assert snap.cumulative() == [(0.1, 2), (1.0, 3), (float("inf"), 4)]


async def test_metrics_threadsafe_gives_up_when_the_loop_does_not_answer() -> None:
    async with Bus.open(":memory:", config=CONFIG) as bus:
        outcome: list[BaseException] = []

        def scrape() -> None:
            try:
                bus.metrics_threadsafe(timeout=0.05)
            except TimeoutError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=scrape)
        thread.start()
        thread.join()  # blocks the loop on purpose: it cannot take the snapshot
        assert len(outcome) == 1
        assert "did not take a metrics snapshot" in str(outcome[0])
