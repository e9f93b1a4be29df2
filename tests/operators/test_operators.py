"""Stateful operators: reduce, tumbling and sliding windows, join; each checked against
a batch recomputation, on an in-memory and a SQLite log."""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from eventbus import (
    BatchPolicy,
    Bus,
    BusConfig,
    Context,
    Event,
    Message,
    RetryPolicy,
    SubscriptionError,
)
from eventbus import operators as ops
from eventbus.operators import OperatorInputError
from eventbus.operators._operators import _window_starts

pytestmark = pytest.mark.anyio

BACKENDS = pytest.mark.parametrize("backend", [":memory:", "file"])
PROPERTY = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_files = itertools.count()

Row = tuple[str, int, int]  # key, event time, amount


@asynccontextmanager
async def open_bus(backend: str, tmp_path: Path, **config: object) -> AsyncIterator[Bus]:
    # A fresh file per call: hypothesis runs many examples in one test's tmp_path.
    target = ":memory:" if backend == ":memory:" else tmp_path / f"ops-{next(_files)}.db"
    async with Bus.open(target, config=BusConfig(**config)) as bus:  # type: ignore[arg-type]
        yield bus


def collect(bus: Bus, topic: str) -> list[dict[str, object]]:
    """Subscribe a collector of ``topic``'s payloads."""
    seen: list[dict[str, object]] = []

    @bus.subscribe(topic, name=f"collect-{topic}")
    async def _collect(events: list[Event[dict[str, object]]], ctx: Context) -> None:
        seen.extend(e.payload for e in events)

    return seen


def add_amount(acc: int, event: Event[dict[str, int]]) -> int:
    return acc + event.payload["amount"]


def event_time(event: Event[dict[str, int]]) -> int:
    return event.payload["ts"]


async def publish_rows(bus: Bus, topic: str, rows: list[Row], chunk: int = 7) -> None:
    # In chunks, so that batches start and end in different places.
    messages = [Message(topic, {"ts": t, "amount": a}, key=k) for k, t, a in rows]
    for i in range(0, len(messages), chunk):
        await bus.publish_many(messages[i : i + chunk])


@st.composite
def disordered_rows(draw: st.DrawFn, lateness: int, keys: int = 3, size: int = 60) -> list[Row]:
    """Events whose time is at most ``lateness`` behind the greatest time published
    before them: none is late for an operator with that lateness."""
    rows: list[Row] = []
    base = draw(st.integers(-50, 50))
    for _ in range(draw(st.integers(0, size))):
        base += draw(st.integers(0, 6))
        key = f"k{draw(st.integers(0, keys - 1))}"
        rows.append((key, base - draw(st.integers(0, lateness)), draw(st.integers(-5, 20))))
    return rows


def brute_windows(rows: list[Row], size: int, slide: int) -> dict[tuple[str, int], int]:
    """Group-by over every grid window [k*slide, k*slide + size) holding each event."""
    totals: dict[tuple[str, int], int] = defaultdict(int)
    for key, t, amount in rows:
        for k in range((t - size) // slide, t // slide + 1):
            if k * slide <= t < k * slide + size:
                totals[key, k * slide] += amount
    return dict(totals)


async def check_windows(
    op: ops.Windows[int], emitted: list[dict[str, object]], rows: list[Row], size: int, slide: int
) -> None:
    """Emitted plus open windows are the group-by, each window once; a window was
    emitted exactly when its key's watermark reached its end."""
    expected = brute_windows(rows, size, slide)
    closed = Counter((str(p["key"]), p["start"]) for p in emitted)
    assert all(n == 1 for n in closed.values()), f"emitted twice: {closed}"
    got: dict[tuple[str, object], object] = {
        (str(p["key"]), p["start"]): p["value"] for p in emitted
    }
    assert all(p["end"] == p["start"] + size for p in emitted)  # type: ignore[operator]
    still_open: dict[tuple[str, object], object] = {
        (w.key, w.start): w.value async for w in op.open_windows()
    }
    assert not set(got) & set(still_open)
    got.update(still_open)
    assert got == expected
    top: dict[str, int] = {}
    for key, t, _ in rows:
        top[key] = max(t, top.get(key, t))
    for key, start in closed:
        assert start + size <= top[key] - op.lateness  # type: ignore[operator]
    for w in [w async for w in op.open_windows()]:
        assert w.end > top[w.key] - op.lateness
    assert await op.late_count() == 0


# -- reduce ---------------------------------------------------------------------------


@BACKENDS
@PROPERTY
@given(
    rows=st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 9)), max_size=60),
    max_size=st.integers(1, 16),
)
async def test_reduce_equals_functools_reduce_per_key_in_publish_order(
    backend: str, tmp_path: Path, rows: list[tuple[str, int]], max_size: int
) -> None:
    async with open_bus(backend, tmp_path) as bus:
        # Concatenation does not commute: a reordering would show.
        op = ops.reduce(
            bus,
            "digits",
            name="concat",
            fn=lambda acc, e: acc + str(e.payload),
            initial="",
            batch=BatchPolicy(mode="natural", max_size=max_size),
        )
        for i in range(0, len(rows), 5):
            await bus.publish_many(Message("digits", d, key=k) for k, d in rows[i : i + 5])
        await bus.drain(timeout=20)
        expected = {
            key: functools.reduce(lambda acc, d: acc + str(d), [d for k, d in rows if k == key], "")
            for key in sorted({k for k, _ in rows})
        }
        assert {k: v async for k, v in op.items()} == expected
        for key, value in expected.items():
            assert await op.get(key) == value
        assert await op.get("missing", "none") == "none"


async def test_reduce_gives_each_key_its_own_copy_of_a_mutable_initial() -> None:
    async with Bus.open(":memory:") as bus:

        def append(acc: list[int], event: Event[int]) -> list[int]:
            acc.append(event.payload)  # mutates in place
            return acc

        empty: list[int] = []
        op = ops.reduce(bus, "n", name="lists", fn=append, initial=empty)
        await bus.publish_many(Message("n", i, key=f"k{i % 2}") for i in range(6))
        await bus.drain(timeout=10)
        assert await op.get("k0") == [0, 2, 4]
        assert await op.get("k1") == [1, 3, 5]


async def test_reduce_by_a_key_function_republishes_by_that_key(log_path: Path) -> None:
    async with Bus.open(log_path) as bus:
        op = ops.reduce(
            bus,
            "payments",
            name="per-customer",
            fn=add_amount,
            initial=0,
            key=lambda e: str(e.payload["customer"]),
        )
        # Unkeyed events, and keys (order ids) that are not the grouping key.
        await bus.publish_many(
            Message("payments", {"customer": i % 3, "amount": i}, key=None if i % 2 else f"o{i}")
            for i in range(30)
        )
        await bus.drain(timeout=10)
        assert {k: v async for k, v in op.items()} == {
            str(c): sum(i for i in range(30) if i % 3 == c) for c in range(3)
        }
    async with Bus.open(log_path) as bus:  # resumes: nothing is counted twice
        op = ops.reduce(
            bus,
            "payments",
            name="per-customer",
            fn=add_amount,
            initial=0,
            key=lambda e: str(e.payload["customer"]),
        )
        await bus.publish("payments", {"customer": 0, "amount": 100})
        await bus.drain(timeout=10)
        assert await op.get("0") == 100 + sum(range(0, 30, 3))


# -- windows --------------------------------------------------------------------------


@BACKENDS
@PROPERTY
@given(
    rows=disordered_rows(lateness=8),
    size=st.integers(1, 30),
    lateness=st.integers(8, 20),
    max_size=st.integers(1, 32),
)
async def test_tumbling_totals_equal_a_group_by_when_disorder_is_within_lateness(
    backend: str, tmp_path: Path, rows: list[Row], size: int, lateness: int, max_size: int
) -> None:
    async with open_bus(backend, tmp_path) as bus:
        op = ops.tumbling(
            bus,
            "payments",
            name="totals",
            size=size,
            aggregate=add_amount,
            initial=0,
            emit="totals-out",
            lateness=lateness,
            time=event_time,
            batch=BatchPolicy(mode="natural", max_size=max_size),
        )
        emitted = collect(bus, "totals-out")
        await publish_rows(bus, "payments", rows)
        await bus.drain(timeout=20)
        await check_windows(op, emitted, rows, size, size)


@BACKENDS
@PROPERTY
@given(
    rows=disordered_rows(lateness=5),
    slide=st.integers(1, 10),
    factor=st.integers(1, 4),
    extra=st.integers(0, 9),
)
async def test_sliding_windows_hold_every_event_of_their_span(
    backend: str, tmp_path: Path, rows: list[Row], slide: int, factor: int, extra: int
) -> None:
    size = slide * factor + min(extra, slide - 1)  # slide <= size, not always a multiple
    async with open_bus(backend, tmp_path) as bus:
        op = ops.sliding(
            bus,
            "payments",
            name="sliding",
            size=size,
            slide=slide,
            aggregate=add_amount,
            initial=0,
            emit="sliding-out",
            lateness=5,
            time=event_time,
        )
        emitted = collect(bus, "sliding-out")
        await publish_rows(bus, "payments", rows)
        await bus.drain(timeout=20)
        await check_windows(op, emitted, rows, size, slide)


@example(t=1.9, slide=0.001, factor=1.0)  # regression: 1.899 + 0.001 == 1.9 held nothing
@given(
    t=st.floats(-1e9, 1e9, allow_nan=False),
    slide=st.floats(1e-3, 1e3),
    factor=st.floats(1.0, 20.0),
)
def test_window_starts_are_on_the_grid_and_hold_the_time(
    t: float, slide: float, factor: float
) -> None:
    size = slide * factor
    starts = _window_starts(t, size, slide)
    assert starts, "every time falls in at least one window"
    # (or, in a gap that float rounding leaves between two windows, the one ending there)
    assert all(s <= t < s + size for s in starts) or (
        len(starts) == 1 and starts[0] <= t <= starts[0] + size
    )
    steps = [round(s / slide) for s in starts]
    assert starts == [k * slide for k in steps]  # on the grid k * slide ...
    assert steps == list(range(steps[0], steps[0] + len(steps)))  # ... consecutive
    assert len(starts) <= math.ceil(size / slide) + 1
    for k in (steps[0] - 1, steps[-1] + 1):  # the neighbours on the grid do not hold t
        assert not k * slide <= t < k * slide + size


async def test_a_late_event_is_counted_and_sent_to_the_late_topic() -> None:
    async with Bus.open(":memory:") as bus:
        op = ops.tumbling(
            bus,
            "payments",
            name="strict",
            size=10,
            aggregate=add_amount,
            initial=0,
            emit="strict-out",
            late="strict-late",
            time=event_time,
        )
        emitted = collect(bus, "strict-out")
        late = collect(bus, "strict-late")
        await publish_rows(bus, "payments", [("a", 3, 1), ("a", 12, 2), ("a", 5, 4), ("a", 11, 8)])
        await bus.drain(timeout=10)
        assert emitted == [{"key": "a", "start": 0, "end": 10, "value": 1}]
        assert late == [{"ts": 5, "amount": 4}]  # its window [0, 10) had closed
        assert [(w.start, w.value) async for w in op.open_windows()] == [(10, 10)]
        assert await op.get("a", 10) == 10
        assert await op.get("a", 0, "closed") == "closed"
        assert await op.late_count() == 1
        assert await op.late_count("a") == 1
        assert await op.watermark("a") == 12
        assert await op.watermark("b") is None


async def test_a_key_watermark_moves_with_its_own_events_only() -> None:
    async with Bus.open(":memory:") as bus:
        op = ops.tumbling(
            bus,
            "payments",
            name="per-key",
            size=10,
            aggregate=add_amount,
            initial=0,
            emit="per-key-out",
            lateness=2,
            time=event_time,
        )
        emitted = collect(bus, "per-key-out")
        await publish_rows(bus, "payments", [("a", 1, 1), ("b", 100, 1)])
        await bus.drain(timeout=10)
        assert emitted == []  # "a" saw nothing past its window yet
        assert await op.watermark("a") == -1
        assert await op.watermark("b") == 98
        await publish_rows(bus, "payments", [("a", 12, 1)])
        await bus.drain(timeout=10)
        assert emitted == [{"key": "a", "start": 0, "end": 10, "value": 1}]


async def test_windows_survive_a_reopen_and_close_once(log_path: Path) -> None:
    def register(bus: Bus) -> ops.Windows[int]:
        return ops.tumbling(
            bus,
            "payments",
            name="durable",
            size=10,
            aggregate=add_amount,
            initial=0,
            emit="durable-out",
            time=event_time,
        )

    async with Bus.open(log_path) as bus:
        register(bus)
        await publish_rows(bus, "payments", [("a", 1, 1), ("a", 4, 2), ("a", 11, 4)])
        await bus.drain(timeout=10)
    async with Bus.open(log_path) as bus:
        op = register(bus)
        emitted = collect(bus, "durable-out")  # new: reads the log from the start
        assert await op.get("a", 10) == 4
        await publish_rows(bus, "payments", [("a", 15, 8), ("a", 25, 16)])
        await bus.drain(timeout=10)
        assert emitted == [
            {"key": "a", "start": 0, "end": 10, "value": 3},
            {"key": "a", "start": 10, "end": 20, "value": 12},
        ]
        assert [(w.start, w.value) async for w in op.open_windows()] == [(20, 16)]


async def test_a_retried_aggregate_on_the_retry_lane_leaves_totals_exact_and_none_late(
    log_path: Path,
) -> None:
    failed_once: set[str] = set()

    def flaky_add(acc: int, event: Event[dict[str, int]]) -> int:
        if event.payload["amount"] % 9 == 0 and event.id not in failed_once:
            failed_once.add(event.id)
            raise RuntimeError("transient")
        return acc + event.payload["amount"]

    rows = [(f"k{i % 4}", i // 2 - (i * 7) % 3, i % 31) for i in range(600)]
    logging.getLogger("eventbus").setLevel(logging.CRITICAL)
    try:
        async with Bus.open(log_path, config=BusConfig(breaker=None)) as bus:
            op = ops.tumbling(
                bus,
                "payments",
                name="flaky",
                size=20,
                aggregate=flaky_add,
                initial=0,
                emit="flaky-out",
                lateness=3,
                time=event_time,
                retry=RetryPolicy(max_attempts=5, initial_delay=0.001, max_delay=0.01),
            )
            emitted = collect(bus, "flaky-out")
            await publish_rows(bus, "payments", rows, chunk=50)
            await bus.drain(timeout=30)
            assert failed_once  # the retry lane ran, beside the main lane
            await check_windows(op, emitted, rows, 20, 20)
            assert await bus.dead_letters.list() == []
    finally:
        logging.getLogger("eventbus").setLevel(logging.NOTSET)


async def test_events_without_a_key_or_a_time_are_dead_lettered_and_the_rest_counted() -> None:
    logging.getLogger("eventbus").setLevel(logging.CRITICAL)
    try:
        async with Bus.open(":memory:") as bus:
            op = ops.tumbling(
                bus,
                "payments",
                name="picky",
                size=10,
                aggregate=add_amount,
                initial=0,
                emit="picky-out",
                time=lambda e: e.payload.get("ts"),  # type: ignore[arg-type, return-value]
            )
            await bus.publish_many(
                [
                    Message("payments", {"ts": 1, "amount": 1}, key="a"),
                    Message("payments", {"ts": 2, "amount": 2}),  # no key
                    Message("payments", {"amount": 4}, key="a"),  # no time
                    Message("payments", {"ts": math.nan, "amount": 8}, key="a"),
                    Message("payments", {"ts": 3, "amount": 16}, key="a"),
                ]
            )
            await bus.drain(timeout=10)
            assert await op.get("a", 0) == 17
            dead = await bus.dead_letters.list(subscription="picky")
            assert len(dead) == 3
            assert {d.attempts for d in dead} == {1}  # not retried: it cannot help
            assert all(d.error_type.endswith("OperatorInputError") for d in dead)
            assert any("has no key" in d.error_message for d in dead)
            assert any("not a finite number" in d.error_message for d in dead)
    finally:
        logging.getLogger("eventbus").setLevel(logging.NOTSET)


# -- join -----------------------------------------------------------------------------


@st.composite
def join_rows(draw: st.DrawFn, lateness: int) -> list[tuple[str, str, int, int]]:
    """(side, key, time, id) with each time at most ``lateness`` behind its key's
    greatest earlier time."""
    rows = []
    base = 0
    for n in range(draw(st.integers(0, 50))):
        base += draw(st.integers(0, 4))
        side = draw(st.sampled_from(["left", "right"]))
        key = draw(st.sampled_from("ab"))
        rows.append((side, key, base - draw(st.integers(0, lateness)), n))
    return rows


@BACKENDS
@PROPERTY
@given(
    rows=join_rows(lateness=4),
    within=st.integers(0, 8),
    max_size=st.integers(1, 16),
)
async def test_join_pairs_equal_a_nested_loop_join_within_the_bound(
    backend: str,
    tmp_path: Path,
    rows: list[tuple[str, str, int, int]],
    within: int,
    max_size: int,
) -> None:
    async with open_bus(backend, tmp_path) as bus:
        op = ops.join(
            bus,
            "left",
            "right",
            name="pairs",
            within=within,
            emit="pairs-out",
            lateness=4,
            time=event_time,
            batch=BatchPolicy(mode="natural", max_size=max_size),
        )
        pairs = collect(bus, "pairs-out")
        await bus.publish_many(
            Message(side, {"ts": t, "amount": n}, key=k) for side, k, t, n in rows
        )
        await bus.drain(timeout=20)
        expected = Counter(
            (k1, l_n, r_n)
            for s1, k1, t1, l_n in rows
            for s2, k2, t2, r_n in rows
            if s1 == "left" and s2 == "right" and k1 == k2 and abs(t1 - t2) <= within
        )
        got = Counter(
            (p["key"], p["left"]["amount"], p["right"]["amount"])  # type: ignore[index]
            for p in pairs
        )
        assert got == expected
        assert await op.late_count() == 0
        for key in "ab":
            left, right = await op.buffered(key)
            # Only events that a later on-time event could still match stay.
            mark = await op.watermark(key)
            times = [t for s, k, t, _ in rows if k == key]
            assert left + right == sum(1 for t in times if mark is not None and t + within >= mark)


async def test_join_by_a_key_function_and_a_late_partner() -> None:
    async with Bus.open(":memory:") as bus:
        op = ops.join(
            bus,
            "orders",
            "shipments",
            name="shipped",
            within=5,
            emit="shipped-out",
            late="shipped-late",
            time=event_time,
            key=lambda e: str(e.payload["order"]),
        )
        pairs = collect(bus, "shipped-out")
        late = collect(bus, "shipped-late")
        await bus.publish_many(
            [
                Message("orders", {"order": 1, "ts": 10}),
                Message("shipments", {"order": 1, "ts": 14}),
                Message("shipments", {"order": 2, "ts": 30}),
                Message("orders", {"order": 2, "ts": 20}),  # late: 30 was seen for order 2
                Message("shipments", {"order": 1, "ts": 16}),  # 6 after the order
            ]
        )
        await bus.drain(timeout=10)
        assert pairs == [
            {"key": "1", "left": {"order": 1, "ts": 10}, "right": {"order": 1, "ts": 14}}
        ]
        assert late == [{"order": 2, "ts": 20}]
        assert await op.late_count("2") == 1
        assert await op.buffered("1") == (0, 2)  # the order left once the watermark passed 15


# -- registration ---------------------------------------------------------------------


async def _async_add(acc: int, event: Event[int]) -> int:
    return acc + event.payload


def _windows(bus: Bus, **overrides: object) -> object:
    args: dict[str, object] = {
        "name": "w",
        "size": 10,
        "aggregate": add_amount,
        "initial": 0,
        "emit": "out",
    }
    args.update(overrides)
    return ops.sliding(bus, "in", slide=args.pop("slide", 10), **args)  # type: ignore[arg-type]


BAD_ARGUMENTS: list[tuple[str, Callable[[Bus], object], type[Exception], str]] = [
    ("size 0", lambda b: _windows(b, size=0, slide=1), ValueError, "size= must be"),
    ("size nan", lambda b: _windows(b, size=math.nan), ValueError, "size= must be"),
    ("size True", lambda b: _windows(b, size=True), ValueError, "size= must be"),
    ("slide > size", lambda b: _windows(b, slide=11), ValueError, "must not exceed size="),
    ("tiny slide", lambda b: _windows(b, slide=1e-4), ValueError, "larger slide="),
    ("lateness < 0", lambda b: _windows(b, lateness=-1), ValueError, "lateness= must be"),
    ("emit own input", lambda b: _windows(b, emit="in"), ValueError, "its own output"),
    ("late own input", lambda b: _windows(b, late="in"), ValueError, "its own output"),
    ("aggregate", lambda b: _windows(b, aggregate=3), TypeError, "aggregate= must be a function"),
    ("time", lambda b: _windows(b, time="ts"), TypeError, "time= must be a function"),
    ("async aggregate", lambda b: _windows(b, aggregate=_async_add), TypeError, "plain function"),
    ("initial", lambda b: _windows(b, initial=object()), TypeError, "initial= must be"),
    ("name", lambda b: _windows(b, name=""), TypeError, "name= must be"),
    (
        "reduce fn",
        lambda b: ops.reduce(b, "in", name="r", fn=None, initial=0),  # type: ignore[arg-type]
        TypeError,
        "fn= must be a function",
    ),
    (
        "wildcard",
        lambda b: ops.reduce(b, "*", name="r", fn=add_amount, initial=0),
        ValueError,
        "cannot read '*'",
    ),
    (
        "join one topic",
        lambda b: ops.join(b, "x", "x", name="j", within=1, emit="out"),
        ValueError,
        "two topics",
    ),
    (
        "join within",
        lambda b: ops.join(b, "x", "y", name="j", within=-1, emit="out"),
        ValueError,
        "within= must be",
    ),
]


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [case[1:] for case in BAD_ARGUMENTS],
    ids=[case[0] for case in BAD_ARGUMENTS],
)
async def test_bad_arguments_raise_a_clear_error_at_registration(
    make: Callable[[Bus], object], error: type[Exception], message: str
) -> None:
    async with Bus.open(":memory:") as bus:
        with pytest.raises(error, match=message.replace("(", r"\(")):
            make(bus)
        assert bus.metrics().subscriptions == {}  # nothing was registered


async def test_a_taken_name_raises_and_leaves_nothing_half_registered() -> None:
    async with Bus.open(":memory:") as bus:
        ops.reduce(bus, "in", name="taken", fn=add_amount, initial=0)
        with pytest.raises(SubscriptionError, match="'taken' already exists"):
            ops.reduce(bus, "in", name="taken", fn=add_amount, initial=0, key=lambda e: "k")
        assert set(bus.metrics().subscriptions) == {"taken"}


def test_operator_input_error_says_what_to_do() -> None:
    exc = OperatorInputError("totals", "e-1", "it has no key")
    assert isinstance(exc, ValueError)
    assert (exc.operator, exc.event_id, exc.reason) == ("totals", "e-1", "it has no key")
    assert "redrive" in str(exc)
