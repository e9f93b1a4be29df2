"""SIGKILL of real consumer processes, inside handlers and inside acknowledgement
commits, checked against a recomputation from the log.

README, Exactly-once effects: "everything a handler changes inside the bus commits in
the same transaction as the event's acknowledgement"; `ctx.state`: "a crash mid-batch
leaves no trace of the batch; its redelivery applies every change once";
`ctx.publish`: "Downstream events commit with the acknowledgement".
Guarantee 5: order per key "whatever ... the crashes".

README, Retries and dead letters: "On the next open, exactly the events whose call was
running are counted as failed once (`eventbus.ProcessDied`); events that were only
buffered, or whose call had ended, are not blamed."
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from eventbus import BatchPolicy, Bus, BusConfig, Context, Event, RetryPolicy
from tests.attack._proc import Worker

EVENTS = 3000
KEYS = 12
KILLS = 20
ROUNDS = 4
CONFIG = BusConfig(reconcile_interval=0)


@dataclass
class Books:
    orders: list[tuple[str, str, int, int]]  # id, key, index, amount
    outbox: dict[str, Counter[str]]  # subscription -> source event id -> count
    state: dict[str, dict[str, dict[str, int]]]  # subscription -> key -> folded state
    dead: int
    lost: dict[str, int]
    kills: int
    # what the handlers saw, in every run: an event of a key called while an earlier
    # event of its key was not yet folded into the key's state
    seen_out_of_order: list[str]
    # two calls of one key running at once, as the handler saw it
    overlaps: list[str]


async def _read_books(
    path: Path, kills: int, seen_out_of_order: list[str], overlaps: list[str]
) -> Books:
    orders: list[tuple[str, str, int, int]] = []
    outbox: dict[str, Counter[str]] = {"acc": Counter(), "agg": Counter()}
    async with Bus.open(path, config=CONFIG) as bus:

        @bus.subscribe("orders", name="check-orders", batch=BatchPolicy(mode="natural"))
        async def read_orders(events: list[Event[dict[str, int]]], ctx: Context) -> None:
            orders.extend((e.id, e.key or "?", e.payload["i"], e.payload["amount"]) for e in events)

        @bus.subscribe("acc-out", name="check-acc", batch=BatchPolicy(mode="natural"))
        async def read_acc(events: list[Event[dict[str, str]]], ctx: Context) -> None:
            outbox["acc"].update(e.payload["src"] for e in events)

        @bus.subscribe("agg-out", name="check-agg", batch=BatchPolicy(mode="natural"))
        async def read_agg(events: list[Event[dict[str, str]]], ctx: Context) -> None:
            outbox["agg"].update(e.payload["src"] for e in events)

        await bus.drain(timeout=120)
        state = {
            name: {k: v async for k, v in bus.state(name).items()}  # type: ignore[misc]
            for name in ("acc", "agg")
        }
        dead = await bus.dead_letters.count()
        report = await bus.reconcile(repair=False)
        lost = {s.name: s.lost for s in report.subscriptions if s.lost}  # type: ignore[attr-defined]
    return Books(orders, outbox, state, dead, lost, kills, seen_out_of_order, overlaps)  # type: ignore[arg-type]


def _kill_round(path: Path, seed: int) -> Books:
    """Publish everything, then consumer-only workers killed at random moments, then
    one left to finish; returns the books read back from the log."""
    publisher = Worker("publish", str(path), str(EVENTS), str(KEYS))
    publisher.wait_for(lambda line: line == "published", timeout=60)
    assert publisher.finish(timeout=30) == 0, publisher.stderr

    rng = random.Random(seed)
    kills = 0
    out_of_order: list[str] = []
    overlaps: list[str] = []
    for run in range(KILLS):
        worker = Worker("consume", str(path))
        lines = worker.wait_for(_count_to(rng.randint(1, 300)), timeout=120)
        if lines[-1] != "drained":
            # A random offset after a handler's line: the kill lands inside another
            # handler call, between calls or inside a commit of acknowledgements.
            time.sleep(rng.random() * 0.02)
            worker.kill()
            kills += 1
        lines += worker.rest()
        out_of_order += [f"run {run}: {line}" for line in lines if "out-of-order" in line]
        overlaps += [f"run {run}: {line}" for line in lines if line.startswith("overlap")]
        if lines[-1] == "drained":
            assert worker.finish(timeout=30) == 0, worker.stderr
            break
    final = Worker("consume", str(path))
    lines = final.wait_for(lambda line: line == "drained", timeout=300)
    out_of_order += [f"final run: {line}" for line in lines if "out-of-order" in line]
    overlaps += [f"final run: {line}" for line in lines if line.startswith("overlap")]
    assert final.finish(timeout=60) == 0, final.stderr
    return asyncio.run(_read_books(path, kills, out_of_order, overlaps))


@pytest.fixture(scope="module")
def rounds(tmp_path_factory: pytest.TempPathFactory) -> list[Books]:
    """ROUNDS independent logs, each through KILLS kills: a kill lands somewhere
    different each time, so several rounds look at more of the moments that matter."""
    return [
        _kill_round(tmp_path_factory.mktemp(f"kill{n}") / "log.db", seed=20240607 + n)
        for n in range(ROUNDS)
    ]


def _count_to(target: int):  # type: ignore[no-untyped-def]
    """A predicate true at `drained` or at the `target`-th line a handler printed."""
    seen = [0]

    def reached(line: str) -> bool:
        if line == "drained":
            return True
        if line.startswith(("a ", "b ")):
            seen[0] += 1
        return seen[0] >= target

    return reached


def _expected(books: Books) -> dict[str, dict[str, int]]:
    want: dict[str, dict[str, int]] = defaultdict(
        lambda: {"count": 0, "sum": 0, "last": -1, "bad": 0}
    )
    for _, key, idx, amount in books.orders:
        st = want[key]
        st["count"] += 1
        st["sum"] += amount
        st["last"] = max(st["last"], idx)
    return dict(want)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ctx_state_is_applied_exactly_once_per_event_across_kill_9(rounds: list[Books]) -> None:
    for n, books in enumerate(rounds):
        assert books.kills >= KILLS // 2, f"round {n}: the workers finished before most kills"
        assert len(books.orders) == EVENTS
        want = {k: (v["count"], v["sum"]) for k, v in _expected(books).items()}
        for name in ("acc", "agg"):
            got = {k: (v["count"], v["sum"]) for k, v in books.state[name].items()}
            assert got == want, f"round {n}, subscription {name}: (count, sum) per key"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_outbox_events_are_published_exactly_once_per_event_across_kill_9(
    rounds: list[Books],
) -> None:
    for n, books in enumerate(rounds):
        ids = {o[0] for o in books.orders}
        for name in ("acc", "agg"):
            twice = {i: c for i, c in books.outbox[name].items() if c != 1}
            missing = ids - set(books.outbox[name])
            strays = set(books.outbox[name]) - ids
            assert (len(missing), len(twice), len(strays)) == (0, 0, 0), (
                f"round {n}, subscription {name}",
                sorted(missing)[:5],
                list(twice.items())[:5],
            )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_events_of_one_key_keep_publish_order_across_kill_9(rounds: list[Books]) -> None:
    # What the handlers saw (in every run, killed or not), then what the bus committed.
    seen = [f"round {n}, {line}" for n, b in enumerate(rounds) for line in b.seen_out_of_order]
    assert seen == [], "\n".join(seen)
    for n, books in enumerate(rounds):
        want = {k: (v["last"], 0) for k, v in _expected(books).items()}
        for name in ("acc", "agg"):
            got = {k: (v["last"], v["bad"]) for k, v in books.state[name].items()}
            assert got == want, f"round {n}, subscription {name}: (last index, out of order)"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_events_of_one_key_never_run_at_once_across_kill_9(rounds: list[Books]) -> None:
    seen = [f"round {n}, {line}" for n, b in enumerate(rounds) for line in b.overlaps]
    assert seen == [], "\n".join(seen)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_logged_event_ends_handled_across_kill_9(rounds: list[Books]) -> None:
    assert [(b.dead, b.lost) for b in rounds] == [(0, {})] * len(rounds)


# -- crash blame ---------------------------------------------------------------------

BACKLOG = 3000
BLOCK_FROM = 200


async def _finish_blame(
    path: Path, max_attempts: int = 1
) -> tuple[set[int], dict[int, str], Counter[int]]:
    handled: Counter[int] = Counter()
    async with Bus.open(path, config=CONFIG) as bus:
        retry = RetryPolicy(max_attempts=max_attempts)

        @bus.subscribe("jobs", name="victim", retry=retry, breaker=None, concurrency=4)
        async def victim(event: Event[dict[str, int]], ctx: Context) -> None:
            handled[event.seq] += 1

        await bus.drain(timeout=120)
        dead = {d.event.seq: d.error_type async for d in bus.dead_letters.iter()}
    return set(handled) | set(dead), dead, handled


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("kind", "concurrency"), [("event", 1), ("event", 4), ("batch", 2)])
def test_a_death_blames_only_the_events_whose_call_was_running(
    tmp_path: Path, kind: str, concurrency: int
) -> None:
    path = tmp_path / "log.db"
    worker = Worker("blame", str(path), str(BACKLOG), str(concurrency), kind, str(BLOCK_FROM))
    running: set[int] = set()
    ended: set[int] = set()
    calls = 0
    while calls < concurrency:
        line = worker.wait_for(lambda line: line.startswith(("start", "done")), timeout=60)[-1]
        verb, *seqs = (w for w in line.split() if not w.startswith("attempt="))
        if verb == "start":
            running.update(map(int, seqs))
            calls += 1
        else:
            ended.update(map(int, seqs))
    # `concurrency` calls are in flight, each blocked for good: nothing else can start.
    worker.kill()

    seen, dead, handled = asyncio.run(_finish_blame(path))
    # Handled before the kill (acknowledged or not), or after it, or dead-lettered.
    assert len(seen | ended) == BACKLOG, "an event ended neither handled nor dead-lettered"
    assert sorted(dead) == sorted(running), (
        f"{len(running)} events had their call running when the process died; "
        f"dead-lettered: {len(dead)}, of which queued or finished: "
        f"{sorted(set(dead) - running)[:10]}"
    )
    assert all("ProcessDied" in t for t in dead.values()), set(dead.values())
    assert not (set(handled) & running), "a dead-lettered event was handled as well"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_second_death_counts_only_against_the_call_that_was_running_the_second_time(
    tmp_path: Path,
) -> None:
    # Run 1: four calls hang and the process is killed (four suspects, one death each).
    # Run 2: one call at a time, every call hangs; killed as soon as one has started.
    # With max_attempts=2, exactly the events that were running at both deaths may be
    # dead-lettered; every other one, suspects included, must be handled.
    path = tmp_path / "log.db"
    first = Worker("blame", str(path), str(BACKLOG), "4", "event", str(BLOCK_FROM), "2")
    running_at: list[set[int]] = [set()]
    ended: set[int] = set()
    while len(running_at[0]) < 4:
        for line in first.wait_for(lambda line: line.startswith("start"), timeout=60):
            verb, seq, *_ = line.split()
            (running_at[0] if verb == "start" else ended).add(int(seq))
    first.kill()

    second = Worker("blame", str(path), "0", "1", "event", "0", "2")
    lines = second.wait_for(lambda line: line.startswith("start"), timeout=60)
    second.kill()
    lines += second.rest()
    starts = [line for line in lines if line.startswith("start")]
    # One call at a time, and it hangs: exactly one started before the kill.
    assert len(starts) == 1, starts
    running_at.append({int(starts[0].split()[1])})

    seen, dead, _ = asyncio.run(_finish_blame(path, max_attempts=2))
    assert len(seen | ended) == BACKLOG, "an event ended neither handled nor dead-lettered"
    died_twice = running_at[0] & running_at[1]
    assert sorted(dead) == sorted(died_twice), (
        f"running at the first death: {sorted(running_at[0])}, at the second: "
        f"{sorted(running_at[1])} ({starts[0]}); dead-lettered: {sorted(dead)}"
    )


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_death_does_not_blame_an_event_waiting_in_the_retry_lane_nor_those_parked_behind_it(
    tmp_path: Path,
) -> None:
    # K#0 failed once and waits for its retry, K#1..K#3 are parked behind it, X's call
    # is running when the process dies. With max_attempts=2, blaming K#0 for the
    # death would dead-letter it; X has died once and gets its second attempt.
    path = tmp_path / "log.db"
    worker = Worker("lane", str(path))
    worker.wait_for(lambda line: line == "start X", timeout=60)
    worker.kill()

    async def reopen() -> tuple[list[tuple[str, int, int]], int]:
        seen: list[tuple[str, int, int]] = []
        async with Bus.open(path, config=CONFIG) as bus:
            retry = RetryPolicy(max_attempts=2, initial_delay=0.5, jitter="none")

            @bus.subscribe("t", name="s", retry=retry, breaker=None, concurrency=2)
            async def h(event: Event[dict[str, int]], ctx: Context) -> None:
                seen.append((event.key or "?", event.payload["i"], ctx.attempt))

            await bus.drain(timeout=30)
            return seen, await bus.dead_letters.count()

    seen, dead = asyncio.run(reopen())
    assert dead == 0
    assert [(i, a) for k, i, a in seen if k == "K"] == [(0, 2), (1, 1), (2, 1), (3, 1)]
    assert [(i, a) for k, i, a in seen if k == "X"] == [(0, 2)]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_suspects_of_a_death_run_again_one_at_a_time_alone(tmp_path: Path) -> None:
    # README: "The suspects run again one at a time, alone (nothing else in flight), so
    # the culprit is found". Four calls hang when the process dies, with a deep backlog
    # behind them; on the next open every call records what else was running.
    path = tmp_path / "log.db"
    worker = Worker("blame", str(path), str(BACKLOG), "4", "event", str(BLOCK_FROM), "3")
    suspects: set[int] = set()
    while len(suspects) < 4:
        line = worker.wait_for(lambda line: line.startswith("start"), timeout=60)[-1]
        suspects.add(int(line.split()[1]))
    worker.kill()

    async def reopen() -> tuple[list[str], set[int]]:
        running: set[int] = set()
        crowded: list[str] = []
        ran: set[int] = set()
        async with Bus.open(path, config=CONFIG) as bus:
            retry = RetryPolicy(max_attempts=3)

            @bus.subscribe("jobs", name="victim", retry=retry, breaker=None, concurrency=4)
            async def victim(event: Event[dict[str, int]], ctx: Context) -> None:
                running.add(event.seq)
                others = running - {event.seq}
                if others and (event.seq in suspects or others & suspects):
                    crowded.append(f"{event.seq} started beside {sorted(others)}")
                try:
                    await asyncio.sleep(0.002)
                finally:
                    running.discard(event.seq)
                if event.seq in suspects:
                    ran.add(event.seq)

            await bus.drain(timeout=120)
        return crowded, ran

    crowded, ran = asyncio.run(reopen())
    assert ran == suspects
    assert crowded == [], f"suspects {sorted(suspects)}: " + "; ".join(crowded[:10])
