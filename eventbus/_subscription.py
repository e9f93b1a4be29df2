"""One subscription at run time: its batcher, its main lane, and what the bus asks of it.

Events reach the main lane in log order (from the window of recent events near the
head, or from the log further behind); its channel is bounded, so memory does not
grow with the backlog. A failing event leaves the main lane at once for the retry
lane (:mod:`._retry_lane`; its due time persisted in the same transaction as the
batch's acknowledgement), so the main lane never sleeps for a retry; with ordering
per key, later events of that key wait behind it in the retry lane.

Before a batch is handed to the handler, the log records how far it reaches (one
write per batch, usually riding on the previous acknowledgement). If the process
dies while handling, the next open (:mod:`._recovery`) moves that stretch to the
retry lane with one attempt counted, so an event that kills the process is
dead-lettered after ``max_attempts`` deaths instead of crash-looping forever.

Every handler call in flight is visible to reconciliation (:class:`HandlerCall`), which
cancels one that outlives its lease: the call then fails with :class:`HandlerStuck`,
an attempt like any other.
"""

from __future__ import annotations

import asyncio
import logging
import time
import typing
from collections import deque
from collections.abc import Awaitable, Callable

import anyio
import msgspec

import storage as _storage
from backpressure import BatchSample
from storage import DeadRecord, Record, RetryRecord, SubscriptionInfo, WriteBatch

from ._breaker import CircuitBreaker
from ._calls import HandlerCall
from ._config import BatchPolicy, BreakerPolicy, RetryPolicy
from ._context import Context, Encoder
from ._errors import BusClosed, HandlerStuck, StorageError
from ._event import Event
from ._handler import Handler, is_batch_handler, make_controller
from ._metrics import SubscriptionRecorder
from ._recovery import recover
from ._retry_lane import Outcome, RetryLane
from ._state import State, StateCache
from .failures import dead_record
from .publish import LogWriter, RecentEvents

logger = logging.getLogger(__name__)


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
        breaker: BreakerPolicy | None,
        ordered: bool,
        capacity: int,
        known: SubscriptionInfo | None,
        cursor: int,
        writer: LogWriter,
        log: _storage.Storage,
        recent: RecentEvents,
        to_event: Callable[[Record], Event[object]],
        encode: Encoder,
        on_progress: Callable[[], None],
        register: SubscriptionInfo,
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
        self.ordered = ordered
        self.controller = make_controller(batch_policy)
        self.breaker = CircuitBreaker(breaker) if breaker is not None else None
        self.retry_lane = RetryLane(self)
        # The retry lane's, held here too so that the main lane reaches them directly.
        self.lane = self.retry_lane.schedule
        self.budget = self.retry_lane.budget
        self._lane_wake = self.retry_lane.wake
        self.capacity = capacity
        self.channel: deque[Event[object]] = deque()
        self.read_pos = cursor  # every event with seq <= read_pos has been examined
        self.acked = cursor  # ... and with seq <= acked, handled and committed
        self.stats = SubscriptionRecorder()
        self._known = known
        self._open_head = writer.committed_head  # the log's head when this one started
        self._marked = cursor  # the in-flight marker persisted in the log
        # Crash-loop protection; only bench/retries.py turns it off, to measure it.
        self._mark_batches = True
        self._writer = writer
        self._log = log
        self._recent = recent
        self._to_event = to_event
        self._encode = encode
        self.state_cache = StateCache(log, name)
        self._ctx = Context(name, encode, State(self.state_cache))
        self._on_progress = on_progress
        self._register = register
        self._ready = asyncio.Event()
        self._stop = anyio.Event()
        self._busy = False
        self._started = False
        self._stopping = False
        self.scope: anyio.CancelScope | None = None
        self.finished = anyio.Event()
        self.calls: set[HandlerCall] = set()  # in flight, for reconciliation
        self._main_call = HandlerCall("main", [])

    # -- called by the bus ----------------------------------------------------------

    def wake(self) -> None:
        """New events were committed."""
        self._ready.set()

    @property
    def started(self) -> bool:
        """Registered in the log and recovered: its retry lane mirrors the log's."""
        return self._started

    def stuck_calls(self, lease: float, now: float) -> list[HandlerCall]:
        """Handler calls in flight for more than ``lease`` seconds at ``now``
        (monotonic), including those already cancelled but not yet unwound."""
        return [c for c in self.calls if c.scope is not None and now - c.started > lease]

    def cancel_stuck(self, call: HandlerCall, lease: float) -> bool:
        """Cancel a call in flight: its events fail this attempt with
        :class:`HandlerStuck` and follow the retry policy (retried, or dead-lettered
        after ``max_attempts``). False if it had finished or was already cancelled."""
        if call.stuck is not None or call.scope is None or call not in self.calls:
            return False
        if time.monotonic() - call.started <= lease:
            return False  # the stuck event finished; the call now holds a fresh one
        call.stuck = lease
        call.scope.cancel()
        return True

    @property
    def live(self) -> bool:
        """True while the subscription reads from memory (close to the head)."""
        return self.read_pos + 1 >= self._recent.first_seq

    def finished_upto(self) -> int:
        """Every event of this subscription with ``seq <=`` this has left the main
        lane: handled, dead-lettered, or in the retry lane."""
        if self._started and not self._busy and not self.channel:
            return max(self.acked, self.read_pos)
        return self.acked

    def settled(self) -> bool:
        """Nothing waits in the retry lane."""
        return self._started and len(self.lane) == 0

    def idle_position(self) -> int | None:
        """A cursor worth persisting for an idle subscription, else None."""
        if self._started and not self._busy and not self.channel and self.read_pos > self.acked:
            return self.read_pos
        return None

    def backlog(self) -> int:
        """Events waiting: buffered, plus (an upper bound on) those not yet examined."""
        return len(self.channel) + max(0, self._writer.committed_head - self.read_pos)

    def wants_mark(self, topics: set[str], upto: int) -> bool:
        """Whether this subscription's in-flight marker should ride on a commit of
        appends on ``topics`` reaching ``upto``: it is near the head (so the stretch
        a crash would put under suspicion stays within two batches) and may take
        some of them next."""
        return (
            self._mark_batches
            and self._started
            and upto > self._marked
            and upto - self.acked <= 2 * self.batch_policy.max_size
            and (self._filter is None or not self._filter.isdisjoint(topics))
        )

    def marked(self, upto: int) -> None:
        """An in-flight marker up to ``upto`` was committed on this one's behalf."""
        self._marked = max(self._marked, upto)

    def stop(self) -> None:
        self._stopping = True
        self._stop.set()
        self._ready.set()
        self.retry_lane.stop()

    def add_retries(self, records: list[RetryRecord]) -> None:
        """Take redriven events into the retry lane (already committed to the log)."""
        self.retry_lane.add(records)

    def release(self) -> WriteBatch:
        """At close, after the tasks stopped: what the log must forget so that the
        abandoned work does not count as a process death on the next open."""
        batch = WriteBatch(inflight={self.name: self.acked})
        batch.retries = [
            msgspec.structs.replace(r, running=False) for r in self.lane.running.values()
        ]
        return batch

    # -- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Recover, then run the main lane and the retry lane until stopped or
        cancelled. A cancelled batch is not acknowledged: it is delivered again on
        the next open."""
        try:
            with anyio.CancelScope() as self.scope:
                await recover(self)
                self._started = True
                self._on_progress()
                async with anyio.create_task_group() as tg:
                    for i in range(self.retry.concurrency):
                        tg.start_soon(self.retry_lane.worker, name=f"{self.name} retry lane {i}")
                    await self._main_loop()
        except BusClosed:
            pass
        finally:
            self.finished.set()

    # -- main lane ------------------------------------------------------------------

    async def _main_loop(self) -> None:
        retries = self.retry_lane
        while not self._stopping:
            await self._breaker_gate()
            await retries.suspect_gate()
            batch = await self._next_batch()
            if batch is None:
                break
            if retries.suspect_running or retries.suspect_waiting:
                # A suspect claimed the floor while this batch was being fetched: put
                # the batch back (it stays unfinished for drain) and let it run alone.
                self.channel.extendleft(reversed(batch))
                continue
            if self.breaker is not None and self.breaker.probing and len(batch) > 1:
                # Half-open: one event probes whether the cause has gone.
                self.channel.extendleft(reversed(batch[1:]))
                batch = batch[:1]
            await self._handle(batch)
        self._lane_wake.set()

    async def _breaker_gate(self) -> None:
        breaker = self.breaker
        if breaker is None:
            return
        while not self._stopping:
            wait = breaker.wait_time(time.monotonic())
            if wait <= 0:
                return
            with anyio.move_on_after(wait):
                await self._stop.wait()

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
            # A batch never outgrows the channel: waiting for more than it can hold
            # would spin (a full channel takes nothing more, without awaiting).
            target = min(self.controller.target(), self.capacity)
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
            undecodable: list[DeadRecord] = []
            for rec in records:
                try:
                    self.channel.append(self._to_event(rec))
                except msgspec.DecodeError as exc:
                    # Not retryable: the bytes will not change.
                    undecodable.append(dead_record(self.name, rec, 0, exc, None))
            if undecodable:
                # Committed before the position passes them: an event is never
                # "finished" without being handled or dead-lettered.
                await self._commit(WriteBatch(dead=undecodable))
                self.stats.dead_lettered += len(undecodable)
            self.read_pos = records[-1].seq if len(records) == room else upto
        if not self.channel:
            self._on_progress()  # moved past events of other topics: drain may care

    def _blocked(self, key: str | None, outcome: Outcome) -> bool:
        return (
            key is not None and self.ordered and (key in outcome.blocked or self.lane.blocks(key))
        )

    async def _handle(self, batch: list[Event[object]]) -> None:
        self._busy = True
        started = time.monotonic()
        wait_time = max(0.0, time.time() - batch[0].created_at)
        done = False
        outcome = Outcome()
        try:
            if self._mark_batches and batch[-1].seq > self._marked:
                # Record how far this batch reaches before the handler sees it.
                self._marked = self.read_pos
                await self._commit(WriteBatch(inflight={self.name: self._marked}))
            if self.is_batch:
                await self._main_batch(batch, outcome)
                processed = len(batch)
            else:
                processed = await self._main_events(batch, outcome)
                if processed < len(batch):
                    # The breaker opened, or a stuck call was cancelled: the rest
                    # waits (in order) for the next batch.
                    self.channel.extendleft(reversed(batch[processed:]))
                    batch = batch[:processed]
            cursor = self.read_pos if not self.channel else batch[-1].seq
            ack = WriteBatch(
                appends=self._ctx._take_outbox(),
                state=self._ctx.state._take(),
                acks={self.name: cursor},
                dead=outcome.dead,
                retries=[r for r, _ in outcome.retries],
            )
            if self._mark_batches and self.channel:
                # The next batch comes from the channel: mark it with this commit.
                ahead = self.channel[min(self.batch_policy.max_size, len(self.channel)) - 1]
                if ahead.seq > self._marked:
                    ack.inflight[self.name] = ahead.seq
            await self._commit(ack)
            self.state_cache.committed(ack.state)
            self._marked = max(self._marked, ack.inflight.get(self.name, 0))
            done = True
        finally:
            self._busy = False
            if not done:
                # Abandoned (cancelled at close): nothing past the acknowledged cursor
                # counts as finished; it is all delivered again on the next open.
                self.read_pos = self.acked
                self.channel.clear()
        self.acked = max(self.acked, cursor)
        for record, due in outcome.retries:
            self.lane.add(record, due)
        # Wake the lane: new retries, or a suspect waiting for the main lane to pause.
        self._lane_wake.set()
        self.stats.dead_lettered += len(outcome.dead)
        self.budget.earn(outcome.successes)
        now = time.monotonic()
        self.stats.batch(len(batch), now - started, batch[0].created_at, batch[-1].created_at)
        self.controller.observe(
            BatchSample(len(batch), now - started, wait_time, self.backlog(), now)
        )
        self._on_progress()

    async def _main_events(self, batch: list[Event[object]], outcome: Outcome) -> int:
        """Per-event handler: returns how many events of the batch were processed
        (fewer than all only when the circuit breaker opened, or when reconciliation
        cancelled a stuck call)."""
        call = self._main_call
        call.batch = batch
        call.stuck = None
        self.calls.add(call)
        try:
            with anyio.CancelScope() as call.scope:
                return await self._each_event(batch, outcome, call)
        finally:
            call.scope = None
            self.calls.discard(call)
        # Only reconciliation cancels this scope (the bus closing cancels an enclosing
        # one, which this one does not absorb): the event in flight failed this attempt.
        i = call.index
        self._ctx._rollback_to(call.mark)
        # Each event before it succeeded, failed or was parked, exactly once.
        outcome.successes = i - len(outcome.retries) - len(outcome.dead)
        self.retry_lane.failed(
            batch[i], HandlerStuck(self.name, call.stuck or 0.0, call.seqs()), outcome
        )
        self._record_breaker(0, 1)
        return i + 1

    async def _each_event(
        self, batch: list[Event[object]], outcome: Outcome, call: HandlerCall
    ) -> int:
        handler = self._call_handler
        monotonic = time.monotonic
        ctx = self._ctx
        # The buffers are replaced only when taken after the batch: marks are lengths.
        outbox = ctx._outbox
        writes = ctx.state._writes
        timeout = self.retry.timeout
        breaker = self.breaker
        lane = self.lane
        ordered = self.ordered
        ok = 0
        for i, event in enumerate(batch):
            if ordered and (outcome.blocked or len(lane)) and self._blocked(event.key, outcome):
                self.retry_lane.park(event, outcome)
                continue
            ctx._event = event
            ctx.attempt = event.attempt
            mark = (len(outbox), len(writes))
            call.index = i
            call.mark = mark
            call.started = monotonic()
            try:
                if timeout is None:
                    await handler(event, ctx)
                else:
                    with anyio.fail_after(timeout):
                        await handler(event, ctx)
                ok += 1
            except Exception as exc:  # noqa: BLE001 - goes to the retry lane or dead letters
                ctx._rollback_to(mark)
                self.retry_lane.failed(event, exc, outcome)
                if breaker is not None:
                    now = time.monotonic()
                    breaker.record(ok, 1, now)
                    outcome.successes += ok
                    ok = 0
                    if breaker.state == "open":
                        self._breaker_opened()
                        return i + 1
        outcome.successes += ok
        if breaker is not None and ok:
            breaker.record(ok, 0, time.monotonic())
        return len(batch)

    async def _main_batch(self, events: list[Event[object]], outcome: Outcome) -> None:
        """Batch handler: on an exception, split the batch to isolate the failures."""
        runnable = events
        if self.ordered and (outcome.blocked or len(self.lane)):
            # Only then can an event of the batch have to wait behind its key.
            runnable = []
            for event in events:
                if self._blocked(event.key, outcome):
                    self.retry_lane.park(event, outcome)
                else:
                    runnable.append(event)
        if not runnable:
            return
        mark = self._ctx._begin(None, max(e.attempt for e in runnable))
        try:
            await self._call(runnable)
        except Exception as exc:  # noqa: BLE001 - isolated below
            self._ctx._rollback_to(mark)
            if len(runnable) == 1 or isinstance(exc, HandlerStuck):
                # A stuck call is not split: its halves could hang a lease each. Its
                # events go to the retry lane, where each runs alone.
                for event in runnable:
                    self.retry_lane.failed(event, exc, outcome)
                self._record_breaker(0, len(runnable))
                return
            logger.warning(
                "subscription %s: batch of %d failed (%s: %s); splitting it to isolate "
                "the failing events",
                self.name,
                len(runnable),
                type(exc).__name__,
                exc,
            )
            middle = len(runnable) // 2
            await self._main_batch(runnable[:middle], outcome)
            await self._main_batch(runnable[middle:], outcome)
            return
        failed = dict(self._ctx._failed)
        for event in runnable:
            error = failed.get(event.seq)
            if error is not None:
                self.retry_lane.failed(event, error, outcome)
        ok = len(runnable) - len(failed)
        outcome.successes += ok
        self._record_breaker(ok, len(failed))

    def _record_breaker(self, ok: int, failed: int) -> None:
        if self.breaker is not None and (ok or failed):
            was_open = self.breaker.state == "open"
            self.breaker.record(ok, failed, time.monotonic())
            if not was_open and self.breaker.state == "open":
                self._breaker_opened()

    def _breaker_opened(self) -> None:
        logger.error(
            "subscription %s: circuit breaker opened (too many failures); new events "
            "wait in the log until a probe succeeds",
            self.name,
        )

    async def _call(
        self, arg: Event[object] | list[Event[object]], ctx: Context | None = None
    ) -> None:
        """One handler call with a cancel scope of its own (a batch handler's call, or
        a retry attempt when ``ctx`` is the lane worker's).

        Raises:
            HandlerStuck: Reconciliation cancelled the call.
        """
        timeout = self.retry.timeout
        call = HandlerCall(
            "main" if ctx is None else "retry", arg if isinstance(arg, list) else [arg]
        )
        self.calls.add(call)
        try:
            with anyio.CancelScope() as call.scope:
                if timeout is None:
                    await self._call_handler(arg, ctx or self._ctx)
                else:
                    with anyio.fail_after(timeout):
                        await self._call_handler(arg, ctx or self._ctx)
                return
        finally:
            call.scope = None
            self.calls.discard(call)
        raise HandlerStuck(self.name, call.stuck or 0.0, call.seqs())

    async def _commit(self, batch: WriteBatch) -> None:
        """Commit, retrying storage failures: the handler's work is already done, so
        giving up here would only cause a redelivery."""
        delay = 0.05
        while True:
            try:
                await self._writer.commit(batch)
                return
            except StorageError as exc:
                logger.warning(
                    "subscription %s: commit failed (%s); retrying in %.2fs",
                    self.name,
                    exc,
                    delay,
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
