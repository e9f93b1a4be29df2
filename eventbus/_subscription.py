"""One subscription at run time: its channel, its batcher and its handler loop.

The channel is a bounded deque. While the subscription keeps up ("live"), the writer
pushes each committed event straight into it; once it is full the subscription falls
back to reading its backlog from the log, and goes live again when it reaches the
head. So memory stays bounded however far behind a handler falls.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
import traceback
import typing
from collections import deque
from collections.abc import Awaitable, Callable

import anyio
import msgspec

import storage as _storage
from backpressure import (
    AIMDController,
    BatchController,
    BatchSample,
    FixedController,
    GradientController,
    NaturalController,
)
from storage import DeadRecord, Record, SubscriptionInfo, WriteBatch

from ._config import BatchPolicy, RetryPolicy
from ._context import Context, Encoder
from ._errors import BusClosed, StorageError, SubscriptionError
from ._event import Event
from ._metrics import SubscriptionRecorder
from ._recent import RecentEvents
from ._retry import backoff_delay
from ._writer import LogWriter

logger = logging.getLogger(__name__)

EventHandler = Callable[[Event[typing.Any], Context], Awaitable[None]]
BatchHandler = Callable[[list[Event[typing.Any]], Context], Awaitable[None]]
Handler = EventHandler | BatchHandler


def is_batch_handler(handler: Callable[..., object]) -> bool:
    """True when the handler's first parameter is annotated ``list[...]`` (string
    annotations included)."""
    try:
        params = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError) as exc:
        raise SubscriptionError(f"cannot inspect handler {handler!r}: {exc}") from exc
    if len(params) < 2:
        raise SubscriptionError(
            f"handler {getattr(handler, '__qualname__', handler)!r} must take two "
            "parameters, (event, ctx) or (events: list[Event], ctx)"
        )
    first = params[0]
    annotation: object = first.annotation
    if annotation is inspect.Parameter.empty:
        return False
    if isinstance(annotation, str):
        text = annotation.replace(" ", "").lower()
        try:
            annotation = typing.get_type_hints(handler).get(first.name, annotation)
        except Exception:  # noqa: BLE001 - an unresolvable string: judge it by its text
            return text.startswith(("list[", "typing.list["))
    return bool(typing.get_origin(annotation) is list or annotation is list)


def make_controller(policy: BatchPolicy) -> BatchController:
    if policy.mode == "natural":
        return NaturalController(policy.min_size, policy.max_size)
    if policy.mode == "fixed":
        return FixedController(policy.max_size, policy.max_wait, policy.min_size)
    if policy.mode == "aimd":
        return AIMDController(policy.min_size, policy.max_size, policy.target_latency)
    return GradientController(policy.min_size, policy.max_size, policy.target_latency)


class Subscription:
    """The runtime of one ``bus.subscribe(...)``."""

    def __init__(
        self,
        *,
        name: str,
        topics: frozenset[str],
        handler: Handler,
        batch_policy: BatchPolicy,
        retry: RetryPolicy,
        capacity: int,
        cursor: int,
        writer: LogWriter,
        log: _storage.Storage,
        recent: RecentEvents,
        to_event: Callable[[Record], Event[object]],
        encode: Encoder,
        on_progress: Callable[[], None],
        register: SubscriptionInfo | None,
    ) -> None:
        self.name = name
        self.topics = topics
        self._filter = None if "*" in topics else topics
        self.handler = handler
        self.is_batch = is_batch_handler(handler)
        # Typed once here: a cast per call would build a typing object every time.
        self._call_handler = typing.cast("Callable[[object, Context], Awaitable[None]]", handler)
        self.batch_policy = batch_policy
        self.retry = retry
        self.controller = make_controller(batch_policy)
        self.capacity = capacity
        self.channel: deque[Event[object]] = deque()
        self.read_pos = cursor  # every event with seq <= read_pos has been examined
        self.acked = cursor  # ... and with seq <= acked, handled and committed
        self.stats = SubscriptionRecorder()
        self._writer = writer
        self._log = log
        self._recent = recent
        self._to_event = to_event
        self._ctx = Context(name, encode)
        self._on_progress = on_progress
        self._register = register
        self._ready = asyncio.Event()
        self._busy = False
        self._stopping = False
        self._dead: list[DeadRecord] = []
        self._rng = random.Random()
        self.scope: anyio.CancelScope | None = None
        self.finished = anyio.Event()

    # -- called by the bus ----------------------------------------------------------

    def wake(self) -> None:
        """New events were committed."""
        self._ready.set()

    @property
    def live(self) -> bool:
        """True while the subscription reads from memory (close to the head)."""
        return self.read_pos + 1 >= self._recent.first_seq

    def finished_upto(self) -> int:
        """Every event of this subscription with ``seq <=`` this is handled and acked
        (or, when idle, needs nothing: events on other topics)."""
        if not self._busy and not self.channel:
            return max(self.acked, self.read_pos)
        return self.acked

    def idle_position(self) -> int | None:
        """A cursor worth persisting for an idle subscription, else None."""
        if not self._busy and not self.channel and self.read_pos > self.acked:
            return self.read_pos
        return None

    def backlog(self) -> int:
        """Events waiting: buffered, plus (an upper bound on) those not yet examined."""
        return len(self.channel) + max(0, self._writer.committed_head - self.read_pos)

    def stop(self) -> None:
        self._stopping = True
        self._ready.set()

    # -- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Handle batches until stopped or cancelled. A cancelled batch is not
        acknowledged: it is delivered again on the next open."""
        try:
            with anyio.CancelScope() as self.scope:
                if self._register is not None:
                    await self._commit(WriteBatch(subscriptions=[self._register]))
                    self._register = None
                while not self._stopping:
                    batch = await self._next_batch()
                    if batch is None:
                        break
                    await self._handle(batch)
        except BusClosed:
            pass
        finally:
            self.finished.set()

    async def _next_batch(self) -> list[Event[object]] | None:
        channel = self.channel
        while not self._stopping:
            if not channel:
                self._ready.clear()
                if self.read_pos >= self._writer.committed_head:
                    await self._ready.wait()
                    continue
                await self._fill()
                continue
            target = self.controller.target()
            linger = self.controller.linger()
            if linger > 0 and len(channel) < target:
                with anyio.move_on_after(linger):
                    while len(channel) < target and not self._stopping:
                        if self.read_pos < self._writer.committed_head:
                            await self._fill()
                        else:
                            self._ready.clear()
                            await self._ready.wait()
            n = min(target, len(channel))
            return [channel.popleft() for _ in range(n)]
        return None

    async def _fill(self) -> None:
        """Fetch the next events: from memory near the head, else from the log."""
        upto = self._writer.committed_head
        room = self.capacity - len(self.channel)
        if self.read_pos >= upto or room <= 0:
            return
        taken = self._recent.take(self.read_pos, upto, self._filter, room)
        if taken is not None:
            events, self.read_pos = taken
            self.channel.extend(events)
        else:
            records = await self._log.read(self.read_pos, upto, self._filter, room)
            for rec in records:
                try:
                    self.channel.append(self._to_event(rec))
                except msgspec.DecodeError as exc:
                    self._dead.append(self._dead_record(rec, 0, exc, time.time()))
            self.read_pos = records[-1].seq if len(records) == room else upto
        if not self.channel:
            self._on_progress()  # moved past events of other topics: drain may care

    async def _handle(self, batch: list[Event[object]]) -> None:
        self._busy = True
        started = time.monotonic()
        wait_time = max(0.0, time.time() - batch[0].created_at)
        done = False
        try:
            if self.is_batch:
                await self._run_batch(batch)
            elif self.retry.timeout is None:
                await self._run_events_fast(batch)
            else:
                for event in batch:
                    await self._run_one(event)
            cursor = self.read_pos if not self.channel else batch[-1].seq
            ack = WriteBatch(
                appends=self._ctx._take_outbox(), acks={self.name: cursor}, dead=self._dead
            )
            self._dead = []
            await self._commit(ack)
            done = True
        finally:
            self._busy = False
            if not done:
                # Abandoned (cancelled at close): nothing past the acknowledged cursor
                # counts as finished; it is all delivered again on the next open.
                self.read_pos = self.acked
                self.channel.clear()
        self.acked = max(self.acked, cursor)
        now = time.monotonic()
        self.stats.batch(len(batch), now - started, batch[0].created_at, batch[-1].created_at)
        self.controller.observe(
            BatchSample(len(batch), now - started, wait_time, self.backlog(), now)
        )
        self._on_progress()

    async def _run_events_fast(self, batch: list[Event[object]]) -> None:
        """Per-event handlers without a timeout: await the handler directly, and
        enter the retry machinery only when it raises."""
        handler = self._call_handler
        ctx = self._ctx
        outbox = ctx._outbox
        for event in batch:
            ctx._event = event
            ctx.attempt = event.attempt
            mark = len(outbox)
            try:
                await handler(event, ctx)
            except Exception as exc:  # noqa: BLE001 - retried or dead-lettered below
                ctx._rollback_to(mark)
                await self._run_one(event, first_error=exc)

    async def _call(self, arg: Event[object] | list[Event[object]]) -> None:
        timeout = self.retry.timeout
        if timeout is None:
            await self._call_handler(arg, self._ctx)
        else:
            with anyio.fail_after(timeout):
                await self._call_handler(arg, self._ctx)

    async def _run_batch(self, batch: list[Event[object]]) -> None:
        if len(batch) == 1:
            await self._run_one(batch[0])
            return
        mark = self._ctx._begin(None, batch[0].attempt)
        try:
            await self._call(batch)
            return
        except Exception as exc:  # noqa: BLE001 - any handler error is isolated below
            self._ctx._rollback_to(mark)
            self.stats.failed_attempts += 1
            logger.warning(
                "subscription %s: batch of %d failed (%s: %s); splitting it to isolate "
                "the failing events",
                self.name,
                len(batch),
                type(exc).__name__,
                exc,
            )
        # Bisect: the healthy halves succeed, the poison narrows down to single events.
        middle = len(batch) // 2
        await self._run_batch(batch[:middle])
        await self._run_batch(batch[middle:])

    async def _run_one(self, event: Event[object], first_error: Exception | None = None) -> None:
        """Handle one event with retries; ``first_error`` is a failure of attempt
        ``event.attempt`` that already happened."""
        attempt = event.attempt
        first_failed: float | None = None
        delay = self.retry.initial_delay
        error = first_error
        while True:
            if error is None:
                current = (
                    event
                    if attempt == event.attempt
                    else msgspec.structs.replace(event, attempt=attempt)
                )
                mark = self._ctx._begin(None if self.is_batch else current, attempt)
                try:
                    await self._call([current] if self.is_batch else current)
                    return
                except Exception as exc:  # noqa: BLE001 - handler errors are retried or dead-lettered
                    self._ctx._rollback_to(mark)
                    error = exc
            self.stats.failed_attempts += 1
            now = time.time()
            first_failed = first_failed or now
            if attempt >= self.retry.max_attempts:
                logger.error(
                    "subscription %s: event %s (seq %d) failed %d times, dead-lettering it: %s: %s",
                    self.name,
                    event.id,
                    event.seq,
                    attempt,
                    type(error).__name__,
                    error,
                )
                record = Record(
                    event.seq, event.id, event.topic, event.key, b"", None, event.created_at
                )
                self._dead.append(self._dead_record(record, attempt, error, first_failed, event))
                self.stats.dead_lettered += 1
                return
            delay = backoff_delay(self.retry, attempt, delay, self._rng)
            logger.warning(
                "subscription %s: event %s attempt %d failed (%s: %s); retrying in %.3fs",
                self.name,
                event.id,
                attempt,
                type(error).__name__,
                error,
                delay,
            )
            await anyio.sleep(delay)
            attempt += 1
            error = None

    def _dead_record(
        self,
        record: Record,
        attempts: int,
        exc: BaseException,
        first_failed: float,
        event: Event[object] | None = None,
    ) -> DeadRecord:
        if event is not None:
            # Re-encode what the handler saw: the original bytes are not kept in memory.
            record = Record(
                record.seq,
                record.id,
                record.topic,
                record.key,
                msgspec.msgpack.encode(event.payload),
                msgspec.msgpack.encode(event.headers) if event.headers else None,
                record.created_at,
            )
        return DeadRecord(
            subscription=self.name,
            record=record,
            attempts=attempts,
            error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
            error_message=str(exc),
            traceback="".join(traceback.format_exception(exc)),
            first_failed_at=first_failed,
            last_failed_at=time.time(),
        )

    async def _commit(self, batch: WriteBatch) -> None:
        """Commit an acknowledgement, retrying storage failures: the handler's work
        is already done, so giving up here would only cause a redelivery."""
        delay = 0.05
        while True:
            try:
                await self._writer.commit(batch)
                return
            except StorageError as exc:
                logger.warning(
                    "subscription %s: acknowledgement failed (%s); retrying in %.2fs",
                    self.name,
                    exc,
                    delay,
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
