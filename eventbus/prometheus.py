"""Prometheus metrics for a bus: :func:`collector` (needs the ``prometheus`` extra).

    from prometheus_client import REGISTRY
    import eventbus.prometheus

    async with Bus.open("app.db") as bus:
        REGISTRY.register(eventbus.prometheus.collector(bus))

The collector is read at scrape time: it takes one :meth:`Bus.metrics` snapshot (no
I/O, nothing recorded per event) and turns it into ``eventbus_*`` metrics labelled
``subscription`` or ``topic``: events published and handled, lag in events and in
seconds, calls in flight, retries waiting, dead letters (dead-lettered by this
process, and held in the log as the latest reconciliation pass counted them),
histograms of handler, end-to-end and commit latency and of batch and commit sizes,
workflow runs by status. The full list, with help texts, is in the module
``eventbus._export`` (``FAMILIES``); the README's "Observability" section shows it.

A scrape from another thread (``prometheus_client.start_http_server``, a WSGI app)
takes the snapshot on the bus's event loop, between two of its steps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

try:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import CollectorRegistry
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "eventbus.prometheus needs prometheus_client: pip install 'eventbus[prometheus]'"
    ) from exc

from ._bus import Bus
from ._errors import BusClosed
from ._export import FAMILIES, Family
from ._metrics import BusMetrics, Histogram

__all__ = ["BusCollector", "collector"]

logger = logging.getLogger("eventbus.bus")


class BusCollector:
    """A ``prometheus_client`` collector of one bus's metrics (see the module
    docstring). Register it on a registry; it reads the bus only when scraped.

    Args:
        bus: The bus to export.
        timeout: Seconds a scrape from another thread waits for the bus's event
            loop to take the snapshot.
    """

    def __init__(self, bus: Bus, *, timeout: float = 5.0) -> None:
        self.bus = bus
        self.timeout = timeout
        bus.count_topics()  # eventbus_events_published_total{topic} from now on

    def describe(self) -> Iterator[Metric]:
        """The metrics this collector exports, without values (so a registry checks
        their names at ``register`` without scraping)."""
        for family in FAMILIES:
            yield _empty(family)

    def collect(self) -> Iterator[Metric]:
        """The bus's metrics now. Yields nothing if its event loop has stopped (or
        did not answer within ``timeout``), rather than failing the whole scrape."""
        try:
            snapshot = self.bus.metrics_threadsafe(self.timeout)
        except (BusClosed, TimeoutError) as exc:
            logger.warning("no eventbus metrics for this scrape: %s", exc)
            return
        yield from metric_families(snapshot)


def collector(bus: Bus, *, registry: CollectorRegistry | None = None) -> BusCollector:
    """A collector of ``bus``'s metrics, registered on ``registry`` if one is given.

    Creating it turns on the per-topic publish counts (:meth:`Bus.count_topics`),
    which cost a little per event; everything else is read from counters the bus
    keeps anyway.

    Raises:
        ValueError: ``registry`` already has metrics of these names (another
            collector of a bus is registered there: give each its own registry).
    """
    made = BusCollector(bus)
    if registry is not None:
        registry.register(made)
    return made


def metric_families(snapshot: BusMetrics) -> Iterator[Metric]:
    """The Prometheus metric families of one snapshot."""
    for family in FAMILIES:
        metric = _empty(family)
        for labels, value in family.read(snapshot):
            if isinstance(value, Histogram):
                assert isinstance(metric, HistogramMetricFamily)
                buckets = [(_le(bound), float(n)) for bound, n in value.cumulative()]
                metric.add_metric(list(labels), buckets, value.sum)
            else:
                assert isinstance(metric, CounterMetricFamily | GaugeMetricFamily)
                metric.add_metric(list(labels), value)
        yield metric


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it: ``+Inf``, ``0.005``, ``1.0``."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _empty(family: Family) -> Metric:
    labels = list(family.labels)
    if family.kind == "counter":
        return CounterMetricFamily(family.name, family.help, labels=labels)
    if family.kind == "gauge":
        return GaugeMetricFamily(family.name, family.help, labels=labels)
    return HistogramMetricFamily(family.name, family.help, labels=labels)
