"""README, Guarantee 5: "Within a subscription, events of one key are handled in publish
order (unless the subscription says `ordered=False`), whatever the `concurrency`, the
retries and the crashes: two events of one key never run at once, and while one waits
for a retry, later events of its key wait behind it."

Failures land on the same keys as healthy traffic, interleaved in the same batches;
retries are due within milliseconds, so they settle while other batches (holding the
key's later events, were the bus to let them through) are running.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.attack._order import Plan, run_workload

SEEDS = (1, 2, 3)


def _run(tmp_path: Path, seed: int, **kwargs: object):
    plan = Plan.make(seed=seed)
    return asyncio.run(run_workload(tmp_path / "log.db", plan, **kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", SEEDS)
def test_events_of_one_key_are_handled_in_publish_order_around_retries_at_concurrency_1(
    tmp_path: Path, seed: int
) -> None:
    rec = _run(tmp_path, seed, kind="event", concurrency=1)
    assert rec.not_exactly_once() == {}
    assert rec.order_violations() == {}
    assert rec.early == []


@pytest.mark.parametrize("seed", SEEDS)
def test_events_of_one_key_are_handled_in_publish_order_around_retries_at_concurrency_4(
    tmp_path: Path, seed: int
) -> None:
    rec = _run(tmp_path, seed, kind="event", concurrency=4)
    assert rec.not_exactly_once() == {}
    assert rec.order_violations() == {}
    assert rec.early == []


@pytest.mark.parametrize("concurrency", [1, 3])
@pytest.mark.parametrize("seed", SEEDS)
def test_a_batch_handler_that_raises_keeps_each_key_in_publish_order(
    tmp_path: Path, seed: int, concurrency: int
) -> None:
    rec = _run(tmp_path, seed, kind="batch-raise", concurrency=concurrency)
    assert rec.not_exactly_once() == {}
    assert rec.order_violations() == {}
    assert rec.early == []


@pytest.mark.parametrize("concurrency", [1, 3])
@pytest.mark.parametrize("seed", SEEDS)
def test_a_batch_handler_that_fails_events_with_ctx_fail_keeps_each_key_in_publish_order(
    tmp_path: Path, seed: int, concurrency: int
) -> None:
    # The handler fails the event and, as Context.fail's documentation asks of a
    # handler that cares about order, the rest of its key in the same batch. Later
    # batches must not hand it the key's later events before the retry settles.
    rec = _run(tmp_path, seed, kind="batch-fail", concurrency=concurrency)
    assert rec.not_exactly_once() == {}
    assert rec.order_violations() == {}
    assert rec.early == []


@pytest.mark.parametrize(
    ("kind", "concurrency"),
    [("event", 4), ("event", 8), ("batch-raise", 4), ("batch-fail", 4)],
)
def test_two_events_of_one_key_never_run_at_once_with_concurrency_n(
    tmp_path: Path, kind: str, concurrency: int
) -> None:
    rec = _run(tmp_path, 5, kind=kind, concurrency=concurrency)
    assert rec.overlaps == []
    assert rec.not_exactly_once() == {}


@pytest.mark.parametrize(
    ("kind", "concurrency"), [("event", 1), ("event", 4), ("batch-raise", 3), ("batch-fail", 3)]
)
def test_ctx_state_of_a_key_is_seen_by_its_next_call_and_a_failed_attempt_leaves_no_trace(
    tmp_path: Path, kind: str, concurrency: int
) -> None:
    # Every call reads the key's state and must find the index of the key's last
    # success: a failed attempt's write (made before it raised) must be gone, and the
    # previous call's write must be visible even before it commits.
    rec = _run(tmp_path, 4, kind=kind, concurrency=concurrency)
    assert rec.state_mismatches == []


@pytest.mark.parametrize(
    ("kind", "concurrency"), [("event", 1), ("event", 4), ("batch-raise", 3), ("batch-fail", 3)]
)
def test_outbox_events_of_a_failed_attempt_are_never_published_and_a_success_publishes_once(
    tmp_path: Path, kind: str, concurrency: int
) -> None:
    # Each call publishes through the outbox before it fails (a batch handler that
    # raises, after publishing for the events before the failing one): none of that
    # may reach the log; each success publishes exactly once.
    rec = _run(tmp_path, 6, kind=kind, concurrency=concurrency)
    assert rec.outbox_not_exactly_once() == {}


@pytest.mark.parametrize(("kind", "concurrency"), [("event", 1), ("event", 4)])
def test_ordered_false_lets_later_events_pass_a_retry(
    tmp_path: Path, kind: str, concurrency: int
) -> None:
    # The control: without order, every event is still handled exactly once, and the
    # recorder does see events of a key passing the one that waits for its retry.
    rec = _run(tmp_path, 1, kind=kind, concurrency=concurrency, ordered=False)
    assert rec.not_exactly_once() == {}
    assert rec.order_violations() != {}


async def _retry_settles_during_batch(path: Path, *, batch: bool, concurrency: int) -> list[str]:
    """K#0 fails once. While it waits for its retry, K#1 is published in one commit
    with A#0 and B#0, and A#0's call holds until K#0's retry has succeeded; K#2 is
    published once it has. Returns the timeline of call starts and successes."""
    from eventbus import BatchPolicy, Bus, BusConfig, Context, Event, Message, RetryPolicy

    timeline: list[str] = []
    k0_failed = asyncio.Event()
    k0_settled = asyncio.Event()
    calls: dict[str, int] = {}

    async def one(event: Event[dict[str, int]]) -> None:
        name = f"{event.key}#{event.payload['i']}"
        calls[name] = calls.get(name, 0) + 1
        timeline.append(f"start {name}")
        if name == "K#0" and calls[name] == 1:
            k0_failed.set()
            raise RuntimeError("K#0 fails once")
        if name == "A#0":
            # Holds its call (and, for a batch handler, its batch) until the retry of
            # K#0 has settled; should that never happen while it runs, it goes on.
            try:
                await asyncio.wait_for(k0_settled.wait(), timeout=3)
            except TimeoutError:
                timeline.append("A#0 gave up waiting for the retry of K#0")
        timeline.append(f"ok {name}")
        if name == "K#0":
            k0_settled.set()

    async with Bus.open(path, config=BusConfig(reconcile_interval=0)) as bus:
        retry = RetryPolicy(max_attempts=5, initial_delay=0.05, jitter="none")
        options = {
            "name": "s",
            "retry": retry,
            "breaker": None,
            "concurrency": concurrency,
            "batch": BatchPolicy(mode="natural", max_size=16),
        }
        if batch:

            async def handle_batch(events: list[Event[dict[str, int]]], ctx: Context) -> None:
                for event in events:
                    try:
                        await one(event)
                    except RuntimeError as exc:
                        ctx.fail(event, exc)

            bus.subscribe("t", **options)(handle_batch)  # type: ignore[arg-type]
        else:

            async def handle(event: Event[dict[str, int]], ctx: Context) -> None:
                await one(event)

            bus.subscribe("t", **options)(handle)  # type: ignore[arg-type]

        await bus.publish("t", {"i": 0}, key="K")
        await asyncio.wait_for(k0_failed.wait(), timeout=10)
        await bus.publish_many(
            [
                Message("t", {"i": 0}, key="A"),
                Message("t", {"i": 1}, key="K"),
                Message("t", {"i": 0}, key="B"),
            ]
        )
        await asyncio.wait_for(k0_settled.wait(), timeout=10)
        await bus.publish("t", {"i": 2}, key="K")
        await bus.drain(timeout=20)
    return timeline


@pytest.mark.parametrize(("batch", "concurrency"), [(False, 1), (False, 2), (True, 1), (True, 2)])
def test_a_retry_that_settles_while_a_batch_with_its_later_event_runs_keeps_the_key_in_order(
    tmp_path: Path, batch: bool, concurrency: int
) -> None:
    timeline = asyncio.run(
        _retry_settles_during_batch(tmp_path / "log.db", batch=batch, concurrency=concurrency)
    )
    starts_of_k = [t for t in timeline if t.startswith("start K#")]
    assert starts_of_k == ["start K#0", "start K#0", "start K#1", "start K#2"], timeline
    # K#1 may start only once K#0 has succeeded, and K#2 only once K#1 has.
    assert timeline.index("start K#1") > timeline.index("ok K#0"), timeline
    assert timeline.index("start K#2") > timeline.index("ok K#1"), timeline
