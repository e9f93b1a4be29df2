"""The dispatch scheduler, one behaviour at a time, on a fake clock and no event loop."""

from __future__ import annotations

import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from eventbus import BreakerPolicy, RetryPolicy
from eventbus.dispatch._scheduler import (
    MAIN,
    PARK,
    RETRY,
    RUN,
    STOP,
    Call,
    Entry,
    Scheduler,
)
from eventbus.failures import CircuitBreaker, Retry, RetryBudget, backoff_delay, decide


class Boom(Exception):
    pass


class RecordingSink:
    """Records what the scheduler asks the log to write."""

    def __init__(self) -> None:
        self.retried: list[tuple[int, int]] = []
        self.buried: list[int] = []
        self.done: list[int] = []

    def retry(self, entry: Entry, error: BaseException | None) -> None:
        self.retried.append((entry.seq, entry.attempt))

    def dead(self, entry: Entry, error: BaseException | None) -> None:
        self.buried.append(entry.seq)

    def settle(self, entry: Entry) -> None:
        self.done.append(entry.seq)


def scheduler(
    *,
    concurrency: int = 1,
    ordered: bool = True,
    retry: RetryPolicy | None = None,
    breaker: BreakerPolicy | None = None,
    cursor: int = 0,
    finished_ahead: list[tuple[int, int]] | None = None,
) -> tuple[Scheduler, RecordingSink]:
    sink = RecordingSink()
    policy = retry or RetryPolicy(max_attempts=3, initial_delay=1.0, jitter="none")
    sched = Scheduler(
        retry=policy,
        ordered=ordered,
        concurrency=concurrency,
        breaker=CircuitBreaker(breaker) if breaker else None,
        budget=RetryBudget(0.2, 10.0, 100.0, 0.0),
        sink=sink,
        cursor=cursor,
        finished_ahead=finished_ahead or [],
        rng=random.Random(1),
    )
    return sched, sink


def fresh(*keys: str | None, first: int = 1) -> list[Entry]:
    return [Entry(first + i, key, f"event {first + i}") for i, key in enumerate(keys)]


def run(
    sched: Scheduler, call: Call, fail: frozenset[int] | set[int] = frozenset(), now: float = 0.0
) -> list[int]:
    """Handle a call's events in order as a shell would; returns the seqs handled."""
    handled: list[int] = []
    todo = list(call.entries)
    while todo:
        entry = todo[0]
        verdict = sched.check(call, entry)
        if verdict == STOP:
            break
        todo.pop(0)
        if verdict == PARK:
            continue
        handled.append(entry.seq)
        if entry.seq in fail:
            sched.failed(call, entry, Boom(f"event {entry.seq}"), now)
        else:
            sched.succeeded(call, entry)
    sched.finish(call, now, todo)
    return handled


def test_later_events_of_a_key_wait_behind_its_retry_and_other_keys_pass() -> None:
    sched, sink = scheduler()
    sched.append(fresh("A"), 1)
    (a1,) = run(sched, sched.next_call(MAIN, 0.0, 10), fail={1})  # type: ignore[arg-type]
    assert a1 == 1
    assert sink.retried == [(1, 2)]
    sched.append(fresh("A", "X", "A", first=2), 4)  # A2, X, A3 in one read
    handled = run(sched, sched.next_call(MAIN, 0.0, 10))  # type: ignore[arg-type]
    assert handled == [3]  # X passes; A2 and A3 are parked behind A1
    assert sink.retried[1:] == [(2, 1), (4, 1)]
    assert sched.next_call(RETRY, 0.5) is None  # A1 is not due yet
    order = []
    now = 1.0
    while (call := sched.next_call(RETRY, now)) is not None:
        order += run(sched, call, now=now)
    assert order == [1, 2, 4]
    assert sink.done == [1, 2, 4]
    assert sched.idle()


def test_the_cursor_passes_only_a_finished_prefix_and_reports_done_ranges_ahead() -> None:
    sched, _ = scheduler(concurrency=3)
    sched.append(fresh("a", "b", "c", "d"), 4)
    slow = sched.next_call(MAIN, 0.0, 1)
    fast = sched.next_call(MAIN, 0.0, 3)
    assert slow is not None
    assert fast is not None
    assert [e.seq for e in slow.entries] == [1]
    run(sched, fast)
    assert sched.take_acks() == (0, [(2, 4)])  # 1 is still running
    run(sched, slow)
    assert sched.take_acks() == (4, [])


def test_two_calls_never_hold_one_key_and_a_held_event_follows_its_key() -> None:
    sched, _ = scheduler(concurrency=2)
    sched.append(fresh("a", "a", "b"), 3)
    first = sched.next_call(MAIN, 0.0, 1)
    second = sched.next_call(MAIN, 0.0, 5)
    assert first is not None
    assert second is not None
    assert [e.seq for e in first.entries] == [1]
    assert [e.seq for e in second.entries] == [3]  # a2 waits for a1's call
    assert sched.next_call(MAIN, 0.0, 5) is None
    run(sched, second)
    assert sched.next_call(MAIN, 0.0, 5) is None  # a2 still waits
    run(sched, first)
    third = sched.next_call(MAIN, 0.0, 5)
    assert third is not None
    assert [e.seq for e in third.entries] == [2]


def test_one_call_may_take_several_events_of_a_key_in_order() -> None:
    sched, _ = scheduler(concurrency=1)
    sched.append(fresh("a", "a", "a"), 3)
    call = sched.next_call(MAIN, 0.0, 10)
    assert call is not None
    assert [e.seq for e in call.entries] == [1, 2, 3]
    assert run(sched, call, fail={1}) == [1]  # a2 and a3 are parked behind a1
    assert sched.pending(0.0).parked == 2


def test_an_unordered_subscription_lets_later_events_of_a_key_pass() -> None:
    sched, _ = scheduler(ordered=False, concurrency=2)
    sched.append(fresh("a", "a"), 2)
    assert run(sched, sched.next_call(MAIN, 0.0, 1), fail={1}) == [1]  # type: ignore[arg-type]
    assert run(sched, sched.next_call(MAIN, 0.0, 1)) == [2]  # type: ignore[arg-type]


def test_a_suspect_runs_alone_and_the_main_lane_pauses_for_it() -> None:
    sched, _ = scheduler(concurrency=4)
    sched.append(fresh("x", "y"), 2)
    main = sched.next_call(MAIN, 0.0, 1)
    assert main is not None
    suspect = Entry.retry(10, "s", None, attempt=2, suspect=True)
    other = Entry.retry(11, "o", None, attempt=2)
    sched.recovered([suspect, other], 0.0)
    sched.append([], 11)
    assert sched.next_call(RETRY, 0.0) is None  # the main call is in flight
    assert sched.next_call(MAIN, 0.0, 1) is None  # the main lane pauses for the suspect
    run(sched, main)
    call = sched.next_call(RETRY, 0.0)
    assert call is not None
    assert call.suspect
    assert call.entries[0].seq == 10
    assert sched.next_call(RETRY, 0.0) is None  # nothing beside it
    assert sched.next_call(MAIN, 0.0, 1) is None
    run(sched, call)
    assert sched.next_call(RETRY, 0.0) is not None  # the other retry may go now
    assert sched.next_call(MAIN, 0.0, 1) is not None


def test_a_run_stops_when_a_suspect_becomes_due() -> None:
    sched, _ = scheduler()
    sched.append(fresh("a", "b", "c"), 3)
    call = sched.next_call(MAIN, 0.0, 3)
    assert call is not None
    sched.recovered([Entry.retry(9, "z", None, attempt=2, suspect=True)], 0.0)
    assert sched.check(call, call.entries[0]) == STOP
    sched.finish(call, 0.0, call.entries)
    assert sched.pending(0.0).buffered == 3  # released, not attempted


def test_an_event_past_its_last_attempt_is_dead_lettered_on_recovery() -> None:
    sched, sink = scheduler(retry=RetryPolicy(max_attempts=1))
    sched.recovered([Entry.retry(5, "a", None, attempt=2, suspect=True)], 0.0)
    assert sink.buried == [5]
    assert sched.idle()


def test_a_retry_that_ends_ahead_of_the_read_position_is_not_read_again() -> None:
    sched, sink = scheduler()
    sched.recovered([Entry.retry(3, None, None, attempt=2)], 0.0)
    call = sched.next_call(RETRY, 0.0)
    assert call is not None
    run(sched, call)
    assert sink.done == [3]
    sched.append(fresh("a", "b", "c"), 3)  # the log still holds 3 past the cursor
    handled = run(sched, sched.next_call(MAIN, 0.0, 10))  # type: ignore[arg-type]
    assert handled == [1, 2]


def test_events_finished_ahead_of_the_cursor_are_not_handled_again() -> None:
    sched, _ = scheduler(cursor=0, finished_ahead=[(2, 3), (5, 5)])
    sched.append(fresh("a", "b", "c", "d", "e"), 5)
    assert run(sched, sched.next_call(MAIN, 0.0, 10)) == [1, 4]  # type: ignore[arg-type]
    assert sched.take_acks()[0] == 5


def test_a_keyed_retry_past_the_read_position_waits_for_the_earlier_events_of_its_key() -> None:
    sched, _ = scheduler()
    sched.recovered([Entry.retry(3, "a", None, attempt=2)], 0.0)
    assert sched.next_call(RETRY, 0.0) is None  # events 1..2 are not read yet
    sched.append(fresh("a", "b", "a"), 3)  # 3 itself is skipped: the retry lane holds it
    # Event 1 (key a) joined the retry lane ahead of 3; b is fresh.
    order = []
    while (call := sched.next_call(RETRY, 0.0)) is not None:
        order += run(sched, call)
    assert order == [1, 3]
    assert run(sched, sched.next_call(MAIN, 0.0, 10)) == [2]  # type: ignore[arg-type]


def test_an_older_event_handed_back_goes_ahead_of_its_key() -> None:
    sched, _sink = scheduler()
    sched.append(fresh("a", first=1), 5)
    run(sched, sched.next_call(MAIN, 0.0, 1), fail={1})  # type: ignore[arg-type]
    call = sched.next_call(RETRY, 1.0)
    assert call is not None  # the attempt of 1 runs...
    sched.recovered([Entry.retry(0, "a", None, attempt=1)], 1.0)  # ...and 0 is redriven
    assert sched.next_call(RETRY, 1.0) is None  # key a is taken by the running attempt
    assert run(sched, call, fail={1}, now=1.0) == [1]
    order = []
    now = 10.0
    while (call := sched.next_call(RETRY, now)) is not None:
        order += run(sched, call, now=now)
    assert order == [0, 1]


def test_abandoned_events_return_in_order_with_their_attempt_unchanged() -> None:
    sched, _ = scheduler()
    sched.append(fresh("a", "b", "c"), 3)
    call = sched.next_call(MAIN, 0.0, 3)
    assert call is not None
    sched.finish(call, 0.0, call.entries)
    again = sched.next_call(MAIN, 0.0, 3)
    assert again is not None
    assert [(e.seq, e.attempt) for e in again.entries] == [(1, 1), (2, 1), (3, 1)]


def test_events_held_behind_a_call_go_back_ahead_of_later_events_of_their_key() -> None:
    """Regression, found by the chaos harness at concurrency 16 (a suspect came due and
    stopped the calls in flight): a call released unattempted put its events back at
    the front and the events held behind it at the back; an event of the key held
    again behind the next owner then went back behind them, and ran after them."""
    sched, _ = scheduler(concurrency=4)
    sched.append(fresh("k", "k", "y", "k", "x"), 5)
    first = sched.next_call(MAIN, 0.0, 3)
    assert first is not None
    assert [e.seq for e in first.entries] == [1, 2, 3]  # owns k and y
    other = sched.next_call(MAIN, 0.0, 5)
    assert other is not None
    assert [e.seq for e in other.entries] == [5]  # k4 is held behind the first call
    sched.finish(first, 0.0, first.entries)  # stopped before its first event: released
    owner = sched.next_call(MAIN, 0.0, 1)
    assert owner is not None
    assert [e.seq for e in owner.entries] == [1]
    holder = sched.next_call(MAIN, 0.0, 1)
    assert holder is not None
    assert [e.seq for e in holder.entries] == [3]  # k2 is held behind k1's call
    assert run(sched, owner) == [1]
    rest = sched.next_call(MAIN, 0.0, 5)
    assert rest is not None
    assert [e.seq for e in rest.entries if e.key == "k"] == [2, 4]


def test_the_breaker_stops_calls_then_lets_one_probe() -> None:
    policy = BreakerPolicy(failure_ratio=0.5, min_calls=2, window=10.0, cooldown=5.0)
    sched, _ = scheduler(
        breaker=policy, retry=RetryPolicy(max_attempts=9, initial_delay=100.0, max_delay=100.0)
    )
    sched.append(fresh("a", "b", "c", "d", "e"), 5)
    call = sched.next_call(MAIN, 0.0, 5)
    assert call is not None
    assert run(sched, call, fail={1, 2}) == [1, 2]  # the breaker opened: the run stopped
    assert sched.next_call(MAIN, 1.0, 5) is None
    assert sched.next_wakeup(1.0) == pytest.approx(5.0)
    probe = sched.next_call(MAIN, 5.0, 5)
    assert probe is not None
    assert probe.probe
    assert len(probe.entries) == 1
    assert sched.next_call(MAIN, 5.0, 5) is None  # one probe at a time
    run(sched, probe, now=5.0)
    assert sched.next_call(MAIN, 5.0, 5) is not None  # closed again


def test_a_healthy_subscription_never_needs_the_timer() -> None:
    sched, _ = scheduler()
    for i in range(5):
        sched.append(fresh("a", "b", first=2 * i + 1), 2 * i + 2)
        run(sched, sched.next_call(MAIN, 0.0, 10))  # type: ignore[arg-type]
    assert sched.next_wakeup(0.0) is None
    assert not sched.retry_changed


def test_retries_that_succeed_give_their_budget_back() -> None:
    budget = RetryBudget(ratio=0.0, floor_per_second=1.0, burst=3.0, now=0.0)
    for _ in range(100):
        assert budget.take(0.0)
        budget.refund()
    assert budget.take(0.0)
    assert budget.take(0.0)
    assert budget.take(0.0)
    assert not budget.take(0.0)  # failing retries keep their tokens: the floor holds


def test_decorrelated_jitter_grows_from_the_previous_delay() -> None:
    policy = RetryPolicy(max_attempts=20, initial_delay=0.1, max_delay=100.0, jitter="decorrelated")
    rng = random.Random(3)
    delay = 0.0
    delays = []
    for attempt in range(1, 9):
        decision = decide(policy, attempt, Boom(), delay, rng)
        assert isinstance(decision, Retry)
        delay = decision.delay
        delays.append(delay)
    assert max(delays[4:]) > 10 * policy.initial_delay
    assert backoff_delay(policy, 1, 50.0, rng) >= policy.initial_delay


def test_the_scheduler_itself_remembers_each_events_previous_delay() -> None:
    policy = RetryPolicy(max_attempts=9, initial_delay=0.1, max_delay=100.0, jitter="decorrelated")
    sched, _ = scheduler(retry=policy)
    sched.append(fresh("a"), 1)
    run(sched, sched.next_call(MAIN, 0.0, 1), fail={1})  # type: ignore[arg-type]
    now = 0.0
    delays = []
    for _ in range(7):
        now += 1000.0
        call = sched.next_call(RETRY, now)
        assert call is not None
        entry = call.entries[0]
        run(sched, call, fail={1}, now=now)
        delays.append(entry.delay)
    assert max(delays) > 1.0  # would stay below 0.3 if the previous delay were forgotten


def test_handing_back_an_event_the_retry_lane_holds_changes_nothing() -> None:
    sched, sink = scheduler()
    sched.append(fresh("a"), 1)
    run(sched, sched.next_call(MAIN, 0.0, 1), fail={1})  # type: ignore[arg-type]
    sched.recovered([Entry.retry(1, "a", None, attempt=1)], 0.0)  # a redrive races
    calls = 0
    now = 5.0
    while (call := sched.next_call(RETRY, now)) is not None:
        assert call.entries[0].attempt == 2
        run(sched, call, now=now)
        calls += 1
    assert calls == 1
    assert sink.done == [1]


def test_an_event_queued_behind_an_older_one_waits_while_the_older_one_retries() -> None:
    sched, _ = scheduler(retry=RetryPolicy(max_attempts=5, initial_delay=1.0, jitter="none"))
    sched.append(fresh("a", first=1), 5)
    run(sched, sched.next_call(MAIN, 0.0, 1), fail={1})  # type: ignore[arg-type]
    running = sched.next_call(RETRY, 1.0)
    assert running is not None
    sched.recovered([Entry.retry(0, "a", None, attempt=1)], 1.0)  # older, handed back
    run(sched, running, fail={1}, now=1.0)  # 1 fails again while 0 waits ahead of it
    order = []
    now = 1.0
    failed_once = False
    for _ in range(20):
        now += 10.0
        while (call := sched.next_call(RETRY, now)) is not None:
            seq = call.entries[0].seq
            fail = {0} if seq == 0 and not failed_once else set()
            failed_once = failed_once or bool(fail)
            order += run(sched, call, fail=fail, now=now)
    assert order == [0, 0, 1]


def test_retries_that_succeed_drain_at_handler_speed_not_at_the_budget_floor() -> None:
    policy = RetryPolicy(max_attempts=3, initial_delay=0.0, budget_ratio=0.0, budget_floor=0.001)
    sink = RecordingSink()
    sched = Scheduler(
        retry=policy,
        ordered=True,
        concurrency=1,
        breaker=None,
        budget=RetryBudget(0.0, 0.001, 2.0, 0.0),
        sink=sink,
        cursor=0,
    )
    sched.recovered([Entry.retry(i, f"k{i}", None, attempt=2) for i in range(1, 101)], 0.0)
    sched.append([], 100)
    while (call := sched.next_call(RETRY, 0.0)) is not None:
        run(sched, call)
    assert len(sink.done) == 100  # no time passed: each success gave its token back


def test_an_abandoned_retry_attempt_is_due_again_with_its_attempt_unchanged() -> None:
    sched, _ = scheduler()
    sched.recovered([Entry.retry(1, "a", None, attempt=2)], 0.0)
    sched.append([], 1)
    call = sched.next_call(RETRY, 0.0)
    assert call is not None
    sched.finish(call, 5.0, call.entries)  # the bus closed during the attempt
    again = sched.next_call(RETRY, 5.0)
    assert again is not None
    assert (again.entries[0].seq, again.entries[0].attempt) == (1, 2)


def test_a_redriven_event_of_a_key_in_a_main_call_waits_for_that_call() -> None:
    sched, _ = scheduler()
    sched.append(fresh("a", "b", first=2), 3)
    main = sched.next_call(MAIN, 0.0, 1)
    assert main is not None
    assert main.entries[0].key == "a"
    sched.recovered([Entry.retry(1, "a", None, attempt=1)], 0.0)  # redriven
    assert sched.next_call(RETRY, 0.0) is None  # key a is in the main call
    assert sched.next_wakeup(0.0) is None  # nothing to wait for but that call
    run(sched, main)
    assert sched.retry_changed
    call = sched.next_call(RETRY, 0.0)
    assert call is not None
    assert call.entries[0].seq == 1


def test_the_timer_waits_for_the_budget_when_due_retries_have_no_token() -> None:
    policy = RetryPolicy(max_attempts=5, initial_delay=0.0, budget_ratio=0.0, budget_floor=2.0)
    sink = RecordingSink()
    sched = Scheduler(
        retry=policy,
        ordered=False,
        concurrency=1,
        breaker=None,
        budget=RetryBudget(0.0, 2.0, 1.0, 0.0),
        sink=sink,
        cursor=0,
    )
    sched.recovered([Entry.retry(i, None, None, attempt=2) for i in (1, 2)], 0.0)
    first = sched.next_call(RETRY, 0.0)
    assert first is not None  # the one token
    run(sched, first, fail={1})
    assert sched.next_call(RETRY, 0.0) is None
    assert sched.next_wakeup(0.0) == pytest.approx(0.5)  # one token at 2 per second
    pending = sched.pending(0.0)
    assert (pending.retries_waiting, pending.retries_due, pending.waiting_for_budget) == (
        2,
        2,
        True,
    )
    assert sched.next_call(RETRY, 0.5) is not None


def test_pending_says_what_waits_and_what_is_parked() -> None:
    sched, _ = scheduler(retry=RetryPolicy(max_attempts=5, initial_delay=10.0, jitter="none"))
    sched.append(fresh("a", "a", "b"), 3)
    call = sched.next_call(MAIN, 0.0, 1)
    assert call is not None
    run(sched, call, fail={1})
    sched.append([], 3)
    other = sched.next_call(MAIN, 0.0, 5)
    assert other is not None
    run(sched, other)
    pending = sched.pending(1.0)
    assert (pending.retries_waiting, pending.retries_due, pending.parked) == (1, 0, 1)
    assert pending.next_due == pytest.approx(10.0)
    assert repr(call.entries[0]) == "Entry(seq=1, key='a', attempt=2)"


def test_an_older_event_recovered_ahead_of_a_waiting_head_runs_first() -> None:
    sched, _ = scheduler()
    sched.recovered([Entry.retry(3, "a", None, attempt=2)], 0.0)
    sched.recovered([Entry.retry(2, "a", None, attempt=2)], 0.0)  # older, later
    sched.append([], 3)
    order = []
    while (call := sched.next_call(RETRY, 0.0)) is not None:
        order += run(sched, call)
    assert order == [2, 3]
    assert sched.idle()


def test_a_fresh_event_taken_before_an_older_one_is_redriven_waits_behind_it() -> None:
    sched, sink = scheduler()
    sched.append(fresh("a", first=5), 5)
    main = sched.next_call(MAIN, 0.0, 1)
    assert main is not None
    sched.recovered([Entry.retry(1, "a", None, attempt=1)], 0.0)  # redriven
    assert run(sched, main) == []  # 5 is parked behind 1 instead of running
    assert sink.retried[-1] == (5, 1)
    order = []
    now = 0.0
    for _ in range(10):
        now += 10.0
        while (call := sched.next_call(RETRY, now)) is not None:
            order += run(sched, call, now=now)
    assert order == [1, 5]


@pytest.mark.parametrize("concurrency", [1, 3])
def test_a_key_entering_the_retry_lane_takes_its_buffered_events_with_it(
    concurrency: int,
) -> None:
    # A1 fails while A2 waits in the buffer; A3 is read after the failure. The lane
    # must hold A2 ahead of A3, or A3 is released when A1 ends and runs before A2
    # (found by the chaos harness: one key's backlog handled ahead of its older events).
    sched, sink = scheduler(concurrency=concurrency)
    sched.append(fresh("A", "A", "X", "X", "X"), 5)  # A1, A2, X...
    call = sched.next_call(MAIN, 0.0, 1)
    assert call is not None
    assert [e.seq for e in call.entries] == [1]
    run(sched, call, fail={1})  # A1 enters the retry lane; A2 was still buffered
    assert (2, 1) in sink.retried  # A2 parked behind it, in the log too
    sched.append(fresh("A", first=6), 6)  # A3, read after the failure
    order: list[int] = []
    now = 1.0
    while not sched.idle():
        for lane in (RETRY, MAIN):
            while (call := sched.next_call(lane, now, 1)) is not None:
                order += [seq for seq in run(sched, call, now=now) if seq in (1, 2, 6)]
        now += 1.0
    assert order == [1, 2, 6]
    assert sched.take_acks()[0] == 6


@settings(max_examples=500, deadline=None)
@given(
    keys=st.lists(st.sampled_from("AX"), min_size=2, max_size=10),
    fail_once=st.sets(st.integers(1, 6), max_size=3),
    reads=st.lists(st.integers(0, 4), min_size=1, max_size=10),
    take=st.integers(1, 2),
    concurrency=st.sampled_from([1, 3]),
)
# A1 fails with A4 buffered behind X2, X3; A5 is read while A1 waits: A5 must not
# run before A4 once A1 is done.
@example(keys=list("AXXAA"), fail_once={1}, reads=[4, 1], take=1, concurrency=1)
def test_key_order_holds_when_the_retry_lane_always_goes_first(
    keys: list[str], fail_once: set[int], reads: list[int], take: int, concurrency: int
) -> None:
    """The adversarial schedule: the retry lane runs whatever it may before the main
    lane takes anything, retries come due while the main lane works through its
    buffer, and the log is read a few events at a time. Events of a key
    succeed in log order, each once, whichever events fail their first attempt."""
    policy = RetryPolicy(max_attempts=3, initial_delay=1.0, jitter="none")
    sched, _ = scheduler(concurrency=concurrency, retry=policy)
    log = fresh(*keys)
    pos = 0  # events read so far
    chunks = iter(reads)
    done: list[int] = []
    now = 0.0

    def read(n: int) -> None:
        nonlocal pos
        n = min(n, len(log) - pos, sched.room(8))
        if n > 0:
            sched.append(log[pos : pos + n], pos + n)
            pos += n

    for _ in range(1_000):
        if sched.idle() and pos == len(log):
            break
        read(next(chunks, 0))  # the shell reads between calls, while work is buffered
        call = sched.next_call(RETRY, now) or sched.next_call(MAIN, now, take)
        if call is None:
            if pos < len(log):
                read(len(log))
            else:
                now += 1.0
            continue
        todo = list(call.entries)
        while todo:
            entry = todo.pop(0)
            verdict = sched.check(call, entry)
            if verdict == STOP:
                todo.insert(0, entry)
                break
            if verdict == PARK:
                continue
            if entry.seq in fail_once and entry.attempt == 1:
                sched.failed(call, entry, Boom(f"event {entry.seq}"), now)
            else:
                sched.succeeded(call, entry)
                done.append(entry.seq)
        sched.finish(call, now, todo)
        now += 0.5  # each call takes a while: retries come due between main calls
    assert sorted(done) == [e.seq for e in log], "an event was lost or handled twice"
    for key in set(keys):
        mine = [seq for seq in done if keys[seq - 1] == key]
        assert mine == sorted(mine), f"key {key} ran out of order: {mine}"


class _Plain:
    """A plain event (Scheduler.append_plain) as the shell reads it."""

    __slots__ = ("key", "seq")

    def __init__(self, seq: int, key: str | None) -> None:
        self.seq = seq
        self.key = key


def _drive(
    plain: bool,
    keys: list[str | None],
    fail_once: set[int],
    ops: list[tuple[str, int]],
    ordered: bool,
) -> list[object]:
    """Run a script of reads, calls, handled events, retries and commits, with events
    read plain or as entries, as the shell would; returns what could be observed:
    the calls handed out, the events handled, the records and acknowledgements."""
    sched, sink = scheduler(ordered=ordered)
    trace: list[object] = []
    now = 0.0
    calls: list[tuple[Call, list[object], list[int]]] = []  # call, todo, changes seen
    redriven: set[int] = set()
    for op, arg in ops:
        if op == "call" and not sched.buffered:
            op, arg = "read", arg + 2  # as the shell reads when nothing is buffered
        if op == "redrive":
            # An event not read yet enters the retry lane (handed back by
            # reconciliation): its key's buffered events join it.
            seq = sched.read_pos + 1 + arg
            if seq <= len(keys) and seq not in redriven:
                redriven.add(seq)
                sched.recovered([Entry.retry(seq, keys[seq - 1], None, attempt=2)], now)
        elif op in ("read", "logread"):
            pos = sched.read_pos
            n = min(arg, len(keys) - pos, sched.room(6))
            if n > 0:
                seqs = range(pos + 1, pos + n + 1)
                if plain and op == "read":
                    sched.append_plain([_Plain(s, keys[s - 1]) for s in seqs], pos + n)
                else:
                    sched.append([Entry(s, keys[s - 1], None) for s in seqs], pos + n)
        elif op == "call":
            lane = MAIN if arg % 2 else RETRY
            call = sched.next_call(lane, now, 1 + arg % 4)
            if call is not None:
                events: list[object] = list(call.plain if call.plain is not None else call.entries)
                trace.append(("call", lane, [e.seq for e in events]))  # type: ignore[attr-defined]
                calls.append((call, events, [sched.changes, 0]))
        elif op == "handle" and calls:
            call, todo, seen = calls[arg % len(calls)]
            if not todo:
                sched.finish(call, now, [e for e in todo if isinstance(e, Entry)])
                calls.remove((call, todo, seen))
                continue
            event = todo[0]
            if isinstance(event, _Plain) and sched.changes != seen[0]:
                # Something changed: the rest get entries, checked from here on.
                todo[:] = sched.convert(call)
                seen[1] = 1
                event = todo[0]
            if isinstance(event, _Plain):
                todo.pop(0)
                if event.seq in fail_once:
                    fail_once.discard(event.seq)
                    todo.insert(0, event)
                    todo[:] = sched.convert(call)
                    seen[1] = 1
                    entry = todo.pop(0)
                    assert isinstance(entry, Entry)
                    trace.append(("failed", entry.seq))
                    sched.failed(call, entry, Boom(), now)
                else:
                    trace.append(("handled", event.seq))
                    call.done += 1
                continue
            assert isinstance(event, Entry)
            if call.lane == MAIN and not seen[1] and sched.changes == seen[0]:
                verdict = RUN
            else:
                seen[1] = 1
                verdict = sched.check(call, event)
            if verdict == STOP:
                sched.finish(call, now, [e for e in todo if isinstance(e, Entry)])
                calls.remove((call, todo, seen))
                continue
            todo.pop(0)
            if verdict == PARK:
                continue
            if event.seq in fail_once and event.attempt == 1:
                fail_once.discard(event.seq)
                trace.append(("failed", event.seq))
                sched.failed(call, event, Boom(), now)
            else:
                trace.append(("handled", event.seq))
                sched.succeeded(call, event)
        elif op == "abandon" and calls:
            call, todo, seen = calls.pop(arg % len(calls))
            sched.finish(call, now, [e for e in todo if isinstance(e, Entry)])
        elif op == "time":
            now += arg
        elif op == "commit":
            trace.append(("acks", sched.take_acks(), sink.retried[:], sink.done[:]))
    trace.append(("end", sched.take_acks(), sched.buffered, sched.pending(now).parked))
    return trace


@settings(max_examples=1000, deadline=None)
@given(
    keys=st.lists(st.sampled_from(["A", "B", None]), min_size=1, max_size=12),
    fail_once=st.sets(st.integers(1, 12), max_size=3),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["read", "call", "call", "handle", "handle", "handle", "abandon"])
            | st.sampled_from(["time", "commit", "redrive", "logread"]),
            st.integers(0, 5),
        ),
        min_size=10,
        max_size=80,
    ),
    ordered=st.booleans(),
)
def test_plain_events_give_the_calls_records_and_acks_that_entries_give(
    keys: list[str | None], fail_once: set[int], ops: list[tuple[str, int]], ordered: bool
) -> None:
    """Events read plain (no entry each until one is needed) are handed out, retried,
    parked, given back and acknowledged exactly as the same events read as entries."""
    assert _drive(True, keys, set(fail_once), ops, ordered) == _drive(
        False, keys, set(fail_once), ops, ordered
    )
