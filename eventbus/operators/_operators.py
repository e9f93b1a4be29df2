"""The stream operators: keyed reduce, event-time windows and joins (see the package
docstring)."""

from __future__ import annotations

import inspect
import math
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Generic, TypeVar, cast, overload

import msgspec

from .._bus import Bus
from .._config import BatchPolicy, RetryPolicy
from .._errors import BusError, SubscriptionError
from .._event import Event
from ..dispatch import Context

__all__ = [
    "Join",
    "OperatorInputError",
    "Reduce",
    "Window",
    "Windows",
    "join",
    "reduce",
    "sliding",
    "tumbling",
]

A = TypeVar("A")
P = TypeVar("P")
T = TypeVar("T")

# An event's windows are all built at once: more than this per event is a mistake
# (size/slide too large), not a workload.
MAX_WINDOWS_PER_EVENT = 10_000

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder()
_MISSING = object()


class OperatorInputError(BusError, ValueError):
    """An event an operator cannot use: it has no key, or its event time is not a
    finite number. The event is dead-lettered at once (retrying cannot help); fix the
    producer or the operator's ``key=``/``time=`` and redrive it.

    Attributes:
        operator: The operator's name.
        event_id: The event's id.
        reason: What is wrong with it.
    """

    def __init__(self, operator: str, event_id: str, reason: str) -> None:
        self.operator = operator
        self.event_id = event_id
        self.reason = reason
        super().__init__(
            f"operator {operator!r} cannot use event {event_id}: {reason}; fix the "
            "producer (or the operator's key=/time=) and redrive the dead letter"
        )


class Window(msgspec.Struct, Generic[A], frozen=True):
    """A window that has not closed yet, as :meth:`Windows.open_windows` returns it.

    Attributes:
        key: The operator key.
        start: The window's start (inclusive), in event time.
        end: The window's end (exclusive).
        value: The aggregate so far.
    """

    key: str
    start: float
    end: float
    value: A


# -- stored records (array-like: compact, and decoded straight into these) ----------


class _Keyed(msgspec.Struct, array_like=True, frozen=True):
    """An event as the ``key=`` step republishes it: the original, field by field."""

    id: str
    seq: int
    topic: str
    key: str | None
    payload: object
    headers: dict[str, str]
    created_at: float


class _WindowState(msgspec.Struct, array_like=True):
    top: int | float | None = None  # the greatest event time seen for the key
    late: int = 0
    open: list[tuple[int | float, object]] = []  # (start, aggregate), by start


class _JoinState(msgspec.Struct, array_like=True):
    top: int | float | None = None
    late: int = 0
    left: list[tuple[int | float, object]] = []  # (event time, payload), arrival order
    right: list[tuple[int | float, object]] = []


# -- argument checks ------------------------------------------------------------------


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"name= must be a non-empty string (the durable name), got {name!r}")
    if name.endswith(":by-key"):
        raise ValueError(f"name= must not end with ':by-key' (kept for the key= step): {name!r}")
    return name


def _check_topics(arg: str, topic: object) -> frozenset[str]:
    topics = frozenset([topic] if isinstance(topic, str) else cast("Iterable[object]", topic))
    if not topics or not all(isinstance(t, str) and t for t in topics):
        raise TypeError(f"{arg}= must be a topic name or several, got {topic!r}")
    if "*" in topics:
        raise ValueError(f"{arg}= must name its topics: an operator cannot read '*'")
    return cast("frozenset[str]", topics)


def _check_topic(arg: str, topic: object) -> str:
    if not isinstance(topic, str) or not topic or topic == "*":
        raise TypeError(f"{arg}= must be a topic name (a non-empty string), got {topic!r}")
    return topic


def _check_callable(arg: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not callable(value):
        raise TypeError(f"{arg}= must be a function, got {type(value).__name__} {value!r}")
    if inspect.iscoroutinefunction(value):
        raise TypeError(
            f"{arg}= must be a plain function, got the async function {value!r}: an "
            "operator's functions compute; do outside calls in a subscription of its output"
        )


def _check_number(arg: str, value: object, *, positive: bool) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or (value <= 0 if positive else value < 0)
    ):
        need = "greater than 0" if positive else "0 or more"
        raise ValueError(f"{arg}= must be a finite number {need}, got {value!r}")
    return cast(float, value)


def _fresh(initial: object) -> Callable[[], object]:
    """A factory of copies of ``initial``: a function that mutates its accumulator in
    place must not share one object between keys or windows."""
    try:
        raw = _ENCODER.encode(initial)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise TypeError(
            f"initial= must be msgspec-encodable (it is stored in the log), got "
            f"{type(initial).__name__}: {exc}"
        ) from exc
    if initial is None or isinstance(initial, int | float | str | bool):
        return lambda: initial
    return lambda: _DECODER.decode(raw)


def _retry_policy(bus: Bus, retry: RetryPolicy | None) -> RetryPolicy:
    base = retry or bus.config.retry
    return msgspec.structs.replace(base, give_up_on=(*base.give_up_on, OperatorInputError))


def _window_starts(t: float, size: float, slide: float) -> list[float]:
    """The starts of every window ``[start, start + size)`` on the ``slide`` grid
    (aligned to 0) that holds ``t``, in ascending order."""
    q = t // slide
    # Float division can land one step off; ints are exact.
    if q * slide > t:
        q -= 1
    elif (q + 1) * slide <= t:
        q += 1
    starts = []
    start = q * slide
    while start + size > t:
        starts.append(start)
        q -= 1
        start = q * slide
    if not starts:
        # t sits in the rounding gap between k * slide + size and (k + 1) * slide
        # (1.899 + 0.001 == 1.9 < 1900 * 0.001): the window that ends there holds it.
        starts.append(q * slide)
    starts.reverse()
    return starts


# -- the shared runtime ---------------------------------------------------------------


class _Operator:
    """One subscription (two with ``key=``) whose state is one record per key."""

    def __init__(
        self,
        bus: Bus,
        name: str,
        topics: frozenset[str],
        key: Callable[[Event[object]], str] | None,
        batch: BatchPolicy | None,
        retry: RetryPolicy | None,
        outputs: Iterable[str | None] = (),
    ) -> None:
        self.name = name
        self.topics = topics
        self._bus = bus
        self._key = key
        self._keyed_topic = f"{name}:by-key"
        for out in outputs:
            if out is not None and (out in topics or out == self._keyed_topic):
                raise ValueError(
                    f"operator {name!r} would read its own output topic {out!r}: "
                    "emit to a topic it does not subscribe to"
                )
        names = [name] if key is None else [name, self._keyed_topic]
        taken = [n for n in names if n in bus.subscription_names]
        if taken:
            # Checked before subscribing, so that a clash leaves nothing half registered.
            raise SubscriptionError(
                f"a subscription named {taken[0]!r} already exists on this bus; give "
                "each operator a distinct name="
            )
        policy = _retry_policy(bus, retry)
        if key is None:
            # ordered=True: per-key state is only safe with events of a key in order.
            bus.subscribe(topics, name=name, batch=batch, retry=policy, ordered=True)(self._handle)
        else:
            bus.subscribe(topics, name=self._keyed_topic, batch=batch, retry=policy)(self._forward)
            bus.subscribe(self._keyed_topic, name=name, batch=batch, retry=policy, ordered=True)(
                self._handle
            )

    async def _forward(self, events: list[Event[object]], ctx: Context) -> None:
        """The ``key=`` step: republish each event keyed by ``key(event)``."""
        assert self._key is not None
        for event in events:
            op_key = self._key(event)
            if not isinstance(op_key, str):
                reason = f"key= returned {type(op_key).__name__} {op_key!r}, not a string"
                ctx.fail(event, OperatorInputError(self.name, event.id, reason))
                continue
            original = _Keyed(
                event.id,
                event.seq,
                event.topic,
                event.key,
                event.payload,
                event.headers,
                event.created_at,
            )
            await ctx.publish(self._keyed_topic, original, key=op_key)

    async def _handle(self, events: list[Event[object]], ctx: Context) -> None:
        groups: dict[str, list[tuple[Event[object], float]]] = {}
        for delivered in events:
            event = delivered
            if self._key is not None:
                k = msgspec.convert(delivered.payload, _Keyed)
                event = Event(
                    k.id,
                    k.seq,
                    k.topic,
                    k.key,
                    k.payload,
                    k.headers,
                    k.created_at,
                    delivered.attempt,
                )
            op_key = delivered.key
            if op_key is None:
                reason = "it has no key; publish it with key=, or give the operator key="
                ctx.fail(delivered, OperatorInputError(self.name, event.id, reason))
                continue
            t = self._event_time(event)
            if not (isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t)):
                reason = f"its event time is {t!r}, not a finite number"
                ctx.fail(delivered, OperatorInputError(self.name, event.id, reason))
                continue
            groups.setdefault(op_key, []).append((event, t))
        for op_key, group in groups.items():
            # One read and one write of the key's record per batch.
            record = await ctx.state.get(op_key, _MISSING)
            ctx.state.set(op_key, await self._step(op_key, record, group, ctx))

    def _event_time(self, event: Event[object]) -> object:
        """The event's time (checked by the caller); 0 for operators without time."""
        return 0.0

    async def _step(
        self, key: str, record: object, events: list[tuple[Event[object], float]], ctx: Context
    ) -> object:
        """Apply one batch's events of ``key`` (in order) to its stored ``record``
        (``_MISSING`` before its first event); return the new record."""
        raise NotImplementedError

    async def _records(self) -> AsyncIterator[tuple[str, object]]:
        async for key, record in self._bus.state(self.name).items():
            yield key, record


class _Timed(_Operator):
    """An operator in event time: a watermark and a late count per key."""

    def __init__(
        self,
        bus: Bus,
        name: str,
        topics: frozenset[str],
        key: Callable[[Event[object]], str] | None,
        time: Callable[[Event[object]], float] | None,
        lateness: float,
        late: str | None,
        batch: BatchPolicy | None,
        retry: RetryPolicy | None,
        emit: str,
    ) -> None:
        self._time = time
        self.lateness = lateness
        self.late_topic = late
        self.emit = emit
        super().__init__(bus, name, topics, key, batch, retry, (emit, late))

    def _event_time(self, event: Event[object]) -> object:
        return event.created_at if self._time is None else self._time(event)

    async def _late(self, key: str, events: list[Event[object]], ctx: Context) -> None:
        if self.late_topic is not None:
            for event in events:
                await ctx.publish(
                    self.late_topic, event.payload, key=key, headers=event.headers or None
                )

    async def watermark(self, key: str) -> float | None:
        """The committed watermark of ``key``: the greatest event time seen for it
        minus ``lateness``; None before its first event.

        Cancellation: a read; nothing changes.
        """
        record = await self._bus.state(self.name).get(key)
        if record is None:
            return None
        top = cast("list[object]", record)[0]
        return None if top is None else cast(float, top) - self.lateness

    async def late_count(self, key: str | None = None) -> int:
        """How many events arrived after every window (or join partner) they belonged
        to had closed, as committed: for ``key``, or for all keys (a scan).

        Cancellation: a read; nothing changes.
        """
        if key is not None:
            record = await self._bus.state(self.name).get(key)
            return 0 if record is None else cast(int, cast("list[object]", record)[1])
        total = 0
        async for _, record in self._records():
            total += cast(int, cast("list[object]", record)[1])
        return total


# -- reduce ---------------------------------------------------------------------------


class Reduce(_Operator, Generic[A]):
    """A keyed running aggregate; create it with :func:`reduce`."""

    def __init__(
        self,
        bus: Bus,
        topics: frozenset[str],
        name: str,
        fn: Callable[[A, Event[P]], A],
        initial: A,
        key: Callable[[Event[P]], str] | None,
        batch: BatchPolicy | None,
        retry: RetryPolicy | None,
    ) -> None:
        self._fn = cast("Callable[[object, Event[object]], object]", fn)
        self._initial = _fresh(initial)
        super().__init__(
            bus, name, topics, cast("Callable[[Event[object]], str] | None", key), batch, retry
        )

    async def _step(
        self, key: str, record: object, events: list[tuple[Event[object], float]], ctx: Context
    ) -> object:
        acc = self._initial() if record is _MISSING else record
        fn = self._fn
        for event, _ in events:
            acc = fn(acc, event)
        return acc

    @overload
    async def get(self, key: str) -> A | None: ...

    @overload
    async def get(self, key: str, default: T) -> A | T: ...

    async def get(self, key: str, default: object = None) -> object:
        """The committed aggregate of ``key``, or ``default`` before its first event.

        Cancellation: a read; nothing changes.
        """
        return await self._bus.state(self.name).get(key, default)

    async def items(self) -> AsyncIterator[tuple[str, A]]:
        """Every key and its committed aggregate, in key order (paged from the log).

        Cancellation: a read; nothing changes.
        """
        async for key, acc in self._records():
            yield key, cast(A, acc)


def reduce(
    bus: Bus,
    topic: str | Iterable[str],
    *,
    name: str,
    fn: Callable[[A, Event[P]], A],
    initial: A,
    key: Callable[[Event[P]], str] | None = None,
    batch: BatchPolicy | None = None,
    retry: RetryPolicy | None = None,
) -> Reduce[A]:
    """Keep, per key, ``acc = fn(acc, event)`` over every event of ``topic``.

    Each key starts from a copy of ``initial``. Accumulators are stored in the log
    with msgpack: use built-in values (a tuple comes back as a list, a Struct as a
    dict). Events of one key are folded in publish order.

    Crash guarantee: each key's accumulator commits in the same transaction as the
    subscription's position, so after any crash every event is folded in exactly
    once.

    Args:
        bus: The bus to register on.
        topic: The topic (or topics) to read.
        name: The durable name: the subscription and its state are kept under it.
        fn: ``fn(acc, event) -> acc``, a plain function. An exception is retried
            under ``retry``; later events of its key wait behind it.
        initial: The accumulator of a key before its first event (msgspec-encodable).
        key: The grouping key of an event; ``event.key`` by default. Given, events
            are first republished by key (see the module docs).
        batch: The subscription's batching; the bus's default if None.
        retry: The subscription's retries; the bus's default if None.

    Returns:
        The operator, to read committed aggregates with ``get`` and ``items``.

    Raises:
        TypeError: ``fn`` or ``key`` is not callable, ``initial`` cannot be encoded,
            or ``name``/``topic`` is not a non-empty string.
        ValueError: ``topic`` is ``"*"``.
        SubscriptionError: ``name`` is taken on this bus.
        BusClosed: The bus is closed.
    """
    name = _check_name(name)
    topics = _check_topics("topic", topic)
    _check_callable("fn", fn)
    _check_callable("key", key, optional=True)
    return Reduce(bus, topics, name, fn, initial, key, batch, retry)


# -- windows --------------------------------------------------------------------------


class Windows(_Timed, Generic[A]):
    """An event-time window aggregate; create it with :func:`tumbling` or
    :func:`sliding`."""

    def __init__(
        self,
        bus: Bus,
        topics: frozenset[str],
        *,
        name: str,
        size: float,
        slide: float,
        aggregate: Callable[[A, Event[P]], A],
        initial: A,
        emit: str,
        lateness: float,
        late: str | None,
        time: Callable[[Event[P]], float] | None,
        key: Callable[[Event[P]], str] | None,
        batch: BatchPolicy | None,
        retry: RetryPolicy | None,
    ) -> None:
        self.size = size
        self.slide = slide
        self._aggregate = cast("Callable[[object, Event[object]], object]", aggregate)
        self._initial = _fresh(initial)
        super().__init__(
            bus,
            name,
            topics,
            cast("Callable[[Event[object]], str] | None", key),
            cast("Callable[[Event[object]], float] | None", time),
            lateness,
            late,
            batch,
            retry,
            emit,
        )

    async def _step(
        self, key: str, record: object, events: list[tuple[Event[object], float]], ctx: Context
    ) -> object:
        state = _WindowState() if record is _MISSING else msgspec.convert(record, _WindowState)
        size, slide, fn = self.size, self.slide, self._aggregate
        windows = dict(state.open)
        top = state.top
        mark = -math.inf if top is None else top - self.lateness
        late: list[Event[object]] = []
        for event, t in events:
            # A window closes once the watermark reaches its end; an event only ever
            # enters windows still open, so a closed window never reopens.
            live = [s for s in _window_starts(t, size, slide) if s + size > mark]
            if not live:
                late.append(event)
                continue
            for start in live:
                windows[start] = fn(windows[start] if start in windows else self._initial(), event)
            if top is None or t > top:
                top = t
                mark = top - self.lateness
        still_open: list[tuple[float, object]] = []
        for start, value in sorted(windows.items()):
            if start + size <= mark:
                result = {"key": key, "start": start, "end": start + size, "value": value}
                await ctx.publish(self.emit, result, key=key)
            else:
                still_open.append((start, value))
        await self._late(key, late, ctx)
        return _WindowState(top, state.late + len(late), still_open)

    async def open_windows(self) -> AsyncIterator[Window[A]]:
        """Every window not closed yet, as committed, by key then start (a scan of
        the operator's state, paged from the log).

        Cancellation: a read; nothing changes.
        """
        async for key, record in self._records():
            state = msgspec.convert(record, _WindowState)
            for start, value in state.open:
                yield Window(key, start, start + self.size, cast(A, value))

    @overload
    async def get(self, key: str, start: float) -> A | None: ...

    @overload
    async def get(self, key: str, start: float, default: T) -> A | T: ...

    async def get(self, key: str, start: float, default: object = None) -> object:
        """The committed aggregate of the open window of ``key`` starting at
        ``start``, or ``default`` (no event yet, or the window has closed: its result
        was published to ``emit``).

        Cancellation: a read; nothing changes.
        """
        record = await self._bus.state(self.name).get(key)
        if record is not None:
            for s, value in msgspec.convert(record, _WindowState).open:
                if s == start:
                    return value
        return default


def sliding(
    bus: Bus,
    topic: str | Iterable[str],
    *,
    name: str,
    size: float,
    slide: float,
    aggregate: Callable[[A, Event[P]], A],
    initial: A,
    emit: str,
    lateness: float = 0.0,
    late: str | None = None,
    time: Callable[[Event[P]], float] | None = None,
    key: Callable[[Event[P]], str] | None = None,
    batch: BatchPolicy | None = None,
    retry: RetryPolicy | None = None,
) -> Windows[A]:
    """Aggregate each key's events in sliding windows of event time.

    Windows are ``[start, start + size)`` for every ``start`` that is a multiple of
    ``slide`` (so an event falls in about ``size / slide`` of them). A window's
    aggregate starts from a copy of ``initial`` and takes ``aggregate(acc, event)``
    for each of its events. When the key's watermark (its greatest event time minus
    ``lateness``) reaches a window's end, the window closes: its result
    ``{"key", "start", "end", "value"}`` is published to ``emit`` with the operator
    key as event key, and its state is deleted. An event whose windows have all
    closed is late: it is counted (``late_count``) and dropped, or published to
    ``late`` (its payload, keyed by the operator key) if given.

    Crash guarantee: the open windows, the watermark, the late count and the
    subscription's position commit in one transaction with the published results.
    After any crash each window's result is published exactly once, each event is
    aggregated once, and which events are late does not depend on when the process
    died (it depends only on each key's events in publish order).

    Args:
        bus: The bus to register on.
        topic: The topic (or topics) to read.
        name: The durable name: the subscription and its state are kept under it.
        size: Window length, in the unit of the event times (> 0).
        slide: Distance between window starts (0 < slide <= size).
        aggregate: ``aggregate(acc, event) -> acc``, a plain function.
        initial: A window's aggregate before its first event (msgspec-encodable).
        emit: The topic for closed windows' results.
        lateness: How far behind a key's greatest event time an event may be and
            still count (>= 0): the disorder the producers allow.
        late: A topic for late events; None drops them (they are still counted).
        time: The event time of an event (a finite number); ``event.created_at``
            (publish time, seconds) by default.
        key: The grouping key of an event; ``event.key`` by default. Given, events
            are first republished by key (see the module docs).
        batch: The subscription's batching; the bus's default if None.
        retry: The subscription's retries; the bus's default if None.

    Returns:
        The operator, to read open windows, watermarks and late counts.

    Raises:
        ValueError: ``size``, ``slide`` or ``lateness`` is not a finite number in
            range, ``slide > size``, one event would fall in more than 10,000
            windows, ``topic`` is ``"*"``, or ``emit``/``late`` is an input topic.
        TypeError: ``aggregate``, ``time`` or ``key`` is not callable, ``initial``
            cannot be encoded, or a name or topic is not a non-empty string.
        SubscriptionError: ``name`` is taken on this bus.
        BusClosed: The bus is closed.
    """
    name = _check_name(name)
    topics = _check_topics("topic", topic)
    size = _check_number("size", size, positive=True)
    slide = _check_number("slide", slide, positive=True)
    if slide > size:
        raise ValueError(
            f"slide= ({slide!r}) must not exceed size= ({size!r}): events between windows "
            "would belong to none; use slide <= size (slide == size for tumbling windows)"
        )
    if size / slide > MAX_WINDOWS_PER_EVENT:
        raise ValueError(
            f"size/slide = {size / slide:.0f}: each event would fall in that many windows "
            f"(at most {MAX_WINDOWS_PER_EVENT}); use a larger slide="
        )
    lateness = _check_number("lateness", lateness, positive=False)
    emit = _check_topic("emit", emit)
    if late is not None:
        late = _check_topic("late", late)
    _check_callable("aggregate", aggregate)
    _check_callable("time", time, optional=True)
    _check_callable("key", key, optional=True)
    return Windows(
        bus,
        topics,
        name=name,
        size=size,
        slide=slide,
        aggregate=aggregate,
        initial=initial,
        emit=emit,
        lateness=lateness,
        late=late,
        time=time,
        key=key,
        batch=batch,
        retry=retry,
    )


def tumbling(
    bus: Bus,
    topic: str | Iterable[str],
    *,
    name: str,
    size: float,
    aggregate: Callable[[A, Event[P]], A],
    initial: A,
    emit: str,
    lateness: float = 0.0,
    late: str | None = None,
    time: Callable[[Event[P]], float] | None = None,
    key: Callable[[Event[P]], str] | None = None,
    batch: BatchPolicy | None = None,
    retry: RetryPolicy | None = None,
) -> Windows[A]:
    """Aggregate each key's events in tumbling (back-to-back) windows of event time,
    ``[n * size, (n + 1) * size)``: :func:`sliding` with ``slide=size``, where the
    closing rule and late events are described.

    Crash guarantee: as for :func:`sliding`, each window's result is published
    exactly once and each event aggregated once across any number of crashes.

    Args:
        bus: The bus to register on.
        topic: The topic (or topics) to read.
        name: The durable name: the subscription and its state are kept under it.
        size: Window length, in the unit of the event times (> 0).
        aggregate: ``aggregate(acc, event) -> acc``, a plain function.
        initial: A window's aggregate before its first event (msgspec-encodable).
        emit: The topic for closed windows' results.
        lateness: How far behind a key's greatest event time an event may be and
            still count (>= 0).
        late: A topic for late events; None drops them (they are still counted).
        time: The event time of an event; ``event.created_at`` by default.
        key: The grouping key of an event; ``event.key`` by default.
        batch: The subscription's batching; the bus's default if None.
        retry: The subscription's retries; the bus's default if None.

    Returns:
        The operator, to read open windows, watermarks and late counts.

    Raises:
        ValueError: ``size`` or ``lateness`` is not a finite number in range,
            ``topic`` is ``"*"``, or ``emit``/``late`` is an input topic.
        TypeError: ``aggregate``, ``time`` or ``key`` is not callable, ``initial``
            cannot be encoded, or a name or topic is not a non-empty string.
        SubscriptionError: ``name`` is taken on this bus.
        BusClosed: The bus is closed.
    """
    size = _check_number("size", size, positive=True)
    return sliding(
        bus,
        topic,
        name=name,
        size=size,
        slide=size,
        aggregate=aggregate,
        initial=initial,
        emit=emit,
        lateness=lateness,
        late=late,
        time=time,
        key=key,
        batch=batch,
        retry=retry,
    )


# -- join -----------------------------------------------------------------------------


class Join(_Timed):
    """A windowed join of two topics by key; create it with :func:`join`."""

    def __init__(
        self,
        bus: Bus,
        *,
        left: str,
        right: str,
        name: str,
        within: float,
        emit: str,
        lateness: float,
        late: str | None,
        time: Callable[[Event[object]], float] | None,
        key: Callable[[Event[object]], str] | None,
        batch: BatchPolicy | None,
        retry: RetryPolicy | None,
    ) -> None:
        self.left = left
        self.right = right
        self.within = within
        super().__init__(
            bus,
            name,
            frozenset((left, right)),
            key,
            time,
            lateness,
            late,
            batch,
            retry,
            emit,
        )

    async def _step(
        self, key: str, record: object, events: list[tuple[Event[object], float]], ctx: Context
    ) -> object:
        state = _JoinState() if record is _MISSING else msgspec.convert(record, _JoinState)
        within = self.within
        top = state.top
        mark = -math.inf if top is None else top - self.lateness
        late: list[Event[object]] = []
        for event, t in events:
            if t < mark:
                late.append(event)
                continue
            is_left = event.topic == self.left
            mine, other = (state.left, state.right) if is_left else (state.right, state.left)
            for t2, payload in other:
                # A partner evicted below could not match: t >= mark > t2 + within.
                if abs(t - t2) <= within:
                    pair = (event.payload, payload) if is_left else (payload, event.payload)
                    result = {"key": key, "left": pair[0], "right": pair[1]}
                    await ctx.publish(self.emit, result, key=key)
            mine.append((t, event.payload))
            if top is None or t > top:
                top = t
                mark = top - self.lateness
        state.left = [entry for entry in state.left if entry[0] + within >= mark]
        state.right = [entry for entry in state.right if entry[0] + within >= mark]
        await self._late(key, late, ctx)
        state.top = top
        state.late += len(late)
        return state

    async def buffered(self, key: str) -> tuple[int, int]:
        """How many left and right events of ``key`` are buffered (committed),
        waiting for partners.

        Cancellation: a read; nothing changes.
        """
        record = await self._bus.state(self.name).get(key)
        if record is None:
            return 0, 0
        state = msgspec.convert(record, _JoinState)
        return len(state.left), len(state.right)


def join(
    bus: Bus,
    left: str,
    right: str,
    *,
    name: str,
    within: float,
    emit: str,
    lateness: float = 0.0,
    late: str | None = None,
    time: Callable[[Event[P]], float] | None = None,
    key: Callable[[Event[P]], str] | None = None,
    batch: BatchPolicy | None = None,
    retry: RetryPolicy | None = None,
) -> Join:
    """Join the events of ``left`` and ``right`` that share a key and whose event
    times are at most ``within`` apart.

    One subscription reads both topics. Each event is buffered under its key and
    side; when it arrives it is matched with the other side's buffered events, and
    each matched pair is published once to ``emit`` as ``{"key", "left", "right"}``
    (the two payloads), keyed by the operator key. A buffered event is evicted once
    the key's watermark (greatest event time minus ``lateness``) passes its time
    plus ``within``: no event that is not late could still match it. An event
    older than the watermark is late: counted (``late_count``) and dropped, or
    published to ``late`` if given. With every event on time, the pairs are exactly
    those of a nested-loop join on key and ``abs(t_left - t_right) <= within``.

    Crash guarantee: the buffers, the watermark, the late count and the
    subscription's position commit in one transaction with the published pairs, so
    after any crash each pair is published exactly once.

    Args:
        bus: The bus to register on.
        left: The left topic.
        right: The right topic (another one).
        name: The durable name: the subscription and its state are kept under it.
        within: The largest difference of event times in a pair (>= 0).
        emit: The topic for matched pairs.
        lateness: How far behind a key's greatest event time an event may be and
            still be matched (>= 0).
        late: A topic for late events; None drops them (they are still counted).
        time: The event time of an event (a finite number); ``event.created_at`` by
            default.
        key: The join key of an event; ``event.key`` by default. Given, events are
            first republished by key (see the module docs).
        batch: The subscription's batching; the bus's default if None.
        retry: The subscription's retries; the bus's default if None.

    Returns:
        The operator, to read buffers, watermarks and late counts.

    Raises:
        ValueError: ``within`` or ``lateness`` is not a finite number >= 0,
            ``left == right``, or ``emit``/``late`` is an input topic.
        TypeError: ``time`` or ``key`` is not callable, or a name or topic is not a
            non-empty string.
        SubscriptionError: ``name`` is taken on this bus.
        BusClosed: The bus is closed.
    """
    name = _check_name(name)
    left = _check_topic("left", left)
    right = _check_topic("right", right)
    if left == right:
        raise ValueError(f"left= and right= must be two topics, got {left!r} twice")
    within = _check_number("within", within, positive=False)
    lateness = _check_number("lateness", lateness, positive=False)
    emit = _check_topic("emit", emit)
    if late is not None:
        late = _check_topic("late", late)
    _check_callable("time", time, optional=True)
    _check_callable("key", key, optional=True)
    return Join(
        bus,
        left=left,
        right=right,
        name=name,
        within=within,
        emit=emit,
        lateness=lateness,
        late=late,
        time=cast("Callable[[Event[object]], float] | None", time),
        key=cast("Callable[[Event[object]], str] | None", key),
        batch=batch,
        retry=retry,
    )
