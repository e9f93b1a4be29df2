"""Typed payloads: a handler annotated ``Event[T]`` (or ``list[Event[T]]``) receives
payloads decoded as ``T``; an event that does not decode is dead-lettered at once,
unretried, and the key's later events go on. This module's annotations are strings
(``from __future__ import annotations``), as in most applications."""

from __future__ import annotations

import dataclasses
import random
from typing import Any, TypedDict

import msgspec
import pytest

from eventbus import (
    BatchPolicy,
    BreakerPolicy,
    Bus,
    BusConfig,
    Context,
    Event,
    Message,
    PayloadValidationError,
    RetryPolicy,
    SubscriptionError,
)
from eventbus.dispatch._handler import handler_payload_type
from eventbus.failures import GiveUp, decide
from eventbus.storage import MemoryStorage, NewRecord, WriteBatch
from eventbus.testing import Faults
from tests.conftest import wait_until

pytestmark = pytest.mark.anyio


class Order(msgspec.Struct, frozen=True):
    id: str
    amount: int
    email: str = "nobody@example.com"


@dataclasses.dataclass(frozen=True)
class OrderData:
    id: str
    amount: int


class OrderDict(TypedDict):
    id: str
    amount: int


class OrderV2(msgspec.Struct, frozen=True):
    """A later version of Order that also takes amounts written as text."""

    id: str
    amount: int | str


class NotDecodable:
    def __init__(self, x: int) -> None:
        self.x = x


class Flaky(Exception):
    pass


async def test_a_handler_of_event_of_a_struct_receives_struct_instances() -> None:
    seen: list[tuple[Order, int]] = []
    async with Bus.open(":memory:") as bus:

        @bus.subscribe("orders")
        async def notify(event: Event[Order], ctx: Context) -> None:
            seen.append((event.payload, event.seq))

        await bus.publish("orders", {"id": "o-1", "amount": 5}, key="o-1")
        await bus.publish("orders", Order("o-2", 7, "a@example.com"), key="o-2")
        await bus.drain(timeout=10, raise_failures=True)
    assert seen == [(Order("o-1", 5), 1), (Order("o-2", 7, "a@example.com"), 2)]
    assert all(type(order) is Order for order, _ in seen)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (OrderData, OrderData("o-1", 5)),
        (OrderDict, OrderDict(id="o-1", amount=5)),
        (list[int], [1, 2]),
        (tuple[int, str], (1, "x")),
    ],
)
@pytest.mark.parametrize("batch_handler", [False, True])
async def test_dataclasses_typed_dicts_and_generic_types_decode_too(
    kind: Any, expected: object, batch_handler: bool
) -> None:
    payload = msgspec.to_builtins(expected)
    seen: list[object] = []
    async with Bus.open(":memory:") as bus:
        if batch_handler:

            @bus.subscribe("t")
            async def many(events: list[Event[kind]], ctx: Context) -> None:  # type: ignore[valid-type]
                seen.extend(e.payload for e in events)

        else:

            @bus.subscribe("t")
            async def one(event: Event[kind], ctx: Context) -> None:  # type: ignore[valid-type]
                seen.append(event.payload)

        await bus.publish("t", payload)
        await bus.drain(timeout=10, raise_failures=True)
    assert seen == [expected]
    assert type(seen[0]) is type(expected)


@pytest.mark.parametrize("concurrency", [1, 3])
@pytest.mark.parametrize("batch_handler", [False, True])
async def test_a_malformed_event_is_dead_lettered_once_unretried_and_its_key_goes_on_in_order(
    concurrency: int, batch_handler: bool
) -> None:
    """Among good events of the same key and of other keys: k1's third event has a
    text amount, k2's second lacks its amount. Each is dead-lettered after one
    attempt with the validation message; every good event is handled once, in key
    order, and the retry policy (which would retry five times) is not consulted."""
    messages: list[Message] = []
    bad = {("k1", 2): {"id": "k1-2", "amount": "five"}, ("k2", 1): {"id": "k2-1"}}
    for i in range(6):
        for key in ("k0", "k1", "k2", "k3"):
            payload = bad.get((key, i), {"id": f"{key}-{i}", "amount": i})
            messages.append(Message("orders", payload, key=key))
    seen: dict[str, list[int]] = {}

    def handle(event: Event[Order]) -> None:
        assert type(event.payload) is Order
        seen.setdefault(event.key or "", []).append(event.payload.amount)

    retry = RetryPolicy(max_attempts=5, initial_delay=0.01, max_delay=0.02)
    async with Bus.open(":memory:") as bus:
        if batch_handler:

            @bus.subscribe("orders", name="s", retry=retry, concurrency=concurrency)
            async def many(events: list[Event[Order]], ctx: Context) -> None:
                for event in events:
                    handle(event)

        else:

            @bus.subscribe("orders", name="s", retry=retry, concurrency=concurrency)
            async def one(event: Event[Order], ctx: Context) -> None:
                handle(event)

        await bus.publish_many(messages)
        await bus.drain(timeout=10)
        dead = sorted(await bus.dead_letters.list("s"), key=lambda d: d.event.key or "")
        metrics = bus.metrics().subscriptions["s"]
    assert seen == {
        "k0": [0, 1, 2, 3, 4, 5],
        "k1": [0, 1, 3, 4, 5],
        "k2": [0, 2, 3, 4, 5],
        "k3": [0, 1, 2, 3, 4, 5],
    }
    assert [(d.event.key, d.event.payload, d.attempts) for d in dead] == [
        ("k1", {"id": "k1-2", "amount": "five"}, 1),
        ("k2", {"id": "k2-1"}, 1),
    ]
    assert all(d.error_type == "eventbus._errors.PayloadValidationError" for d in dead)
    k1, k2 = (d.error_message for d in dead)
    assert "does not decode as Order: Expected `int`, got `str` - at `$.amount`" in k1
    assert "Object missing required field `amount`" in k2
    assert "dead-lettered without retries" in k1
    assert "publish a corrected event" in k1
    assert metrics.failed_attempts == 2


async def test_a_batch_handler_of_list_of_event_of_a_struct_gets_one_batch_of_structs() -> None:
    batches: list[list[Order]] = []
    async with Bus.open(":memory:") as bus:

        @bus.subscribe("orders", batch=BatchPolicy(mode="fixed", max_size=10, max_wait=1.0))
        async def audit(events: list[Event[Order]], ctx: Context) -> None:
            batches.append([e.payload for e in events])

        await bus.publish_many(
            Message("orders", {"id": f"o-{i}", "amount": i}, key=f"o-{i % 3}") for i in range(10)
        )
        await bus.drain(timeout=10, raise_failures=True)
    assert batches == [[Order(f"o-{i}", i) for i in range(10)]]


@pytest.mark.parametrize(
    "annotation",
    ["Event", "Event[Any]", "Event[object]", "Event[dict[str, Any]]", "list[Event[Any]]", None],
)
async def test_untyped_annotations_keep_the_payload_as_decoded_at_no_cost(
    annotation: str | None,
) -> None:
    async def handler(event, ctx):  # type: ignore[no-untyped-def]
        seen.append(event)

    if annotation is not None:
        handler.__annotations__ = {"event": annotation, "ctx": "Context"}
    seen: list[Any] = []
    async with Bus.open(":memory:") as bus:
        bus.subscribe("t", name="s")(handler)
        await bus.publish("t", {"id": "o-1", "amount": "text is fine"})
        await bus.drain(timeout=10, raise_failures=True)
    (got,) = seen if annotation is None or not annotation.startswith("list") else seen[0]
    assert got.payload == {"id": "o-1", "amount": "text is fine"}
    assert handler_payload_type(handler) is None  # nothing converts their payloads


async def test_a_type_defined_where_the_handler_is_subscribed_is_found() -> None:
    class Local(msgspec.Struct):
        n: int

    seen: list[object] = []
    async with Bus.open(":memory:") as bus:

        @bus.subscribe("t")
        async def handler(event: Event[Local], ctx: Context) -> None:
            seen.append(event.payload)

        await bus.publish("t", {"n": 1})
        await bus.drain(timeout=10, raise_failures=True)
    assert seen == [Local(1)]


async def test_a_type_that_cannot_be_found_or_decoded_is_refused_at_subscribe() -> None:
    async with Bus.open(":memory:") as bus:
        with pytest.raises(
            SubscriptionError, match=r"Missing.*cannot be resolved.*import or define"
        ):

            @bus.subscribe("t")
            async def missing(event: Event[Missing], ctx: Context) -> None:  # type: ignore[name-defined]  # noqa: F821
                pass

        with pytest.raises(SubscriptionError, match=r"NotDecodable.*msgspec cannot decode"):

            @bus.subscribe("t")
            async def opaque(event: Event[NotDecodable], ctx: Context) -> None:
                pass

        assert bus.subscription_names == frozenset()


async def test_a_typed_event_that_fails_in_its_handler_is_retried_typed(
    bus: Bus, faults: Faults
) -> None:
    """On the test kit's bus (eventbus.testing), whose faults fail the handler."""
    attempts: list[tuple[int, int, Order]] = []

    @bus.subscribe("orders", name="charge", retry=RetryPolicy(initial_delay=1.0, jitter="none"))
    async def charge(event: Event[Order], ctx: Context) -> None:
        attempts.append((event.attempt, ctx.attempt, event.payload))

    faults.fail("charge", times=2, exc=Flaky("the payments API is down"))
    await bus.publish("orders", {"id": "o-1", "amount": 5})
    await bus.drain()
    assert attempts == [(3, 3, Order("o-1", 5))]
    assert faults.fired("charge") == 2


@pytest.mark.virtual_clock
async def test_a_typed_retry_recovered_from_the_log_after_a_restart_is_decoded() -> None:
    log = MemoryStorage()  # kept across the restart
    retry = RetryPolicy(initial_delay=60.0, max_delay=60.0, jitter="none")
    async with Bus.open(":memory:", storage=log) as bus:

        @bus.subscribe("orders", name="s", retry=retry)
        async def fails(event: Event[Order], ctx: Context) -> None:
            raise Flaky("fails before the restart")

        await bus.publish("orders", {"id": "o-1", "amount": 5}, key="o-1")
        await bus.publish("orders", {"id": "o-1", "amount": "bad"}, key="o-1")  # parked
        metrics = bus.metrics
        await wait_until(bus, lambda: metrics().subscriptions["s"].parked == 1)
    seen: list[tuple[Order, int]] = []
    async with Bus.open(":memory:", storage=log) as bus:

        @bus.subscribe("orders", name="s", retry=retry)
        async def works(event: Event[Order], ctx: Context) -> None:
            seen.append((event.payload, ctx.attempt))

        await bus.drain(timeout=600)
        (dead,) = await bus.dead_letters.list("s")
    assert seen == [(Order("o-1", 5), 2)]
    assert dead.attempts == 1
    assert dead.error_type.endswith("PayloadValidationError")


async def test_redriving_an_undecodable_event_needs_a_changed_handler() -> None:
    """Redriven unchanged, it is dead-lettered again at once; once the handler's type
    accepts the payload (a new process with new code), the redrive handles it."""
    log = MemoryStorage()  # kept across the "deploy"
    async with Bus.open(":memory:", storage=log) as bus:

        @bus.subscribe("orders", name="billing")
        async def v1(event: Event[Order], ctx: Context) -> None:
            pass

        await bus.publish("orders", {"id": "o-1", "amount": "5"})
        await bus.drain(timeout=10)
        assert await bus.dead_letters.redrive("billing") == 1
        await bus.drain(timeout=10)
        (again,) = await bus.dead_letters.list("billing")
        assert again.attempts == 1
        assert again.error_type.endswith("PayloadValidationError")
    handled: list[OrderV2] = []
    async with Bus.open(":memory:", storage=log) as bus:

        @bus.subscribe("orders", name="billing")
        async def v2(event: Event[OrderV2], ctx: Context) -> None:
            handled.append(event.payload)

        assert await bus.dead_letters.redrive("billing", error_type="PayloadValidationError") == 1
        await bus.drain(timeout=10, raise_failures=True)
        assert await bus.dead_letters.list("billing") == []
    assert handled == [OrderV2("o-1", "5")]


@pytest.mark.virtual_clock
async def test_a_flood_of_malformed_events_does_not_open_the_circuit_breaker() -> None:
    breaker = BreakerPolicy(failure_ratio=0.5, min_calls=5, window=10, cooldown=5)
    good: list[str] = []
    async with Bus.open(":memory:", config=BusConfig(breaker=breaker)) as bus:

        @bus.subscribe("orders", name="s")
        async def handler(event: Event[Order], ctx: Context) -> None:
            good.append(event.payload.id)

        await bus.publish_many(
            Message("orders", {"id": f"o-{i}", "amount": i if i % 5 == 0 else "x"})
            for i in range(100)
        )
        await bus.drain(timeout=60)
        metrics = bus.metrics().subscriptions["s"]
        assert await bus.dead_letters.count("s") == 80
    assert metrics.breaker_trips == 0
    assert good == [f"o-{i}" for i in range(0, 100, 5)]


async def test_an_event_whose_stored_bytes_do_not_decode_is_dead_lettered_at_once() -> None:
    log = MemoryStorage()
    await log.open()
    await log.commit(WriteBatch(appends=[NewRecord("e-1", "t", "k", b"\xc1", None, 0.0)]))
    await log.close()
    seen: list[object] = []
    async with Bus.open(":memory:", storage=log) as bus:

        @bus.subscribe("t", name="s", retry=RetryPolicy(max_attempts=5))
        async def handler(event: Event[Any], ctx: Context) -> None:
            seen.append(event.payload)

        await bus.publish("t", 1, key="k")
        await bus.drain(timeout=10)
        (dead,) = await bus.dead_letters.list("s")
    assert seen == [1]
    assert (dead.event.id, dead.attempts) == ("e-1", 1)
    assert dead.error_type.endswith("PayloadValidationError")
    assert "is not valid msgpack" in dead.error_message


def test_the_retry_decision_never_retries_a_payload_that_does_not_decode() -> None:
    error = PayloadValidationError("s", "e-1", 1, "t", "Order", "Expected `int` - at `$.n`")
    retry_everything = RetryPolicy(max_attempts=5, retry_on=(Exception,))
    decision = decide(retry_everything, 1, error, 0.0, random.Random(1))
    assert decision == GiveUp("not retryable")
    assert error.path == "$.n"
    assert decide(retry_everything, 1, Flaky(), 0.0, random.Random(1)) != decision
