"""The test kit's edges: where it refuses to run, what the recorder keeps, how
faults are armed and cleared, and that subscribing through it checks handlers as
the bus does."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import msgspec
import pytest

from eventbus import (
    BatchPolicy,
    Bus,
    BusConfig,
    Context,
    DrainTimeout,
    Event,
    HandlerStuck,
    Message,
    SubscriptionError,
)
from eventbus.testing import (
    DRAIN_TIMEOUT,
    Faults,
    InjectedFault,
    KitBus,
    NotOnVirtualClock,
    Recorder,
    VirtualClockLoop,
    faults,
    kit_config,
    open_kit,
)

pytestmark = pytest.mark.anyio


class Order(msgspec.Struct, frozen=True):
    id: str
    amount: int


@pytest.fixture
def bus_config() -> BusConfig:
    return kit_config(concurrency=3)


async def test_the_bus_config_fixture_configures_the_kits_bus(bus: Bus) -> None:
    assert isinstance(bus, KitBus)
    assert bus.config.concurrency == 3
    assert bus.config.reconcile_interval == 3600.0  # kit_config keeps it hourly
    assert kit_config(reconcile_interval=5.0).reconcile_interval == 5.0


async def test_the_kit_refuses_a_loop_whose_clock_is_real() -> None:
    with pytest.raises(NotOnVirtualClock, match=r"virtual clock.*pytest_plugins"):
        async with open_kit():
            pass


async def test_the_recorder_keeps_every_commit_once_in_log_order(
    bus: Bus, recorder: Recorder
) -> None:
    await bus.publish("a", 1, key="k", idempotency_key="once")
    await bus.publish("a", 1, key="k", idempotency_key="once")  # a duplicate: not again
    bus.publish_nowait("b", {"x": 1}, headers={"h": "v"})
    await bus.publish_many([Message("a", 2), Message("b", Order("o-1", 5))])
    await bus.drain()
    events = recorder.published()
    assert [(e.seq, e.topic, e.payload) for e in events] == [
        (1, "a", 1),
        (2, "b", {"x": 1}),
        (3, "a", 2),
        (4, "b", {"id": "o-1", "amount": 5}),
    ]
    assert events[0].key == "k"
    assert events[1].headers == {"h": "v"}
    assert [e.payload for e in recorder.published("a")] == [1, 2]
    assert recorder.published("nothing") == []
    recorder.clear()
    assert recorder.published() == []


async def test_the_recorder_keeps_publishes_appended_at_once(bus: Bus, recorder: Recorder) -> None:
    """The kit's bus appends a plain publish at once, as any in-memory bus does; the
    recorder still sees every one, in log order, among those that went the other
    way (queued by ``publish_nowait``)."""

    async def producer(p: int) -> None:
        for i in range(40):
            if i % 13 == 5:
                bus.publish_nowait("t", [p, i])
            else:
                await bus.publish("t", [p, i])

    async with asyncio.TaskGroup() as tg:
        for p in range(8):
            tg.create_task(producer(p))
    await bus.drain()
    events = recorder.published("t")
    assert [e.seq for e in events] == list(range(1, 8 * 40 + 1))
    for p in range(8):
        assert [e.payload[1] for e in events if e.payload[0] == p] == list(range(40))


async def test_the_kits_drain_can_leave_failures_to_the_dead_letters(bus: Bus) -> None:
    @bus.subscribe("t", retry={"max_attempts": 1})
    async def fails(event: Event[int], ctx: Context) -> None:
        raise ValueError(event.payload)

    await bus.publish("t", 1)
    await bus.drain(raise_failures=False)
    assert await bus.dead_letters.count() == 1
    with pytest.raises(ValueError, match="1"):
        await bus.drain()  # still unreported: reported now


def test_faults_refuse_what_cannot_be_armed(faults: Faults) -> None:
    with pytest.raises(ValueError, match="name"):
        faults.fail("")
    with pytest.raises(ValueError, match="times"):
        faults.fail("s", times=0)
    with pytest.raises(ValueError, match="times"):
        faults.fail("s", times=True)
    with pytest.raises(ValueError, match="exc"):
        faults.fail("s", exc="boom")  # type: ignore[arg-type]


async def test_a_fault_point_is_a_no_op_until_armed_and_fires_the_armed_times(
    faults: Faults,
) -> None:
    await faults.point("charge")  # nothing armed
    faults.fail("charge", times=2)
    for number in (1, 2):
        with pytest.raises(InjectedFault, match=rf"injected fault {number} of 2 at 'charge'"):
            faults.point("charge")  # raises when called, awaited or not
    await faults.point("charge")  # used up
    assert faults.fired("charge") == 2
    assert faults.fired("other") == 0


def test_an_armed_exception_is_raised_as_a_fresh_copy_or_instance(faults: Faults) -> None:
    error = ConnectionError("down")
    faults.fail("p", times=2, exc=error)
    raised = []
    for _ in range(2):
        with pytest.raises(ConnectionError, match="down") as info:
            faults.point("p")
        raised.append(info.value)
    assert raised[0] is not raised[1]
    assert raised[0] is not error
    faults.fail("q", exc=KeyError)
    with pytest.raises(KeyError):
        faults.point("q")


def test_an_exception_that_cannot_be_copied_is_raised_as_it_is(faults: Faults) -> None:
    class Odd(Exception):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(f"{a}/{b}")

    error = Odd(1, 2)
    faults.fail("p", exc=error)
    with pytest.raises(Odd) as info:
        faults.point("p")
    assert info.value is error


@pytest.fixture
def armed_elsewhere() -> Iterator[None]:
    faults.fail("left-over", times=5)
    yield
    faults.clear()


def test_the_faults_fixture_starts_disarmed(armed_elsewhere: None, faults: Faults) -> None:
    faults.point("left-over")  # the fixture cleared it
    assert faults.fired("left-over") == 0


def test_the_kit_disarms_faults_when_it_closes() -> None:
    faults.fail("s", times=3)

    async def main() -> None:
        async with open_kit():
            pass

    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        runner.run(main())
    faults.point("s")  # cleared by the kit's exit: no exception


async def test_subscribing_through_the_kit_checks_handlers_as_the_bus_does(bus: Bus) -> None:
    def plain(event: Event[int], ctx: Context) -> None:
        pass

    with pytest.raises(SubscriptionError, match="async def"):
        bus.subscribe("t")(plain)  # type: ignore[arg-type]

    class Callable:
        async def __call__(self, event: Event[int], ctx: Context) -> None:
            pass

    with pytest.raises(SubscriptionError, match="name="):
        bus.subscribe("t")(Callable())
    bus.subscribe("t", name="object")(Callable())
    with pytest.raises(SubscriptionError, match="Event\\[Missing\\]"):

        @bus.subscribe("t")
        async def missing(event: Event[Missing], ctx: Context) -> None:  # type: ignore[name-defined]  # noqa: F821
            pass

    seen: list[list[Order]] = []

    @bus.subscribe("orders", batch=BatchPolicy(mode="fixed", max_size=3, max_wait=1.0))
    async def audit(events: list[Event[Order]], ctx: Context) -> None:
        seen.append([e.payload for e in events])

    assert audit.__name__ == "audit"  # the decorator returns the handler itself
    assert bus.subscription_names == {"object", "audit"}
    await bus.publish_many(Message("orders", Order(f"o-{i}", i)) for i in range(3))
    await bus.drain()
    assert sorted((o.id, type(o)) for batch in seen for o in batch) == [
        ("o-0", Order),
        ("o-1", Order),
        ("o-2", Order),
    ]


async def test_a_handler_that_hangs_fails_the_test_as_stuck_at_once(bus: Bus) -> None:
    @bus.subscribe("t")
    async def hangs(event: Event[int], ctx: Context) -> None:
        await asyncio.Event().wait()

    await bus.publish("t", 1)
    with pytest.raises(HandlerStuck, match="ran longer than the reconcile lease"):
        await bus.drain()  # reconciliation cancels each attempt after its lease


async def test_a_drain_that_cannot_finish_in_time_times_out_in_virtual_time(bus: Bus) -> None:
    release = asyncio.Event()

    @bus.subscribe("t")
    async def blocked(event: Event[int], ctx: Context) -> None:
        await release.wait()

    await bus.publish("t", 1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(DrainTimeout, match="drain timed out after 60"):
        await bus.drain(timeout=60)
    assert loop.time() - started >= 60
    release.set()
    await bus.drain()
    assert DRAIN_TIMEOUT >= 86_400  # the default waits for retries hours apart
