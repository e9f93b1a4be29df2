"""The test bus: an in-memory :class:`~eventbus.Bus` on a virtual clock that records
what is published, fails tests with handlers' own exceptions, and lets
:data:`~eventbus.testing.faults` fail its handlers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from eventbus.storage import MemoryStorage, NewRecord, Receipt, WriteBatch

from .._bus import Bus
from .._config import BusConfig
from .._errors import BusError
from .._event import Event
from .._hooks import HandlerCall, Hook
from .._payloads import payload_type
from ..failures import DeadLettered
from ._faults import Faults, faults

#: How long the kit's ``drain`` waits by default, in virtual seconds: long enough
#: for retries hours apart (the virtual clock jumps over the wait), short enough
#: that a test whose events can never finish fails at once instead of hanging.
DRAIN_TIMEOUT = 7 * 86_400.0

# The bus's background passes (polling for command-line commands, compaction,
# reconciliation) wake it every second or minute. On a virtual clock every wake-up
# is a jump, and a jump waits 2 ms of real time for I/O first: at the default
# intervals a virtual hour took 10 s; hourly, a virtual day takes 0.1 s.
_HOURLY = {"control_interval": 3600.0, "compact_interval": 3600.0, "reconcile_interval": 3600.0}

_PAYLOAD = payload_type(Any)
_HEADERS = payload_type(dict[str, str])


def kit_config(**settings: Any) -> BusConfig:
    """The kit's bus settings: ``BusConfig(**settings)``, except that the bus's
    background passes (command polling, compaction, reconciliation) run hourly
    unless ``settings`` say otherwise, so that long virtual waits stay fast.

    Raises:
        ConfigError: A setting is unknown or its value impossible.
    """
    return BusConfig(**{**_HOURLY, **settings})


class NotOnVirtualClock(BusError):
    """:func:`open_kit` was called on an event loop whose clock is real."""

    def __init__(self, loop: object) -> None:
        self.loop_type = type(loop).__name__
        super().__init__(
            f"eventbus.testing needs an event loop on a virtual clock, and this one is a "
            f"{self.loop_type}: use the kit's fixtures (pytest_plugins = "
            '["eventbus.testing"]), which run on one, or run your test in '
            "asyncio.Runner(loop_factory=eventbus.testing.VirtualClockLoop)"
        )


class Recorder:
    """Every event committed to the kit's log, in log order: publishes
    (``publish``, ``publish_nowait``, ``publish_many``), handlers' outbox publishes
    (``ctx.publish``) and events published by workflows and reconcilers.

    Duplicates (an idempotency key already in the log) are not recorded again.
    Events are kept whatever compaction later removes from the log.
    """

    def __init__(self) -> None:
        self._records: list[tuple[int, NewRecord]] = []

    def published(self, topic: str | None = None) -> list[Event[Any]]:
        """The events committed on ``topic`` (every topic if None), oldest first,
        their payloads decoded to built-in types as an untyped handler sees them."""
        return [
            Event(
                rec.id,
                seq,
                rec.topic,
                rec.key,
                _PAYLOAD.decode(rec.payload),
                _HEADERS.decode(rec.headers) if rec.headers else {},
                rec.created_at,
            )
            for seq, rec in self._records
            if topic is None or rec.topic == topic
        ]

    def clear(self) -> None:
        """Forget what was recorded so far."""
        self._records.clear()

    def committed(self, appends: list[NewRecord], receipts: list[Receipt]) -> None:
        """Record a commit's appended events (the kit's log calls this)."""
        self._records.extend(
            (receipt.seq, rec)
            for rec, receipt in zip(appends, receipts, strict=True)
            if not receipt.duplicate
        )


class _RecordingLog(MemoryStorage):
    """An in-memory log that tells a :class:`Recorder` what each commit appended."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self._recorder = recorder

    async def commit(self, batch: WriteBatch) -> list[Receipt]:
        receipts = await super().commit(batch)
        if batch.appends:
            self._recorder.committed(batch.appends, receipts)
        return receipts

    def append_now(self, record: NewRecord) -> Receipt | None:
        # Publishes are appended at once, as on any in-memory bus; recorded here.
        receipt = super().append_now(record)
        if receipt is not None:
            self._recorder.committed([record], [receipt])
        return receipt


class KitBus(Bus):
    """The kit's bus: a :class:`~eventbus.Bus` (on an in-memory log) whose
    :meth:`drain` raises handlers' failures by default, and whose handlers'
    calls :data:`~eventbus.testing.faults` can fail by subscription name (through
    an ``around_call`` hook, :class:`~eventbus.Hook`)."""

    async def drain(
        self,
        timeout: float | None = DRAIN_TIMEOUT,
        *,
        workflows: bool = False,
        raise_failures: bool = True,
    ) -> None:
        """:meth:`Bus.drain`, raising by default the first dead-lettered handler's
        own exception (with a note naming the subscription and the event), so a
        failing handler fails the test as itself. ``timeout`` is in virtual seconds.

        Raises:
            BaseException: The first dead-lettered event's own exception, with
                ``raise_failures`` (:class:`DeadLettered` when there is none, as for
                an event whose handler killed the process).
            DrainTimeout: ``timeout`` virtual seconds passed first.

        Cancellation: safe; nothing changes.
        """
        __tracebackhide__ = True  # pytest shows the handler's frames, not these
        failure: DeadLettered | None = None
        try:
            await super().drain(timeout, workflows=workflows, raise_failures=raise_failures)
        except DeadLettered as exc:
            failure = exc
        if failure is not None:
            raise _own_exception(failure)


class _FaultPoints(Hook):
    """The kit's hook: each handler call first passes the fault point named after
    its subscription (``faults.fail("billing")`` fails the next calls of
    "billing"); what it raises is the call's failure, as the handler's own would be."""

    def __init__(self, points: Faults) -> None:
        self._points = points

    @contextlib.asynccontextmanager
    async def around_call(self, call: HandlerCall) -> AsyncIterator[None]:
        __tracebackhide__ = True  # pytest shows the test's frames, not this one
        await self._points.point(call.subscription)
        yield


def _own_exception(failure: DeadLettered) -> BaseException:
    """The first dead-lettered event's own exception, noted with where it failed."""
    own = failure.__cause__
    if not isinstance(own, Exception):
        return failure
    first = failure.dead_letters[0]
    own.add_note(
        f"eventbus.testing: subscription {first.subscription!r} dead-lettered event "
        f"{first.event.id} (seq {first.event.seq}, topic {first.event.topic!r}) after "
        f"{first.attempts} attempt(s) with this exception; {failure.count} event(s) were "
        "dead-lettered in all (bus.dead_letters lists them)"
    )
    return own


class BusKit:
    """What :func:`open_kit` gives a test.

    Attributes:
        bus: The bus (:class:`KitBus`, a :class:`~eventbus.Bus`).
        recorder: What was published on it (:class:`Recorder`).
        faults: The process's :data:`~eventbus.testing.faults`.
    """

    __slots__ = ("bus", "faults", "recorder")

    def __init__(self, bus: KitBus, recorder: Recorder, points: Faults) -> None:
        self.bus = bus
        self.recorder = recorder
        self.faults = points


@contextlib.asynccontextmanager
async def open_kit(config: BusConfig | None = None) -> AsyncIterator[BusKit]:
    """Open a test bus: in memory, on the running loop's virtual clock, recording
    what is published; ``faults`` is cleared when it closes.

    ::

        async with open_kit() as kit:
            @kit.bus.subscribe("orders")
            async def billing(event: Event[Order], ctx: Context) -> None: ...

            await kit.bus.publish("orders", Order(...), key="o-1")
            await kit.bus.drain()          # a failing handler raises its own exception
            assert kit.recorder.published("invoices")

    Args:
        config: The bus's settings; :func:`kit_config` by default (build yours
            with it, so that long virtual waits stay fast).

    Raises:
        NotOnVirtualClock: The running loop's clock is real.

    Cancellation: as for :meth:`Bus.open`: the bus closes at once, abandoning the
    calls in flight.
    """
    loop = asyncio.get_running_loop()
    if not getattr(loop, "virtual_clock", False):
        raise NotOnVirtualClock(loop)
    recorder = Recorder()
    try:
        async with KitBus.open(
            ":memory:", config=config or kit_config(), storage=_RecordingLog(recorder)
        ) as bus:
            assert isinstance(bus, KitBus)
            bus.hooks.add(_FaultPoints(faults))
            yield BusKit(bus, recorder, faults)
    finally:
        faults.clear()
