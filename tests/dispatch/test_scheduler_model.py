"""The dispatch scheduler against a model, with no event loop: hypothesis drives random
appends, calls that succeed, fail, time out or are abandoned, time passing, commits,
crashes and recoveries, on a fake clock.

Checked after every step: events of one key are handled in log order, no event is in
two calls at once, no event gets more attempts than ``max_attempts`` plus the deaths
its own calls caused, the committed cursor only passes finished events; and once the
run settles with no more faults, every event is done or dead-lettered, none lost.

Events are read either as entries or as plain events (``Scheduler.append_plain``),
whose calls the machine runs as the shell does: no entry each until something
changes, an attempt fails or the call is abandoned.
"""

from __future__ import annotations

import os
import random
import typing
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from eventbus import RetryPolicy
from eventbus.dispatch._scheduler import MAIN, PARK, RETRY, RUN, STOP, Call, Entry, Scheduler
from eventbus.failures import RetryBudget

KEYS = ["a", "b", "c", None]


@dataclass(frozen=True)
class Plain:
    """A plain event as the shell reads it."""

    seq: int
    key: str | None


class Boom(Exception):
    """A handler failure."""


class Fatal(Exception):
    """A failure the policy does not retry."""


@dataclass
class Stored:
    """What the log holds (what survives a crash)."""

    cursor: int = 0
    done: set[int] = field(default_factory=set)
    dead: set[int] = field(default_factory=set)
    retries: dict[int, tuple[int, bool]] = field(default_factory=dict)  # seq -> attempt, died


class RecordingSink:
    """The scheduler's records, held until a commit applies them to ``Stored``."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, int, int]] = []

    def retry(self, entry: Entry, error: BaseException | None) -> None:
        self.ops.append(("retry", entry.seq, entry.attempt))

    def dead(self, entry: Entry, error: BaseException | None) -> None:
        self.ops.append(("dead", entry.seq, entry.attempt))

    def settle(self, entry: Entry) -> None:
        self.ops.append(("settled", entry.seq, entry.attempt))


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[int, str | None, str]] = []  # seq, key, behaviour
        self.stored = Stored()
        self.now = 0.0
        self.calls: list[tuple[Call, list[Entry | Plain]]] = []  # call, events not yet run
        # Failed attempts whose record committed, and those of this life not yet
        # committed (a crash forgets them: the attempt is made again).
        self.failed_attempts: dict[int, int] = {}
        self.failed_now: dict[int, int] = {}
        self.deaths: dict[int, int] = {}  # deaths its own calls caused
        self.inside: dict[Call, Entry | Plain] = {}  # calls inside the handler, on which event
        self.skip_checks: dict[Call, list[object]] = {}  # changes when handed out, checking
        self.running: set[int] = set()
        self.done_now: set[int] = set()  # done in this life (committed or not)
        self.failures_left: dict[int, int] = {}
        self.plain_calls: set[Call] = set()  # calls of plain events not converted yet

    @initialize(
        ordered=st.booleans(),
        concurrency=st.integers(1, 4),
        retry_concurrency=st.integers(1, 3),
        max_attempts=st.integers(1, 4),
        capacity=st.integers(1, 12),
        seed=st.integers(0, 2**16),
        plain=st.booleans(),
    )
    def setup(
        self,
        ordered: bool,
        concurrency: int,
        retry_concurrency: int,
        max_attempts: int,
        capacity: int,
        seed: int,
        plain: bool,
    ) -> None:
        self.plain = plain
        self.ordered = ordered
        self.concurrency = concurrency
        self.capacity = capacity
        self.policy = RetryPolicy(
            max_attempts=max_attempts,
            initial_delay=0.5,
            max_delay=2.0,
            jitter="full",
            concurrency=retry_concurrency,
            give_up_on=(Fatal,),
        )
        self.rng = random.Random(seed)
        self._open()

    def _open(self, delays: list[float] | None = None) -> None:
        """A new life: a scheduler built from what the log holds."""
        self.sink = RecordingSink()
        finished = sorted(s for s in self.stored.done | self.stored.dead if s > self.stored.cursor)
        self.sched = Scheduler(
            retry=self.policy,
            ordered=self.ordered,
            concurrency=self.concurrency,
            breaker=None,
            budget=RetryBudget(1.0, 1000.0, 1000.0, self.now),
            sink=self.sink,
            cursor=self.stored.cursor,
            finished_ahead=[(s, s) for s in finished],
            rng=self.rng,
        )
        recovered = []
        for i, (seq, (attempt, died)) in enumerate(sorted(self.stored.retries.items())):
            entry = Entry.retry(seq, self.log[seq - 1][1], None, attempt=attempt)
            entry.suspect = died
            entry.due = self.now + (delays[i % len(delays)] if delays else 0.0)
            recovered.append(entry)
        self.sched.recovered(recovered, self.now)
        self.calls = []
        self.plain_calls = set()
        self.running = set()
        self.done_now = set(self.stored.done)
        self.read_from = self.stored.cursor

    # -- the outside world ----------------------------------------------------------

    @rule(
        keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=6),
        behaviours=st.lists(
            st.sampled_from(["ok", "ok", "ok", "fail1", "fail2", "always", "fatal", "kill"]),
            min_size=6,
            max_size=6,
        ),
    )
    def publish(self, keys: list[str | None], behaviours: list[str]) -> None:
        for key, behaviour in zip(keys, behaviours, strict=False):
            seq = len(self.log) + 1
            self.log.append((seq, key, behaviour))
            self.failures_left[seq] = {"fail1": 1, "fail2": 2}.get(behaviour, 0)

    @rule()
    def read(self) -> None:
        room = self.sched.room(self.capacity)
        entries = []
        pos = self.sched.read_pos
        while pos < len(self.log) and len(entries) < room:
            pos += 1
            seq, key, _ = self.log[pos - 1]
            entries.append(Entry(seq, key, None))
        if self.plain:
            self.sched.append_plain([Plain(e.seq, e.key) for e in entries], pos)
        else:
            self.sched.append(entries, pos)

    @staticmethod
    def _events(call: Call) -> list[Entry | Plain]:
        """Every event a call was handed (a plain call's, and its entries once
        converted)."""
        return [*typing.cast("list[Plain]", call.plain or []), *call.entries]

    def _add_call(self, call: Call) -> list[Entry | Plain]:
        events = list(typing.cast("list[Plain]", call.plain)) if call.plain else call.entries
        for event in events:
            self.running.add(event.seq)
        todo: list[Entry | Plain] = list(events)
        self.calls.append((call, todo))
        if call.plain is not None:
            self.plain_calls.add(call)
        return todo

    def _convert(self, call: Call, todo: list[Entry | Plain]) -> None:
        """As the shell does when a plain call meets anything but success: entries for
        the events not handled yet."""
        self.plain_calls.discard(call)
        entries = self.sched.convert(call)
        assert [e.seq for e in entries] == [e.seq for e in todo]
        todo[:] = entries

    @rule(dt=st.sampled_from([0.1, 0.5, 1.0, 3.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(lane=st.sampled_from([MAIN, RETRY]), limit=st.integers(1, 5))
    def start_call(self, lane: str, limit: int) -> None:
        call = self.sched.next_call(lane, self.now, limit)  # type: ignore[arg-type]
        if call is None:
            return
        assert call.lane == lane
        events = self._events(call)
        assert events
        assert len(events) <= (limit if lane == MAIN else 1)
        suspects = [c for c, _ in self.calls if c.suspect]
        assert not suspects, "a call started while a suspect runs alone"
        if call.suspect:
            assert not self.calls, "a suspect started beside other calls"
        for event in events:
            assert event.seq not in self.running, f"event {event.seq} is in two calls at once"
        if self.ordered:
            keys = [e.key for c, _ in self.calls for e in self._events(c) if e.key is not None]
            for event in events:
                if event.key is not None:
                    assert event.key not in keys, f"key {event.key} is in two calls at once"
        self._add_call(call)
        self.skip_checks[call] = [self.sched.changes, False]

    @precondition(lambda self: self.calls)
    @rule(which=st.integers(0, 10))
    def begin(self, which: int) -> None:
        """The next event of a call in flight enters the handler."""
        call, todo = self.calls[which % len(self.calls)]
        if call in self.inside:
            return None
        if not todo:
            return self._finish(call, todo)
        state = self.skip_checks.get(call)
        if call in self.plain_calls:
            # A plain call's next event runs unchecked until something changed.
            if state is not None and self.sched.changes == state[0]:
                return self._enter(call, todo.pop(0))
            self._convert(call, todo)
            if state is not None:
                state[1] = True
            if not todo:
                return self._finish(call, todo)
        entry = todo[0]
        assert isinstance(entry, Entry)
        # As the shell does: a main call's events were checked when handed out, and
        # need checking again only once something changed.
        if call.lane == MAIN and state is not None and not state[1]:
            if self.sched.changes == state[0]:
                verdict = RUN
            else:
                state[1] = True
                verdict = self.sched.check(call, entry)
        else:
            verdict = self.sched.check(call, entry)
        if verdict == STOP:
            return self._finish(call, todo)
        todo.pop(0)
        if verdict == PARK:
            self.running.discard(entry.seq)
            return None
        assert verdict == RUN
        return self._enter(call, entry)

    def _enter(self, call: Call, entry: Entry | Plain) -> None:
        seq, key, behaviour = self.log[entry.seq - 1]
        assert seq not in self.done_now, f"event {seq} was handled again after it was done"
        attempt = entry.attempt if isinstance(entry, Entry) else 1
        assert attempt <= self.policy.max_attempts, f"event {seq} ran at {entry}"
        self._check_order(seq, key)
        self.inside[call] = entry
        if behaviour == "kill":
            # This call kills the process: every call inside a handler is blamed.
            self.log[seq - 1] = (seq, key, "ok")  # it kills once, then behaves
            self._crash()
        return None

    @precondition(lambda self: self.inside)
    @rule(which=st.integers(0, 10), stuck=st.booleans())
    def end(self, which: int, stuck: bool) -> None:
        """A call inside the handler returns (or fails, or is cancelled as stuck)."""
        call = list(self.inside)[which % len(self.inside)]
        entry = self.inside.pop(call)
        seq, _, behaviour = self.log[entry.seq - 1]
        fails = behaviour in ("always", "fatal") or self.failures_left[seq] > 0 or stuck
        self.running.discard(seq)
        if fails:
            if behaviour not in ("always", "fatal") and not stuck:
                self.failures_left[seq] -= 1
            self.failed_now[seq] = self.failed_now.get(seq, 0) + 1
            failed = self.failed_attempts.get(seq, 0) + self.failed_now[seq]
            limit = self.policy.max_attempts + self.deaths.get(seq, 0)
            assert failed <= limit, f"event {seq} failed {failed} times"
            error = Fatal() if behaviour == "fatal" else Boom()
            if call in self.plain_calls:
                todo = next(t for c, t in self.calls if c is call)
                todo.insert(0, entry)
                self._convert(call, todo)
                entry = todo.pop(0)
            assert isinstance(entry, Entry)
            self.sched.failed(call, entry, error, self.now)
            if call in self.skip_checks:
                self.skip_checks[call][1] = True
        elif call in self.plain_calls:
            call.done += 1
            self.done_now.add(seq)
        else:
            assert isinstance(entry, Entry)
            self.sched.succeeded(call, entry)
            self.done_now.add(seq)

    def _finish(self, call: Call, todo: list[Entry | Plain]) -> None:
        current = self.inside.pop(call, None)
        if current is not None:
            todo = [current, *todo]  # abandoned inside the handler: released
        for entry in todo:
            self.running.discard(entry.seq)
        if call in self.plain_calls:
            # The scheduler gives back the events from ``call.done`` on itself.
            self.plain_calls.discard(call)
            todo = []
        self.sched.finish(call, self.now, typing.cast("list[Entry]", todo))
        self.calls = [(c, t) for c, t in self.calls if c is not call]

    @precondition(lambda self: self.calls)
    @rule(which=st.integers(0, 10))
    def abandon(self, which: int) -> None:
        """A call cancelled at close: what it did not finish is released."""
        call, todo = self.calls[which % len(self.calls)]
        self._finish(call, todo)

    def _check_order(self, seq: int, key: str | None) -> None:
        if not self.ordered or key is None:
            return
        for other, other_key, _ in self.log[: seq - 1]:
            if other_key == key:
                finished = (
                    other in self.done_now
                    or other in self.stored.dead
                    or any(op == "dead" and s == other for op, s, _ in self.sink.ops)
                )
                assert finished, f"event {seq} of key {key} ran before event {other}"
        for other, other_key, _ in self.log[seq:]:
            if other_key == key:
                assert other not in self.done_now, f"event {seq} of key {key} ran after {other}"

    # -- commits and crashes --------------------------------------------------------

    @rule()
    def commit(self) -> None:
        cursor, ranges = self.sched.take_acks()
        stored = self.stored
        for op, seq, attempt in self.sink.ops:
            if op == "retry":
                stored.retries[seq] = (attempt, False)
            elif op == "dead":
                stored.retries.pop(seq, None)
                stored.dead.add(seq)
            else:
                stored.retries.pop(seq, None)
                stored.done.add(seq)
        self.sink.ops.clear()
        for seq, n in self.failed_now.items():
            self.failed_attempts[seq] = self.failed_attempts.get(seq, 0) + n
        self.failed_now.clear()
        for lo, hi in ranges:
            stored.done.update(range(lo, hi + 1))
        if cursor > stored.cursor:
            for seq in range(stored.cursor + 1, cursor + 1):
                if seq not in stored.retries and seq not in stored.dead:
                    stored.done.add(seq)
            stored.cursor = cursor

    def _crash(self, delays: list[float] | None = None) -> None:
        """The process dies: uncommitted records are lost; every call inside a handler
        is charged one failed attempt (the call journal), then a new life starts."""
        stored = self.stored
        for entry in self.inside.values():
            seq = entry.seq
            if seq in self.done_now:
                continue
            self.deaths[seq] = self.deaths.get(seq, 0) + 1
            if seq in stored.retries:
                attempt, _ = stored.retries[seq]
                stored.retries[seq] = (attempt + 1, True)
            elif seq not in stored.done and seq not in stored.dead:
                stored.retries[seq] = (2, True)
        # A failed attempt whose record was not committed is forgotten with it: only
        # the failures the log holds count (its attempt is 1 + failures + deaths).
        for seq in self.failed_attempts:
            if seq in stored.retries:
                attempt, _ = stored.retries[seq]
                self.failed_attempts[seq] = attempt - 1 - self.deaths.get(seq, 0)
            elif seq not in stored.done and seq not in stored.dead:
                self.failed_attempts[seq] = 0
        self.inside = {}
        self.failed_now.clear()
        self._open(delays)

    @rule(delays=st.lists(st.sampled_from([0.0, 0.0, 0.3, 1.0]), min_size=1, max_size=4))
    def crash(self, delays: list[float]) -> None:
        self._crash(delays)

    # -- invariants -----------------------------------------------------------------

    @invariant()
    def the_committed_cursor_only_passes_finished_events(self) -> None:
        stored = getattr(self, "stored", None)
        if stored is None:
            return
        for seq in range(1, stored.cursor + 1):
            assert seq in stored.done or seq in stored.dead or seq in stored.retries, seq

    def teardown(self) -> None:
        """No more faults: run everything to the end; every event ends done or dead."""
        if not hasattr(self, "sched"):
            return
        for seq, key, behaviour in self.log:
            if behaviour == "kill":
                self.log[seq - 1] = (seq, key, "ok")
        for _ in range(2_000):
            self.read()
            while self.calls:
                call, todo = self.calls[0]
                if call in self.inside:
                    self.end(list(self.inside).index(call), False)
                elif todo:
                    self.begin(0)
                else:
                    self._finish(call, todo)
            progressed = False
            for lane in (MAIN, RETRY):
                call = self.sched.next_call(lane, self.now, 5)  # type: ignore[arg-type]
                if call is not None:
                    progressed = True
                    self._add_call(call)
                    if call.plain is not None:
                        self.skip_checks[call] = [self.sched.changes, False]
            self.commit()
            if not progressed and not self.calls:
                if self.sched.read_pos >= len(self.log) and self.sched.idle():
                    break
                self.now += 5.0
        else:
            raise AssertionError("the scheduler never settled")
        stored = self.stored
        for seq, _, _ in self.log:
            assert seq in stored.done or seq in stored.dead, f"event {seq} was lost"
            assert not (seq in stored.done and seq in stored.dead), seq
        assert not stored.retries


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(
    max_examples=int(os.environ.get("SCHEDULER_EXAMPLES", "200")),
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
