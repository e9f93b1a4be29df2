"""The overview's recent past: per subscription, a bounded series of throughput,
handler p99 and lag, and the small inline SVG charts drawn from them."""

from __future__ import annotations

from collections import deque

import msgspec

from ._source import Snapshot

#: Samples kept per subscription: ten minutes at one sample every two seconds.
SAMPLES = 300
#: Samples closer together than this (seconds) are taken as one (several open tabs).
MIN_SPACING = 1.0


class Point(msgspec.Struct, frozen=True):
    at: float
    throughput: float
    handler_p99: float | None
    lag: int


class History:
    """Bounded series per subscription, fed with the snapshots the overview takes.

    From a log file alone (no in-process metrics) throughput is the cursor's advance
    per second between two snapshots.
    """

    def __init__(self, samples: int = SAMPLES) -> None:
        self._samples = samples
        self._series: dict[str, deque[Point]] = {}
        self._cursors: dict[str, tuple[float, int]] = {}
        self._last = 0.0

    def record(self, snapshot: Snapshot) -> None:
        """Add a snapshot (ignored if it follows the last within ``MIN_SPACING``)."""
        if snapshot.at - self._last < MIN_SPACING:
            return
        self._last = snapshot.at
        for sub in snapshot.subscriptions:
            rate = sub.throughput
            if rate is None:
                before = self._cursors.get(sub.name)
                rate = 0.0
                if before is not None and snapshot.at > before[0]:
                    rate = max(0, sub.cursor - before[1]) / (snapshot.at - before[0])
            self._cursors[sub.name] = (snapshot.at, sub.cursor)
            series = self._series.setdefault(sub.name, deque(maxlen=self._samples))
            series.append(Point(snapshot.at, rate, sub.handler_p99, sub.lag))

    def series(self, name: str) -> list[Point]:
        """The samples of one subscription, oldest first."""
        return list(self._series.get(name, ()))

    def throughput(self, name: str) -> float:
        """The latest throughput of one subscription (events per second)."""
        points = self._series.get(name)
        return points[-1].throughput if points else 0.0


def sparkline(values: list[float], *, label: str, width: int = 160, height: int = 32) -> str:
    """A small line chart as inline SVG (plain markup, no script), scaled to its
    largest value; ``label`` is its accessible title."""
    title = f"<title>{_escape(label)}</title>"
    if len(values) < 2:
        return (
            f'<svg class="spark" width="{width}" height="{height}" role="img">{title}'
            f'<text x="4" y="{height // 2 + 4}">collecting…</text></svg>'
        )
    top = max(values) or 1.0
    step = width / (len(values) - 1)
    points = " ".join(
        f"{i * step:.1f},{height - 2 - (v / top) * (height - 4):.1f}" for i, v in enumerate(values)
    )
    return (
        f'<svg class="spark" width="{width}" height="{height}" role="img">{title}'
        f'<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="{points}"/>'
        "</svg>"
    )


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
