"""Dead letters: events a subscription gave up on, and how to look at them."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Literal

import msgspec

import eventbus.storage as _storage
from eventbus.storage import DeadRecord, Record, RetryRecord

from .._errors import BusError, translate_storage_error
from .._event import Event


class DeadLetter(msgspec.Struct, frozen=True):
    """An event that a subscription could not handle.

    Attributes:
        event: The original event (same ``id`` and ``seq``).
        subscription: The subscription that gave up.
        attempts: How many attempts were made.
        error_type: The last error's qualified type name.
        error_message: The last error's message.
        traceback: The last error's formatted traceback.
        first_failed_at: Unix time of the first failure.
        last_failed_at: Unix time of the last failure.
    """

    event: Event[object]
    subscription: str
    attempts: int
    error_type: str
    error_message: str
    traceback: str
    first_failed_at: float
    last_failed_at: float


class DeadLetterPage(builtins.list[DeadLetter]):
    """One page of dead letters, as :meth:`DeadLetters.list` returns it: a list, which
    also says whether it is all there is.

    Attributes:
        total: How many dead letters match the filters, on every page.
        more: Whether more follow this page: ask for them with
            ``list(..., after=page[-1])``, or walk every one with
            :meth:`DeadLetters.iter`.
    """

    def __init__(self, items: Iterable[DeadLetter], *, total: int, more: bool) -> None:
        super().__init__(items)
        self.total = total
        self.more = more

    def __repr__(self) -> str:
        return f"DeadLetterPage({super().__repr__()}, total={self.total}, more={self.more})"


class DeadLettered(BusError):
    """``drain(raise_failures=True)`` found events dead-lettered (for tests, where a
    failing handler must not pass silently). Its ``__cause__`` is the first one's own
    exception, when this process raised it.

    Attributes:
        count: How many were dead-lettered since the bus opened or the last such drain.
        dead_letters: The first of them (up to 100), the first failure first.
    """

    def __init__(self, count: int, dead_letters: builtins.list[DeadLetter]) -> None:
        self.count = count
        self.dead_letters = dead_letters
        first = dead_letters[0]
        super().__init__(
            f"{count} events were dead-lettered; the first: subscription "
            f"{first.subscription!r}, event {first.event.id} (seq {first.event.seq}) after "
            f"{first.attempts} attempts, {first.error_type}: {first.error_message}. Each is in "
            "bus.dead_letters; fix the handler and redrive them. Its traceback:\n"
            f"{first.traceback}"
        )


class ControlCommand(msgspec.Struct, frozen=True, tag=True):
    """A command queued in the log file for the bus that owns it (dead letters:
    redrive, purge; subscriptions: drop; workflow runs: cancel, the runs in ``ids``)."""

    action: Literal["redrive", "purge", "drop", "cancel"]
    subscription: str | None = None
    ids: list[str] | None = None
    error_type: str | None = None


CONTROL_ENCODER = msgspec.msgpack.Encoder()
CONTROL_DECODER = msgspec.msgpack.Decoder(ControlCommand)


class DeadLetters:
    """``bus.dead_letters``: inspect, re-inject and purge dead-lettered events."""

    def __init__(
        self,
        log: _storage.Storage,
        to_event: Callable[[Record], Event[object]],
        write_lock: asyncio.Lock,
        on_redriven: Callable[[list[RetryRecord]], None],
        rate: float,
    ) -> None:
        self._log = log
        self._to_event = to_event
        self._lock = write_lock
        self._on_redriven = on_redriven
        self._rate = rate

    def letter(self, dead: DeadRecord) -> DeadLetter:
        """The :class:`DeadLetter` of a stored dead letter (its event decoded)."""
        return self._convert(dead)

    def _convert(self, dead: DeadRecord) -> DeadLetter:
        try:
            event = self._to_event(dead.record)
        except msgspec.DecodeError:
            # Undecodable payloads are kept as raw bytes for the operator to inspect.
            event = Event(
                dead.record.id,
                dead.record.seq,
                dead.record.topic,
                dead.record.key,
                dead.record.payload,
                {},
                dead.record.created_at,
            )
        return DeadLetter(
            event=event,
            subscription=dead.subscription,
            attempts=dead.attempts,
            error_type=dead.error_type,
            error_message=dead.error_message,
            traceback=dead.traceback,
            first_failed_at=dead.first_failed_at,
            last_failed_at=dead.last_failed_at,
        )

    async def list(
        self,
        subscription: str | None = None,
        *,
        error_type: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        after: DeadLetter | None = None,
        after_seq: int = 0,
    ) -> DeadLetterPage:
        """One page of dead letters, in log order (then by subscription).

        The page is a list that says whether it holds everything: ``page.more`` is
        true when more match, ``page.total`` counts them all. For every one, use
        :meth:`iter`.

        Args:
            subscription: Only this subscription's.
            error_type: Only this error type: qualified (``"builtins.ValueError"``)
                or its last part (``"ValueError"``).
            since: Only those whose last failure is at or after this unix time.
            until: Only those whose last failure is before this unix time.
            limit: At most this many.
            after: Page on: the last dead letter of the previous page.
            after_seq: Page on from this ``event.seq`` (every subscription's letter
                of it skipped); ``after`` is exact where several subscriptions
                dead-lettered one event.

        Returns:
            The page: a ``list[DeadLetter]`` with ``total`` and ``more``.

        Raises:
            ValueError: ``limit`` is below 1.
            StorageError: The log could not be read.

        Cancellation: a read; nothing changes.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit!r}")
        try:
            rows = await self._log.dead_letters(
                subscription,
                limit + 1,  # one more, to know whether more follow
                after.event.seq if after is not None else after_seq,
                error_type=error_type,
                since=since,
                until=until,
                after_subscription=after.subscription if after is not None else None,
            )
            total = await self._log.count_dead_letters(
                subscription, error_type=error_type, since=since, until=until
            )
        except _storage.StorageError as exc:
            raise translate_storage_error(exc) from exc
        return DeadLetterPage(
            (self._convert(d) for d in rows[:limit]), total=total, more=len(rows) > limit
        )

    async def iter(
        self,
        subscription: str | None = None,
        *,
        error_type: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
        page_size: int = 500,
    ) -> AsyncIterator[DeadLetter]:
        """Every matching dead letter, in log order (then by subscription), read from
        the log a page at a time: ``async for letter in bus.dead_letters.iter():``.

        Args:
            subscription: Only this subscription's.
            error_type: Only this error type (qualified or its last part).
            since: Only those whose last failure is at or after this unix time.
            until: Only those whose last failure is before this unix time.
            limit: Stop after this many; None (the default) for all of them.
            page_size: Dead letters read from the log at a time.

        Raises:
            ValueError: ``limit`` is negative or ``page_size`` below 1.
            StorageError: The log could not be read.

        Cancellation: a read; nothing changes. Letters dead-lettered or redriven
        while the iteration runs may or may not be seen.
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be None or at least 0, got {limit!r}")
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size!r}")
        left = limit
        after: DeadLetter | None = None
        while left is None or left > 0:
            size = page_size if left is None else min(page_size, left)
            try:
                rows = await self._log.dead_letters(
                    subscription,
                    size,
                    after.event.seq if after is not None else 0,
                    error_type=error_type,
                    since=since,
                    until=until,
                    after_subscription=after.subscription if after is not None else None,
                )
            except _storage.StorageError as exc:
                raise translate_storage_error(exc) from exc
            for row in rows:
                after = self._convert(row)
                yield after
            if left is not None:
                left -= len(rows)
            if len(rows) < size:
                return

    async def count(
        self,
        subscription: str | None = None,
        *,
        error_type: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> int:
        """How many dead letters match (the filters are those of :meth:`list`).

        Raises:
            StorageError: The log could not be read.

        Cancellation: a read; nothing changes.
        """
        try:
            return await self._log.count_dead_letters(
                subscription, error_type=error_type, since=since, until=until
            )
        except _storage.StorageError as exc:
            raise translate_storage_error(exc) from exc

    async def get(self, event_id: str) -> builtins.list[DeadLetter]:
        """The dead letters of one event (one per subscription that gave up on it).

        Cancellation: a read; nothing changes.
        """
        try:
            rows = await self._log.dead_letters(None, 1000, 0, ids=[event_id])
        except _storage.StorageError as exc:
            raise translate_storage_error(exc) from exc
        return [self._convert(d) for d in rows]

    async def redrive(
        self,
        subscription: str | None = None,
        *,
        ids: Sequence[str] | None = None,
        error_type: str | None = None,
        rate: float | None = None,
    ) -> int:
        """Re-inject dead letters into the subscription that gave up on them (and
        only that one), with attempts reset. The event keeps its id, so
        ``ctx.idempotency_key`` is the same as before.

        They enter that subscription's retry lane spaced ``1 / rate`` seconds apart
        (``BusConfig.redrive_rate`` by default), so a large redrive cannot swamp live
        traffic. A subscription not running in this process picks them up when it
        next subscribes.

        Returns:
            How many were re-injected.

        Cancellation: the move from dead letters to the retry lane is one
        transaction; if cancelled, it happened entirely or not at all.
        """
        per_second = rate or self._rate
        if not per_second > 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        try:
            async with self._lock:
                records = await self._log.redrive(
                    subscription,
                    ids=ids,
                    error_type=error_type,
                    due_at=time.time(),
                    spacing=1.0 / per_second,
                )
        except _storage.StorageError as exc:
            raise translate_storage_error(exc) from exc
        self._on_redriven(records)
        return len(records)

    async def purge(
        self,
        subscription: str | None = None,
        *,
        ids: Sequence[str] | None = None,
        error_type: str | None = None,
        before: float | None = None,
    ) -> int:
        """Delete dead letters for good; returns how many.

        ``before`` keeps those whose last failure is at or after that unix time.

        Cancellation: one transaction; if cancelled, it happened entirely or not at all.
        """
        try:
            async with self._lock:
                return await self._log.purge(
                    subscription, ids=ids, error_type=error_type, until=before
                )
        except _storage.StorageError as exc:
            raise translate_storage_error(exc) from exc
