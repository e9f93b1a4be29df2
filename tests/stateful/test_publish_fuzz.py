"""Fuzzed publish arguments in the same group commits as good publishes: every call
returns or raises a typed error, every good event is committed exactly once, and
nothing else is written.

Each example opens a SQLite log, starts good ``publish`` tasks and queues good
``publish_nowait`` events, and in the same loop iteration makes fuzzed ``publish``,
``publish_nowait`` and ``publish_many`` calls: all of them reach the writer's queue
before its next cycle, so they share group commits.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from eventbus import Bus, BusConfig, BusError, Message
from eventbus.storage import SQLiteStorage

LIMIT = 2048  # max_event_bytes: payloads of a few kB go over it


class Point(msgspec.Struct):
    x: int
    label: str


class Opaque:
    """Not encodable."""


def cyclic() -> list[object]:
    loop: list[object] = []
    loop.append(loop)
    return loop


def deep(depth: int) -> list[object]:
    nested: list[object] = []
    for _ in range(depth):
        nested = [nested]
    return nested


CYCLIC = cyclic()
DEEP = deep(50_000)

json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
payloads = st.one_of(
    json_like,
    st.binary(max_size=3 * LIMIT),
    st.text(max_size=LIMIT).map(lambda s: s * 2),
    st.sets(st.integers(), max_size=3),
    st.frozensets(st.text(max_size=3), max_size=3),
    st.tuples(st.integers(), st.text(max_size=3)),
    st.builds(Point, st.integers(-(2**63), 2**63 - 1), st.text(max_size=5)),
    st.datetimes(timezones=st.just(datetime.UTC)),
    st.just(2**70),
    st.just(-(2**70)),
    st.just(complex(1, 2)),
    st.builds(Opaque),
    st.just(CYCLIC),
    st.just(DEEP),
    st.just({"nested": CYCLIC}),
    st.just(math.nan),
    st.just("\ud800 lone surrogate"),
    st.lists(st.just("x" * 500), min_size=1, max_size=20),  # one string, many times
)
texts = st.one_of(
    st.text(max_size=10),
    st.just(""),
    st.just("*"),
    st.just("a\ud800"),
    st.just("x" * (LIMIT + 1)),
)
wrong_types = st.one_of(
    st.integers(), st.binary(max_size=5), st.lists(st.text(max_size=3), max_size=2), st.floats()
)
topics = st.one_of(texts, wrong_types, st.none())
keys = st.one_of(st.none(), texts, wrong_types)
headers = st.one_of(
    st.none(),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=2),
    st.dictionaries(st.integers(), st.text(max_size=3), min_size=1, max_size=2),
    st.just({"h": "\udfff"}),
    st.just({"h": "y" * (LIMIT + 1)}),
    st.text(max_size=5),
    st.lists(st.tuples(st.text(max_size=2), st.text(max_size=2)), max_size=2),
    st.integers(),
)


@dataclass(frozen=True)
class Call:
    method: str  # "publish", "publish_nowait" or "publish_many"
    topic: object
    payload: object
    key: object
    headers: object
    idempotency_key: object
    extra_items: int  # publish_many: good messages around the fuzzed one
    not_a_message: bool  # publish_many: the fuzzed item is a tuple, not a Message


FIELDS = ("topic", "payload", "key", "headers", "idempotency_key")


@st.composite
def calls(draw: st.DrawFn) -> Call:
    """A call with one or two fuzzed arguments (or none) among valid ones: a bad
    argument in the middle of good ones."""
    fuzzed = draw(st.sets(st.sampled_from(FIELDS), max_size=2))
    valid: dict[str, object] = {
        "topic": "fuzz",
        "payload": draw(json_like),
        "key": draw(st.none() | st.text(max_size=5)),
        "headers": None,
        "idempotency_key": draw(st.none() | st.text(max_size=5)),
    }
    fuzz = {"topic": topics, "payload": payloads, "key": keys, "headers": headers}
    fuzz["idempotency_key"] = keys
    args = {f: draw(fuzz[f]) if f in fuzzed else valid[f] for f in FIELDS}
    return Call(
        draw(st.sampled_from(["publish", "publish_nowait", "publish_many"])),
        extra_items=draw(st.integers(0, 2)),
        not_a_message=draw(st.integers(0, 9)) == 0,
        **args,
    )


def unique_idempotency_key(call: Call, index: int) -> object:
    """A valid idempotency key made unique to its call (so that no fuzzed call is a
    duplicate of another and the expected log is exact); an invalid one unchanged."""
    key = call.idempotency_key
    return f"fuzz-{index}:{key}" if isinstance(key, str) else key


Written = tuple[str, object, bytes, object]  # topic, key, payload, headers


def written(topic: object, payload: object, key: object, headers: object) -> Written:
    """What a record accepted with these arguments holds: its payload encoded as the
    bus encodes it, no headers as None."""
    return (str(topic), key, msgspec.msgpack.encode(payload), headers or None)


async def run_example(path: Path, fuzzed: list[Call]) -> None:
    good_receipts: list[object] = []
    # ("ok", the records the call wrote) or ("error", its exception, its idempotency key)
    outcomes: list[tuple[str, object, object]] = []

    async def good(i: int) -> None:
        good_receipts.append(
            await bus.publish("good", {"good": i}, key=f"k{i % 3}", idempotency_key=f"good-{i}")
        )

    async def fuzz(index: int, call: Call) -> None:
        ikey = unique_idempotency_key(call, index)
        try:
            if call.method == "publish":
                receipt = await bus.publish(
                    call.topic,  # type: ignore[arg-type]
                    call.payload,
                    key=call.key,  # type: ignore[arg-type]
                    headers=call.headers,  # type: ignore[arg-type]
                    idempotency_key=ikey,  # type: ignore[arg-type]
                )
                assert not receipt.duplicate
                outcomes.append(
                    ("ok", [written(call.topic, call.payload, call.key, call.headers)], None)
                )
            elif call.method == "publish_nowait":
                bus.publish_nowait(
                    call.topic,  # type: ignore[arg-type]
                    call.payload,
                    key=call.key,  # type: ignore[arg-type]
                    headers=call.headers,  # type: ignore[arg-type]
                    idempotency_key=ikey,  # type: ignore[arg-type]
                )
                outcomes.append(
                    ("ok", [written(call.topic, call.payload, call.key, call.headers)], None)
                )
            else:
                item: object = (
                    (call.topic, call.payload)
                    if call.not_a_message
                    else Message(
                        call.topic,  # type: ignore[arg-type]
                        call.payload,
                        call.key,  # type: ignore[arg-type]
                        call.headers,  # type: ignore[arg-type]
                        ikey,  # type: ignore[arg-type]
                    )
                )
                messages = [
                    *(Message("many", {"extra": j}) for j in range(call.extra_items)),
                    item,
                ]
                receipts = await bus.publish_many(messages)  # type: ignore[arg-type]
                assert len(receipts) == len(messages)
                extras = [
                    written("many", {"extra": j}, None, None) for j in range(call.extra_items)
                ]
                mine = written(call.topic, call.payload, call.key, call.headers)
                outcomes.append(("ok", [*extras, mine], None))
        except (BusError, TypeError, ValueError) as exc:
            outcomes.append(("error", exc, ikey))

    config = BusConfig(max_event_bytes=LIMIT, reconcile_interval=0)
    async with Bus.open(path, config=config) as bus:
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(good, i)
            for index, call in enumerate(fuzzed):
                tg.start_soon(fuzz, index, call)
            for i in range(5):
                bus.publish_nowait("good", {"nowait": i})
        await bus.drain(timeout=30)
        after = await bus.publish("good", {"after": True})  # the writer is still alive
        # A refused call left no idempotency key behind either.
        refused_keys = [
            k for outcome, _, k in outcomes if outcome == "error" and isinstance(k, str)
        ]
        for ikey in refused_keys:
            with contextlib.suppress(BusError):  # a key the log cannot store stays refused
                receipt = await bus.publish("retry", None, idempotency_key=ikey)
                assert not receipt.duplicate, f"refused, yet its idempotency key {ikey!r} was kept"
        retried = (await bus.stats()).head - after.seq
    assert len(good_receipts) == 20
    assert len(outcomes) == len(fuzzed)
    for outcome, detail, _ in outcomes:
        if outcome == "error":
            assert isinstance(detail, BusError | TypeError | ValueError)
            assert str(detail)

    store = SQLiteStorage(path, read_only=True)
    await store.open()
    try:
        records = await store.read(0, 10**9, None, 10**6)
    finally:
        await store.close()
    decoder = msgspec.msgpack.Decoder()
    goods = [decoder.decode(r.payload) for r in records if r.topic == "good"]
    expected_good = (
        [{"good": i} for i in range(20)] + [{"nowait": i} for i in range(5)] + [{"after": True}]
    )
    assert sorted(map(repr, goods)) == sorted(map(repr, expected_good)), "good events"
    assert [r.key for r in records if r.topic == "good"].count(None) == 6  # nowait and after
    # Everything else is exactly what the calls that returned asked for.
    others = [
        (
            r.topic,
            r.key,
            r.payload,
            decoder.decode(r.headers) if r.headers is not None else None,
        )
        for r in records[: after.seq]
        if r.topic != "good"
    ]
    expected_others = [w for outcome, ws, _ in outcomes if outcome == "ok" for w in ws]  # type: ignore[attr-defined]
    assert sorted(map(repr, others)) == sorted(map(repr, expected_others)), "fuzzed events"
    assert len(records) == after.seq + retried
    assert all(r.topic == "retry" for r in records[after.seq :])


def attack(method: str, **bad: object) -> Call:
    """One call with ``bad`` arguments among valid ones."""
    args: dict[str, object] = {
        "topic": "fuzz",
        "payload": {"a": 1},
        "key": None,
        "headers": None,
        "idempotency_key": None,
    }
    return Call(method, extra_items=2, not_a_message=False, **(args | bad))


# The attacks that once failed or dropped the good publishes of their group commit,
# each made by every method, whatever the search happens to draw.
ATTACKS = [
    attack(method, **bad)
    for method in ("publish", "publish_nowait", "publish_many")
    for bad in (
        {"idempotency_key": ["x"]},
        {"idempotency_key": 123},
        {"key": {"k": 1}},
        {"topic": 5},
        {"payload": CYCLIC},
        {"headers": "abc"},
        {"headers": {"h": 1}},
        {"payload": "x" * (LIMIT + 1)},
    )
]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(fuzzed=st.lists(calls(), min_size=1, max_size=8))
@example(fuzzed=ATTACKS)
def test_fuzzed_publishes_never_disturb_good_ones_in_the_same_group_commit(
    fuzzed: list[Call],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(run_example, Path(tmp) / "log.db", fuzzed)
