"""The log writer: one task that turns many publishes and acks into one transaction.

Publishes wait in a bounded FIFO. Subscriptions are *sources*: each keeps its own
pending acknowledgement (cursor, outbox events, state, retries, dead letters) and
tells the writer when it has one; every cycle takes them all, so consumers keep
moving even while producers flood the log, and a subscription's acknowledgements
commit in the order it made them. Each cycle takes the waiting publishes, as many as
the commit-size controller allows (at most ``max_commit_batch`` events), every
source's pending writes and every queued one-off write (:meth:`LogWriter.commit`),
and commits them with one ``Storage.commit``: group commit. A commit that fails over
one record is committed again in parts (``_isolation``), so only that record's
publisher fails.

Where a commit costs no I/O (an in-memory log) there is nothing to share: a publish
with nothing queued ahead of it is appended at once (``Storage.append_now``), and
what one turn of the loop appended is handed on together at its end, as a group
commit's events are.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import eventbus.storage as _storage
from eventbus.backpressure import BatchController, BatchSample, GradientController
from eventbus.storage import NewRecord, Receipt, WriteBatch

from .._errors import BusClosed, BusFull
from .._metrics import CommitRecorder, LogMetrics
from ._isolation import COMMIT_ERRORS, commit_apart, commit_error, rejects_a_record

logger = logging.getLogger("eventbus.publish")

# The loop's running task, read once per publish: asyncio.current_task is written in
# C from Python 3.12; before, its table is read directly (a fifth of the cost).
if sys.version_info >= (3, 12):
    _current_task: Callable[[asyncio.AbstractEventLoop], object] = asyncio.current_task
else:
    from asyncio.tasks import _current_tasks  # type: ignore[attr-defined]

    _current_task = _current_tasks.get

_Appends = NewRecord | list[NewRecord]
_Taken = tuple[_Appends, "asyncio.Future[object] | None"]
_Ack = tuple[WriteBatch, "asyncio.Future[list[Receipt]]"]
_Sourced = tuple["Source", WriteBatch]
# One publish, one one-off write or one subscription's pending writes.
_Unit = tuple[_Taken | None, _Ack | None, _Sourced | None]
OnCommitted = Callable[[list[NewRecord], list[Receipt]], None]

# A source whose writes failed to commit (the disk is full, the file locked) waits
# this long before the next try, doubling up to the cap; publishes are not held back.
_SOURCE_RETRY_DELAY = 0.05
_SOURCE_RETRY_CAP = 5.0


class Source(Protocol):
    """A subscription's acknowledgements, as the writer sees them."""

    def take_writes(self) -> WriteBatch | None:
        """Everything pending, to commit in this cycle (None: nothing after all)."""

    def committed(self, batch: WriteBatch) -> None:
        """``batch`` (from :meth:`take_writes`) committed."""

    def commit_failed(self, batch: WriteBatch) -> None:
        """``batch`` did not commit: keep it, ahead of anything newer, for the next
        cycle."""

    def lease_lost(self, batch: WriteBatch) -> None:
        """``batch`` was refused because a lease it carries was lost (a log shared by
        several processes: another process handles those events now). It is not
        retried."""


# How many publishes a task publishing alone commits at once in one turn of the
# event loop before it yields to the loop.
_BURST = 32

# What one group commit may take before the controller lets fewer publishes into the
# next one. A full commit of ordinary events stays below it (4096 events of ~100 bytes:
# 15-40 ms to a SQLite file here, 10-25 us an event), so the writer behaves as plain
# group commit; with large events it keeps each transaction, and so the
# acknowledgements queued behind it, from taking seconds.
COMMIT_TARGET_LATENCY = 0.1


class LogWriter:
    """Group-commits appends and acknowledgements to a :class:`eventbus.storage.Storage`.

    ``on_committed`` is called synchronously after each successful commit with the
    appended records and their receipts, before any waiting publisher resumes.

    ``controller`` sizes the appends of each commit (the group-commit batching
    point); by default an adaptive :class:`eventbus.backpressure.GradientController` that
    starts at ``max_commit_batch`` and only takes fewer when a commit would take
    longer than ``COMMIT_TARGET_LATENCY``. It never waits: a commit starts as soon as
    the previous one ends.
    """

    def __init__(
        self,
        log: _storage.Storage,
        *,
        max_pending: int,
        max_commit_batch: int,
        on_committed: OnCommitted,
        controller: BatchController | None = None,
    ) -> None:
        self._log = log
        self._max_pending = max_pending
        self.controller = controller or GradientController(
            1,
            max_commit_batch,
            target_latency=COMMIT_TARGET_LATENCY,
            initial_size=max_commit_batch,
        )
        self._on_committed = on_committed
        self._appends: deque[tuple[_Appends, asyncio.Future[object] | None]] = deque()
        self._pending = 0  # events waiting in _appends
        self._many = 0  # publish_many entries among them (the rest are single records)
        self._acks: list[tuple[WriteBatch, asyncio.Future[list[Receipt]]]] = []
        self._dirty: dict[Source, None] = {}  # sources with writes pending, in order
        self._source_retry_at = 0.0
        self._source_delay = _SOURCE_RETRY_DELAY
        self._timer: asyncio.TimerHandle | None = None
        # Set while the writer task waits for work: resolving it wakes the task.
        self._wakeup: asyncio.Future[None] | None = None
        self._space = asyncio.Event()
        self._space.set()
        self._cycle_waiters: list[asyncio.Future[None]] = []
        self._busy = False
        self._closed = False
        # The publishing tasks of this turn of the loop (see submit): the first, and
        # whether any other published too; whether the last turn had one alone; how
        # many publishes this turn committed at once.
        self._turn_task: object = None
        self._crowded = False
        self._solo = True
        self._burst = 0
        # Publishes awaiting their commit, until they resume: while any does, others
        # are about to publish again, so nobody commits alone.
        self._waiting = 0
        # Held around every storage transaction, so maintenance (compaction) never
        # interleaves its statements with a group commit on the same connection.
        self.lock = asyncio.Lock()
        self._stopping = False
        self._committed_head = log.head
        # Whether the storage can ever commit on this thread (Storage.commit_now).
        self._at_once = log.commits_now
        self.stats = CommitRecorder()  # for metrics()
        # The batch of a publish committed at once with nothing else: reused, since
        # only its appends ever change (a storage reads a batch, never keeps it).
        self._alone = WriteBatch()
        # Whether the storage appends without I/O (Storage.append_now: in memory), so
        # that publishes are appended at once (append_at_once); what they appended
        # in this turn of the loop, not yet routed to the subscriptions; and the task
        # appending at once, and how many times in a row.
        self.appends_at_once = log.appends_now
        self._unrouted: list[NewRecord] = []
        self._unrouted_receipts: list[Receipt] = []
        self._run_task: object = None
        self._run = 0
        self._turn_pending = False  # _turn_ended is scheduled

    @property
    def committed_head(self) -> int:
        """The seq of the last event committed. Events appended at once and not yet
        routed are routed first, so that whoever reads it (a subscription about to
        read, a new subscription starting at the latest event) finds them
        everywhere."""
        if self._unrouted:
            self.route_appended()
        return self._committed_head

    @property
    def pending(self) -> int:
        """Events waiting for the writer (not yet in a transaction)."""
        return self._pending

    @property
    def commits(self) -> int:
        """Transactions committed so far."""
        self.route_appended()
        return self.stats.commits

    @property
    def committed_events(self) -> int:
        """Events appended by those transactions."""
        self.route_appended()
        return self.stats.committed_events

    def metrics(self) -> LogMetrics:
        """Group-commit sizes and latencies (no I/O)."""
        self.route_appended()
        return self.stats.snapshot(self.controller.target())

    # -- submitting -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed or self._stopping:
            raise BusClosed("the bus is closing")

    def submit_nowait(
        self, record: NewRecord, *, want_receipt: bool
    ) -> asyncio.Future[object] | None:
        """Queue one append. Raises ``BusFull`` at capacity, ``BusClosed`` if closing."""
        self._check_open()
        if self._pending >= self._max_pending:
            raise BusFull(self._pending)
        fut = asyncio.get_running_loop().create_future() if want_receipt else None
        self._queue(record, fut)
        return fut

    def _queue(self, appends: _Appends, fut: asyncio.Future[object] | None, n: int = 1) -> None:
        self._appends.append((appends, fut))
        self._pending += n
        if self._pending >= self._max_pending:
            self._space.clear()
        if self._wakeup is not None:
            self._poke()

    def _poke(self) -> None:
        """Wake the writer task if it waits for work."""
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            if not wakeup.done():
                wakeup.set_result(None)

    async def wait_for_space(self) -> None:
        """Wait until the queue is below capacity (or the writer closes)."""
        while self._pending >= self._max_pending:
            self._check_open()
            await self._space.wait()
        self._check_open()

    def queue_behind(
        self, record: NewRecord, loop: asyncio.AbstractEventLoop
    ) -> asyncio.Future[Receipt] | None:
        """The common case of :meth:`submit`, without a coroutine of its own: when a
        publish already waits for its commit and there is room, queue ``record``
        to commit with it and return the future of its receipt; the caller awaits
        it and then, however the wait ends, calls :meth:`resumed`. None when the
        caller must use :meth:`submit`."""
        if (
            not self._waiting
            or self._pending >= self._max_pending
            or self._closed
            or self._stopping
        ):
            return None
        fut: asyncio.Future[Receipt] = loop.create_future()
        # _queue, written out: this is the path of nearly every publish under load.
        self._appends.append((record, fut))  # type: ignore[arg-type]
        self._pending += 1
        if self._pending >= self._max_pending:
            self._space.clear()
        if self._wakeup is not None:
            self._poke()
        self._waiting += 1
        return fut

    def append_at_once(self, record: NewRecord, loop: asyncio.AbstractEventLoop) -> Receipt | None:
        """Append one publish now, when the storage appends without I/O
        (``Storage.append_now``: an in-memory log) and nothing is queued ahead of
        it: with no transaction to share, a publish has nothing to wait for. The
        events appended in one turn of the loop reach the subscriptions together, at
        its end (:meth:`route_appended`), as the events of one group commit do.

        None, with nothing written, when it cannot, or when the publishing task has
        appended ``_BURST`` events in a row without the loop turning: the caller
        then queues it (:meth:`queue_behind`, and waits for its commit) or hands it
        to :meth:`submit`, which yields to the loop first. Either way a producer that
        never waits does not hold the loop.
        """
        if (
            self._appends
            or self._closed
            or self._stopping
            or self._busy
            or len(self._unrouted) >= self._max_pending
            or self.lock.locked()
        ):
            return None
        task = _current_task(loop)
        if task is not self._run_task:
            self._run_task = task
            self._run = 0
        elif self._run >= _BURST:
            return None
        receipt = self._log.append_now(record)
        if receipt is None:
            return None
        self._run += 1
        if not self._turn_pending:
            self._turn_pending = True
            loop.call_soon(self._turn_ended)
        self._unrouted.append(record)
        self._unrouted_receipts.append(receipt)
        return receipt

    def _turn_ended(self) -> None:
        """The loop turned since an append at once: route what is left, and let the
        publishing task start a new run."""
        self._turn_pending = False
        self._run_task = None
        self.route_appended()

    def route_appended(self) -> None:
        """Hand what :meth:`append_at_once` appended to ``on_committed`` (the
        subscriptions, the counters): once the loop turns, before any commit (whose
        events come after them), and whenever someone needs to see it now (the
        head, the metrics). It leaves the publishing task's run as it is."""
        records = self._unrouted
        if not records:
            return
        receipts = self._unrouted_receipts
        self._unrouted = []
        self._unrouted_receipts = []
        self.stats.commit(len(records), 0, 0.0)
        top = receipts[-1].seq
        if top > self._committed_head:
            self._committed_head = top
        self._on_committed(records, receipts)
        self._notify_cycle()

    def resumed(self) -> None:
        """A publisher queued by :meth:`queue_behind` stopped waiting."""
        self._waiting -= 1

    async def submit(
        self, record: NewRecord, loop: asyncio.AbstractEventLoop | None = None
    ) -> Receipt:
        """Append one event: at once when it can (:meth:`_commit_at_once`), else
        queue it, waiting for room, and wait for its commit. ``loop`` is the running
        loop, when the caller has it at hand."""
        if loop is None:
            loop = asyncio.get_running_loop()
        if self.appends_at_once:
            if self._run >= _BURST and _current_task(loop) is self._run_task:
                # A run of appends at once: let the loop run first (subscriptions take
                # them; _turn_ended starts a new run), before this append, so that a
                # cancellation here writes nothing.
                await asyncio.sleep(0)
            # (Bus.publish has tried before calling here, except with hooks; after
            # the yield, or for a hooked publish, it may succeed now.)
            receipt = self.append_at_once(record, loop)
            if receipt is not None:
                return receipt
        # Who publishes decides how to commit: a task publishing alone commits at
        # once; many tasks share a group commit. Alone means: no other publish is
        # waiting for a commit, no other task published in this turn of the loop,
        # and none but one did in the last turn that had publishes.
        # While a publish waits for its commit, this one joins it (nothing to decide).
        if not self._waiting and self._at_once:
            if self._burst >= _BURST:
                # Let the loop run (subscriptions take what was committed): a
                # producer that never waits must not hold it for long. Before this
                # publish's commit, so that a cancellation here leaves nothing written.
                await asyncio.sleep(0)
            task = _current_task(loop)
            if self._turn_task is None:
                self._turn_task = task
                loop.call_soon(self._end_turn)
            elif task is not self._turn_task:
                self._crowded = True
            if self._solo and not self._crowded and not self._waiting:
                receipt = self._commit_at_once(record)
                if receipt is not None:
                    self._burst += 1
                    return receipt
        if self._pending >= self._max_pending or self._closed or self._stopping:
            await self.wait_for_space()
        fut: asyncio.Future[Receipt] = loop.create_future()
        self._queue(record, fut)  # type: ignore[arg-type]
        self._waiting += 1
        try:
            return await fut
        finally:
            self._waiting -= 1

    async def submit_many(self, records: list[NewRecord]) -> list[Receipt]:
        """Queue appends that commit in one transaction, all or nothing."""
        if not records:
            return []
        await self.wait_for_space()
        fut: asyncio.Future[list[Receipt]] = asyncio.get_running_loop().create_future()
        self._many += 1
        self._queue(records, fut, len(records))  # type: ignore[arg-type]
        self._waiting += 1
        try:
            return await fut
        finally:
            self._waiting -= 1

    async def commit(self, batch: WriteBatch) -> list[Receipt]:
        """Commit acknowledgements (and whatever rides with them) in the next cycle.

        Not bounded by ``max_pending_publishes``: each subscription has at most one
        acknowledgement in flight, so this queue holds at most one batch each.
        """
        if self._closed:
            raise BusClosed("the log writer has stopped")
        fut: asyncio.Future[list[Receipt]] = asyncio.get_running_loop().create_future()
        self._acks.append((batch, fut))
        self._poke()
        return await fut

    def _commit_at_once(self, record: NewRecord) -> Receipt | None:
        """Commit one publish now, on this thread, with every source's pending writes,
        when the storage can (``Storage.commit_now``: a small transaction) and
        nothing is ahead of it: no queued publish, no commit in flight, no
        maintenance holding the lock. It saves the round trip through the writer
        task, the largest cost of a publish that a producer awaits alone.

        Only for a task publishing alone (:meth:`submit` decides): when several
        tasks publish in one turn of the event loop, they queue, so that they
        still share one group commit.

        None (nothing written; the caller queues the record) when it cannot, or when
        the commit failed: the writer then commits it the usual way, with its
        handling of failures.
        """
        if (
            self._appends
            or self._acks
            or self._busy
            or self._closed
            or self._stopping
            or self.lock.locked()
        ):
            return None
        self.route_appended()  # the events appended at once come first
        if not self._dirty:
            # The publish alone (no acknowledgement to carry), recorded at little cost.
            batch = self._alone
            batch.appends = appends = [record]
            started = time.monotonic()
            try:
                receipts = self._log.commit_now(batch)
            except COMMIT_ERRORS:
                return None  # the writer commits it, with its handling of failures
            if receipts is None:
                return None
            self.stats.commit(1, 0, time.monotonic() - started)
            receipt = receipts[0]
            if receipt.seq > self._committed_head:
                self._committed_head = receipt.seq
            self._on_committed(appends, receipts)
            return receipt
        taken: list[_Taken] = [(record, None)]
        sourced = self._take_sources()
        batch = self._batch(taken, [], sourced)
        started = time.monotonic()
        try:
            receipts = self._log.commit_now(batch)
        except COMMIT_ERRORS:
            receipts = None  # the writer commits it, with its handling of failures
        except BaseException:
            self._give_back(sourced)
            raise
        if receipts is None:
            # Nothing was written: the sources keep their writes for the writer.
            self._give_back(sourced)
            return None
        ended = time.monotonic()
        self._done(batch, taken, [], [], sourced, receipts, started, ended, inline=True, events=1)
        return receipts[0]

    def _give_back(self, sourced: list[_Sourced]) -> None:
        for source, writes in sourced:
            source.commit_failed(writes)
            self._dirty[source] = None

    def _end_turn(self) -> None:
        """The loop turned: the next turn commits at once only if this one had a
        single publishing task."""
        self._solo = not self._crowded
        self._crowded = False
        self._turn_task = None
        self._burst = 0

    def notify(self, source: Source) -> None:
        """``source`` has writes pending: take them in the next cycle."""
        if source not in self._dirty:
            self._dirty[source] = None
            self._poke()

    def _sources_ready(self) -> bool:
        # Loop time, like the timer that ends a retry delay.
        return bool(self._dirty) and (
            not self._source_retry_at or asyncio.get_running_loop().time() >= self._source_retry_at
        )

    async def flush(self) -> None:
        """Wait until everything queued before this call is committed (or failed),
        sources' pending writes included (unless their commits keep failing)."""
        while self._appends or self._acks or self._busy or self._unrouted or self._sources_ready():
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._cycle_waiters.append(fut)
            await fut

    # -- running --------------------------------------------------------------------

    def stop(self) -> None:
        """Refuse new publishes; :meth:`run` returns once the queues are empty."""
        self._stopping = True
        self.route_appended()
        self._space.set()
        self._poke()

    async def run(self) -> None:
        """Commit until stopped. Cancellation fails whatever is still queued with
        ``BusClosed``; a transaction in flight is rolled back (or, if its COMMIT
        already reached SQLite, kept: its publishers are then told BusClosed although
        the events are in the log)."""
        try:
            while True:
                if not self._appends and not self._acks and not self._sources_ready():
                    self._notify_cycle()
                    if self._stopping:
                        return
                    loop = asyncio.get_running_loop()
                    if self._dirty and self._timer is None:
                        # Sources wait out their retry delay; wake when it is over.
                        self._timer = loop.call_at(self._source_retry_at, self._retry_sources)
                    self._wakeup = wakeup = loop.create_future()
                    try:
                        await wakeup
                    finally:
                        self._wakeup = None
                    continue
                await self._cycle()
        finally:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._fail_all(BusClosed("the bus closed before this write was committed"))

    def _retry_sources(self) -> None:
        self._timer = None
        self._poke()

    async def _cycle(self) -> None:
        taken, records, singles = self._take_appends()
        acks, self._acks = self._acks, []
        sourced = self._take_sources()
        self._busy = True
        try:
            while True:
                try:
                    await self._commit(taken, acks, sourced, records, singles=singles)
                    break
                except _storage.LeaseLost as exc:
                    # Fenced off: drop the writes of the sources whose lease was lost
                    # and commit the rest at once.
                    sourced = _without_fenced(sourced, exc)
        except COMMIT_ERRORS as exc:
            if len(taken) + len(acks) + len(sourced) > 1 and rejects_a_record(exc):
                units: list[_Unit] = [(item, None, None) for item in taken]
                units += [(None, ack, None) for ack in acks]
                units += [(None, None, writes) for writes in sourced]
                await commit_apart(units, self._commit_units, self._fail_units)
            else:
                self._fail_commit(taken, acks, sourced, exc)
        except BaseException:
            self._fail(taken, acks, BusClosed("the bus closed during this write's commit"))
            self._sources_failed(sourced)
            raise
        finally:
            self._busy = False
        self._notify_cycle()

    def _take_appends(self) -> tuple[list[_Taken], list[NewRecord], bool]:
        """The waiting publishes the next commit takes, as many as the controller
        allows, their records in order, and whether all are single publishes."""
        appends = self._appends
        limit = self.controller.target()
        if not self._many and self._pending <= limit:
            # Single publishes only, all of them fit (the common case): in bulk.
            taken: list[_Taken] = list(appends)
            appends.clear()
            records: list[NewRecord] = [item[0] for item in taken]  # type: ignore[misc]
            self._pending = 0
            self._space.set()
            return taken, records, True
        taken = []
        records = []
        while appends and len(records) < limit:
            item = appends.popleft()
            taken.append(item)
            if isinstance(item[0], NewRecord):
                records.append(item[0])
            else:
                records.extend(item[0])
                self._many -= 1
        self._pending -= len(records)
        if self._pending < self._max_pending:
            self._space.set()
        return taken, records, False

    def _take_sources(self) -> list[_Sourced]:
        """Every source's pending writes, unless sources wait out a retry delay."""
        sourced: list[_Sourced] = []
        if self._sources_ready():
            dirty, self._dirty = self._dirty, {}
            for source in dirty:
                writes = source.take_writes()
                if writes is not None:
                    sourced.append((source, writes))
        return sourced

    async def _commit(
        self,
        taken: list[_Taken],
        acks: list[_Ack],
        sourced: list[_Sourced],
        records: list[NewRecord] | None = None,
        *,
        singles: bool = False,
    ) -> None:
        """Commit these appends (``records``: theirs, in order, if known; ``singles``:
        all single publishes), one-off writes and sources' writes in one transaction
        and resolve their futures; raise (nothing resolved) if the storage fails."""
        self.route_appended()  # the events appended at once come first
        ack_slices: list[tuple[int, int]] = []
        batch = self._batch(taken, acks, sourced, ack_slices, records)
        log = self._log
        started = time.monotonic()
        # A small transaction commits on this thread when the storage can (no hop to
        # its thread). Nothing else can run meanwhile, so it needs no lock unless
        # maintenance holds it across an await.
        inline = None if self.lock.locked() or not self._at_once else log.commit_now(batch)
        if inline is None:
            async with self.lock:
                started = time.monotonic()
                receipts = await log.commit(batch)
        else:
            receipts = inline
        self._done(
            batch,
            taken,
            acks,
            ack_slices,
            sourced,
            receipts,
            started,
            time.monotonic(),
            inline=inline is not None,
            events=None if records is None else len(records),
            singles=singles,
        )

    def _batch(
        self,
        taken: list[_Taken],
        acks: list[_Ack],
        sourced: list[_Sourced],
        ack_slices: list[tuple[int, int]] | None = None,
        records: list[NewRecord] | None = None,
    ) -> WriteBatch:
        """One transaction's writes; ``ack_slices`` receives where each one-off
        write's appends are in it."""
        batch = WriteBatch()
        if records is not None:
            batch.appends.extend(records)
        else:
            for payload, _ in taken:
                if isinstance(payload, NewRecord):
                    batch.appends.append(payload)
                else:
                    batch.appends.extend(payload)
        for ack_batch, _ in acks:
            start = len(batch.appends)
            batch.merge(ack_batch)
            if ack_slices is not None:
                ack_slices.append((start, len(batch.appends)))
        for _, writes in sourced:
            batch.merge(writes)
        return batch

    def _done(
        self,
        batch: WriteBatch,
        taken: list[_Taken],
        acks: list[_Ack],
        ack_slices: list[tuple[int, int]],
        sourced: list[_Sourced],
        receipts: list[Receipt],
        started: float,
        finished: float,
        *,
        inline: bool,
        events: int | None = None,
        singles: bool = False,
    ) -> None:
        """After a commit: account for it, tell the sources and the subscriptions,
        resolve the futures. ``events``: how many records ``taken`` holds, if known;
        ``singles``: whether all are single publishes (a receipt each)."""
        n = events if events is not None else _count(taken)
        if receipts:
            # Fresh receipts have the highest seqs, in order; a duplicate's is older.
            last = receipts[-1]
            top = last.seq if not last.duplicate else max(r.seq for r in receipts)
            if top > self._committed_head:
                self._committed_head = top
        self.stats.commit(len(batch.appends), len(acks), finished - started)
        # A commit made inline is small and far below the target latency: it tells
        # the controller nothing it needs to size the next one.
        if n and not inline:
            first = taken[0][0]
            oldest = first.created_at if isinstance(first, NewRecord) else first[0].created_at
            self.controller.observe(
                BatchSample(
                    n, finished - started, max(0.0, time.time() - oldest), self._pending, finished
                )
            )
        if sourced:
            self._source_delay = _SOURCE_RETRY_DELAY
            self._source_retry_at = 0.0
            for source, writes in sourced:
                source.committed(writes)
        self._on_committed(batch.appends, receipts)
        if singles:
            for (_, fut), receipt in zip(taken, receipts, strict=False):
                if fut is not None and not fut.done():
                    fut.set_result(receipt)
            taken = []
        i = 0
        for payload, fut in taken:
            if isinstance(payload, NewRecord):
                if fut is not None and not fut.done():
                    fut.set_result(receipts[i])
                i += 1
            else:
                if fut is not None and not fut.done():
                    fut.set_result(receipts[i : i + len(payload)])
                i += len(payload)
        for (_, ack_fut), (start, end) in zip(acks, ack_slices, strict=True):
            if not ack_fut.done():
                ack_fut.set_result(receipts[start:end])

    async def _commit_units(self, units: list[_Unit]) -> None:
        await self._commit(*_split(units))

    def _fail_units(self, units: list[_Unit], exc: BaseException) -> None:
        self._fail_commit(*_split(units), exc)

    def _fail_commit(
        self, taken: list[_Taken], acks: list[_Ack], sourced: list[_Sourced], exc: BaseException
    ) -> None:
        error = commit_error(exc)
        events = _count(taken)
        logger.error("group commit of %d events failed: %s", events, error)
        self._fail(taken, acks, error)
        self._sources_failed(sourced)

    def _sources_failed(self, sourced: list[tuple[Source, WriteBatch]]) -> None:
        """Hand failed writes back to their sources, and hold sources off for a while
        (a full disk or a lock held elsewhere does not clear at once)."""
        if not sourced:
            return
        for source, writes in sourced:
            source.commit_failed(writes)
            self._dirty[source] = None
        delay = self._source_delay
        self._source_retry_at = asyncio.get_running_loop().time() + delay
        self._source_delay = min(delay * 2, _SOURCE_RETRY_CAP)
        logger.warning(
            "acknowledgements of %d subscriptions did not commit; retrying in %.2fs",
            len(sourced),
            delay,
        )

    def _notify_cycle(self) -> None:
        waiters, self._cycle_waiters = self._cycle_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _fail(
        self,
        taken: list[tuple[_Appends, asyncio.Future[object] | None]],
        acks: list[tuple[WriteBatch, asyncio.Future[list[Receipt]]]],
        error: BaseException,
    ) -> None:
        lost = 0
        for _payload, fut in taken:
            if fut is None:
                lost += 1
            elif not fut.done():
                fut.set_exception(error)
        if lost:
            logger.error("%d events queued with publish_nowait were not committed: %s", lost, error)
        for _, ack_fut in acks:
            if not ack_fut.done():
                ack_fut.set_exception(error)
        self._notify_cycle()

    def _fail_all(self, error: BaseException) -> None:
        taken = list(self._appends)
        self._appends.clear()
        self._pending = self._many = 0
        acks, self._acks = self._acks, []
        self._space.set()
        if taken or acks:
            self._fail(taken, acks, error)
        else:
            self._notify_cycle()


def _without_fenced(sourced: list[_Sourced], exc: _storage.LeaseLost) -> list[_Sourced]:
    """``sourced`` without the writes ``exc`` refused (told so); re-raises ``exc`` if
    none of them carries a lease it names."""
    lost = set(exc.subscriptions)
    kept: list[_Sourced] = []
    fenced: list[_Sourced] = []
    for item in sourced:
        (fenced if lost.intersection(item[1].leases) else kept).append(item)
    if not fenced:
        raise exc
    for source, writes in fenced:
        source.lease_lost(writes)
    return kept


def _count(taken: list[_Taken]) -> int:
    """How many records these publishes append."""
    return sum(1 if isinstance(p, NewRecord) else len(p) for p, _ in taken)


def _split(units: list[_Unit]) -> tuple[list[_Taken], list[_Ack], list[_Sourced]]:
    return (
        [item for item, _, _ in units if item is not None],
        [ack for _, ack, _ in units if ack is not None],
        [writes for _, _, writes in units if writes is not None],
    )
