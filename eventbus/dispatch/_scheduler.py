"""The dispatch scheduler of one subscription: a state machine with no I/O and no clock.

It is fed what happens (events read from the log, a handler call that succeeded,
failed or was abandoned, retries recovered from the log or redriven, the time) and
answers what to call next, in which lane, and what the log must record. The async
shell around it (:mod:`._subscription`) only moves events, calls handlers and hands
the records to the log writer; it never decides anything.

What it owns:

- **the buffer** of events read from the log and not yet handled, bounded by the
  shell (it reads at most ``room()`` more);
- **calls in flight**, in two lanes: ``MAIN`` (fresh events, up to ``concurrency``
  calls) and ``RETRY`` (retries, up to ``RetryPolicy.concurrency`` calls). A key
  belongs to at most one call at a time while the subscription is ordered;
- **the retry lane**: per key, the events waiting for a retry in log order (the head
  has a due time, the rest are *parked* behind it), and a heap of due times. While
  a key has an event there, every later event of that key joins it, so per-key
  order holds across retries, crashes and concurrency;
- **suspects**: events whose call was running when the process died. One runs alone,
  nothing else in flight, so that if it kills the process again only it is blamed;
- **the circuit breaker and the retry budget**, consulted before every call;
- **the cursor**: the end of the prefix of the log that is finished (handled,
  dead-lettered or in the retry lane), and the events finished ahead of it.

One function decides a failure (:func:`eventbus.failures.decide`). Records for the
log go to a :class:`Sink` as decisions are made; :meth:`Scheduler.take_acks` gives
the cursor and the ranges finished ahead of it, to commit with them.
"""

from __future__ import annotations

import bisect
import heapq
import random
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Literal, Protocol

from .._config import RetryPolicy
from ..failures import CircuitBreaker, GiveUp, RetryBudget, decide, never_succeeds

Lane = Literal["main", "retry"]
MAIN: Lane = "main"
RETRY: Lane = "retry"

# Entry states.
FRESH = 0  # read from the log, waiting in the buffer
RUNNING = 1  # in a call
WAITING = 2  # in the retry lane with a due time (the head of its key)
PARKED = 3  # in the retry lane behind an earlier event of its key
GONE = 4  # done or dead-lettered

# What :meth:`Scheduler.check` says about the next event of a run.
RUN = 0  # handle it
PARK = 1  # its key has an event in the retry lane: it was parked behind it
STOP = 2  # stop the run here (breaker, suspect, stopping); the rest is released


class Entry:
    """One event as the scheduler sees it.

    Attributes:
        seq: Its position in the log.
        key: Its ordering key (None: no order to keep).
        item: The shell's own data for it (the decoded event, or the stored record).
        attempt: The attempt that runs next (1 for a fresh event).
        fresh: True until the log holds a retry record for it.
        suspect: Its call was running when the process died.
        due: When it is due (monotonic), while ``WAITING``.
        delay: The backoff delay that preceded its next attempt.
        first_failed: When it first failed (unix time), set by the shell.
        view: The shell's own data for how its handler sees it (the event with its
            payload decoded as the handler's type), once made.
    """

    __slots__ = (
        "attempt",
        "delay",
        "due",
        "first_failed",
        "fresh",
        "item",
        "key",
        "pending",
        "seq",
        "state",
        "suspect",
        "view",
    )

    # Set only for a handler that wants its payloads typed, so that other entries
    # cost nothing more to make: read it with ``getattr(entry, "view", None)``.
    view: object

    def __init__(self, seq: int, key: str | None, item: object) -> None:
        # A fresh event, read from the log (made for every event: kept to constants).
        self.seq = seq
        self.key = key
        self.item = item
        self.attempt = 1
        self.fresh = True
        self.suspect = False
        self.delay = 0.0
        self.first_failed: float | None = None
        self.state = FRESH
        self.due = 0.0
        # Holds the cursor back: a fresh event not yet finished.
        self.pending = True

    @classmethod
    def retry(
        cls,
        seq: int,
        key: str | None,
        item: object,
        *,
        attempt: int,
        suspect: bool = False,
        delay: float = 0.0,
        first_failed: float | None = None,
    ) -> Entry:
        """An event of the retry lane as the log holds it (``attempt`` runs next)."""
        entry = cls(seq, key, item)
        entry.attempt = attempt
        entry.fresh = entry.pending = False
        entry.suspect = suspect
        entry.delay = delay
        entry.first_failed = first_failed
        return entry

    def __repr__(self) -> str:
        return f"Entry(seq={self.seq}, key={self.key!r}, attempt={self.attempt})"


class Call:
    """A handler call the scheduler handed out: ``entries`` in ``lane``.

    A call of plain events (see :meth:`Scheduler.append_plain`) holds them in
    ``plain`` instead, with no entries: the shell counts the ones handled in ``done``
    (each a success), and asks :meth:`Scheduler.convert` for entries of the rest
    when anything else happens (a failure, a change, the call abandoned).
    """

    __slots__ = ("done", "earned", "entries", "keys", "lane", "ok", "plain", "probe", "suspect")

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.entries: list[Entry] = []
        self.plain: list[Plain] | None = None  # a call of plain events
        self.done = 0  # of ``plain``: handled, in order
        self.keys: list[str] = []  # keys this call owns until it finishes
        self.ok = 0  # successes not yet reported to the breaker
        self.earned = 0  # fresh events handled: retry budget earned at the end
        self.probe = False
        self.suspect = False


class Plain(Protocol):
    """A fresh event as the shell reads it (an :class:`~eventbus.Event`): all the
    scheduler needs of it while nothing goes wrong."""

    @property
    def seq(self) -> int: ...

    @property
    def key(self) -> str | None: ...


class Sink(Protocol):
    """Where the scheduler's records for the log go (the shell's write buffer)."""

    def retry(self, entry: Entry, error: BaseException | None) -> None:
        """Write ``entry``'s retry record: due at ``entry.due`` (WAITING) or parked
        behind its key (PARKED); ``error`` is the failure (None when parked)."""

    def dead(self, entry: Entry, error: BaseException | None) -> None:
        """Dead-letter ``entry`` (and drop its retry record, if it is not fresh);
        ``error`` None: it killed the process once too often."""

    def settle(self, entry: Entry) -> None:
        """``entry`` (not fresh) succeeded: drop its retry record, mark it done."""


class Pending:
    """What a subscription has not finished, and why (see :meth:`Scheduler.pending`)."""

    __slots__ = (
        "blocked_by_breaker",
        "buffered",
        "in_flight",
        "next_due",
        "parked",
        "retries_due",
        "retries_waiting",
        "suspects",
        "waiting_for_budget",
    )

    def __init__(self) -> None:
        self.buffered = 0
        self.in_flight = 0
        self.retries_waiting = 0
        self.retries_due = 0
        self.parked = 0
        self.suspects = 0
        self.next_due: float | None = None
        self.blocked_by_breaker = False
        self.waiting_for_budget = False


class Scheduler:
    """The dispatch state machine of one subscription (see the module docstring).

    Args:
        retry: The retry policy (attempts, backoff, lane concurrency).
        ordered: Keep events of one key in log order.
        concurrency: Main-lane calls that may run at once.
        breaker: The circuit breaker, or None.
        budget: The retry budget.
        sink: Receives the records to write.
        cursor: The cursor in the log: everything up to it is finished.
        finished_ahead: Ranges of events finished ahead of the cursor (done or
            dead-lettered, from the log): they are not handled again.
        rng: The jitter's random source.
    """

    def __init__(
        self,
        *,
        retry: RetryPolicy,
        ordered: bool,
        concurrency: int,
        breaker: CircuitBreaker | None,
        budget: RetryBudget,
        sink: Sink,
        cursor: int,
        finished_ahead: Iterable[tuple[int, int]] = (),
        rng: random.Random | None = None,
    ) -> None:
        self.retry_policy = retry
        self.ordered = ordered
        self.concurrency = concurrency
        self.breaker = breaker
        self.budget = budget
        self._sink = sink
        self._rng = rng or random.Random()
        self.read_pos = cursor  # every seq <= read_pos has been read (or skipped)
        self._ahead = deque(sorted(finished_ahead))
        # Events of the retry lane past read_pos that ended: not to be read as fresh.
        self._gone_ahead: set[int] = set()
        # The buffer: fresh events not yet in a call.
        self._fresh: deque[Entry] = deque()
        self._released: deque[Entry] = deque()  # given back: taken before _fresh
        self._held: dict[str, deque[Entry]] = {}  # waiting for their key's call
        # Plain events (:meth:`append_plain`): the tail of the buffer, after every
        # entry in it, kept without entries until one needs them.
        self._plain: list[Plain] = []
        self._plain_call: Call | None = None  # a call of plain events, not converted
        self.buffered = 0
        # The cursor: fresh events in log order, finished ones dropped from the front.
        self._order: deque[Entry] = deque()
        self._done_ahead: list[int] = []  # fresh events done since the last take
        # Calls in flight.
        self._owner: dict[str, Call] = {}
        self._serial: Call | None = None  # a main call handed out without key tracking
        # The latest time the scheduler was told: a parked event released when its
        # key's head settles is due then, behind whatever (a suspect) was due before.
        self._now = 0.0
        self.in_flight = {MAIN: 0, RETRY: 0}
        # The retry lane.
        self._known: dict[int, Entry] = {}  # every event in the retry lane, by seq
        self._lanes: dict[str, list[Entry]] = {}  # per key, in seq order; head first
        self._heap: list[tuple[float, int, Entry]] = []
        self._unreachable: list[tuple[int, Entry]] = []  # heads past read_pos
        self._key_blocked: dict[str, list[Entry]] = {}  # due, but their key is in a call
        self._suspect_running = False
        self._stopping = False
        #: Set when the retry lane may have work or a new due time; the shell clears it.
        self.retry_changed = False
        #: Set when the main lane may have work again; the shell clears it.
        self.main_changed = False
        #: Counts the changes that could make :meth:`check` say anything but ``RUN``
        #: (a key entering the retry lane, a due time, the breaker, stopping): a call
        #: that sees it unchanged since its events were checked need not check again.
        self.changes = 0
        #: The circuit breaker's last change of state (from, to); the shell clears it.
        self.breaker_moved: tuple[str, str] | None = None

    # -- input ----------------------------------------------------------------------

    def room(self, capacity: int) -> int:
        """How many more fresh events the buffer may take."""
        return max(0, capacity - self.buffered)

    def append(self, entries: Iterable[Entry], read_upto: int) -> None:
        """Fresh events read from the log (in log order), and how far it was read.

        Events in the retry lane or already acknowledged ahead of the cursor are
        skipped; an event of a key with an event in the retry lane joins it there.
        """
        if self._plain:
            self._materialise()  # ahead of these in the buffer and the cursor
        known = self._known
        ahead = self._ahead
        gone = self._gone_ahead
        if not known and not ahead and not gone:
            # Nothing to skip and no key in the retry lane: all of them join the buffer.
            entries = list(entries)
            if entries:
                self._order.extend(entries)
                self._fresh.extend(entries)
                self.buffered += len(entries)
                self.main_changed = True
            if read_upto > self.read_pos:
                self.read_pos = read_upto
                if self._unreachable:
                    self._reach()
            return
        added = False
        for entry in entries:
            seq = entry.seq
            if seq in known or (gone and seq in gone):
                continue
            while ahead and ahead[0][1] < seq:
                ahead.popleft()
            if ahead and ahead[0][0] <= seq:
                continue
            self._order.append(entry)
            key = entry.key
            if self.ordered and key is not None and key in self._lanes:
                self._park(entry)
                continue
            self._fresh.append(entry)
            self.buffered += 1
            added = True
        if read_upto > self.read_pos:
            self.read_pos = read_upto
            if self._unreachable:
                self._reach()
            if gone:
                self._gone_ahead = {seq for seq in gone if seq > read_upto}
        if added:
            self.main_changed = True

    def append_plain(self, events: Sequence[Plain], read_upto: int) -> None:
        """Fresh events read from the log, as :meth:`append` takes them, without an
        entry each: the common case of one main call at a time and nothing to skip
        (no event in the retry lane, none finished ahead of the cursor) needs none
        until something goes wrong. They get entries, and the same treatment as
        :meth:`append` gives, as soon as any other case arises."""
        if self.concurrency != 1 or self._known or self._ahead or self._gone_ahead:
            self.append([Entry(event.seq, event.key, event) for event in events], read_upto)
            return
        if events:
            self._plain += events
            self.buffered += len(events)
            self.main_changed = True
        if read_upto > self.read_pos:
            self.read_pos = read_upto
            if self._unreachable:
                self._reach()

    def _materialise(self) -> None:
        """The plain events of the buffer get entries, at its tail and the cursor's."""
        entries = [Entry(event.seq, event.key, event) for event in self._plain]
        self._plain = []
        self._order.extend(entries)
        self._fresh.extend(entries)

    def convert(self, call: Call) -> list[Entry]:
        """The plain ``call``'s events not handled yet (from ``call.done`` on) get
        entries, running, and become ``call.entries``: from here on its shell checks
        each one (:meth:`check`) and tells its outcome, as for any call. The
        ``call.done`` events before them succeeded."""
        assert call is self._plain_call
        assert call.plain is not None
        self._plain_call = None
        done = call.done
        call.ok += done
        call.earned += done
        entries = [Entry(event.seq, event.key, event) for event in call.plain[done:]]
        for entry in entries:
            entry.state = RUNNING
        call.entries = entries
        if entries:
            # Entries in the cursor's queue are later events (none was pending when
            # the call was handed out), unless read after it: they go ahead of them.
            order = self._order
            if not order or order[-1].seq < entries[0].seq:
                order.extend(entries)
            elif entries[-1].seq < order[0].seq:
                order.extendleft(reversed(entries))
            else:
                self._order = deque(heapq.merge(order, entries, key=lambda e: e.seq))
        return entries

    def finished_ahead(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Ranges of events past the read position already finished (from the log):
        they are skipped when read."""
        self._ahead = deque(sorted([*self._ahead, *ranges]))

    def recovered(self, entries: Iterable[Entry], now: float) -> None:
        """Events of the retry lane as the log holds them (at start, after a redrive,
        or handed back by reconciliation). Already known events are ignored. An
        event past its last attempt (it killed the process once too often) is
        dead-lettered here."""
        self._now = now
        for entry in sorted(entries, key=lambda e: e.seq):
            if entry.seq in self._known or entry.fresh:
                continue
            if entry.attempt > self.retry_policy.max_attempts:
                self._sink.dead(entry, None)
                self._forget_ahead(entry)
                continue
            self._enter_lane(entry, max(entry.due, 0.0), write=False)
        self.retry_changed = True

    def stop(self) -> None:
        """Hand out nothing more; runs stop at their next event."""
        self._stopping = True
        self.changes += 1
        self.main_changed = self.retry_changed = True

    # -- handing out calls ----------------------------------------------------------

    def next_call(self, lane: Lane, now: float, limit: int = 1) -> Call | None:
        """The next call to run in ``lane`` at ``now``, of at most ``limit`` events,
        or None. The call owns its keys until :meth:`finish`."""
        if self._stopping:
            return None
        self._now = now
        if lane == MAIN and not self.buffered:
            return None  # (the common answer of an idle main lane, made quickly)
        breaker = self.breaker
        probe = False
        if breaker is not None:
            if breaker.wait_time(now) > 0:
                return None
            if breaker.probing:
                if self.in_flight[MAIN] or self.in_flight[RETRY]:
                    return None
                if lane == RETRY and self.buffered:
                    return None  # a fresh event probes: a retry's failure says less
                probe, limit = True, 1
        call = self._next_main(limit) if lane == MAIN else self._next_retry(now)
        if call is not None:
            call.probe = probe
            self.in_flight[lane] += 1
        return call

    def _next_main(self, limit: int) -> Call | None:
        if self._suspect_running or self.in_flight[MAIN] >= self.concurrency:
            return None
        if self._suspect_due():
            return None  # a suspect waits for the calls in flight to end
        if self.concurrency == 1 and not self._released and not self._lanes:
            # One call at a time, nothing in the retry lane, nothing given back: the
            # next events of the buffer, keys not tracked (no other call can take one).
            fresh = self._fresh
            if fresh:
                if self._plain and len(fresh) < limit:
                    self._materialise()  # the call takes plain events after them
                n = min(limit, len(fresh))
                call = Call(MAIN)
                call.entries = [fresh.popleft() for _ in range(n)]
                self.buffered -= n
                self._serial = call  # its keys are its entries' (see _serial_holds)
                return call
            if self._plain and not self._held and self.cursor() == self._plain[0].seq - 1:
                # Plain events, and nothing before them is pending: a plain call,
                # whose events finish in order ahead of anything read later.
                plain = self._plain
                n = min(limit, len(plain))
                call = Call(MAIN)
                if n == len(plain):
                    call.plain, self._plain = plain, []
                else:
                    call.plain = plain[:n]
                    del plain[:n]
                self.buffered -= n
                self._serial = self._plain_call = call
                return call
        if self._plain:
            self._materialise()
        call = Call(MAIN)
        ordered = self.ordered
        owner = self._owner
        taken = call.entries
        for source in (self._released, self._fresh):
            while source and len(taken) < limit:
                entry = source.popleft()
                self.buffered -= 1
                key = entry.key
                if ordered and key is not None:
                    if key in self._lanes:
                        self._park(entry)
                        continue
                    held_by = owner.get(key)
                    if held_by is None:
                        owner[key] = call
                        call.keys.append(key)
                    elif held_by is not call:
                        queue = self._held.get(key)
                        if queue is None:
                            queue = self._held[key] = deque()
                        queue.append(entry)
                        self.buffered += 1
                        continue
                entry.state = RUNNING
                taken.append(entry)
        return call if taken else None

    def _next_retry(self, now: float) -> Call | None:
        if self._suspect_running:
            return None
        if self.in_flight[RETRY] >= self.retry_policy.concurrency:
            return None
        heap = self._heap
        found: Entry | None = None
        while heap:
            due, seq, entry = heap[0]
            if entry.state != WAITING or entry.due != due:
                heapq.heappop(heap)  # stale
                continue
            if due > now:
                break
            key = entry.key
            if self.ordered and key is not None:
                if seq > self.read_pos:
                    # An earlier event of its key may still be unread: wait for it.
                    heapq.heappop(heap)
                    bisect.insort(self._unreachable, (seq, entry), key=lambda item: item[0])
                    continue
                if key in self._owner or self._serial_holds(key):
                    # Its key is in a call (a redriven event of a busy key): it waits
                    # for that call to end.
                    heapq.heappop(heap)
                    self._key_blocked.setdefault(key, []).append(entry)
                    continue
            if entry.suspect:
                if self.in_flight[MAIN] or self.in_flight[RETRY]:
                    break  # it runs alone; the main lane pauses meanwhile
            elif entry.attempt >= 2 and not self.budget.take(now):
                break
            heapq.heappop(heap)
            found = entry
            break
        if found is None:
            return None
        found.state = RUNNING
        call = Call(RETRY)
        call.entries.append(found)
        if found.suspect:
            call.suspect = True
            self._suspect_running = True
        if self.ordered and found.key is not None:
            self._owner[found.key] = call
            call.keys.append(found.key)
        return call

    def _serial_holds(self, key: str) -> bool:
        serial = self._serial
        if serial is None:
            return False
        if serial.plain is not None and any(event.key == key for event in serial.plain):
            return True
        return any(entry.key == key for entry in serial.entries)

    def _suspect_due(self) -> bool:
        """A suspect is due and waits for the main lane to pause."""
        heap = self._heap
        while heap:
            due, _, entry = heap[0]
            if entry.state != WAITING or entry.due != due:
                heapq.heappop(heap)
                continue
            return entry.suspect
        return False

    def check(self, call: Call, entry: Entry) -> int:
        """Before handling ``entry``, the next event of a running ``call``: ``RUN``,
        ``PARK`` (an earlier event of its key failed meanwhile: it was parked
        behind it) or ``STOP`` (the breaker opened, a suspect waits, or the
        subscription is stopping: release the rest of the call)."""
        if self._stopping:
            return STOP
        lanes = self._lanes
        if lanes and call.lane is MAIN and self.ordered and entry.key in lanes:
            self._park(entry)
            return PARK
        if call.lane is MAIN and len(call.entries) > 1:
            breaker = self.breaker
            if breaker is not None and breaker.state == "open":
                return STOP
            if self._heap and self._suspect_due():
                return STOP
        return RUN

    # -- outcomes -------------------------------------------------------------------

    def succeeded(self, call: Call, entry: Entry) -> None:
        """``entry`` was handled: done."""
        entry.state = GONE
        call.ok += 1
        if entry.fresh:
            entry.pending = False
            self._done_ahead.append(entry.seq)
        else:
            if entry.attempt >= 2 and not entry.suspect:
                self.budget.refund()
            self._sink.settle(entry)
            self._leave_lane(entry)
            self._forget_ahead(entry)
        if call.lane == MAIN and entry.fresh:
            call.earned += 1

    def succeeded_many(self, call: Call, entries: list[Entry]) -> None:
        """Fresh events of a main-lane call handled, one after the other, without a
        change in between (:attr:`changes`): :meth:`succeeded` for each, in bulk."""
        for entry in entries:
            entry.state = GONE
            entry.pending = False
        n = len(entries)
        call.ok += n
        call.earned += n
        # Any of them may be ahead of the cursor (an older event held or retried).
        self._done_ahead.extend([entry.seq for entry in entries])

    def failed(self, call: Call, entry: Entry, error: BaseException, now: float) -> bool:
        """``entry``'s attempt failed with ``error``: retry it later or dead-letter it
        (returns True when dead-lettered), as :func:`~eventbus.failures.decide` says.
        An event that can never succeed (its payload does not decode for the
        handler) is dead-lettered at once, and not counted by the circuit breaker."""
        self._now = now
        self._record(call, call.ok, 0 if never_succeeds(error) else 1, now)
        decision = decide(self.retry_policy, entry.attempt, error, entry.delay, self._rng)
        if isinstance(decision, GiveUp):
            entry.state = GONE
            entry.pending = False
            self._sink.dead(entry, error)
            if not entry.fresh:
                self._leave_lane(entry)
                self._forget_ahead(entry)
            return True
        entry.attempt += 1
        entry.delay = decision.delay
        entry.suspect = False
        if entry.fresh:
            entry.fresh = entry.pending = False
            self._enter_lane(entry, now + decision.delay, error)
        else:
            self._requeue(entry, now + decision.delay, error)
        return False

    def finish(self, call: Call, now: float, unhandled: Iterable[Entry] = ()) -> None:
        """``call`` is over. ``unhandled`` events were not attempted (abandoned at
        close, or released by a stop): they go back where they came from, their
        attempt not counted."""
        self._now = now
        if call is self._plain_call:
            rest = self.convert(call)
            if rest:
                unhandled = [*rest, *unhandled]
        back: list[Entry] = []
        for entry in unhandled:
            if entry.state != RUNNING and not (entry.state == FRESH and entry.pending):
                continue
            if entry.fresh:
                entry.state = FRESH
                back.append(entry)
            else:
                entry.state = WAITING
                entry.due = now
                self._push_due(now, entry.seq, entry)
                self.retry_changed = True
        self.buffered += len(back)
        self._record(call, call.ok, 0, now)
        if call.earned:
            self.budget.earn(call.earned)
        self.in_flight[call.lane] -= 1
        if call is self._serial:
            self._serial = None
            call.keys = list(self._key_blocked)  # due retries it held back may go now
        owner = self._owner
        for key in call.keys:
            if owner.get(key) is call:
                del owner[key]
            blocked = self._key_blocked.pop(key, None)
            if blocked:
                for entry in blocked:
                    if entry.state == WAITING:
                        self._push_due(entry.due, entry.seq, entry)
                self.retry_changed = True
            held = self._held.pop(key, None)
            if held:
                # (A key that entered the retry lane meanwhile parked its held events
                # then, so these are free to go.)
                back.extend(held)
        if back:
            # Back to the front of the buffer: the call's unattempted events, then the
            # events held behind its keys. Each is the earliest unhandled event of its
            # key (a call takes a key's events in log order, and a later one is held
            # only while an earlier one is in a call), so per-key order holds. Behind
            # the buffer, a held event would queue after later events of its key that
            # an earlier release had put there.
            self._released.extendleft(reversed(back))
            self.main_changed = True
        if call.suspect:
            self._suspect_running = False
            self.main_changed = True
        if call.lane == RETRY or self._heap:
            self.retry_changed = True  # a retry slot, a suspect's turn or a key is free
        if call.lane == RETRY or call.probe:
            self.main_changed = True
        breaker = self.breaker
        if breaker is not None and breaker.state != "closed":
            self.main_changed = self.retry_changed = True

    def _record(self, call: Call, ok: int, failed: int, now: float) -> None:
        """Tell the breaker how events fared. Only first attempts (and probes) count:
        retries of an event that keeps failing say nothing new about the dependency,
        and would open the breaker on a mix of a few poison events and healthy
        traffic."""
        breaker = self.breaker
        if breaker is None or not (ok or failed) or (call.lane == RETRY and not call.probe):
            call.ok = 0
            return
        was = breaker.state
        breaker.record(ok, failed, now)
        call.ok = 0
        if breaker.state != was:
            self.changes += 1
            self.retry_changed = self.main_changed = True
            self.breaker_moved = (was, breaker.state)

    # -- the retry lane -------------------------------------------------------------

    def _enter_lane(
        self, entry: Entry, due: float, error: BaseException | None = None, *, write: bool = True
    ) -> None:
        """``entry`` joins the retry lane (its record written unless ``write`` is
        False: recovered from the log), due at ``due`` if it heads its key, else
        parked behind the events of its key ahead of it."""
        self._known[entry.seq] = entry
        entry.fresh = entry.pending = False
        self.changes += 1
        key = entry.key
        if self.ordered and key is not None:
            lane = self._lanes.get(key)
            if lane is None:
                self._lanes[key] = [entry]
                self._set_due(entry, due, error, write)
                self._park_buffered(key)
                return
            i = bisect.bisect_left(lane, entry.seq, key=lambda e: e.seq)
            lane.insert(i, entry)
            if i == 0:
                # Ahead of the old head (an older event recovered late): the old head
                # waits behind it.
                old = lane[1]
                if old.state == WAITING:
                    old.state = PARKED
                self._set_due(entry, due, error, write)
                return
            entry.state = PARKED
            entry.due = 0.0
            if write:
                self._sink.retry(entry, error)
            return
        self._set_due(entry, due, error, write)

    def _set_due(
        self, entry: Entry, due: float, error: BaseException | None, write: bool = True
    ) -> None:
        entry.state = WAITING
        entry.due = due
        if write:
            self._sink.retry(entry, error)
        self._push_due(due, entry.seq, entry)
        self.retry_changed = True

    def _push_due(self, due: float, seq: int, entry: Entry) -> None:
        heapq.heappush(self._heap, (due, seq, entry))
        self.changes += 1  # a suspect may now be due: calls must check their events

    def _requeue(self, entry: Entry, due: float, error: BaseException) -> None:
        """A retry attempt failed: due again if it still heads its key, else parked
        (an older event of its key was handed back while it ran)."""
        key = entry.key
        if self.ordered and key is not None and self._lanes[key][0] is not entry:
            entry.state = PARKED
            entry.due = 0.0
            self._sink.retry(entry, error)
            return
        self._set_due(entry, due, error)

    def _park(self, entry: Entry) -> None:
        """A fresh event of a key with an event in the retry lane joins it: parked
        behind it, or (older than the lane's head: one recovered ahead of the read
        position) due at once, ahead of it."""
        entry.pending = False
        entry.fresh = False
        self.changes += 1
        self._known[entry.seq] = entry
        lane = self._lanes[entry.key]  # type: ignore[index]
        if lane[-1].seq < entry.seq:
            lane.append(entry)
        else:
            bisect.insort(lane, entry, key=lambda e: e.seq)
            if lane[0] is entry:
                old = lane[1]
                if old.state == WAITING:
                    old.state = PARKED
                self._set_due(entry, self._now, None)
                return
        entry.state = PARKED
        entry.due = 0.0
        self._sink.retry(entry, None)

    def _park_buffered(self, key: str) -> None:
        """``key`` just entered the retry lane: its events still in the buffer (held
        behind a call, given back, or fresh) join it, so that the lane holds every
        read event of the key in log order. An event of the key read from now on is
        parked as it is read: left behind in the buffer, an older one would run
        after it, once the lane released it."""
        if self._plain:
            self._materialise()
        held = self._held.pop(key, None)
        if held:
            self.buffered -= len(held)
            for entry in held:
                self._park(entry)
        self._released = self._park_from(self._released, key)
        self._fresh = self._park_from(self._fresh, key)

    def _park_from(self, source: deque[Entry], key: str) -> deque[Entry]:
        """``source`` without the events of ``key``, which are parked."""
        if not source:
            return source
        mine = [entry for entry in source if entry.key == key]
        if not mine:
            return source
        self.buffered -= len(mine)
        for entry in mine:
            self._park(entry)
        return deque(entry for entry in source if entry.key != key)

    def _leave_lane(self, entry: Entry) -> None:
        """``entry`` left the retry lane (done or dead): the next of its key is due."""
        self._known.pop(entry.seq, None)
        key = entry.key
        if not self.ordered or key is None:
            return
        lane = self._lanes.get(key)
        if lane is None:
            return
        if lane and lane[0] is entry:
            lane.pop(0)
        elif entry in lane:
            lane.remove(entry)
        if not lane:
            del self._lanes[key]
            self.main_changed = True
            return
        head = lane[0]
        if head.state == PARKED:
            head.state = WAITING
            head.due = self._now  # released: due now, behind what was due before
            self._push_due(head.due, head.seq, head)
            self.retry_changed = True

    def _forget_ahead(self, entry: Entry) -> None:
        """An event of the retry lane ended: if the log is not read up to it yet,
        remember not to read it as a fresh event."""
        if entry.seq > self.read_pos:
            self._gone_ahead.add(entry.seq)

    def _reach(self) -> None:
        """Heads of the retry lane waiting for the log to be read up to them."""
        while self._unreachable and self._unreachable[0][0] <= self.read_pos:
            _, entry = self._unreachable.pop(0)
            if entry.state == WAITING:
                self._push_due(entry.due, entry.seq, entry)
                self.retry_changed = True

    # -- output ---------------------------------------------------------------------

    def next_wakeup(self, now: float) -> float | None:
        """When the retry lane (or a main lane paused by the breaker) next has
        something to do if nothing else happens first; None: only a change (new
        input, a call ending) can give it work, and that change says so through
        :attr:`retry_changed` and :attr:`main_changed`."""
        times: list[float] = []
        breaker = self.breaker
        if breaker is not None and breaker.state == "open":
            times.append(now + breaker.wait_time(now))
        heap = self._heap
        while heap:
            due, _, entry = heap[0]
            if entry.state != WAITING or entry.due != due:
                heapq.heappop(heap)
                continue
            if due > now:
                times.append(due)
            elif entry.attempt >= 2 and not entry.suspect:
                # Due now and not started: the budget (or a call ending) holds it.
                wait = self.budget.wait_time(now)
                if wait > 0:
                    times.append(now + wait)
            break
        return min(times) if times else None

    def cursor(self) -> int:
        """The end of the finished prefix of the log."""
        order = self._order
        while order and not order[0].pending:
            order.popleft()
        call = self._plain_call
        if call is not None:
            plain = call.plain
            assert plain is not None
            if call.done < len(plain):
                # Ahead of any entry in the cursor's queue (see :meth:`convert`).
                return plain[call.done].seq - 1
        if order:
            return order[0].seq - 1
        # The plain events of the buffer come after every entry and call.
        return self._plain[0].seq - 1 if self._plain else self.read_pos

    def oldest_pending(self) -> Entry | None:
        """The first event in log order that is read and not finished (the one that
        holds the cursor back), or None."""
        first = self.cursor() + 1
        if self._order and self._order[0].seq == first:
            return self._order[0]
        call = self._plain_call
        for event in (call.plain[call.done :] if call is not None and call.plain else []) + (
            self._plain[:1]
        ):
            if event.seq == first:
                return Entry(event.seq, event.key, event)
        return None

    def take_acks(self) -> tuple[int, list[tuple[int, int]]]:
        """The cursor, and the ranges of fresh events done ahead of it since the last
        call (to record in the acknowledgement ledger with the cursor)."""
        cursor = self.cursor()
        if not self._done_ahead:
            return cursor, []
        done, self._done_ahead = self._done_ahead, []
        ranges: list[tuple[int, int]] = []
        ahead = sorted(seq for seq in done if seq > cursor)
        for seq in ahead:
            if ranges and ranges[-1][1] == seq - 1:
                ranges[-1] = (ranges[-1][0], seq)
            else:
                ranges.append((seq, seq))
        return cursor, ranges

    def idle(self) -> bool:
        """Nothing buffered, in flight or in the retry lane."""
        return (
            not self.buffered
            and not self.in_flight[MAIN]
            and not self.in_flight[RETRY]
            and not self._known
        )

    def holds(self, seq: int) -> bool:
        """Whether the event ``seq`` is in the retry lane."""
        return seq in self._known

    def retry_seqs(self) -> set[int]:
        """The events in the retry lane."""
        return set(self._known)

    def pending(self, now: float) -> Pending:
        """What is not finished, and why (for ``drain`` and metrics)."""
        out = Pending()
        out.buffered = self.buffered
        out.in_flight = self.in_flight[MAIN] + self.in_flight[RETRY]
        breaker = self.breaker
        out.blocked_by_breaker = breaker is not None and breaker.state == "open"
        for entry in self._known.values():
            if entry.state == PARKED:
                out.parked += 1
            elif entry.state == WAITING:
                out.retries_waiting += 1
                if entry.suspect:
                    out.suspects += 1
                if entry.due <= now:
                    out.retries_due += 1
                elif out.next_due is None or entry.due < out.next_due:
                    out.next_due = entry.due
        out.waiting_for_budget = out.retries_due > 0 and self.budget.wait_time(now) > 0
        return out
