"""The window of recent events that subscriptions near the head read from."""

from __future__ import annotations

import asyncio
import typing

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventbus import Bus
from eventbus._event import Event
from eventbus.publish import RecentEvents
from eventbus.storage import NewRecord, Receipt


def to_event(rec: NewRecord, seq: int) -> Event[object]:
    return Event(rec.id, seq, rec.topic, rec.key, rec.payload, {}, rec.created_at)


def records(first: int, n: int, topic: str = "t") -> tuple[list[NewRecord], list[Receipt]]:
    recs = [NewRecord(f"id-{first + i}", topic, None, b"x" * 10, None, 0.0) for i in range(n)]
    return recs, [Receipt(first + i, r.id) for i, r in enumerate(recs)]


def test_take_returns_events_in_range_and_the_position_examined() -> None:
    window = RecentEvents(0, max_events=100, max_bytes=10**6, to_event=to_event)
    window.append(*records(1, 5, "a"))
    window.append(*records(6, 5, "b"))
    taken = window.take(0, 10, frozenset({"b"}), 3)
    assert taken is not None
    events, pos = taken
    assert [e.seq for e in events] == [6, 7, 8]
    assert pos == 8
    events, pos = window.take(8, 10, frozenset({"a"}), 3)  # type: ignore[misc]
    assert events == []
    assert pos == 10


def test_events_are_decoded_once_and_shared() -> None:
    window = RecentEvents(0, max_events=100, max_bytes=10**6, to_event=to_event)
    window.append(*records(1, 3))
    first = window.take(0, 3, None, 10)
    second = window.take(0, 3, None, 10)
    assert first is not None
    assert second is not None
    assert all(a is b for a, b in zip(first[0], second[0], strict=True))


def test_the_window_is_bounded_and_readers_behind_it_go_to_the_log() -> None:
    window = RecentEvents(0, max_events=10, max_bytes=10**6, to_event=to_event)
    for first in range(1, 101, 5):
        window.append(*records(first, 5))
    assert window.first_seq > 80
    assert window.take(0, 100, None, 10) is None
    taken = window.take(window.first_seq - 1, 100, None, 100)
    assert taken is not None
    assert taken[0][-1].seq == 100


def test_duplicates_take_no_place_in_the_window() -> None:
    window = RecentEvents(0, max_events=100, max_bytes=10**6, to_event=to_event)
    recs, receipts = records(1, 3)
    receipts[1] = Receipt(1, recs[0].id, duplicate=True)
    receipts[2] = Receipt(2, recs[2].id)
    window.append(recs, receipts)
    taken = window.take(0, 2, None, 10)
    assert taken is not None
    assert [e.id for e in taken[0]] == ["id-1", "id-3"]


def test_the_window_is_bounded_in_bytes() -> None:
    window = RecentEvents(0, max_events=10**6, max_bytes=2000, to_event=to_event)
    for first in range(1, 201, 10):
        window.append(*records(first, 10))
    assert 200 - window.first_seq < 30


def test_events_far_behind_the_head_are_not_kept_decoded() -> None:
    # Kept decoded, every event of the window would outlive the garbage collector's
    # young generation: only the newest are kept for other readers.
    made: list[int] = []

    def counting(rec: NewRecord, seq: int) -> Event[object]:
        made.append(seq)
        return to_event(rec, seq)

    window = RecentEvents(0, max_events=10_000, max_bytes=10**8, to_event=counting)
    window.append(*records(1, 2000))
    assert window.take(0, 2000, None, 10) is not None  # far behind: not kept
    assert window.take(1990, 2000, None, 10) is not None  # near the head: kept
    assert window.take(0, 2000, None, 10) is not None
    assert window.take(1990, 2000, None, 10) is not None
    assert made == [*range(1, 11), *range(1991, 2001), *range(1, 11)]


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.lists(st.sampled_from("ab"), max_size=40)),
            st.tuples(
                st.just("take"),
                st.integers(0, 400),
                st.integers(0, 400),
                st.sampled_from([None, frozenset("a"), frozenset("b"), frozenset("ab")]),
                st.integers(1, 50),
            ),
        ),
        max_size=30,
    ),
    max_events=st.integers(5, 300),
)
def test_take_gives_the_events_of_a_plain_filter_over_the_log(
    steps: list[tuple[object, ...]], max_events: int
) -> None:
    window = RecentEvents(0, max_events=max_events, max_bytes=10**8, to_event=to_event)
    log: list[str] = []  # topic by seq - 1
    for step in steps:
        if step[0] == "append":
            topics = typing.cast("list[str]", step[1])
            recs = [
                NewRecord(f"id-{len(log) + i + 1}", t, None, b"x", None, 0.0)
                for i, t in enumerate(topics)
            ]
            window.append(recs, [Receipt(len(log) + i + 1, r.id) for i, r in enumerate(recs)])
            log += topics
            continue
        _, after, upto, chosen, limit = step
        assert isinstance(after, int)
        assert isinstance(upto, int)
        assert isinstance(limit, int)
        wanted = typing.cast("frozenset[str] | None", chosen)
        taken = window.take(after, upto, wanted, limit)
        if after + 1 < window.first_seq:
            assert taken is None
            continue
        assert taken is not None
        events, pos = taken
        expected = [
            seq
            for seq in range(after + 1, min(upto, len(log)) + 1)
            if wanted is None or log[seq - 1] in wanted
        ][:limit]
        assert [e.seq for e in events] == expected
        assert [e.id for e in events] == [f"id-{seq}" for seq in expected]
        if len(expected) == limit:
            assert pos == expected[-1]
        else:
            assert pos == max(after, min(upto, len(log)))


_PAYLOADS = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None)
@given(
    payloads=st.lists(_PAYLOADS, max_size=40),
    headers=st.lists(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2)),
)
def test_a_bus_makes_a_slice_of_events_as_it_makes_each(
    payloads: list[object], headers: list[dict[str, str]]
) -> None:
    # The window's events of a slice are made together (their payloads decoded as one
    # msgpack array): they must equal the events made one at a time.
    encoder = msgspec.msgpack.Encoder()
    recs = [
        NewRecord(
            f"id-{i}",
            "t",
            None if i % 2 else f"k{i}",
            encoder.encode(payload),
            encoder.encode(headers[i]) if i < len(headers) and headers[i] else None,
            float(i),
        )
        for i, payload in enumerate(payloads)
    ]

    async def check() -> None:
        async with Bus.open(":memory:") as bus:
            one_by_one = [bus._new_to_event(rec, 10 + i) for i, rec in enumerate(recs)]
            assert bus._new_to_events(recs, 10) == one_by_one
            if recs:
                # A payload that is not one msgpack value: made one at a time, as before.
                broken = [*recs[:-1], msgspec.structs.replace(recs[-1], payload=b"\xc1")]
                with pytest.raises(msgspec.DecodeError):
                    bus._new_to_events(broken, 10)

    asyncio.run(check())
