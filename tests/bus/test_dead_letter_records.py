"""Dead letters as an operator reads them: whole tracebacks, and lists that say when
they are partial."""

from __future__ import annotations

import anyio
import pytest

from eventbus import Bus, BusConfig, Context, DeadLetterPage, Event, RetryPolicy
from eventbus.storage import DeadRecord, NewRecord, Record, WriteBatch
from tests import postgres

pytestmark = pytest.mark.anyio

ONCE = RetryPolicy(max_attempts=1)


class LookupFailed(Exception):
    pass


async def test_a_dead_letter_traceback_keeps_the_chained_cause(log_url: str) -> None:
    # Regression: the recorded traceback showed only the last exception, not the
    # one it was raised from (`raise ... from exc`) nor the one being handled.
    async with Bus.open(log_url, config=BusConfig(breaker=None)) as bus:

        @bus.subscribe("orders", name="billing", retry=ONCE)
        async def bill(event: Event[dict[str, str]], ctx: Context) -> None:
            try:
                event.payload["customer"]
            except KeyError as exc:
                try:
                    raise LookupFailed("no customer on the order") from exc
                except LookupFailed:
                    raise RuntimeError("billing gave up")  # noqa: B904 - the context is the point

        await bus.publish("orders", {"id": "o-1"})
        await bus.drain(timeout=10)
        (letter,) = await bus.dead_letters.list()
    trace = letter.traceback
    assert letter.error_type == "builtins.RuntimeError"
    # Oldest first, as Python prints a chain.
    key_error = trace.index("builtins.KeyError: 'customer'")
    cause = trace.index("The above exception was the direct cause of the following exception:")
    lookup = trace.index("LookupFailed: no customer on the order")
    during = trace.index("During handling of the above exception, another exception occurred:")
    last = trace.index("builtins.RuntimeError: billing gave up")
    assert key_error < cause < lookup < during < last
    assert 'event.payload["customer"]' in trace


async def test_a_timed_out_attempt_is_recorded_with_what_happened(log_url: str) -> None:
    # Regression: a handler timeout was dead-lettered with an empty error_message
    # (str() of the TimeoutError the timeout raised).
    retry = RetryPolicy(max_attempts=2, initial_delay=0.0, max_delay=0.0, timeout=0.3)
    attempts: list[int] = []
    async with Bus.open(log_url, config=BusConfig(breaker=None)) as bus:

        @bus.subscribe("orders", name="billing", retry=retry)
        async def bill(event: Event[int], ctx: Context) -> None:
            attempts.append(ctx.attempt)
            await anyio.sleep_forever()

        await bus.publish("orders", 1)
        await bus.drain(timeout=10)
        (letter,) = await bus.dead_letters.list()
    assert attempts == [1, 2]
    assert letter.error_type == "builtins.TimeoutError"
    assert letter.error_message == "attempt timed out after 0.3s (RetryPolicy.timeout)"
    assert letter.attempts == 2
    assert "TimeoutError: attempt timed out after 0.3s" in letter.traceback


async def test_an_event_that_does_not_decode_is_recorded_as_one_attempt(log_url: str) -> None:
    # Regression: a payload that did not decode was dead-lettered with attempts=0,
    # as if no delivery had been tried.
    store = postgres.log_at(log_url)
    await store.open()
    try:
        await store.commit(
            WriteBatch(appends=[NewRecord("bad-1", "orders", "k", b"\xc1", None, 0.0)])
        )
    finally:
        await store.close()
    seen: list[int] = []
    async with Bus.open(log_url, config=BusConfig(breaker=None)) as bus:

        @bus.subscribe("orders", name="billing", retry=RetryPolicy(max_attempts=5))
        async def bill(event: Event[int], ctx: Context) -> None:
            seen.append(event.payload)

        await bus.publish("orders", 2, key="k")
        await bus.drain(timeout=10)
        (letter,) = await bus.dead_letters.list()
    assert seen == [2]
    assert (letter.event.id, letter.event.seq, letter.attempts) == ("bad-1", 1, 1)
    assert letter.error_type.endswith("PayloadValidationError")
    assert "is not valid msgpack" in letter.error_message


async def write_dead_letters(target: str, events: int, subscriptions: tuple[str, ...]) -> None:
    """``events`` events, each dead-lettered by every one of ``subscriptions``."""
    store = postgres.log_at(target)
    await store.open()
    try:
        dead = [
            DeadRecord(
                sub,
                Record(seq, f"ev-{seq}", "orders", None, b"\xa1x", None, 1.0),
                3,
                "builtins.ValueError",
                f"event {seq} failed",
                "Traceback (most recent call last):\n",
                1.0,
                2.0,
            )
            for seq in range(1, events + 1)
            for sub in subscriptions
        ]
        await store.commit(WriteBatch(dead=dead))
    finally:
        await store.close()


async def test_a_partial_list_of_dead_letters_says_so_and_iter_reaches_every_one(
    log_url: str,
) -> None:
    # Regression: list() returned the first 100 and said nothing about the rest.
    await write_dead_letters(log_url, 150, ("a", "b"))
    async with Bus.open(log_url) as bus:
        page = await bus.dead_letters.list()
        assert isinstance(page, list)
        assert isinstance(page, DeadLetterPage)
        assert len(page) == 100
        assert (page.total, page.more) == (300, True)
        assert "more=True" in repr(page)
        letters = [(d.event.seq, d.subscription) async for d in bus.dead_letters.iter()]
        assert letters == [(seq, sub) for seq in range(1, 151) for sub in ("a", "b")]
        capped = [d async for d in bus.dead_letters.iter(subscription="b", limit=7)]
        assert [d.event.seq for d in capped] == list(range(1, 8))
        assert await bus.dead_letters.count(subscription="a") == 150


async def test_paging_with_after_resumes_between_subscriptions_of_one_event(
    log_url: str,
) -> None:
    await write_dead_letters(log_url, 3, ("a", "b", "c"))
    async with Bus.open(log_url) as bus:
        seen: list[tuple[int, str]] = []
        page = await bus.dead_letters.list(limit=4)
        seen += [(d.event.seq, d.subscription) for d in page]
        while page.more:
            page = await bus.dead_letters.list(limit=4, after=page[-1])
            seen += [(d.event.seq, d.subscription) for d in page]
        assert seen == [(seq, sub) for seq in (1, 2, 3) for sub in ("a", "b", "c")]
        last = await bus.dead_letters.list(after_seq=2)
        assert (len(last), last.total, last.more) == (3, 9, False)
