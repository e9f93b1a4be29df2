"""One subscription on a log shared by several processes (PostgreSQL): the share of
its work this process holds, as a succession of ordinary :class:`Subscription` runs.

The log divides each subscription's events into partitions and leases them to the
processes subscribed (``storage._pg_leases``). This runtime keeps its process's
lease alive (a heartbeat every third of the lease time, and at once when another
process announces a change), and runs one *generation* at a time: a
:class:`Subscription` built on a view of the log that reads only the partitions held
(each past its own cursor) and a writer that stamps every write with the lease, so
that a write made after the lease was lost is refused whole (fencing). Handler calls
are recorded in the log before they start, so that a process taking a partition
over from one that died charges the death to exactly those events.

A generation ends when the partitions held should change: a process joined (this
one holds more than its share: it finishes its calls in flight, commits what they
did, then gives the surplus up), one left or died (there are free partitions to
take), a retry lane was written outside the handling (a redrive), or the lease was
lost (a pause past it: the generation is abandoned, its writes dropped; the
partitions' new holder handles those events). Then the next generation starts on
what is held now. Only this process pauses: the others go on.

Per-key order holds across processes: a key's events all fall in one partition,
which one process at a time handles, from where the last holder's commits left it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import typing
from collections.abc import Awaitable, Callable, Sequence

import anyio
import msgspec

import eventbus.storage as _storage
from eventbus.storage import (
    CallSlots,
    Claim,
    DeadRecord,
    Lease,
    NewRecord,
    NoCallSlots,
    Notice,
    Receipt,
    Record,
    RetryRecord,
    SubscriptionInfo,
    WriteBatch,
)

from .._clock import Clock
from .._config import BatchPolicy, BreakerPolicy, RetryPolicy
from .._errors import BusClosed, translate_storage_error
from .._event import Event
from .._metrics import LatencySummary, SubscriptionMetrics
from ..publish import LogWriter, RecentEvents, Source
from ._context import Context, Encoder
from ._handler import Handler, is_batch_handler
from ._scheduler import Pending
from ._state import StateCache
from ._subscription import Decode, RunningCall, Subscription

logger = logging.getLogger("eventbus.dispatch")

# While the subscription's progress (in every partition) trails the head, it is read
# this often, so that drain() sees other processes' acknowledgements.
_PROGRESS_POLL = 0.05
# How long after a call ends its row is deleted, unless its slot's next call
# replaces it first: a busy worker never waits for a deletion.
_CLEAR_AFTER = 0.005
# How long to wait before trying again after the log failed (a lost connection).
_RETRY_DELAY = 0.5


class _ClaimedLog:
    """The log as a generation sees it: the partitions of its claim only."""

    def __init__(self, log: _storage.SharedLog, claim: Claim) -> None:
        self._log = log
        self._claim = claim

    async def read(
        self, after: int, upto: int, topics: frozenset[str] | None, limit: int
    ) -> list[Record]:
        return await self._log.read_claimed(self._claim, after, upto, topics, limit)

    async def retries(self, subscription: str) -> list[RetryRecord]:
        return await self._log.claimed_retries(self._claim.lease)

    async def finished_ahead(self, subscription: str, after: int) -> list[tuple[int, int]]:
        return await self._log.claimed_finished_ahead(self._claim.lease, after)

    def calls(self, subscription: str, slots: int, width: int) -> CallSlots:
        if self._log.records_calls:
            return NoCallSlots()  # marked in the log by the handler's wrapper
        return self._log.calls(subscription, slots, width)

    async def get_state(self, subscription: str, keys: Sequence[str]) -> dict[str, bytes]:
        return await self._log.get_state(subscription, keys)


class _FencedSource:
    """A generation's pending writes as the log writer sees them: each batch
    stamped with the lease; none handed out once the generation is closed."""

    def __init__(self, lease: Lease, on_lost: Callable[[], None]) -> None:
        self.lease = lease
        self.source: Source | None = None
        self.dirty = False
        self.outstanding = 0  # batches taken, not yet committed or refused
        self.closed = False
        self.lost = False
        self._on_lost = on_lost

    @property
    def idle(self) -> bool:
        """Nothing waiting and nothing being committed."""
        return (self.closed or not self.dirty) and not self.outstanding

    def take_writes(self) -> WriteBatch | None:
        self.dirty = False
        if self.closed or self.source is None:
            return None
        batch = self.source.take_writes()
        if batch is None:
            return None
        batch.leases[self.lease.subscription] = self.lease
        self.outstanding += 1
        return batch

    def committed(self, batch: WriteBatch) -> None:
        self.outstanding -= 1
        assert self.source is not None
        self.source.committed(batch)

    def commit_failed(self, batch: WriteBatch) -> None:
        self.outstanding -= 1
        if self.closed:
            return  # abandoned: nothing of it is to be written any more
        assert self.source is not None
        self.source.commit_failed(batch)
        self.dirty = True

    def lease_lost(self, batch: WriteBatch) -> None:
        self.outstanding -= 1
        self.closed = self.lost = True
        self._on_lost()


class _GenerationWriter:
    """The log writer as a generation sees it: its pending writes go through the
    generation's :class:`_FencedSource`; the head is the log's (others append)."""

    def __init__(self, writer: LogWriter, source: _FencedSource, log: _storage.SharedLog) -> None:
        self._writer = writer
        self._source = source
        self._log = log

    @property
    def committed_head(self) -> int:
        return max(self._writer.committed_head, self._log.head)

    def notify(self, source: Source) -> None:
        fenced = self._source
        fenced.source = source
        if not fenced.closed:
            fenced.dirty = True
            self._writer.notify(fenced)

    async def commit(self, batch: WriteBatch) -> list[Receipt]:
        return await self._writer.commit(batch)


class _Slots:
    """Numbers for the handler calls running at once (their rows in the log)."""

    def __init__(self) -> None:
        self._free: list[int] = []
        self._next = 0

    def take(self) -> int:
        if self._free:
            return self._free.pop()
        self._next += 1
        return self._next - 1

    def give(self, slot: int) -> None:
        self._free.append(slot)


class SharedSubscription:
    """The runtime of one ``bus.subscribe(...)`` on a shared log (see the module
    docstring). It takes the arguments of :class:`Subscription`, and offers what the
    bus and reconciliation use of one."""

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
        writer: LogWriter,
        log: _storage.SharedLog,
        decode: Decode,
        encode: Encoder,
        clock: Clock,
        on_progress: Callable[[], None],
        register: SubscriptionInfo,
        on_dead: Callable[[list[DeadRecord], list[BaseException | None]], None] | None = None,
    ) -> None:
        self.name = name
        self.topics = topics
        self.is_batch = is_batch_handler(handler)
        self.concurrency = concurrency
        self._settings = {
            "batch_policy": batch_policy,
            "retry": retry,
            "breaker": breaker,
            "ordered": ordered,
            "concurrency": concurrency,
            "capacity": capacity,
        }
        #: The handler as subscribed; ``_call`` is what a call runs (hooks wrap it).
        self.handler = typing.cast("Callable[[object, Context], Awaitable[None]]", handler)
        self._call = self.handler
        self._handler = self._marked() if log.records_calls else self._through()
        self._writer = writer
        self._log = log
        self._decode = decode
        self._encode = encode
        self._clock = clock
        self._on_progress = on_progress
        self._on_dead = on_dead
        self._register = register
        # A generation reads its partitions from the log: an empty window, always
        # behind it, sends every read there.
        self._no_recent = RecentEvents(2**62, 1, 0, _never)
        self._inner: Subscription | None = None
        self._last: Subscription | None = None
        self._totals = (0, 0, 0, 0)  # handled, batches, failed, dead of ended generations
        self._lease: Lease | None = None
        self._slots = _Slots()
        self._calls = 0  # handler calls marked so far
        # Slots whose call ended and whose row is still in the log: (lease, call).
        self._ended: dict[int, tuple[Lease, int]] = {}
        self._clear = asyncio.Event()
        self._poke = asyncio.Event()  # the lease loop has something to look at
        self._progress_poke = asyncio.Event()
        self._stopping = False
        self._restart = False
        self._announce = False
        self._registered = False
        self._polled = False
        self._finished_upto = 0
        self._retrying = 0
        self._scope: anyio.CancelScope | None = None
        self.finished = anyio.Event()
        self.lease_losses = 0  # generations that lost their lease (fenced)
        self.generations = 0

    # -- called by the bus ----------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._registered

    @property
    def state_cache(self) -> StateCache | None:
        """None: committed state is read from the log, where every process writes."""
        return None

    @property
    def partitions(self) -> tuple[int, ...]:
        """The partitions this process holds now."""
        lease = self._lease if self._inner is not None else None
        return lease.partitions if lease is not None else ()

    def notice(self, notice: Notice) -> None:
        """What another process announced about this subscription (or the head)."""
        if notice.kind == "head":
            self.wake()
            return
        if notice.kind == "retries":
            self._restart = True
        self._poke.set()

    def wake(self) -> None:
        """New events were committed to the log."""
        if self._inner is not None:
            self._inner.wake()
        self._progress_poke.set()

    def stop(self) -> None:
        self._stopping = True
        if self._inner is not None:
            self._inner.stop()
        self._poke.set()

    def cancel(self) -> None:
        self.stop()
        if self._inner is not None:
            self._inner.cancel()
        if self._scope is not None:
            self._scope.cancel()

    def add_retries(self, records: list[RetryRecord]) -> None:
        """Retries written to the log outside the handling (a redrive, a repair): the
        holders of their partitions, whichever processes they are, read their lanes
        again."""
        if not records:
            return
        self._restart = self._announce = True
        self._retrying += len(records)  # until the next reading of the log says
        self._poke.set()
        self._progress_poke.set()

    def holds(self, seq: int) -> bool:
        """True: on a shared log, whichever process holds an event's partition holds
        its retry (a retry waits in that process's lane; reconciliation here cannot
        judge it overdue)."""
        return True

    def retry_seqs(self) -> set[int]:
        return self._inner.retry_seqs() if self._inner is not None else set()

    @property
    def acked(self) -> int:
        return self._finished_upto

    def finished_upto(self) -> int:
        """Every event with ``seq <=`` this is finished in every partition, by
        whichever process holds it (read from the log)."""
        return self._finished_upto

    def settled(self) -> bool:
        """No event of the subscription waits in a retry lane, in any process."""
        inner = self._inner
        return self._polled and not self._retrying and (inner is None or inner.settled())

    def pending(self) -> Pending:
        return self._inner.pending() if self._inner is not None else Pending()

    def flush_position(self) -> None:
        if self._inner is not None:
            self._inner.flush_position()

    def running_calls(self, lease: float) -> list[RunningCall]:
        return self._inner.running_calls(lease) if self._inner is not None else []

    def cancel_stuck(self, call: RunningCall, lease: float) -> bool:
        return self._inner is not None and self._inner.cancel_stuck(call, lease)

    def metrics(self, head: int) -> SubscriptionMetrics:
        inner = self._inner or self._last
        handled, batches, failed, dead = self._totals
        if inner is None:
            return SubscriptionMetrics(
                handled=handled,
                batches=batches,
                failed_attempts=failed,
                dead_lettered=dead,
                acked=self._finished_upto,
                lag=max(0, head - self._finished_upto),
                buffered=0,
                live=False,
                batch_target=0,
                throughput=0.0,
                batch_size_p50=0.0,
                batch_size_max=0,
                handler_latency=_ZERO,
                end_to_end_latency=_ZERO,
                concurrency=self.concurrency,
            )
        now = inner.metrics(head)
        return msgspec.structs.replace(
            now,
            handled=now.handled + handled,
            batches=now.batches + batches,
            failed_attempts=now.failed_attempts + failed,
            dead_lettered=now.dead_lettered + dead,
            lag=max(0, head - self._finished_upto),
        )

    # -- running --------------------------------------------------------------------

    async def run(self) -> None:
        """Register, then hold a fair share of the partitions and handle their events
        until stopped; give them up at the end."""
        try:
            with anyio.CancelScope() as self._scope:
                await self._register_once()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watch_progress, name=f"{self.name} progress")
                    tg.start_soon(self._clear_ended, name=f"{self.name} calls ended")
                    await self._serve()
                    tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await self._log.release(self.name, None)
        except (BusClosed, _storage.StorageError):
            pass
        finally:
            self._inner = None
            self.finished.set()

    async def _register_once(self) -> None:
        while True:
            try:
                await self._writer.commit(WriteBatch(subscriptions=[self._register]))
                break
            except _storage.StorageError as exc:
                logger.warning("subscription %s: registering failed (%s); retrying", self.name, exc)
                await anyio.sleep(_RETRY_DELAY)
        self._registered = True
        self._on_progress()

    async def _serve(self) -> None:
        """Claim, run a generation, repeat, until stopped."""
        lease: Lease | None = None
        interval = self._log.lease_time / 3
        while not self._stopping:
            try:
                if self._announce:
                    self._announce = False
                    await self._log.announce(self.name)
                sent = time.monotonic()
                share = await self._log.heartbeat(self.name, lease)
                held = share.held
                if len(held) > share.target:
                    await self._log.release(self.name, held[share.target :])
                    held = held[: share.target]
                claim = await self._log.acquire(self.name, max(0, share.target - len(held)))
            except _storage.StorageError as exc:
                logger.warning(
                    "subscription %s: cannot reach the log to claim partitions (%s); retrying",
                    self.name,
                    exc,
                )
                lease = None
                await self._wait(_RETRY_DELAY)
                continue
            lease = claim.lease
            if not lease.partitions:
                self._restart = False
                await self._wait(interval)
                continue
            lease = await self._generation(claim, sent + self._log.lease_time)

    async def _wait(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._poke.wait()
        self._poke.clear()

    async def _generation(self, claim: Claim, deadline: float) -> Lease | None:
        """Handle the claim's partitions until they should change; returns the lease
        last renewed (None if it was lost)."""
        self._restart = False
        source = _FencedSource(claim.lease, self._poke.set)
        inner = Subscription(
            name=self.name,
            topics=self.topics,
            handler=self._handler,
            cursor=claim.start,
            writer=_GenerationWriter(self._writer, source, self._log),
            log=_ClaimedLog(self._log, claim),
            recent=self._no_recent,
            decode=self._decode,
            encode=self._encode,
            clock=self._clock,
            on_progress=self._progressed,
            on_dead=self._on_dead,
            register=SubscriptionInfo(
                self.name, self._register.topics, claim.start, self._clock.wall()
            ),
            **self._settings,  # type: ignore[arg-type]
        )
        self._inner, self._lease = inner, claim.lease
        self.generations += 1
        done = anyio.Event()
        lease: Lease | None = claim.lease
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._run_generation, inner, source, done)
                lease = await self._keep(inner, source, claim.lease, deadline, done)
        finally:
            self._retire(inner)
        return lease

    def _retire(self, inner: Subscription) -> None:
        stats = inner.stats
        handled, batches, failed, dead = self._totals
        self._totals = (
            handled + stats.handled,
            batches + stats.batches,
            failed + stats.failed_attempts,
            dead + stats.dead_lettered,
        )
        self._inner = None
        self._last = None

    async def _run_generation(
        self, inner: Subscription, source: _FencedSource, done: anyio.Event
    ) -> None:
        """Run the generation, then wait until what it did is committed (or dropped:
        a generation's writes must never mix with the next one's)."""
        try:
            await inner.run()
            while not source.idle:
                await self._writer.flush()
                if not source.idle:
                    await anyio.sleep(0.01)  # the writer waits out a failed commit
        finally:
            done.set()
            self._poke.set()

    async def _keep(
        self,
        inner: Subscription,
        source: _FencedSource,
        lease: Lease,
        deadline: float,
        done: anyio.Event,
    ) -> Lease | None:
        """Keep the lease alive while the generation runs (every third of the lease
        time, and at once when woken); end the generation gracefully when the
        partitions should change, at once if the lease is lost."""
        interval = self._log.lease_time / 3
        next_beat = time.monotonic() + interval
        ending = abandoned = False
        current: Lease | None = lease
        while not done.is_set():
            with anyio.move_on_after(max(0.0, min(next_beat, deadline) - time.monotonic())):
                await self._poke.wait()
            self._poke.clear()
            if done.is_set():
                break
            if not abandoned and (source.lost or time.monotonic() >= deadline):
                abandoned = True
                current = None
                self._abandon(
                    inner,
                    source,
                    "another process took them over"
                    if source.lost
                    else "its lease ran out before it could renew it",
                )
                continue
            if not ending and (self._stopping or self._restart):
                ending = True
                inner.stop()
            if current is None:
                continue  # abandoned: only waiting for the generation to end
            try:
                sent = time.monotonic()
                share = await self._log.heartbeat(self.name, current)
            except _storage.StorageError as exc:
                logger.warning(
                    "subscription %s: cannot renew its lease (%s); retrying", self.name, exc
                )
                next_beat = time.monotonic() + min(interval, _RETRY_DELAY)
                continue
            next_beat = time.monotonic() + interval
            if share.held != current.partitions:
                abandoned = True
                current = None
                self._abandon(inner, source, "another process took some of them over")
                continue
            deadline = sent + self._log.lease_time
            held = len(share.held)
            if not ending and (held > share.target or (held < share.target and share.free > 0)):
                ending = True  # rebalance: finish the calls in flight, commit, then change
                inner.stop()
        return current

    def _abandon(self, inner: Subscription, source: _FencedSource, why: str) -> None:
        """End the generation at once: its calls are abandoned and its writes
        dropped (they could not commit anyway: the lease is gone)."""
        self.lease_losses += 1
        logger.warning(
            "subscription %s: this process no longer holds partitions %s (%s); abandoning "
            "their calls in flight and dropping their writes: their new holder handles "
            "those events",
            self.name,
            ", ".join(map(str, source.lease.partitions)),
            why,
        )
        source.closed = True
        inner.cancel()

    def _progressed(self) -> None:
        self._progress_poke.set()
        self._on_progress()

    async def _watch_progress(self) -> None:
        """Read how far the subscription has finished, in every partition, while it
        trails the head (so drain sees every process's acknowledgements)."""
        while True:
            head = self._log.head
            if self._polled and self._finished_upto >= head and not self._retrying:
                await self._progress_poke.wait()
            self._progress_poke.clear()
            try:
                finished, retrying = await self._log.progress(
                    self.name, self.topics, self._log.head
                )
            except _storage.StorageError as exc:
                logger.info("subscription %s: reading progress failed (%s)", self.name, exc)
                await anyio.sleep(_RETRY_DELAY)
                continue
            changed = (finished, retrying) != (self._finished_upto, self._retrying)
            self._finished_upto = max(self._finished_upto, finished)
            self._retrying = retrying
            first = not self._polled
            self._polled = True
            if changed or first:
                self._on_progress()
            if self._finished_upto < self._log.head or retrying:
                await anyio.sleep(_PROGRESS_POLL)

    async def _clear_ended(self) -> None:
        """Delete the rows of calls that ended, a moment after they did: a worker
        that goes on with its next event replaces its row instead (no round trip);
        one that goes idle has it deleted here, all at once."""
        while True:
            await self._clear.wait()
            self._clear.clear()
            await anyio.sleep(_CLEAR_AFTER)
            ended, self._ended = self._ended, {}
            by_lease: dict[Lease, list[tuple[int, int]]] = {}
            for slot, (lease, number) in ended.items():
                by_lease.setdefault(lease, []).append((slot, number))
            for lease, calls in by_lease.items():
                try:
                    await self._log.end_calls(lease, calls)
                except _storage.StorageError as exc:
                    # Left in the log: charged only if this process dies before the
                    # slot's next call replaces the row.
                    logger.info(
                        "subscription %s: forgetting ended calls failed (%s)", self.name, exc
                    )

    # -- handler calls ----------------------------------------------------------------

    def call_through(self, wrapper: Callable[[object, Context], Awaitable[None]] | None) -> None:
        """From the next call on, call ``wrapper`` instead of the handler (the bus's
        hooks wrap it); None calls the handler itself again."""
        self._call = wrapper or self.handler

    def _through(self) -> Handler:
        """What a generation calls: the handler, or what wraps it now."""
        handler = self.handler

        @functools.wraps(handler)
        async def through(arg: object, ctx: Context) -> None:
            await self._call(arg, ctx)

        return typing.cast("Handler", through)

    def _marked(self) -> Handler:
        """The handler (or what wraps it now), recording each call in the log before
        it starts (see the module docstring). It keeps the handler's signature, so
        that it is still recognised as a batch handler or not."""
        handler = self.handler

        @functools.wraps(handler)
        async def marked(arg: object, ctx: Context) -> None:
            call = self._call
            events = typing.cast("list[Event[object]]", arg if isinstance(arg, list) else [arg])
            lease = self._lease
            if lease is None:
                await call(arg, ctx)
                return
            slot = self._slots.take()
            self._ended.pop(slot, None)  # its next call replaces its row
            self._calls += 1
            number = self._calls
            try:
                try:
                    await self._log.mark_call(
                        lease,
                        slot,
                        [e.seq for e in events],
                        [e.attempt for e in events],
                        [e.key for e in events],
                        number,
                    )
                except _storage.StorageError as exc:
                    raise translate_storage_error(exc) from exc
                try:
                    await call(arg, ctx)
                finally:
                    # Returned or raised: its row goes, unless the slot's next call
                    # replaces it first (a worker going on with its next event).
                    self._ended[slot] = (lease, number)
                    self._clear.set()
            finally:
                self._slots.give(slot)

        return typing.cast("Handler", marked)


_ZERO = LatencySummary(0.0, 0.0, 0.0)


def _never(record: NewRecord, seq: int) -> Event[object]:
    raise AssertionError("unreachable: a generation reads the log, never the recent window")
