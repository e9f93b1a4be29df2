"""After a crash, a key whose backlog is parked in the retry lane must not hold up a
suspect of another key, nor, through it, the main lane.

Found by the chaos harness (now fixed: a released event is due at the time it is
released) on a consumer-only run over a deep backlog: between kills,
``settle`` handled one suspect per run and then, one event per call, the whole
backlog of that suspect's key, with the main lane paused. A released parked event is
due at 0.0 ("at once"), so it sorts ahead of every suspect (due at recovery time);
the next suspect waits for the whole chain, and while a suspect is due the main lane
pauses. Guarantee 6 says a failing event delays other keys by one batch at most.
"""

from __future__ import annotations

from eventbus.dispatch._scheduler import MAIN, RETRY, Call, Entry

from .test_scheduler import run, scheduler


def _recovered(seq: int, key: str, now: float, *, suspect: bool = False) -> Entry:
    """An event of the retry lane as the shell recovers it: due now."""
    entry = Entry.retry(seq, key, None, attempt=2, suspect=suspect)
    entry.due = now
    return entry


def test_a_parked_backlog_of_one_key_holds_up_neither_a_suspect_nor_other_keys() -> None:
    now = 100.0
    sched, _ = scheduler(concurrency=1)
    # a1 waits for an ordinary retry, b5 was running when the process died.
    sched.recovered([_recovered(1, "a", now), _recovered(5, "b", now, suspect=True)], now)
    # The backlog: a's events park behind a1; c never failed.
    a_backlog = [2, 3, 4, *range(6, 40, 2)]
    c_events = list(range(7, 40, 2))
    backlog = sorted([*a_backlog, *c_events])
    sched.append([Entry(s, "a" if s in a_backlog else "c", None) for s in backlog], 39)
    handled: list[int] = []
    for _ in range(200):
        # The retry lane and a main worker run side by side, as the shell's tasks do.
        calls: list[Call | None] = [sched.next_call(RETRY, now), sched.next_call(MAIN, now, 4)]
        if not any(calls):
            break
        for call in calls:
            if call is not None:
                handled += run(sched, call, now=now)
        now += 0.01
    assert sorted(handled) == list(range(1, 40))
    last_a = handled.index(a_backlog[-1])
    assert handled.index(5) < handled.index(a_backlog[2]), "the suspect waited for key a"
    assert all(handled.index(c) < last_a for c in c_events), "key c waited for key a"
