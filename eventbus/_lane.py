"""The retry lane's schedule: a heap of due times and, per key, the events waiting.

Pure bookkeeping (no I/O, no clock reads): the subscription drives it. A failed event
leaves the main pipeline at once and waits here until it is due. With ordering per
key, later events of the same key wait behind it ("parked", with no due time of their
own) and become due, one at a time, as the one before them settles.
"""

from __future__ import annotations

import heapq
from collections import deque

from storage import RetryRecord


class RetrySchedule:
    """What is waiting in one subscription's retry lane."""

    def __init__(self, *, ordered: bool) -> None:
        self.ordered = ordered
        self._heap: list[tuple[float, int]] = []  # (due, monotonic), seq
        self._items: dict[int, RetryRecord] = {}
        self._due: dict[int, float] = {}
        self._keys: dict[str, deque[int]] = {}  # key -> seqs in log order, head first
        self.running: dict[int, RetryRecord] = {}
        self._again: dict[int, RetryRecord] = {}
        self._ending: set[int] = set()  # attempt over, its outcome being committed

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, seq: int) -> bool:
        """Whether the event with this seq waits or runs here."""
        return seq in self._items

    def seqs(self) -> set[int]:
        """The events waiting or running here."""
        return set(self._items)

    def blocks(self, key: str | None) -> bool:
        """Whether a fresh event with ``key`` must wait behind the lane."""
        return self.ordered and key is not None and key in self._keys

    def add(self, record: RetryRecord, due: float | None) -> None:
        """Add an event; ``due`` (monotonic) None parks it behind its key's head.

        The first event of a key is due at ``due`` (or at once, if parked with
        nothing ahead of it). An event already here is left as it is: the log and
        reconciliation may both hand over the same event.
        """
        seq = record.record.seq
        if seq in self.running or seq in self._ending:
            # Handed back (a redrive) while its attempt is ending: the attempt's
            # settle must not drop it; it runs again after.
            self._again[seq] = record
            return
        if seq in self._items:
            return
        self._items[seq] = record
        key = record.record.key
        if self.ordered and key is not None:
            queue = self._keys.setdefault(key, deque())
            queue.append(seq)
            if len(queue) > 1:
                return  # waits for the ones ahead of it
        self._push(seq, due if due is not None else 0.0)

    def _push(self, seq: int, due: float) -> None:
        self._due[seq] = due
        heapq.heappush(self._heap, (due, seq))

    def attempt_over(self, seq: int) -> None:
        """The attempt of a running event has returned; its outcome is being
        committed (settle or reschedule follows)."""
        if self.running.pop(seq, None) is not None:
            self._ending.add(seq)

    def reschedule(self, record: RetryRecord, due: float) -> None:
        """A running event failed again: put it back with a new due time."""
        seq = record.record.seq
        self.running.pop(seq, None)
        self._ending.discard(seq)
        self._again.pop(seq, None)  # still here: a redrive of it changes nothing
        self._items[seq] = record
        self._push(seq, due)

    def next_due(self) -> float | None:
        """The earliest due time (monotonic), or None when nothing is schedulable."""
        heap = self._heap
        while heap:
            due, seq = heap[0]
            if self._due.get(seq) == due and seq not in self.running:
                return due
            heapq.heappop(heap)  # stale entry
        return None

    def peek_due(self) -> RetryRecord | None:
        """The item that :meth:`pop_due` would take next, without taking it."""
        if self.next_due() is None:
            return None
        return self._items[self._heap[0][1]]

    def pop_due(self, now: float) -> RetryRecord | None:
        """Take the earliest item that is due at ``now``, marking it running."""
        due = self.next_due()
        if due is None or due > now:
            return None
        _, seq = heapq.heappop(self._heap)
        del self._due[seq]
        record = self._items[seq]
        self.running[seq] = record
        return record

    def settle(self, seq: int, now: float) -> None:
        """The event is done or dead-lettered: drop it, and release the next event
        of its key."""
        record = self._items.pop(seq, None)
        self.running.pop(seq, None)
        self._ending.discard(seq)
        self._due.pop(seq, None)
        again = self._again.pop(seq, None)
        if again is not None and record is not None:
            # Redriven while its last attempt ended: it stays, due now, at the head
            # of its key.
            self._items[seq] = again
            self._push(seq, now)
            return
        if record is None:
            return
        key = record.record.key
        queue = self._keys.get(key) if key is not None else None
        if queue is None:
            return
        if queue and queue[0] == seq:
            queue.popleft()
        else:
            queue.remove(seq)
        if queue:
            self._push(queue[0], now)
        else:
            del self._keys[key]  # type: ignore[arg-type]
