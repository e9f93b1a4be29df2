"""The log writer: one task that turns many publishes and acks into one transaction.

Publishes wait in a bounded FIFO; acknowledgements (with their outbox events and dead
letters) in a second queue that is emptied on every cycle, so consumers keep moving
even while producers flood the log. Each cycle takes the waiting publishes, as many
as the commit-size controller allows (at most ``max_commit_batch`` events), and every
waiting acknowledgement, and commits them with one ``Storage.commit``: group commit.
A commit that fails over one record is committed again in parts (``_isolation``), so
only that record's publisher fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

import storage as _storage
from backpressure import BatchController, BatchSample, GradientController
from storage import NewRecord, Receipt, WriteBatch

from .._errors import BusClosed, BusFull
from .._metrics import CommitRecorder, LogMetrics
from ._isolation import COMMIT_ERRORS, commit_apart, commit_error, rejects_a_record

logger = logging.getLogger(__name__)

_Appends = NewRecord | list[NewRecord]
_Taken = tuple[_Appends, "asyncio.Future[object] | None"]
_Ack = tuple[WriteBatch, "asyncio.Future[list[Receipt]]"]
_Unit = tuple[_Taken | None, _Ack | None]  # one publish or one acknowledgement
OnCommitted = Callable[[list[NewRecord], list[Receipt]], None]

# What one group commit may take before the controller lets fewer publishes into the
# next one. A full commit of ordinary events stays below it (4096 events of ~100 bytes:
# 15-40 ms to a SQLite file here, 10-25 us an event), so the writer behaves as plain
# group commit; with large events it keeps each transaction, and so the
# acknowledgements queued behind it, from taking seconds.
COMMIT_TARGET_LATENCY = 0.1


class LogWriter:
    """Group-commits appends and acknowledgements to a :class:`storage.Storage`.

    ``on_committed`` is called synchronously after each successful commit with the
    appended records and their receipts, before any waiting publisher resumes.

    ``controller`` sizes the appends of each commit (the group-commit batching
    point); by default an adaptive :class:`backpressure.GradientController` that
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
        before_commit: Callable[[WriteBatch], None] | None = None,
        controller: BatchController | None = None,
    ) -> None:
        self._log = log
        self._before_commit = before_commit
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
        self._acks: list[tuple[WriteBatch, asyncio.Future[list[Receipt]]]] = []
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._cycle_waiters: list[asyncio.Future[None]] = []
        self._busy = False
        self._closed = False
        # Held around every storage transaction, so maintenance (compaction) never
        # interleaves its statements with a group commit on the same connection.
        self.lock = asyncio.Lock()
        self._stopping = False
        self.committed_head = log.head
        self.stats = CommitRecorder()  # for metrics()

    @property
    def pending(self) -> int:
        """Events waiting for the writer (not yet in a transaction)."""
        return self._pending

    @property
    def commits(self) -> int:
        """Transactions committed so far."""
        return self.stats.commits

    @property
    def committed_events(self) -> int:
        """Events appended by those transactions."""
        return self.stats.committed_events

    def metrics(self) -> LogMetrics:
        """Group-commit sizes and latencies (no I/O)."""
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
        self._appends.append((record, fut))
        self._pending += 1
        if self._pending >= self._max_pending:
            self._space.clear()
        self._wake.set()
        return fut

    async def wait_for_space(self) -> None:
        """Wait until the queue is below capacity (or the writer closes)."""
        while self._pending >= self._max_pending:
            self._check_open()
            await self._space.wait()
        self._check_open()

    async def submit(self, record: NewRecord) -> Receipt:
        """Queue one append, waiting for room, and wait for its commit."""
        if self._pending >= self._max_pending:
            await self.wait_for_space()
        fut = self.submit_nowait(record, want_receipt=True)
        assert fut is not None
        result = await fut
        assert isinstance(result, Receipt)
        return result

    async def submit_many(self, records: list[NewRecord]) -> list[Receipt]:
        """Queue appends that commit in one transaction, all or nothing."""
        if not records:
            return []
        await self.wait_for_space()
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._appends.append((records, fut))
        self._pending += len(records)
        if self._pending >= self._max_pending:
            self._space.clear()
        self._wake.set()
        result = await fut
        assert isinstance(result, list)
        return result

    async def commit(self, batch: WriteBatch) -> list[Receipt]:
        """Commit acknowledgements (and whatever rides with them) in the next cycle.

        Not bounded by ``max_pending_publishes``: each subscription has at most one
        acknowledgement in flight, so this queue holds at most one batch each.
        """
        if self._closed:
            raise BusClosed("the log writer has stopped")
        fut: asyncio.Future[list[Receipt]] = asyncio.get_running_loop().create_future()
        self._acks.append((batch, fut))
        self._wake.set()
        return await fut

    async def flush(self) -> None:
        """Wait until everything queued before this call is committed (or failed)."""
        while self._appends or self._acks or self._busy:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._cycle_waiters.append(fut)
            await fut

    # -- running --------------------------------------------------------------------

    def stop(self) -> None:
        """Refuse new publishes; :meth:`run` returns once the queues are empty."""
        self._stopping = True
        self._space.set()
        self._wake.set()

    async def run(self) -> None:
        """Commit until stopped. Cancellation fails whatever is still queued with
        ``BusClosed``; a transaction in flight is rolled back (or, if its COMMIT
        already reached SQLite, kept: its publishers are then told BusClosed although
        the events are in the log)."""
        try:
            while True:
                if not self._appends and not self._acks:
                    self._notify_cycle()
                    if self._stopping:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await self._cycle()
        finally:
            self._closed = True
            self._fail_all(BusClosed("the bus closed before this write was committed"))

    async def _cycle(self) -> None:
        taken = self._take_appends()
        acks, self._acks = self._acks, []
        self._busy = True
        try:
            await self._commit(taken, acks)
        except COMMIT_ERRORS as exc:
            if len(taken) + len(acks) > 1 and rejects_a_record(exc):
                units: list[_Unit] = [(item, None) for item in taken]
                units += [(None, ack) for ack in acks]
                await commit_apart(units, self._commit_units, self._fail_units)
            else:
                self._fail_commit(taken, acks, exc)
        except BaseException:
            self._fail(taken, acks, BusClosed("the bus closed during this write's commit"))
            raise
        finally:
            self._busy = False
        self._notify_cycle()

    def _take_appends(self) -> list[_Taken]:
        """The waiting publishes the next commit takes: as many as the controller allows."""
        taken: list[_Taken] = []
        appends = self._appends
        n = 0
        limit = self.controller.target()
        while appends and n < limit:
            item = appends.popleft()
            taken.append(item)
            n += 1 if isinstance(item[0], NewRecord) else len(item[0])
        self._pending -= n
        if self._pending < self._max_pending:
            self._space.set()
        return taken

    async def _commit(
        self,
        taken: list[_Taken],
        acks: list[_Ack],
    ) -> None:
        """Commit these appends and acknowledgements in one transaction and resolve
        their futures; raise (futures untouched) if the storage fails."""
        batch = WriteBatch()
        for payload, _ in taken:
            if isinstance(payload, NewRecord):
                batch.appends.append(payload)
            else:
                batch.appends.extend(payload)
        n = len(batch.appends)
        ack_slices: list[tuple[int, int]] = []
        for ack_batch, _ in acks:
            start = len(batch.appends)
            batch.merge(ack_batch)
            ack_slices.append((start, len(batch.appends)))
        if self._before_commit is not None:
            self._before_commit(batch)
        async with self.lock:
            started = time.monotonic()
            receipts = await self._log.commit(batch)
            finished = time.monotonic()
        if receipts:
            self.committed_head = max(self.committed_head, max(r.seq for r in receipts))
        self.stats.commit(len(batch.appends), len(acks), finished - started)
        if n:
            first = taken[0][0]
            oldest = first.created_at if isinstance(first, NewRecord) else first[0].created_at
            self.controller.observe(
                BatchSample(
                    n, finished - started, max(0.0, time.time() - oldest), self._pending, finished
                )
            )
        self._on_committed(batch.appends, receipts)
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
        await self._commit(
            [item for item, _ in units if item is not None],
            [ack for _, ack in units if ack is not None],
        )

    def _fail_units(self, units: list[_Unit], exc: BaseException) -> None:
        self._fail_commit(
            [item for item, _ in units if item is not None],
            [ack for _, ack in units if ack is not None],
            exc,
        )

    def _fail_commit(
        self,
        taken: list[_Taken],
        acks: list[_Ack],
        exc: BaseException,
    ) -> None:
        error = commit_error(exc)
        events = sum(1 if isinstance(p, NewRecord) else len(p) for p, _ in taken)
        logger.error("group commit of %d events failed: %s", events, error)
        self._fail(taken, acks, error)

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
        self._pending = 0
        acks, self._acks = self._acks, []
        self._space.set()
        if taken or acks:
            self._fail(taken, acks, error)
        else:
            self._notify_cycle()
