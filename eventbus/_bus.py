"""The bus: publish, subscribe, drain and close, over a :class:`eventbus.storage.Storage`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
from asyncio import _get_running_loop as _running_loop  # this thread's loop, or None
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from threading import get_ident as _thread_ident
from typing import Literal, TypeVar

import anyio
import msgspec

import eventbus.storage as _storage
from eventbus.storage import (
    WORKFLOW_PREFIX,
    LogStats,
    MemoryStorage,
    NewRecord,
    Receipt,
    Record,
    SharedSQLiteStorage,
    SQLiteStorage,
)
from eventbus.storage import SubscriptionInfo as _SubInfo

from ._clock import Clock, LoopClock
from ._config import BatchPolicy, BreakerPolicy, BusConfig, RetryPolicy, subscription_policies
from ._effect_log import EffectLog
from ._errors import (
    BusClosed,
    ConfigError,
    DrainTimeout,
    SubscriptionError,
    WrongEventLoop,
    translate_storage_error,
)
from ._event import Event, Message
from ._hooks import Hooks, PublishKind
from ._log_access import LogReader
from ._metrics import BusMetrics
from ._reconciliation import ReconciliationBase
from ._stopping import stop_requested
from ._unclaimed import apply_drop, warn_unclaimed
from .dispatch import (
    Handler,
    SharedSubscription,
    StateReader,
    Subscription,
    SubscriptionRuntime,
    check_handler,
    check_topics,
    subscription_name,
    warn_of_replay,
)
from .failures import CONTROL_DECODER as _CONTROL
from .failures import DeadLettered, DeadLetters
from .publish import EventEncoder, LogWriter, RecentEvents
from .reconcile import R, Reconciler, ReconcileReport
from .workflows import WorkflowEngine, WorkflowError, WorkflowFunction, WorkflowHandle

logger = logging.getLogger("eventbus.bus")

H = TypeVar("H", bound=Handler)
W = TypeVar("W", bound=WorkflowFunction)

_HEADERS = msgspec.msgpack.Decoder(dict[str, str])

# Forks of this process so far, as the child sees it: a bus's loop running in the
# parent is not the child's, though the child's thread has the same id (publish).
_forks = 0


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)


def _array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` values."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


class Reconciliation(ReconciliationBase["Bus"]):
    """What a user reconciler gets on each run: ``rc.bus`` is this bus,
    ``await rc.publish(...)`` emits a corrective event (counted unless its
    idempotency key was already in the log), ``rc.flag(message)`` records an
    inconsistency it cannot correct."""


class Bus:
    """A durable in-process event bus. Create it with :meth:`Bus.open`.

    Publishing appends to a write-ahead log (group-committed); every subscription
    receives every event of its topics in log order, in batches, and acknowledges
    them in the same transaction as its outbox publishes.

    Attributes:
        config: The bus's settings.
        dead_letters: Inspect, redrive and purge dead letters (:class:`DeadLetters`).
        effects: Results of outside effects recorded by :func:`eventbus.idempotent`.
        hooks: The hooks run around publishes, handler calls and workflow runs
            (:class:`Hooks`).
    """

    def __init__(self, log: _storage.Storage, config: BusConfig, clock: Clock) -> None:
        self.config = config
        self._log = log
        self._clock = clock
        self._events = EventEncoder(config.max_event_bytes)
        self._decoder = msgspec.msgpack.Decoder()
        self._writer = LogWriter(
            log,
            max_pending=config.max_pending_publishes,
            max_commit_batch=config.max_commit_batch,
            on_committed=self._route,
        )
        self._subs: dict[str, SubscriptionRuntime] = {}
        self._known: dict[str, _SubInfo] = {}
        self._oldest = 1  # the first seq still in the log when it was opened
        # Whoever waits for progress (drain, reconciliation): woken at the next change.
        self._progress_waiters: list[asyncio.Future[None]] = []
        # Dead letters committed since open or the last drain(raise_failures=True).
        self._failures: list[tuple[_storage.DeadRecord, BaseException | None]] = []
        self._failure_count = 0
        self._tg: anyio.abc.TaskGroup | None = None
        self._maintenance_scope = anyio.CancelScope()
        self._poll_scope = anyio.CancelScope()
        self._writer_done = anyio.Event()
        self._closing = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # The thread that runs it, in which process (see publish, _check_publish).
        self._loop_thread = 0
        self._loop_forks = 0
        # Events committed per topic, once something asked for them (count_topics).
        self._topic_counts: Counter[str] | None = None
        #: The hooks run around publishes, handler calls and workflow runs.
        self.hooks = Hooks(self._hooks_changed)
        self._publish_hooks = False  # whether a publish hook is registered
        self._workflows = WorkflowEngine(
            log, self._writer.commit, config.retry, config.workflow_concurrency
        )
        self.dead_letters = DeadLetters(
            log, self._to_event, self._writer.lock, self._redriven, config.redrive_rate
        )
        #: Results of outside effects recorded by :func:`eventbus.idempotent`.
        self.effects = EffectLog(log, self._writer.commit)
        self._reconciler = Reconciler(
            log=log,
            config=config,
            clock=clock,
            commit=self._writer.commit,
            subscriptions=self._subs,
            workflows=self._workflows,
            is_closing=lambda: self._closing,
            wait_for_progress=self._wait_for_progress,
            new_run=lambda name: Reconciliation(self, name),
        )
        # Recently committed events, decoded at most once, for subscriptions near the
        # head; bounded so a burst of large events cannot pin much memory.
        self._recent = RecentEvents(
            log.head,
            max_events=8 * max(config.max_commit_batch, config.channel_capacity),
            max_bytes=64 * 1024 * 1024,
            to_event=self._new_to_event,
            to_events=self._new_to_events,
        )

    # -- lifecycle ------------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        config: BusConfig | None = None,
        storage: _storage.Storage | None = None,
        clock: Clock | None = None,
        hooks: Iterable[object] = (),
    ) -> AsyncIterator[Bus]:
        """Open a bus on the log at ``path`` (``":memory:"`` for no durability).

        Unacknowledged events in the log are delivered again to their subscriptions
        as soon as those subscribe.

        Args:
            path: A SQLite file (created if missing), ``":memory:"``, or a
                PostgreSQL URL (``postgresql://user@host/db?schema=name``: the
                schema and its tables are created if missing; needs the
                ``postgres`` extra).
            config: Settings; ``BusConfig()`` by default.
            storage: A ready :class:`eventbus.storage.Storage` to use instead of ``path``.
            clock: Where the bus reads time; the event loop's clock by default
                (so a loop with a virtual clock runs the whole bus on it).
            hooks: Hook objects to register at once, as ``bus.hooks.add`` does
                (see :class:`Hook`).

        Raises:
            HookError: One of ``hooks`` has no hook method.
            LogLocked: Another process runs a bus on this file (or PostgreSQL log).
            ConfigError: A PostgreSQL URL that cannot be used (a schema name that
                is not a plain identifier, or asyncpg is not installed).
            NotALog: The file is not an event log.
            CorruptLog: SQLite reports the file as damaged.
            SchemaTooNew: A newer eventbus wrote the file.

        An exception raised in the body leaves as it is (not in an exception group),
        after the bus has closed.

        Cancellation: cancelling the task that runs the body (``task.cancel()`` or an
        enclosing cancel scope) closes the bus at once, without waiting for handlers:
        calls in flight are abandoned, their events delivered again on the next open
        and not counted as failed attempts; what the writer already holds is
        committed; the cancellation then propagates. Under :func:`eventbus.run`, a
        SIGTERM or SIGINT closes it gracefully instead, as a normal exit does.
        """
        config = config or BusConfig()
        if storage is None:
            storage = _storage_for(os.fspath(path), config)
        try:
            await storage.open()
        except _storage.StorageError as exc:
            raise translate_storage_error(exc) from exc
        body_error: BaseException | None = None
        try:
            bus = cls(storage, config, clock or LoopClock())
            bus._loop = asyncio.get_running_loop()
            bus._loop_thread = _thread_ident()
            bus._loop_forks = _forks
            for hook in hooks:
                bus.hooks.add(hook)
            bus._known = await storage.subscriptions()
            shared = isinstance(storage, _storage.SharedLog)
            if isinstance(storage, _storage.SharedLog):
                storage.watch(bus._noticed)
            first = await storage.read(0, storage.head, None, 1)
            bus._oldest = first[0].seq if first else storage.head + 1
            async with anyio.create_task_group() as tg:
                bus._tg = tg
                bus._workflows.attach(tg)
                tg.start_soon(bus._run_writer)
                tg.start_soon(bus._maintenance)
                tg.start_soon(bus._reconciler.run)
                tg.start_soon(bus._warn_unclaimed)
                if shared:
                    tg.start_soon(bus._poll_log)
                try:
                    yield bus
                except BaseException as exc:  # noqa: BLE001 - re-raised below, as it is
                    # Raised after the task group, as it is: the group is ours.
                    body_error = exc
                    with anyio.CancelScope(shield=True):
                        await bus._shutdown(abandon=_is_cancellation(exc) and not stop_requested())
                else:
                    await bus.close()
        finally:
            with anyio.CancelScope(shield=True):
                await storage.close()
        if body_error is not None:
            raise body_error

    async def close(self) -> None:
        """Stop the bus: flush queued publishes, let handler calls in flight finish
        for up to ``close_timeout`` seconds, commit their acknowledgements and stop
        the writer. Idempotent; publishing afterwards raises ``BusClosed``.

        Cancellation: a cancelled close still stops every task and commits what the
        writer holds (shielded); calls still running are abandoned and their events
        delivered again on the next open.
        """
        await self._shutdown(abandon=False)

    async def _shutdown(self, *, abandon: bool) -> None:
        """Close; with ``abandon``, without waiting for handler calls."""
        if self._closing:
            with anyio.CancelScope(shield=True):
                await self._writer_done.wait()
            return
        self._closing = True
        self._reconciler.stop()
        try:
            if not abandon:
                with anyio.move_on_after(self.config.close_timeout):
                    # Workflow runs stop first, while the writer can still record
                    # where their steps were; they resume on the next open.
                    await self._workflows.stop()
                    await self._writer.flush()
                    for sub in self._subs.values():
                        sub.stop()
                    for sub in self._subs.values():
                        await sub.finished.wait()
        finally:
            with anyio.CancelScope(shield=True):
                for sub in self._subs.values():
                    sub.cancel()
                with anyio.move_on_after(self.config.close_timeout):
                    await self._workflows.stop()
                for sub in self._subs.values():
                    await sub.finished.wait()
                for sub in self._subs.values():
                    sub.flush_position()
                self._maintenance_scope.cancel()
                self._poll_scope.cancel()
                self._writer.stop()
                with anyio.move_on_after(self.config.close_timeout) as timer:
                    await self._writer_done.wait()
                if timer.cancelled_caught and self._tg is not None:
                    logger.error("the log writer did not stop in time; cancelling it")
                    self._tg.cancel_scope.cancel()
                self._closed = True

    async def _warn_unclaimed(self) -> None:
        """At the body's first await: subscriptions in the log that no handler took
        (not on a shared log: other processes handle them, a publisher none)."""
        if isinstance(self._log, _storage.SharedLog):
            return
        warn_unclaimed(self._known, self._subs, self._writer.committed_head)

    async def _run_writer(self) -> None:
        try:
            await self._writer.run()
        finally:
            self._writer_done.set()

    async def _poll_log(self) -> None:
        """On a shared log that cannot announce appends (SQLite), look for other
        processes' appends every ``poll_interval``."""
        log = self._log
        assert isinstance(log, _storage.SharedLog)
        interval = log.poll_interval
        if interval is None:
            return
        with self._poll_scope:
            while True:
                await anyio.sleep(interval)
                try:
                    await log.poll()
                except _storage.StorageError as exc:
                    logger.info("looking for other processes' appends failed: %s", exc)

    def _upkeep(self) -> bool:
        """Whether this process does the log's upkeep: queued commands, compaction
        (on a SQLite log shared by processes, only the one dispatching)."""
        log = self._log
        return not isinstance(log, _storage.SharedLog) or log.dispatching

    async def _maintenance(self) -> None:
        """Compaction every ``compact_interval``; commands queued by the command line
        every ``control_interval``."""
        config = self.config
        now = self._clock.now
        with self._maintenance_scope:
            next_compaction = now() + config.compact_interval
            while True:
                await anyio.sleep(min(config.control_interval, config.compact_interval))
                if not self._upkeep():
                    continue
                try:
                    await self._apply_control()
                except _storage.StorageError as exc:
                    logger.warning("reading queued commands failed, will retry: %s", exc)
                if now() >= next_compaction:
                    next_compaction = now() + config.compact_interval
                    await self._persist_idle_positions()
                    try:
                        await self.compact()
                    except _storage.StorageError as exc:
                        logger.warning("compaction failed, will retry: %s", exc)

    async def _apply_control(self) -> None:
        commands = await self._log.take_control()
        if not commands:
            return
        for _, raw in commands:
            try:
                command = _CONTROL.decode(raw)
            except msgspec.DecodeError:
                logger.error("ignoring a malformed command queued in the log: %r", raw[:100])
                continue
            if command.action == "drop":
                await apply_drop(
                    self._log, self._writer.lock, self._known, self._subs, command.subscription
                )
                continue
            if command.action == "cancel":
                for workflow_id in command.ids or ():
                    try:
                        await self._workflows.cancel(workflow_id)
                    except WorkflowError as exc:
                        logger.error("ignoring a queued cancel: %s", exc)
                logger.warning("applied a queued cancel command: %s", command.ids)
                continue
            if command.action == "redrive":
                n = await self.dead_letters.redrive(
                    command.subscription, ids=command.ids, error_type=command.error_type
                )
            else:
                n = await self.dead_letters.purge(
                    command.subscription, ids=command.ids, error_type=command.error_type
                )
            logger.warning("applied a queued %s command: %d dead letters", command.action, n)
        async with self._writer.lock:
            await self._log.done_control([i for i, _ in commands])

    def _redriven(self, records: list[_storage.RetryRecord]) -> None:
        by_sub: dict[str, list[_storage.RetryRecord]] = {}
        for record in records:
            if record.subscription.startswith(WORKFLOW_PREFIX):
                # A redriven workflow run is running again in the log: resume it.
                self._workflows.launch(record.record.id, again=True)
                continue
            by_sub.setdefault(record.subscription, []).append(record)
        for name, items in by_sub.items():
            sub = self._subs.get(name)
            if sub is not None:
                sub.add_retries(items)

    async def _persist_idle_positions(self) -> None:
        """Move idle subscriptions' cursors past events on other topics, so lag and
        compaction see them as caught up."""
        for sub in self._subs.values():
            sub.flush_position()
        if not self._writer_done.is_set():
            await self._writer.flush()

    async def compact(self) -> int:
        """Delete events every subscription has finished and that are older than
        ``retention``. Returns how many were deleted.

        Cancellation: safe; a cancelled compaction deletes nothing or a whole chunk.
        """
        subs = await self._log.subscriptions()
        upto = min((s.cursor for s in subs.values()), default=self._writer.committed_head)
        now = self._clock.wall()
        removed = 0
        chunk = 10_000
        while True:
            # One short transaction per chunk, so group commits interleave with it.
            async with self._writer.lock:
                n = await self._log.compact(
                    upto,
                    now - self.config.retention,
                    now - self.config.idempotency_retention,
                    chunk,
                )
            removed += n
            if n < chunk:
                return removed

    # -- publishing -----------------------------------------------------------------

    def _encode(
        self, topic: str, payload: object, key: str | None, headers: dict[str, str] | None
    ) -> NewRecord:
        """An outbox event (``ctx.publish``), with the publish hooks around it."""
        if self._publish_hooks:
            return self._queue_hooked("outbox", topic, payload, key, headers, None)
        return self._events.encode(topic, payload, key, headers, None, self._clock.wall())

    def _check_open(self) -> None:
        if self._closing:
            raise BusClosed("the bus is closed")

    def _check_publish(self, method: str) -> None:
        """Open, and called on the bus's own event loop (the writer's queues and a
        commit on the loop's thread are not safe from anywhere else)."""
        if self._closing:
            raise BusClosed("the bus is closed")
        if _running_loop() is not self._loop:
            raise WrongEventLoop(method)
        # The loop may have moved to another thread (run_forever from there): the
        # fast check of publish follows it from now on.
        self._loop_thread = _thread_ident()
        self._loop_forks = _forks

    async def publish(
        self,
        topic: str,
        payload: object,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Receipt:
        """Append one event to the log and return once it is committed.

        Args:
            topic: Where subscriptions find it.
            payload: Any msgspec-encodable value or ``msgspec.Struct``.
            key: Ordering key: events with one key are handled in publish order.
            headers: String metadata.
            idempotency_key: If an event with this key is already in the log, nothing
                is written and the original's receipt returns with ``duplicate=True``.

        Returns:
            The receipt: ``seq``, ``id`` and ``duplicate``.

        Raises:
            InvalidEvent: The topic, key or idempotency key is not allowed: not a
                ``str`` (None for the keys), an empty topic or ``"*"``, not valid
                Unicode (nothing written).
            PayloadError: The payload or headers cannot be encoded, or the payload is
                nested too deeply or cyclic (nothing written).
            EventTooLarge: Over ``max_event_bytes`` (nothing written; a payload is
                never encoded much past the limit).
            BusClosed: The bus is closed or closed before the commit.
            StorageError: The log failed to commit (nothing written).
            HookFailed: A ``before_publish`` hook raised (nothing written).

        Cancellation: if cancelled while waiting for room, nothing is written; if
        cancelled while waiting for the commit, the event may still be committed
        (use an idempotency key to publish again safely).
        """
        loop = self._loop
        # On the bus's own loop: this thread of this process runs it, and it is running
        # (a thread runs one loop at a time). Cheaper than asyncio's _get_running_loop,
        # which asks the kernel for the process id at every call (3.11). A loop moved
        # to another thread is followed from the first publish there (the full check).
        if (
            self._closing
            or _thread_ident() != self._loop_thread
            or _forks != self._loop_forks
            or loop is None
            or not loop.is_running()
        ):
            self._check_publish("publish")
        if self._publish_hooks:
            return await self._publish_hooked(topic, payload, key, headers, idempotency_key)
        record = self._events.encode(
            topic, payload, key, headers, idempotency_key, self._clock.wall()
        )
        writer = self._writer
        if writer.appends_at_once:
            # An in-memory log: appended now, with no group commit to wait for.
            receipt = writer.append_at_once(record, loop)  # type: ignore[arg-type]
            if receipt is not None:
                return receipt
        fut = writer.queue_behind(record, loop)  # type: ignore[arg-type] # checked above
        if fut is None:
            return await writer.submit(record, loop)
        try:
            return await fut
        finally:
            writer.resumed()

    async def _publish_hooked(
        self,
        topic: str,
        payload: object,
        key: str | None,
        headers: dict[str, str] | None,
        idempotency_key: str | None,
    ) -> Receipt:
        """``publish`` with the publish hooks around it."""
        hooks = self.hooks
        publishing = hooks.prepare("publish", topic, payload, key, headers, idempotency_key)
        try:
            record = self._events.encode(
                topic,
                payload,
                key,
                publishing.headers or None,
                idempotency_key,
                self._clock.wall(),
            )
            receipt = await self._writer.submit(record)
        except BaseException as exc:
            hooks.finish(publishing, error=exc)
            raise
        hooks.finish(publishing, receipt)
        return receipt

    def publish_nowait(
        self,
        topic: str,
        payload: object,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        """Queue one event for the log writer without waiting.

        The event is durable once the writer commits it (``drain`` or ``close``
        waits for that); a commit failure is logged, since nobody awaits it.

        Raises:
            BusFull: ``max_pending_publishes`` events are already waiting.
            InvalidEvent, PayloadError, EventTooLarge, BusClosed, HookFailed: as
                for :meth:`publish`; nothing is queued.
        """
        self._check_publish("publish_nowait")
        if self._publish_hooks:
            self._queue_hooked("publish_nowait", topic, payload, key, headers, idempotency_key)
            return
        record = self._events.encode(
            topic, payload, key, headers, idempotency_key, self._clock.wall()
        )
        self._writer.submit_nowait(record, want_receipt=False)

    def _queue_hooked(
        self,
        kind: PublishKind,
        topic: str,
        payload: object,
        key: str | None,
        headers: dict[str, str] | None,
        idempotency_key: str | None,
    ) -> NewRecord:
        """``publish_nowait`` (or, without ``idempotency_key``, an outbox event's
        encoding) with the publish hooks around it."""
        hooks = self.hooks
        publishing = hooks.prepare(kind, topic, payload, key, headers, idempotency_key)
        try:
            record = self._events.encode(
                topic,
                payload,
                key,
                publishing.headers or None,
                idempotency_key,
                self._clock.wall(),
            )
            if kind == "publish_nowait":
                self._writer.submit_nowait(record, want_receipt=False)
        except BaseException as exc:
            hooks.finish(publishing, error=exc)
            raise
        hooks.finish(publishing)
        return record

    async def publish_many(self, messages: Iterable[Message]) -> list[Receipt]:
        """Append several events in one transaction: all are committed, or none.

        Raises:
            InvalidEvent, PayloadError, EventTooLarge: One message is bad; nothing
                is written.
            HookFailed: A ``before_publish`` hook raised for one message; nothing
                is written.
            BusClosed, StorageError: As for :meth:`publish`.

        Cancellation: as for :meth:`publish`.
        """
        self._check_publish("publish_many")
        if not self._publish_hooks:
            return await self._writer.submit_many(self._events.encode_many(messages))
        hooks = self.hooks
        prepared, messages = hooks.prepare_many(messages)
        try:
            receipts = await self._writer.submit_many(self._events.encode_many(messages))
        except BaseException as exc:
            for publishing in prepared:
                hooks.finish(publishing, error=exc)
            raise
        for publishing, receipt in zip(prepared, receipts, strict=True):
            hooks.finish(publishing, receipt)
        return receipts

    # -- routing (called by the writer after each commit) ---------------------------

    def _to_event(self, record: Record) -> Event[object]:
        return self._new_to_event(record, record.seq)

    def _new_to_event(self, record: NewRecord | Record, seq: int) -> Event[object]:
        return Event(
            record.id,
            seq,
            record.topic,
            record.key,
            self._decoder.decode(record.payload),
            _HEADERS.decode(record.headers) if record.headers else {},
            record.created_at,
        )

    def _new_to_events(self, records: list[NewRecord], first: int) -> list[Event[object]]:
        """:meth:`_new_to_event` for records with consecutive seqs from ``first``, their
        payloads decoded in one call, as one msgpack array (each is one value)."""
        n = len(records)
        packed = b"".join([_array_header(n), *[record.payload for record in records]])
        try:
            payloads = self._decoder.decode(packed)
        except msgspec.DecodeError:
            return [self._new_to_event(record, first + i) for i, record in enumerate(records)]
        return [
            Event(
                record.id,
                seq,
                record.topic,
                record.key,
                payload,
                _HEADERS.decode(record.headers) if record.headers else {},
                record.created_at,
            )
            for seq, record, payload in zip(range(first, first + n), records, payloads, strict=True)
        ]

    def _route(self, appended: list[NewRecord], receipts: list[Receipt]) -> None:
        """After each group commit: new events are in the window; wake subscribers."""
        if appended:
            self._recent.append(appended, receipts)
            if self._topic_counts is not None:
                self._count_topics(appended, receipts)
            for sub in self._subs.values():
                sub.wake()
        self._notify_progress()

    def _noticed(self, notice: _storage.Notice) -> None:
        """What the processes sharing the log announced: events appended (by any of
        them), a subscription's partitions changing hands."""
        if notice.kind == "head":
            for sub in self._subs.values():
                sub.wake()
            self._notify_progress()
            return
        shared = self._subs.get(notice.subscription)
        if isinstance(shared, SharedSubscription):
            shared.notice(notice)

    def _count_topics(self, appended: list[NewRecord], receipts: list[Receipt]) -> None:
        counts = self._topic_counts
        assert counts is not None
        for record, receipt in zip(appended, receipts, strict=False):
            if not receipt.duplicate:
                counts[record.topic] += 1

    def _notify_progress(self) -> None:
        # Called for every commit and call: nothing to do unless someone waits.
        if self._progress_waiters:
            waiters, self._progress_waiters = self._progress_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    async def _wait_for_progress(self) -> None:
        """Until the next commit or change of a subscription's progress.

        Cancellation: nothing changes.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._progress_waiters.append(fut)
        try:
            await fut
        finally:
            if not fut.done():
                fut.cancel()
                self._progress_waiters.remove(fut)

    # -- subscribing ----------------------------------------------------------------

    def subscribe(
        self,
        topic: str | Iterable[str],
        *,
        name: str | None = None,
        batch: BatchPolicy | Mapping[str, object] | None = None,
        retry: RetryPolicy | Mapping[str, object] | None = None,
        breaker: BreakerPolicy | Mapping[str, object] | Literal["default"] | None = "default",
        ordered: bool = True,
        start: Literal["earliest", "latest"] = "earliest",
        concurrency: int | None = None,
    ) -> Callable[[H], H]:
        """Register a handler for ``topic`` (a name, several names, or ``"*"``).

        A handler is ``async def h(event: Event, ctx: Context)``, or a batch handler
        ``async def h(events: list[Event], ctx: Context)`` (recognised by the
        ``list[...]`` annotation on its first parameter). Its shape is checked here:
        a plain ``def``, a lambda, a third required parameter or ``(ctx, event)``
        is refused at once rather than failing every event later. Annotated
        ``Event[T]`` (or ``list[Event[T]]``), it receives payloads decoded as ``T``
        (a ``msgspec.Struct``, dataclass, ``TypedDict``...); an event whose payload
        does not decode is dead-lettered at once with
        :class:`~eventbus.PayloadValidationError`, never retried.

        A subscription new to the log that starts at the earliest event logs a
        warning when more than 10,000 events (``REPLAY_WARNING``) are already in the
        log: a renamed subscription would replay them all.

        Args:
            topic: The topic(s) to receive; ``"*"`` for every topic.
            name: The durable name of the subscription: its position in the log is
                kept under it across restarts. Defaults to the handler's function
                name (``__name__``: ``"bill"`` for ``async def bill``), the same
                however the program is started or where the function is defined;
                renaming the function renames the subscription. A handler without
                a plain name (a partial, a callable object) needs ``name=``.
            batch: How events are batched; ``config.batch`` by default. A policy
                object is used whole (its unset fields take the class defaults); a
                dict changes only its keys of ``config.batch``.
            retry: How failures are retried; ``config.retry`` by default, a
                :class:`RetryPolicy` (whole) or a dict (changes to ``config.retry``).
            breaker: When to pause on persistent failure; ``config.breaker`` by
                default, a :class:`BreakerPolicy`, a dict (changes to
                ``config.breaker``), or None for no circuit breaker.
            ordered: Keep events of one key in publish order: while one waits for a
                retry, later events of its key wait behind it. False lets them pass.
            start: Where a subscription new to this log begins: ``"earliest"``
                (every event still in the log) or ``"latest"`` (events published
                from now on).
            concurrency: Handler calls of this subscription that may run at once
                (``config.concurrency`` by default, 1): for handlers that wait on
                outside I/O. While ``ordered``, two events of one key never run at
                once and each key keeps its order; a batch handler gets up to this
                many batches at once, their keys disjoint.

        Raises:
            SubscriptionError: The name is taken; the topic is not a name or an
                iterable of names (or the decorator was used without parentheses);
                the handler is not an ``async def`` taking ``(event, ctx)``; its
                ``Event[T]`` names a type that cannot be found or decoded to.
            ConfigError: A policy is neither a policy, a dict nor None, or a dict's
                key is unknown or its value impossible.
            BusClosed: The bus is closed.
        """
        self._check_open()
        topics = check_topics(topic)
        batch_policy, retry_policy, breaker_policy = subscription_policies(
            self.config, batch, retry, breaker
        )
        if start not in ("earliest", "latest"):
            raise SubscriptionError(f"start must be 'earliest' or 'latest', got {start!r}")
        if concurrency is None:
            concurrency = self.config.concurrency
        elif isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise SubscriptionError(
                f"concurrency must be a whole number of calls, at least 1; got {concurrency!r}"
            )

        def decorator(handler: H) -> H:
            check_handler(handler)
            sub_name = subscription_name(handler, name, self._known)
            if sub_name in self._subs:
                raise SubscriptionError(
                    f"a subscription named {sub_name!r} already exists on this bus; "
                    "give each subscription a distinct name="
                )
            if start == "earliest" and sub_name not in self._known:
                warn_of_replay(sub_name, self._writer.committed_head - self._oldest + 1)
            self._start_subscription(
                sub_name,
                topics,
                handler,
                batch_policy,
                retry_policy,
                breaker_policy,
                ordered,
                start,
                concurrency,
            )
            return handler

        return decorator

    def _start_subscription(
        self,
        name: str,
        topics: frozenset[str],
        handler: Handler,
        batch: BatchPolicy,
        retry: RetryPolicy,
        breaker: BreakerPolicy | None,
        ordered: bool,
        start: str,
        concurrency: int,
    ) -> None:
        known = self._known.get(name)
        if known is not None:
            cursor = known.cursor
        else:
            cursor = 0 if start == "earliest" else self._writer.committed_head
        register = _SubInfo(name, tuple(sorted(topics)), cursor, self._clock.wall())
        sub: SubscriptionRuntime
        if isinstance(self._log, _storage.SharedLog):
            # Several processes share the log: this one handles its share of it.
            sub = SharedSubscription(
                name=name,
                topics=topics,
                handler=handler,
                batch_policy=batch,
                retry=retry,
                breaker=breaker,
                ordered=ordered,
                concurrency=concurrency,
                capacity=self.config.channel_capacity,
                writer=self._writer,
                log=self._log,
                decode=self._to_event,
                encode=self._encode,
                clock=self._clock,
                on_progress=self._notify_progress,
                on_dead=self._dead_lettered,
                register=register,
            )
        else:
            sub = Subscription(
                name=name,
                topics=topics,
                handler=handler,
                batch_policy=batch,
                retry=retry,
                breaker=breaker,
                ordered=ordered,
                concurrency=concurrency,
                capacity=self.config.channel_capacity,
                cursor=cursor,
                writer=self._writer,
                log=self._log,
                recent=self._recent,
                decode=self._to_event,
                encode=self._encode,
                clock=self._clock,
                on_progress=self._notify_progress,
                on_dead=self._dead_lettered,
                register=register,
            )
        assert self._tg is not None
        self._subs[name] = sub
        if self.hooks.calls:
            self._wrap(sub)
        self._tg.start_soon(sub.run, name=f"eventbus subscription {name}")

    # -- hooks ----------------------------------------------------------------------

    def _hooks_changed(self) -> None:
        """Hooks were added or removed: call through them only where some are."""
        hooks = self.hooks
        self._publish_hooks = hooks.publishing
        for sub in self._subs.values():
            if hooks.calls:
                self._wrap(sub)
            else:
                sub.call_through(None)
        self._workflows.around_run = hooks.around_run if hooks.runs else None
        self._workflows.around_step = hooks.around_attempt if hooks.steps else None

    def _wrap(self, sub: SubscriptionRuntime) -> None:
        sub.call_through(self.hooks.wrap_handler(sub.handler, sub.name, sub.topics, sub.is_batch))

    # -- workflows ------------------------------------------------------------------

    def workflow(self, name: str, *, timeout: float | None = None) -> Callable[[W], W]:
        """Register an async function ``(wf, input)`` as the workflow ``name``.

        Unfinished runs of it in the log resume at once (replaying their
        checkpointed steps). Inside, ``await wf.step(step_name, fn, *args)`` runs a
        step and checkpoints its output; ``wf.sleep`` sleeps durably and
        ``wf.gather`` runs steps concurrently. The input and result are decoded to
        the function's annotated types.

        Args:
            name: The durable name runs are recorded under.
            timeout: Default deadline of a run, in seconds from its start;
                reconciliation reports runs past it.

        Raises:
            WorkflowError: The name is taken, or the function's shape is wrong.
            BusClosed: The bus is closed.
        """
        self._check_open()

        def decorator(fn: W) -> W:
            self._workflows.register(name, fn, timeout)
            return fn

        return decorator

    async def start_workflow(
        self,
        name: str,
        input: object = None,
        *,
        workflow_id: str | None = None,
        timeout: float | None = None,
    ) -> WorkflowHandle:
        """Start a run of the workflow ``name`` with ``input``; returns its handle once
        the start is committed.

        Idempotent by ``workflow_id``: starting an id that exists returns that run's
        handle, whatever its state, and starts nothing. A handler that starts one
        run per event with ``workflow_id=event.id`` therefore starts it exactly once.

        Args:
            name: A workflow registered with :meth:`workflow`.
            input: A msgspec-encodable value.
            workflow_id: The run's id; a fresh unique id by default.
            timeout: Seconds the run should take at most (overrides the workflow's).

        Raises:
            WorkflowError: No such workflow, or the id belongs to another workflow.
            PayloadError: The input cannot be encoded.
            BusClosed: The bus is closed.

        Cancellation: the start may still commit (and the run then starts); calling
        again with the same ``workflow_id`` returns that run's handle.
        """
        self._check_open()
        record = await self._workflows.start(name, input, workflow_id, timeout)
        return WorkflowHandle(self._workflows, record)

    async def get_workflow(self, workflow_id: str) -> WorkflowHandle:
        """The handle of an existing run.

        Raises:
            WorkflowError: No run has this id.

        Cancellation: a read; nothing changes.
        """
        return WorkflowHandle(self._workflows, await self._workflows.read(workflow_id))

    # -- reconciliation -------------------------------------------------------------

    async def reconcile(self, *, repair: bool = True) -> ReconcileReport:
        """Account for every event of every subscription in the log, and repair what
        can be repaired; also runs each user reconciler once. The bus runs the same
        pass just after open and every ``config.reconcile_interval`` seconds.

        Per subscription: events pending, retrying, dead-lettered, and *lost* (passed
        by its cursor but neither done, retrying nor dead-lettered: never on a sound
        log); retries overdue by more than ``config.reconcile_lease`` that nothing
        runs; handler calls running longer than the lease (*stuck*).

        Args:
            repair: Re-dispatch lost events through the subscription's retry lane
                (they end done or dead-lettered), re-arm overdue retries, cancel
                stuck calls (a failed attempt, ``HandlerStuck``: retried, then
                dead-lettered after ``max_attempts``), resume orphaned workflow
                runs. Only subscriptions registered on this bus are repaired.

        Returns:
            The report: ``report.ok`` is true when nothing is lost.

        Raises:
            BusClosed: The bus is closed.
            StorageError: The log could not be read or a repair not written.

        Cancellation: safe. A lost event is written to the retry lane in the log
        before the running subscription is handed it: a pass cancelled in between
        leaves it in the log's retry lane, where the next pass (once it is overdue)
        or the next open picks it up.
        """
        self._check_open()
        return await self._reconciler.reconcile(repair=repair)

    def reconciler(self, *, every: float = 60.0, name: str | None = None) -> Callable[[R], R]:
        """Register ``async def check(rc: Reconciliation) -> None``, run every
        ``every`` seconds (and on each :meth:`reconcile`) to compare the bus's view
        with an outside system: ``rc.bus`` is this bus, ``await rc.publish(...)``
        emits a corrective event, ``rc.flag(message)`` records an inconsistency. An
        exception (or a run longer than ``config.reconcile_lease``) is logged and
        shown in the report; it never stops the bus.

        Raises:
            ValueError: ``every`` is not a positive number, or the name is taken.
            BusClosed: The bus is closed.
        """
        self._check_open()
        return self._reconciler.reconciler(every, name)

    # -- waiting and looking --------------------------------------------------------

    def _dead_lettered(
        self, dead: list[_storage.DeadRecord], errors: list[BaseException | None]
    ) -> None:
        self._failure_count += len(dead)
        room = max(0, 100 - len(self._failures))
        self._failures.extend(zip(dead[:room], errors[:room], strict=True))

    async def drain(
        self, timeout: float | None = 30.0, *, workflows: bool = False, raise_failures: bool = False
    ) -> None:
        """Wait until every event committed so far is finished (handled and
        acknowledged, or dead-lettered) by every subscription of this bus, including
        events waiting in retry lanes, and outbox events those publish meanwhile.

        Workflow runs are not waited for (a run may sleep durably for days) unless
        ``workflows`` is true: then also until no run executes in this process.

        With ``raise_failures`` (for tests), events dead-lettered since the bus opened
        or the last such drain make it raise :class:`DeadLettered` once drained, with
        the first failure's error and traceback, instead of passing silently.

        Raises:
            DrainTimeout: ``timeout`` seconds passed first; it names each
                subscription behind and what it still holds (backlog, calls in
                flight, retries waiting and why, events parked behind a retry).
            DeadLettered: ``raise_failures`` and events were dead-lettered.

        Cancellation: safe; nothing changes.
        """
        try:
            with anyio.fail_after(timeout):
                # On a shared log, what other processes committed before this call too
                # (their later appends are not waited for: they may never stop).
                floor = await self._others_head()
                while True:
                    await self._writer.flush()
                    target = max(self._writer.committed_head, floor)
                    if not self._lagging(target) and self._writer.committed_head <= target:
                        # Nothing behind, and no outbox event appeared meanwhile.
                        if not self._writer.pending:
                            if workflows and not self._workflows.idle():
                                await self._workflows.wait_idle()
                                continue
                            if raise_failures and self._failure_count:
                                self._raise_failures()
                            return
                        continue
                    await self._wait_for_progress()
        except TimeoutError:
            head = self._writer.committed_head
            behind = self._lagging(head)
            raise DrainTimeout(
                timeout or 0.0,
                {s.name: s.finished_upto() for s in behind},
                {s.name: _describe(s, head) for s in behind},
                self._workflows.live() if workflows else None,
            ) from None

    async def _others_head(self) -> int:
        """The head of a shared log as of now, other processes' appends included (0
        on a log this process alone writes)."""
        log = self._log
        if not isinstance(log, _storage.SharedLog):
            return 0
        try:
            await log.poll()
        except _storage.StorageError as exc:
            raise translate_storage_error(exc) from exc
        return log.head

    def _raise_failures(self) -> None:
        count, failures = self._failure_count, self._failures
        self._failure_count, self._failures = 0, []
        # The first failure's own exception is the cause, with its traceback.
        raise DeadLettered(count, [self.dead_letters.letter(d) for d, _ in failures]) from (
            failures[0][1]
        )

    def _lagging(self, target: int) -> list[SubscriptionRuntime]:
        return [s for s in self._subs.values() if s.finished_upto() < target or not s.settled()]

    def state(self, subscription: str) -> StateReader:
        """A read view of ``subscription``'s committed state (``ctx.state`` writes
        that were acknowledged): ``await bus.state("billing").get(key, default)``."""
        sub = self._subs.get(subscription)
        return StateReader(self._log, sub.state_cache if sub else None, subscription)

    async def stats(self, *, exact: bool = True) -> LogStats:
        """Read the log's size, cursors, lag, retry and dead-letter counts.

        Args:
            exact: Count events and lag row by row (the default). False for a page
                that polls a big log: ``events`` is then the span of seqs kept and
                ``lag`` the head minus each cursor, a few index reads whatever the
                log's size.

        Cancellation: a read; nothing changes.
        """
        try:
            return await self._log.stats(exact=exact)
        except _storage.StorageError as exc:
            raise translate_storage_error(exc) from exc

    def count_topics(self) -> None:
        """Count the events committed per topic from now on, in
        ``metrics().published`` (the metrics exporters turn this on). Off until
        asked, since it costs a little per event. Idempotent."""
        if self._topic_counts is None:
            self._writer.route_appended()  # what was published before is not counted
            self._topic_counts = Counter()

    def metrics_threadsafe(self, timeout: float = 5.0) -> BusMetrics:
        """:meth:`metrics` from any thread (a metrics exporter's, a WSGI server's).

        On the bus's event loop it is :meth:`metrics`; from another thread the
        snapshot is taken on the loop, between two steps of the bus, so it never
        reads counters halfway through a change.

        Args:
            timeout: Seconds to wait for the loop to take it.

        Raises:
            BusClosed: The bus was never opened, or its event loop has stopped.
            TimeoutError: The loop did not take the snapshot within ``timeout``
                (it is blocked, or waits on this thread).
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            raise BusClosed("the bus's event loop is not running")
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return self.metrics()
        result: concurrent.futures.Future[BusMetrics] = concurrent.futures.Future()

        def take() -> None:
            if result.set_running_or_notify_cancel():
                try:
                    result.set_result(self.metrics())
                except Exception as exc:  # noqa: BLE001 - handed to the waiting thread
                    result.set_exception(exc)

        try:
            loop.call_soon_threadsafe(take)
        except RuntimeError:
            raise BusClosed("the bus's event loop has stopped") from None
        try:
            return result.result(timeout)
        except concurrent.futures.TimeoutError:
            result.cancel()
            raise TimeoutError(
                f"the bus's event loop did not take a metrics snapshot within {timeout}s"
            ) from None

    def metrics(self) -> BusMetrics:
        """A snapshot of in-process counters (no I/O). Call it on the bus's event
        loop; from another thread use :meth:`metrics_threadsafe`."""
        head = self._writer.committed_head
        return BusMetrics(
            head=head,
            pending_publishes=self._writer.pending,
            commits=self._writer.commits,
            committed_events=self._writer.committed_events,
            log=self._writer.metrics(),
            reconcile=self._reconciler.metrics(),
            workflows=self._workflows.metrics(),
            subscriptions={name: s.metrics(head) for name, s in self._subs.items()},
            published=dict(self._topic_counts) if self._topic_counts is not None else {},
        )

    def log_reader(self) -> LogReader:
        """Read access to this bus's log, for an operator's tools (the dashboard
        mounted next to the bus): stats, dead letters, workflow runs and their steps,
        paged. It writes nothing."""
        return LogReader(self._log)

    @property
    def subscription_names(self) -> frozenset[str]:
        """The names of the subscriptions made on this bus."""
        return frozenset(self._subs)


def _storage_for(target: str, config: BusConfig) -> _storage.Storage:
    """The log ``Bus.open`` opens for ``target``."""
    if target == ":memory:":
        return MemoryStorage()
    if not _storage.is_postgres_url(target):
        kind = SharedSQLiteStorage if config.shared else SQLiteStorage
        return kind(
            target,
            durability=config.durability,
            busy_timeout=config.busy_timeout,
            open_timeout=config.open_timeout,
        )
    try:
        return _storage.PostgresStorage(
            target,
            durability=config.durability,
            busy_timeout=config.busy_timeout,
            open_timeout=config.open_timeout,
        )
    except (ImportError, ValueError) as exc:
        raise ConfigError("path", str(exc)) from exc


def _is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is the cancellation of the task that runs the bus."""
    return isinstance(exc, asyncio.CancelledError | anyio.get_cancelled_exc_class())


def _describe(sub: SubscriptionRuntime, head: int) -> str:
    """What a subscription behind still holds, for ``DrainTimeout``."""
    pending = sub.pending()
    parts = [f"at {sub.finished_upto()} of {head}"]
    if pending.buffered:
        parts.append(f"{pending.buffered} buffered")
    if pending.in_flight:
        parts.append(f"{pending.in_flight} calls in flight")
    if pending.retries_waiting:
        why = []
        if pending.suspects:
            why.append(f"{pending.suspects} suspects of killing the process, run alone")
        if pending.blocked_by_breaker:
            why.append("the circuit breaker is open")
        if pending.waiting_for_budget:
            why.append("held by the retry budget (RetryPolicy.budget_floor per second)")
        due = f"{pending.retries_due} due now"
        if pending.next_due is not None and pending.retries_due < pending.retries_waiting:
            due += ", the next later"
        parts.append(
            f"{pending.retries_waiting} retries waiting ({due}"
            + (f"; {'; '.join(why)}" if why else "")
            + ")"
        )
    if pending.parked:
        parts.append(f"{pending.parked} parked behind a retry of their key")
    return ", ".join(parts)
