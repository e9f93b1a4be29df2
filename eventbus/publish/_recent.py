"""The most recent committed events, shared by every subscription near the head.

Subscriptions pull from here instead of having events pushed into them: one that
keeps up finds its next events in memory (decoded once, however many subscriptions
read them); one that falls further behind than this window reads the log. The window
is bounded in count and in bytes, so memory does not grow with the backlog.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter

from eventbus.storage import NewRecord, Receipt

from .._event import Event

ToEvent = Callable[[NewRecord, int], Event[object]]
ToEvents = Callable[[list[NewRecord], int], list[Event[object]]]

_TOPIC = attrgetter("topic")

# Decoded events are kept for other readers only while they are among the newest this
# many: readers that keep up read a commit's events right after it, and an event kept
# longer than that outlives the garbage collector's young generation, so that every
# collection of the older ones walks the whole window (measured: with 12,000 decoded
# events kept, a third of the dispatch side's instructions went to the collector).
_HOT = 256


class RecentEvents:
    """A sliding window over the tail of the log, indexed by sequence number."""

    def __init__(
        self,
        head: int,
        max_events: int,
        max_bytes: int,
        to_event: ToEvent,
        to_events: ToEvents | None = None,
    ) -> None:
        self._records: list[NewRecord] = []
        self._events: list[Event[object] | None] = []
        self._sizes: list[int] = []  # bytes accounted per record, for cheap trimming
        self._first = head + 1  # seq of _records[0]
        self._cold = head + 1  # events with a lower seq are not kept decoded
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._bytes = 0
        self._to_event = to_event
        # Events of consecutive records, made together (``to_event`` for each if None).
        self._to_events = to_events

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
        records = self._records
        stop = min(upto + 1 - first, len(records))
        examined = max(after, min(upto, first + len(records) - 1))
        events = self._events
        hot = len(records) - _HOT  # events before it are not kept decoded
        end = min(stop, start + limit)
        if start < end and (topics is None or topics.issuperset(map(_TOPIC, records[start:end]))):
            # Every event up to the limit is wanted: one slice, decoded together.
            kept = events[start:end]
            missing = kept.count(None)
            if not missing:
                return kept, examined if end == stop else first + end - 1  # type: ignore[return-value]
            to_event = self._to_event
            if missing == len(kept):
                if self._to_events is not None:
                    taken = self._to_events(records[start:end], first + start)
                else:
                    seqs = range(first + start, first + end)
                    taken = list(map(to_event, records[start:end], seqs))
            else:
                taken = [
                    to_event(records[i], first + i) if event is None else event
                    for i, event in enumerate(kept, start)
                ]
            if end > hot:
                events[start:end] = taken
            self._forget_cold(hot)
            return taken, examined if end == stop else first + end - 1
        out: list[Event[object]] = []
        for i in range(start, stop):
            rec = records[i]
            if topics is None or rec.topic in topics:
                event = events[i]
                if event is None:
                    event = self._to_event(rec, first + i)
                    if i >= hot:
                        events[i] = event
                out.append(event)
                if len(out) >= limit:
                    examined = first + i
                    break
        self._forget_cold(hot)
        return out, examined

    def _forget_cold(self, hot: int) -> None:
        """Drop the decoded events before ``_records[hot]`` (see ``_HOT``)."""
        cold = self._cold - self._first
        if cold < hot:
            cold = max(cold, 0)
            self._events[cold:hot] = [None] * (hot - cold)
            self._cold = self._first + hot
