"""One subscription at run time: the async shell around its :class:`Scheduler`.

The shell moves events and calls handlers; the scheduler decides. Events reach the
scheduler in log order, from the window of recent events near the head or from the
log further behind, never more than ``channel_capacity`` at a time. Up to
``concurrency`` workers take calls from the main lane; retries run as tasks of
their own (up to ``RetryPolicy.concurrency``), started by one loop that sleeps until
the next due time and that healthy traffic never wakes.

What a call produces (outbox events, state writes, retry records, dead letters, the
cursor and the events finished ahead of it) collects in the subscription's pending
writes, which the log writer takes in its next group commit: a subscription's
acknowledgements commit in the order it made them, and a commit that fails is kept
and retried. State written by a call is visible to later calls before it commits.

Every handler call is recorded in the log's call journal while it runs, so that a
process death is blamed on exactly the events whose call had started. Cancelling a
call (the bus closing or its owner cancelled) releases its events unattempted; a
call that reconciliation cancels as stuck fails with :class:`HandlerStuck`.
"""

from __future__ import annotations

import asyncio
import math
import typing
from collections import deque
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import msgspec

import eventbus.storage as _storage
from eventbus.backpressure import BatchSample
from eventbus.storage import (
    PROCESS_DIED,
    DeadRecord,
    NoCallSlots,
    Record,
    RetryRecord,
    SubscriptionInfo,
    WriteBatch,
)

from .._clock import Clock
from .._config import BatchPolicy, BreakerPolicy, RetryPolicy
from .._errors import BusClosed, HandlerStuck, PayloadValidationError
from .._event import Event
from .._logging import event_fields, get_logger
from .._metrics import SubscriptionMetrics, SubscriptionRecorder, median, summarize
from ..failures import (
    CircuitBreaker,
    RetryBudget,
    error_type_name,
    estimated_previous_delay,
)
from ..publish import RecentEvents
from ._context import Context, Encoder
from ._handler import Handler, handler_payload_type, is_batch_handler, make_controller
from ._ports import DispatchLog, DispatchWriter
from ._scheduler import MAIN, RETRY, RUN, STOP, Call, Entry, Pending, Scheduler
from ._state import StateCache
from ._writes import PendingWrites, Undecodable, event_id

logger = get_logger("dispatch")

Decode = Callable[[Record], Event[object]]


class RunningCall:
    """A handler call in flight, as reconciliation sees it.

    Attributes:
        lane: ``"main"`` or ``"retry"``.
        seqs: The events the handler holds now.
        started: When it started holding them (the clock's monotonic time).
        stuck: The lease it outlived, once reconciliation cancelled it.
    """

    __slots__ = ("event", "held", "lane", "scope", "started", "stuck")

    def __init__(self, lane: str) -> None:
        self.lane = lane
        self.held: tuple[int, ...] = ()
        # Or the one event a call of plain events holds (no tuple made for each).
        self.event: Event[object] | None = None
        self.started = 0.0
        self.scope: anyio.CancelScope | None = None
        self.stuck: float | None = None

    @property
    def seqs(self) -> tuple[int, ...]:
        event = self.event
        return (event.seq,) if event is not None else self.held

    @seqs.setter
    def seqs(self, seqs: tuple[int, ...]) -> None:
        self.held = seqs
        self.event = None


class Subscription:
    """The runtime of one ``bus.subscribe(...)`` (see the module docstring)."""

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
        concurrency: int,
        capacity: int,
        cursor: int,
        writer: DispatchWriter,
        log: DispatchLog,
        recent: RecentEvents,
        decode: Decode,
        encode: Encoder,
        clock: Clock,
        on_progress: Callable[[], None],
        register: SubscriptionInfo,
        on_dead: Callable[[list[DeadRecord], list[BaseException | None]], None] | None = None,
    ) -> None:
        self.name = name
        self.topics = topics
        self._filter = None if "*" in topics else topics
        self.is_batch = is_batch_handler(handler)
        # Event[T]: payloads decoded as T, a batch at a time; None costs nothing.
        self._payload = handler_payload_type(handler)
        # Typed once here: a cast per call would build a typing object every time.
        self._handler = typing.cast("Callable[[object, Context], Awaitable[None]]", handler)
        self.handler = self._handler  # as subscribed (``_handler`` may wrap it)
        self.batch_policy = batch_policy
        self.retry = retry
        self.ordered = ordered
        self.concurrency = concurrency
        self.controller = make_controller(batch_policy)
        self._capacity = capacity
        self._writer = writer
        self._log = log
        self._recent = recent
        self._decode = decode
        self._encode = encode
        self._clock = clock
        self._on_progress = on_progress
        self._register = register
        self.state_cache = StateCache(log, name)
        self.stats = SubscriptionRecorder()
        self._writes = PendingWrites(name, clock, writer, self.state_cache, self.stats, cursor)
        self._writes.on_committed = on_progress
        if on_dead is not None:
            self._writes.on_dead = on_dead
        self._sched = Scheduler(
            retry=retry,
            ordered=ordered,
            concurrency=concurrency,
            breaker=CircuitBreaker(breaker) if breaker is not None else None,
            budget=RetryBudget(
                retry.budget_ratio,
                retry.budget_floor,
                # Ten seconds of the floor plus the earnings of a thousand fresh events:
                # a backlog of retries drains in bursts, a storm still cannot outgrow it.
                burst=max(10.0, 10 * retry.budget_floor) + 1000 * retry.budget_ratio,
                now=clock.now(),
            ),
            sink=self._writes,
            cursor=cursor,
        )
        self._writes.scheduler = self._sched
        # The journal: one slot per main worker, then one per retry attempt.
        width = 1 if not self.is_batch else max(1, min(batch_policy.max_size, capacity))
        self._slots = log.calls(name, concurrency + retry.concurrency, width)
        # A log that forgets everything at exit records no calls: skip the calls.
        self._track_calls = not isinstance(self._slots, NoCallSlots)
        self._free_slots = list(range(concurrency + retry.concurrency - 1, concurrency - 1, -1))
        self._contexts = [
            Context(name, encode, self.state_cache) for _ in range(concurrency + retry.concurrency)
        ]
        self._running: dict[int, RunningCall] = {}  # by slot
        # Waking: idle main workers wait on futures; the retry loop on an event.
        self._idle: deque[asyncio.Future[None]] = deque()
        self._retry_wake = asyncio.Event()
        self._reading = False
        self._stopping = False
        self._started = False
        self._scope: anyio.CancelScope | None = None
        self.finished = anyio.Event()

    # -- called by the bus ----------------------------------------------------------

    @property
    def started(self) -> bool:
        """Registered in the log and recovered: its retry lane mirrors the log's."""
        return self._started

    def wake(self) -> None:
        """New events were committed to the log."""
        if self._idle:
            self._wake_workers(1)

    def stop(self) -> None:
        """Stop taking work: running calls end at their current event, and what they
        did not reach stays for the next open."""
        self._stopping = True
        self._sched.stop()
        self._wake_workers(len(self._idle))
        self._retry_wake.set()

    def cancel(self) -> None:
        """Abandon the calls in flight at once: their events are released, not
        counted as failed (the bus is closing)."""
        self.stop()
        if self._scope is not None:
            self._scope.cancel()

    def call_through(self, wrapper: Callable[[object, Context], Awaitable[None]] | None) -> None:
        """From the next call on, call ``wrapper`` instead of the handler (the bus's
        hooks wrap it); None calls the handler itself again."""
        self._handler = wrapper or self.handler

    def add_retries(self, records: list[RetryRecord]) -> None:
        """Take events into the retry lane that the log already holds there
        (redriven dead letters, events reconciliation re-dispatched)."""
        if not self._started:
            return  # recovery reads them from the log
        now = self._clock.now()
        self._sched.recovered([self._retry_entry(r, now) for r in records], now)
        self._signal()
        self._on_progress()

    def holds(self, seq: int) -> bool:
        """Whether the event ``seq`` waits or runs in the retry lane."""
        return self._sched.holds(seq)

    def retry_seqs(self) -> set[int]:
        """The events in the retry lane."""
        return self._sched.retry_seqs()

    @property
    def acked(self) -> int:
        """The cursor the log holds."""
        return self._writes.acked

    def finished_upto(self) -> int:
        """Every event with ``seq <=`` this is finished for this subscription (done,
        dead-lettered or in the retry lane) and recorded so in the log."""
        if not self._started or not self._writes.clean:
            return self.acked
        return max(self.acked, self._sched.cursor())

    def settled(self) -> bool:
        """Nothing buffered, running or waiting in the retry lane."""
        return self._started and self._sched.idle()

    def pending(self) -> Pending:
        """What this subscription has not finished, and why."""
        return self._sched.pending(self._clock.now())

    def flush_position(self) -> None:
        """Record the cursor if it moved with nothing to write (past events of other
        topics), so lag and compaction see the subscription caught up."""
        if self._started and self._sched.cursor() > self.acked:
            self._writes.touch()

    def running_calls(self, lease: float) -> list[RunningCall]:
        """Handler calls holding their events for more than ``lease`` seconds."""
        now = self._clock.now()
        return [c for c in self._running.values() if c.seqs and now - c.started > lease]

    def cancel_stuck(self, call: RunningCall, lease: float) -> bool:
        """Cancel a call that outlived ``lease``: its events fail this attempt with
        :class:`HandlerStuck` and follow the retry policy. False if it has moved on
        (finished, or holds a newer event) or was cancelled already."""
        if call.stuck is not None or call.scope is None or not call.seqs:
            return False
        if call not in self._running.values() or self._clock.now() - call.started <= lease:
            return False
        call.stuck = lease
        call.scope.cancel()
        return True

    def metrics(self, head: int) -> SubscriptionMetrics:
        """A snapshot of this subscription's counters (no I/O)."""
        stats = self.stats
        pending = self.pending()
        breaker = self._sched.breaker
        oldest = self._sched.oldest_pending()
        created = _created_at(oldest.item) if oldest is not None else None
        return SubscriptionMetrics(
            handled=stats.handled,
            batches=stats.batches,
            failed_attempts=stats.failed_attempts,
            dead_lettered=stats.dead_lettered,
            acked=self.acked,
            lag=max(0, head - self.finished_upto()),
            buffered=pending.buffered,
            live=self._sched.read_pos + 1 >= self._recent.first_seq,
            batch_target=self.controller.target(),
            throughput=stats.throughput(self._clock.now()),
            batch_size_p50=median(stats.batch_sizes),
            batch_size_max=max(stats.batch_sizes, default=0),
            handler_latency=summarize(stats.handler_latency),
            end_to_end_latency=summarize(stats.end_to_end),
            in_flight=pending.in_flight,
            retries_waiting=pending.retries_waiting,
            retries_due=pending.retries_due,
            parked=pending.parked,
            concurrency=self.concurrency,
            breaker_state=breaker.state if breaker is not None else "closed",
            breaker_trips=breaker.trips if breaker is not None else 0,
            lag_seconds=0.0 if created is None else max(0.0, self._clock.wall() - created),
            handler_seconds=stats.handler_seconds.snapshot(),
            end_to_end_seconds=stats.end_to_end_seconds.snapshot(),
            call_sizes=stats.call_sizes.snapshot(),
        )

    # -- running --------------------------------------------------------------------

    async def run(self) -> None:
        """Register and recover, then run the workers and the retry loop until
        stopped or cancelled."""
        try:
            with anyio.CancelScope() as self._scope:
                await self._recover()
                self._started = True
                self._on_progress()
                async with anyio.create_task_group() as tg:
                    for slot in range(self.concurrency):
                        tg.start_soon(self._worker, slot, name=f"{self.name} worker {slot}")
                    tg.start_soon(self._retry_loop, tg, name=f"{self.name} retry lane")
        except BusClosed:
            pass
        finally:
            self.finished.set()

    async def _recover(self) -> None:
        """Register in the log; take the retry lane and what was finished ahead of the
        cursor from it (retrying storage failures: nothing runs until it has)."""
        delay = 0.05
        while True:
            try:
                await self._writer.commit(WriteBatch(subscriptions=[self._register]))
                retries = await self._log.retries(self.name)
                ahead = await self._log.finished_ahead(self.name, self.acked)
                break
            except _storage.StorageError as exc:
                logger.warning(
                    "subscription %s: recovery failed (%s); retrying in %.2fs",
                    self.name,
                    exc,
                    delay,
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
        now = self._clock.now()
        self._sched.finished_ahead(ahead)
        entries = [self._retry_entry(r, now) for r in retries]
        died = sum(1 for e in entries if e.suspect)
        if died:
            logger.warning(
                "subscription %s: the process died while handling %d events; they run "
                "again one at a time",
                self.name,
                died,
            )
        self._sched.recovered(entries, now)

    def _retry_entry(self, record: RetryRecord, now: float) -> Entry:
        """An event of the retry lane as the log holds it."""
        entry = Entry.retry(
            record.record.seq,
            record.record.key,
            record,
            attempt=record.attempt,
            suspect=record.error_type == PROCESS_DIED,
            delay=estimated_previous_delay(self.retry, record.attempt),
            first_failed=record.first_failed_at,
        )
        if self._payload is not None:
            entry.view = None
        if record.due_at is None:
            entry.due = now
        else:
            # A wall clock that jumped while the process was down cannot delay a
            # retry beyond the policy's cap.
            wait = min(max(0.0, record.due_at - self._clock.wall()), self.retry.max_delay)
            entry.due = now + wait
        return entry

    # -- the main lane --------------------------------------------------------------

    def _run_size(self) -> int:
        target = min(self.controller.target(), self._capacity)
        if self.concurrency == 1:
            return target
        # Spread what is buffered over the workers, so that slow calls overlap.
        return max(1, min(target, math.ceil(self._sched.buffered / self.concurrency)))

    async def _worker(self, slot: int) -> None:
        """One worker of the main lane. Its cancel scope lives as long as it does (a
        scope per call would cost more than a trivial handler): reconciliation
        cancels it to stop a stuck call, and the worker goes on in a new one."""
        info = RunningCall(MAIN)
        while True:
            with anyio.CancelScope() as scope:
                info.scope = scope
                info.stuck = None
                await self._work(slot, info)
                return
            # Cancelled as stuck: that call has failed its event and released the rest.
            self._after_call()

    async def _work(self, slot: int, info: RunningCall) -> None:
        sched = self._sched
        writer = self._writer
        now = self._clock.now
        while True:
            linger = self.controller.linger()
            if linger > 0 and not self._stopping:
                await self._linger(linger)
            call = sched.next_call(MAIN, now(), self._run_size() if sched.buffered else 1)
            if call is None:
                if self._stopping:
                    return
                if (
                    not self._reading
                    and sched.read_pos < writer.committed_head
                    and sched.room(self._capacity) > 0
                ):
                    await self._read()
                    continue
                await self._idle_wait()
                continue
            if self.is_batch:
                await self._run_batch(call, slot)
            else:
                await self._run_events(call, slot, info)
            self._after_call()

    async def _linger(self, linger: float) -> None:
        """Wait up to ``linger`` for the buffer to reach the controller's target."""
        target = min(self.controller.target(), self._capacity)
        sched = self._sched
        if sched.buffered >= target or not sched.buffered:
            return
        with anyio.move_on_after(linger):
            while sched.buffered < target and not self._stopping:
                if sched.read_pos < self._writer.committed_head and not self._reading:
                    await self._read()
                else:
                    await self._idle_wait()

    async def _idle_wait(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle.append(fut)
        try:
            await fut
        finally:
            if not fut.done():
                fut.cancel()
                self._idle.remove(fut)

    def _wake_workers(self, n: int) -> None:
        idle = self._idle
        while n > 0 and idle:
            fut = idle.popleft()
            if not fut.done():
                fut.set_result(None)
                n -= 1

    async def _read(self) -> None:
        """Fetch the next events: from memory near the head, else from the log."""
        sched = self._sched
        head = self._writer.committed_head
        pos = sched.read_pos
        room = sched.room(self._capacity)
        if pos >= head or room <= 0:
            return
        taken = self._recent.take(pos, head, self._filter, room)
        if taken is not None:
            events, upto = taken
            if self._payload is None:
                sched.append_plain(events, upto)  # entries only when needed
            else:
                entries = [Entry(e.seq, e.key, e) for e in events]
                self._decode_views(entries)
                sched.append(entries, upto)
        else:
            self._reading = True
            try:
                records = await self._read_log(pos, head, room)
            finally:
                self._reading = False
            upto = records[-1].seq if len(records) == room else head
            entries = []
            events = []
            for rec in records:
                try:
                    events.append(self._decode(rec))
                except msgspec.DecodeError as exc:
                    entries.append(
                        Entry(rec.seq, rec.key, Undecodable(rec, self._undecodable(rec, "", exc)))
                    )
                    continue
                if entries:
                    entries.append(Entry(rec.seq, rec.key, events.pop()))
            if self._payload is None and not entries:
                sched.append_plain(events, upto)  # entries only when needed
            else:
                entries[:0] = [Entry(e.seq, e.key, e) for e in events]
                if self._payload is not None:
                    self._decode_views(entries)
                sched.append(entries, upto)
        self._signal()
        if not sched.buffered:
            self._on_progress()  # moved past events of other topics: drain may care

    async def _read_log(self, after: int, upto: int, limit: int) -> list[Record]:
        delay = 0.05
        while True:
            try:
                return await self._log.read(after, upto, self._filter, limit)
            except _storage.StorageError as exc:
                logger.warning(
                    "subscription %s: reading the log failed (%s); retrying in %.2fs",
                    self.name,
                    exc,
                    delay,
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _after_call(self) -> None:
        self._signal()
        self._on_progress()

    def _signal(self) -> None:
        """Act on what the scheduler says changed."""
        sched = self._sched
        if sched.breaker_moved is not None:
            self._log_breaker(*sched.breaker_moved)
            sched.breaker_moved = None
        if sched.retry_changed:
            sched.retry_changed = False
            self._retry_wake.set()
        if sched.main_changed:
            sched.main_changed = False
            if self._idle:
                self._wake_workers(max(1, sched.buffered))

    def _log_breaker(self, was: str, now: str) -> None:
        if now == "open":
            logger.warning(
                "subscription %s: circuit breaker opened (%s); new events wait in the log "
                "until a probe succeeds",
                self.name,
                "the probe failed" if was == "half_open" else "too many failures",
                extra={"subscription": self.name},
            )
        elif now == "closed":
            logger.warning(
                "subscription %s: circuit breaker closed: the probe succeeded",
                self.name,
                extra={"subscription": self.name},
            )

    def _event_of(self, entry: Entry) -> Event[object]:
        """The event to hand to the handler, at the entry's attempt (its payload
        decoded as the handler's type, for a typed handler).

        Raises:
            PayloadValidationError: Its payload does not decode.
        """
        item = entry.item
        if isinstance(item, Event):
            event = item
        elif isinstance(item, RetryRecord):
            try:
                event = self._decode(item.record)
            except msgspec.DecodeError as exc:
                raise self._undecodable(item.record, "", exc) from exc
        else:
            raise typing.cast("Undecodable", item).error
        if event.attempt != entry.attempt:
            event = msgspec.structs.replace(event, attempt=entry.attempt)
        entry.item = event
        if self._payload is None:
            return event
        view = getattr(entry, "view", None)
        if view is None:  # read from the retry lane: decoded when first reached
            self._decode_views([entry])
            view = entry.view
        if type(view) is not Event:
            raise typing.cast("PayloadValidationError", view)
        if view.attempt != entry.attempt:
            view = entry.view = msgspec.structs.replace(view, attempt=entry.attempt)
        return view

    def _decode_views(self, entries: list[Entry]) -> None:
        """Set each entry's ``view``: for a decoded event (read from the log), the
        event with its payload decoded as the handler's type, or the
        :class:`PayloadValidationError` that dead-letters it when it is reached
        (one msgspec call for them all); None for the others, decoded when reached.
        """
        payload = self._payload
        assert payload is not None
        todo: list[Entry] = []
        events: list[Event[object]] = []
        for entry in entries:
            item = entry.item
            if type(item) is Event:
                todo.append(entry)
                events.append(item)
            else:
                entry.view = None
        if todo:
            for entry, event, view in zip(todo, events, payload.events(events), strict=True):
                if type(view) is Event:
                    entry.view = view
                else:
                    error = typing.cast("msgspec.ValidationError", view)
                    entry.view = self._undecodable(event, payload.name, error)

    def _undecodable(
        self, event: Event[object] | Record, expected: str, error: msgspec.DecodeError
    ) -> PayloadValidationError:
        failure = PayloadValidationError(
            self.name, event.id, event.seq, event.topic, expected, str(error)
        )
        failure.__cause__ = error
        return failure

    async def _run_events(self, call: Call, slot: int, info: RunningCall) -> None:
        """A per-event handler's call: its events one after the other, in the
        worker's cancel scope (``info.scope``)."""
        sched = self._sched
        ctx = self._contexts[slot]
        buf = ctx.buffer
        handler = self._handler
        journal = self._slots
        timeout = self.retry.timeout
        now = self._clock.now
        track = self._track_calls
        writes = self._writes
        self._running[slot] = info
        entries = call.entries
        count = len(entries)
        i = 0
        inside = False
        started = now()
        handled = 0
        # The scheduler checked these events when it handed them out; until something
        # changes that :meth:`Scheduler.check` would see, they need no other check, and
        # successes are told in bulk: entries[done_from:i].
        done_from = 0
        changes = sched.changes
        checking = False
        typed = self._payload is not None  # its events come with their views
        try:
            if call.plain is not None:
                # Plain events (see Scheduler.append_plain): no entry each, no check,
                # each success counted in ``call.done``, until something happens
                # that the loop of entries below is for.
                events = typing.cast("list[Event[object]]", call.plain)
                buf.attempt = 1
                failed = False
                for current in events:
                    if sched.changes != changes:
                        break
                    buf.event = current
                    if track:
                        journal.started(slot, (current.seq,))
                        inside = True
                    info.event = current
                    info.started = now()
                    try:
                        if timeout is None:
                            await handler(current, ctx)
                        else:
                            with anyio.fail_after(timeout):
                                await handler(current, ctx)
                    except Exception as exc:  # noqa: BLE001 - goes to the retry lane or dead letters
                        if track:
                            journal.ended(slot)
                            inside = False
                        entries = sched.convert(call)  # the current event first
                        count = len(entries)
                        i = done_from = 1
                        checking = failed = True
                        buf.clear()
                        self._failed(call, entries[0], exc)
                        break
                    except BaseException:
                        if info.stuck is not None:
                            # As below: the event in flight failed this attempt.
                            journal.ended(slot)
                            inside = False
                            entries = sched.convert(call)  # the current event first
                            i = 1
                            buf.clear()
                            self._failed(
                                call, entries[0], HandlerStuck(self.name, info.stuck, info.seqs)
                            )
                        raise  # (not stuck: finish() gives back the events not handled)
                    if track:
                        journal.ended(slot)
                        inside = False
                    call.done += 1
                    if buf.outbox or buf.writes:
                        # Its writes join the acknowledgement that ``done`` now allows.
                        writes.absorb(buf)
                if not failed and call.done < len(events):
                    # Something changed: the rest are checked, one entry each.
                    entries = sched.convert(call)
                    count = len(entries)
                    checking = True
                handled = call.done
            while i < count:
                entry = entries[i]
                if checking or sched.changes != changes:
                    checking = True  # from here on, every event is checked
                    if done_from < i:
                        sched.succeeded_many(call, entries[done_from:i])
                    done_from = i
                    verdict = sched.check(call, entry)
                    if verdict != RUN:
                        if verdict == STOP:
                            break
                        i += 1
                        done_from = i
                        continue
                event = getattr(entry, "view", None) if typed else entry.item
                if type(event) is not Event or event.attempt != entry.attempt:
                    try:
                        event = self._event_of(entry)
                    except PayloadValidationError as exc:
                        if done_from < i:
                            sched.succeeded_many(call, entries[done_from:i])
                        i += 1
                        done_from = i
                        checking = True
                        self._failed(call, entry, exc)
                        continue
                buf.event = event
                buf.attempt = entry.attempt
                seqs = (entry.seq,)
                if track:
                    journal.started(slot, seqs)
                inside = True
                info.seqs = seqs
                info.started = now()
                try:
                    if timeout is None:
                        await handler(event, ctx)
                    else:
                        with anyio.fail_after(timeout):
                            await handler(event, ctx)
                except Exception as exc:  # noqa: BLE001 - goes to the retry lane or dead letters
                    if track:
                        journal.ended(slot)
                    inside = False
                    if done_from < i:
                        sched.succeeded_many(call, entries[done_from:i])
                    i += 1
                    done_from = i
                    checking = True
                    buf.clear()
                    self._failed(call, entry, exc)
                    continue
                except BaseException:
                    if done_from < i:
                        sched.succeeded_many(call, entries[done_from:i])
                        done_from = i
                    if info.stuck is not None:
                        # Reconciliation cancelled a stuck call: the event in flight
                        # failed this attempt; the cancellation ends the call.
                        journal.ended(slot)
                        inside = False
                        i += 1
                        buf.clear()
                        self._failed(call, entry, HandlerStuck(self.name, info.stuck, info.seqs))
                    raise
                if track:
                    journal.ended(slot)
                inside = False
                i += 1
                handled += 1
                if buf.outbox or buf.writes:
                    # Its writes and its acknowledgement must reach the same commit:
                    # tell the scheduler now, before anything can take the writes.
                    writes.absorb(buf)
                    sched.succeeded_many(call, entries[done_from:i])
                    done_from = i
            if done_from < i:
                sched.succeeded_many(call, entries[done_from:i])
                done_from = i
        finally:
            if inside:
                journal.ended(slot)  # abandoned (the bus is closing): not a death
            info.seqs = ()
            del self._running[slot]
            sched.finish(call, now(), entries[i:])
            self._writes.touch()
        self._observe(call, handled, started)

    async def _run_batch(self, call: Call, slot: int) -> None:
        """A batch handler's call: one handler call for the events it may run now;
        on an exception, split in halves to isolate the failing events."""
        # The scheduler checked these events when it handed them out, just now:
        # nothing has changed since (no await in between), so all of them may run.
        size = len(call.plain) if call.plain is not None else len(call.entries)
        started = self._clock.now()
        unhandled: list[Entry] | None = None
        try:
            if call.plain is not None:
                unhandled = await self._call_plain_batch(call, slot)
            else:
                unhandled = await self._call_batch(call, call.entries, slot)
        finally:
            # Cancelled: every entry still running goes back (a plain call's events
            # not handled get their entries there).
            self._sched.finish(
                call, self._clock.now(), call.entries if unhandled is None else unhandled
            )
            self._writes.touch()
        self._observe(call, size - len(unhandled), started)

    async def _call_plain_batch(self, call: Call, slot: int) -> list[Entry]:
        """:meth:`_call_batch` for a call of plain events: they get entries only if
        the call does not simply succeed."""
        events = call.plain
        assert events is not None
        seqs = tuple([event.seq for event in events])
        # A list of its own: the handler may keep or change it.
        error = await self._invoke(slot, MAIN, list(events), seqs, 1)
        buf = self._contexts[slot].buffer
        if error is None and not buf.failed:
            call.done = len(events)
            self._writes.absorb(buf)
            return []
        return await self._batch_outcome(call, self._sched.convert(call), error, slot)

    async def _call_batch(self, call: Call, entries: list[Entry], slot: int) -> list[Entry]:
        """Call the batch handler on ``entries``; returns those left unhandled
        (abandoned at close, or released by a stop while a failing batch was split)."""
        typed = self._payload is not None  # its events come with their views
        events: list[Event[object]] = []
        seqs: list[int] = []
        attempt = 1
        runnable = entries  # until an event does not decode
        for i, entry in enumerate(entries):
            event = getattr(entry, "view", None) if typed else entry.item
            if type(event) is not Event or event.attempt != entry.attempt:
                try:
                    event = self._event_of(entry)
                except PayloadValidationError as exc:
                    if runnable is entries:
                        runnable = entries[:i]
                    self._failed(call, entry, exc)
                    continue
            if runnable is not entries:
                runnable.append(entry)
            events.append(event)
            seqs.append(entry.seq)
            if entry.attempt > attempt:
                attempt = entry.attempt
        if not runnable:
            return []
        error = await self._invoke(slot, MAIN, events, tuple(seqs), attempt)
        return await self._batch_outcome(call, runnable, error, slot)

    async def _batch_outcome(
        self, call: Call, runnable: list[Entry], error: BaseException | None, slot: int
    ) -> list[Entry]:
        """Tell the scheduler how a batch call of ``runnable`` went (``error`` as
        :meth:`_invoke` returns it); returns the events left unhandled."""
        sched = self._sched
        buf = self._contexts[slot].buffer
        if error is None:
            failed = buf.failed
            self._writes.absorb(buf)
            if not failed:
                sched.succeeded_many(call, runnable)  # fresh events, handled together
                return []
            for entry in runnable:
                problem = failed.get(entry.seq)
                if problem is None:
                    sched.succeeded(call, entry)
                else:
                    self._failed(call, entry, problem)
            return []
        if isinstance(error, _Abandoned):
            return runnable
        buf.clear()
        if len(runnable) == 1 or isinstance(error, HandlerStuck):
            # A stuck call is not split: its halves could hang a lease each. Its
            # events go to the retry lane, where each runs alone.
            for entry in runnable:
                self._failed(call, entry, error)
            return []
        # A retry of the batch in halves (INFO, as retries are): only the events that
        # fail alone are retried or dead-lettered, each with its own record.
        logger.info(
            "subscription %s: batch of %d failed (%s: %s); splitting it to isolate the "
            "failing events",
            self.name,
            len(runnable),
            type(error).__name__,
            error,
            extra={"subscription": self.name},
        )
        middle = len(runnable) // 2
        left: list[Entry] = []
        stopped: list[Entry] = []
        for half in (runnable[:middle], runnable[middle:]):
            allowed: list[Entry] = []
            for entry in half:
                # An event of the first half that failed parks its key's later events;
                # a stop (the breaker opened on the failures isolated so far, a suspect
                # came due) releases the rest of the call unattempted, as before a call.
                verdict = STOP if stopped else sched.check(call, entry)
                if verdict == RUN:
                    allowed.append(entry)
                elif verdict == STOP:
                    stopped.append(entry)
            left += await self._call_batch(call, allowed, slot)
        return left + stopped

    async def _invoke(
        self, slot: int, lane: str, arg: object, seqs: tuple[int, ...], attempt: int
    ) -> BaseException | None:
        """One handler call with a cancel scope of its own: returns its error (None
        on success, :class:`HandlerStuck` if reconciliation cancelled it,
        ``_Abandoned`` if the bus did)."""
        ctx = self._contexts[slot]
        buf = ctx.buffer
        journal = self._slots
        timeout = self.retry.timeout
        info = self._running[slot] = RunningCall(lane)
        info.seqs = seqs
        info.started = self._clock.now()
        buf.begin(arg if isinstance(arg, Event) else None, attempt)
        journal.started(slot, seqs)
        error: BaseException | None = _ABANDONED
        try:
            with anyio.CancelScope() as scope:
                info.scope = scope
                try:
                    if timeout is None:
                        await self._handler(arg, ctx)
                    else:
                        with anyio.fail_after(timeout):
                            await self._handler(arg, ctx)
                    error = None
                except Exception as exc:  # noqa: BLE001 - returned to the caller
                    error = exc
            if scope.cancelled_caught:
                error = HandlerStuck(self.name, info.stuck or 0.0, seqs)
        finally:
            journal.ended(slot)
            del self._running[slot]
        return error

    def _failed(self, call: Call, entry: Entry, error: BaseException) -> None:
        if isinstance(error, TimeoutError) and not str(error) and self.retry.timeout is not None:
            error = _timed_out(self.retry.timeout, error)
        self.stats.failed_attempts += 1
        attempt = entry.attempt
        if not self._sched.failed(call, entry, error, self._clock.now()):
            logger.info(
                "subscription %s: event (seq %d) attempt %d failed (%s: %s); retrying in %.3fs",
                self.name,
                entry.seq,
                attempt,
                error_type_name(error),
                error,
                entry.delay,
                extra=event_fields(self.name, event_id(entry), entry.seq, attempt),
            )

    def _observe(self, call: Call, handled: int, started: float) -> None:
        """Feed the batch controller and the metrics with a finished call."""
        if not handled or call.lane != MAIN:
            return
        clock = self._clock
        now = clock.now()
        wall = clock.wall()
        first: object
        last: object
        if call.plain is not None:
            first, last = call.plain[0], call.plain[-1]
        else:
            first = call.entries[0].item
            last = call.entries[-1].item
        oldest = first.created_at if isinstance(first, Event) else wall
        newest = last.created_at if isinstance(last, Event) else wall
        self.stats.batch(handled, now - started, oldest, newest, wall, now)
        self.controller.observe(
            BatchSample(handled, now - started, max(0.0, wall - oldest), self._sched.buffered, now)
        )

    # -- the retry lane -------------------------------------------------------------

    async def _retry_loop(self, tg: anyio.abc.TaskGroup) -> None:
        """Start due retries; sleep until the next is due or something changes."""
        sched = self._sched
        clock = self._clock
        while not self._stopping:
            self._retry_wake.clear()
            now = clock.now()
            while (call := sched.next_call(RETRY, now)) is not None:
                tg.start_soon(self._attempt, call)
            self._signal()
            wake_at = sched.next_wakeup(now)
            if wake_at is None:
                await self._retry_wake.wait()
            else:
                with anyio.move_on_after(max(0.0, wake_at - now)) as timer:
                    await self._retry_wake.wait()
                if timer.cancelled_caught:
                    sched.main_changed = True  # the breaker may let the main lane go

    async def _attempt(self, call: Call) -> None:
        """One retry attempt, then its outcome."""
        sched = self._sched
        entry = call.entries[0]
        slot = self._free_slots.pop()
        unhandled: list[Entry] = [entry]
        try:
            try:
                event = self._event_of(entry)
            except PayloadValidationError as exc:
                unhandled = []
                self._failed(call, entry, exc)
                return
            arg: object = [event] if self.is_batch else event
            error = await self._invoke(slot, RETRY, arg, (entry.seq,), entry.attempt)
            if isinstance(error, _Abandoned):
                return
            unhandled = []
            buf = self._contexts[slot].buffer
            if error is None:
                error = buf.failed.get(entry.seq)
            if error is None:
                self._writes.absorb(buf)
                sched.succeeded(call, entry)
                self.stats.handled += 1
            else:
                buf.clear()
                self._failed(call, entry, error)
        finally:
            self._free_slots.append(slot)
            sched.finish(call, self._clock.now(), unhandled)
            self._writes.touch()
            self._signal()
            self._on_progress()


def _created_at(item: object) -> float | None:
    """When the event an entry holds was published (None if it holds none)."""
    if isinstance(item, Event):
        return item.created_at
    record = getattr(item, "record", None)  # a RetryRecord or an Undecodable
    return record.created_at if isinstance(record, Record) else None


class _Abandoned(BaseException):
    """The marker of a call the bus cancelled (never raised)."""


_ABANDONED = _Abandoned()


def _timed_out(timeout: float, cause: TimeoutError) -> TimeoutError:
    error = TimeoutError(f"attempt timed out after {timeout:g}s (RetryPolicy.timeout)")
    error.__cause__ = cause
    error.__traceback__ = cause.__traceback__
    return error
