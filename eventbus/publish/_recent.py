"""The most recent committed events, shared by every subscription near the head.

Subscriptions pull from here instead of having events pushed into them: one that
keeps up finds its next events in memory (decoded once, however many subscriptions
read them); one that falls further behind than this window reads the log. The window
is bounded in count and in bytes, so memory does not grow with the backlog.
"""

from __future__ import annotations

from collections.abc import Callable

from eventbus.storage import NewRecord, Receipt

from .._event import Event

ToEvent = Callable[[NewRecord, int], Event[object]]


class RecentEvents:
    """A sliding window over the tail of the log, indexed by sequence number."""

    def __init__(self, head: int, max_events: int, max_bytes: int, to_event: ToEvent) -> None:
        self._records: list[NewRecord] = []
        self._events: list[Event[object] | None] = []
        self._sizes: list[int] = []  # bytes accounted per record, for cheap trimming
        self._first = head + 1  # seq of _records[0]
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._bytes = 0
        self._to_event = to_event

    @property
    def first_seq(self) -> int:
        """The oldest sequence number still in the window."""
        return self._first

    def append(self, records: list[NewRecord], receipts: list[Receipt]) -> None:
        """Add a commit's new events (duplicates carry no new seq and are skipped)."""
        n = len(records)
        expected = self._first + len(self._records)
        if n == 1 and receipts[0].seq == expected:
            # One new event (the common commit of a producer publishing alone).
            size = len(records[0].payload) + 100
            self._records.append(records[0])
            self._events.append(None)
            self._sizes.append(size)
            self._bytes += size
            if len(self._records) > self._max_events or self._bytes > self._max_bytes:
                self._bound()
            return
        if n and receipts[0].seq == expected and receipts[-1].seq == expected + n - 1:
            # No duplicates (seqs are dense): append in bulk.
            sizes = [len(r.payload) + 100 for r in records]
            self._records.extend(records)
            self._events.extend([None] * n)
            self._sizes.extend(sizes)
            self._bytes += sum(sizes)
            self._bound()
            return
        for rec, receipt in zip(records, receipts, strict=True):
            if receipt.duplicate:
                continue
            if receipt.seq != self._first + len(self._records):
                # A gap (cannot happen with one writer): restart the window there.
                self._records.clear()
                self._events.clear()
                self._sizes.clear()
                self._bytes = 0
                self._first = receipt.seq
            self._records.append(rec)
            self._events.append(None)
            self._sizes.append(len(rec.payload) + 100)
            self._bytes += self._sizes[-1]
        self._bound()

    def _bound(self) -> None:
        excess = len(self._records) - self._max_events
        if excess > 0 or self._bytes > self._max_bytes:
            self._trim(max(excess, len(self._records) // 4, 1))

    def _trim(self, n: int) -> None:
        # Trim in chunks so that the list shifts are amortised over many appends.
        n = min(n, len(self._records))
        self._bytes -= sum(self._sizes[:n])
        del self._records[:n]
        del self._events[:n]
        del self._sizes[:n]
        self._first += n

    def take(
        self, after: int, upto: int, topics: frozenset[str] | None, limit: int
    ) -> tuple[list[Event[object]], int] | None:
        """Events with ``after < seq <= upto`` on ``topics`` (all if None), at most
        ``limit``, and the position examined up to; None if ``after`` is older than
        the window (read the log instead)."""
        first = self._first
        if after + 1 < first:
            return None
        start = after + 1 - first
        stop = min(upto + 1 - first, len(self._records))
        records = self._records
        events = self._events
        out: list[Event[object]] = []
        for i in range(start, stop):
            rec = records[i]
            if topics is None or rec.topic in topics:
                event = events[i]
                if event is None:
                    event = events[i] = self._to_event(rec, first + i)
                out.append(event)
                if len(out) >= limit:
                    return out, first + i
        return out, max(after, min(upto, first + len(records) - 1))
