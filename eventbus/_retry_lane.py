"""One subscription's retry lane: its workers, the attempts they run, and what follows
a failed attempt (a new due time with backoff, or the dead letters).

A failed event leaves the main lane at once and waits here (in a
:class:`RetrySchedule`) until it is due; ``retry.concurrency`` workers take due
events within the retry budget and while the circuit breaker lets them. Each attempt
is recorded as running in the log before it starts, so an attempt that kills the
process counts. A suspect of killing the process (an event that was running when one
died) runs alone: the lane claims the floor, and the main lane pauses between
batches until the suspect's attempt ends.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING

import anyio
import msgspec

from storage import DeadRecord, RetryRecord, WriteBatch

from ._breaker import RetryBudget
from ._context import Context
from ._event import Event
from ._lane import RetrySchedule
from ._state import State
from .failures import PROCESS_DIED, backoff_delay, dead_record, event_record, retry_record

if TYPE_CHECKING:
    from ._subscription import Subscription

logger = logging.getLogger(__name__)


class Outcome:
    """What a main-lane batch decided for its failing and waiting events: they enter
    the retry lane (or the dead letters) with the batch's acknowledgement."""

    __slots__ = ("blocked", "dead", "retries", "successes")

    def __init__(self) -> None:
        self.retries: list[tuple[RetryRecord, float | None]] = []  # with monotonic due
        self.dead: list[DeadRecord] = []
        self.blocked: set[str] = set()
        self.successes = 0


class RetryLane:
    """The retry lane of one :class:`Subscription`, which owns it and runs its workers.

    Attributes:
        schedule: What waits or runs in the lane (the subscription's ``lane``).
        budget: Retry tokens: fresh events handled by the main lane earn them, and
            each retry after the first attempt takes one.
        rng: The jitter of backoff delays.
        wake: Set when what is due may have changed (a retry added or settled, the
            main lane between batches, the subscription stopping).
        suspect_running: A suspect of killing the process is running, alone.
        suspect_waiting: A suspect is due and waits for the main lane to pause.
    """

    def __init__(self, sub: Subscription) -> None:
        retry = sub.retry
        self._sub = sub
        self.schedule = RetrySchedule(ordered=sub.ordered)
        self.budget = RetryBudget(
            retry.budget_ratio,
            retry.budget_floor,
            # Ten seconds of the floor plus the earnings of a thousand fresh events:
            # a backlog of retries drains in bursts, a storm still cannot outgrow it.
            burst=max(10.0, 10 * retry.budget_floor) + 1000 * retry.budget_ratio,
            now=time.monotonic(),
        )
        self.rng = random.Random()
        self.wake = asyncio.Event()
        self._alone = asyncio.Event()
        self.suspect_running = False
        self.suspect_waiting = False

    def add(self, records: list[RetryRecord]) -> None:
        """Take redriven events into the lane (already committed to the log)."""
        now_wall, now = time.time(), time.monotonic()
        for record in sorted(records, key=lambda r: r.record.seq):
            due = now + max(0.0, (record.due_at or now_wall) - now_wall)
            self.schedule.add(record, due)
        self.wake.set()
        self._sub._on_progress()

    def park(self, event: Event[object], outcome: Outcome) -> None:
        """An earlier event of this key waits in the retry lane: queue behind it."""
        record = RetryRecord(self._sub.name, event_record(event), event.attempt, None)
        outcome.retries.append((record, None))

    def failed(self, event: Event[object], exc: Exception, outcome: Outcome) -> None:
        """Decide a failed first attempt: retry lane or, if hopeless, dead letters."""
        sub = self._sub
        sub.stats.failed_attempts += 1
        attempt = event.attempt
        if attempt >= sub.retry.max_attempts or not sub.retry.retryable(exc):
            logger.error(
                "subscription %s: event %s (seq %d) failed (%s: %s); dead-lettering it",
                sub.name,
                event.id,
                event.seq,
                type(exc).__name__,
                exc,
            )
            outcome.dead.append(dead_record(sub.name, event_record(event), attempt, exc, None))
            return
        delay = backoff_delay(sub.retry, attempt, sub.retry.initial_delay, self.rng)
        logger.warning(
            "subscription %s: event %s attempt %d failed (%s: %s); retrying in %.3fs",
            sub.name,
            event.id,
            attempt,
            type(exc).__name__,
            exc,
            delay,
        )
        now_wall = time.time()
        record = retry_record(
            sub.name, event_record(event), attempt + 1, now_wall + delay, exc, now_wall
        )
        outcome.retries.append((record, time.monotonic() + delay))
        if sub.ordered and event.key is not None:
            outcome.blocked.add(event.key)

    def stop(self) -> None:
        """The subscription is stopping: wake the workers, and a main lane waiting
        for a suspect."""
        self.wake.set()
        self._alone.set()

    async def suspect_gate(self) -> None:
        """Between main-lane batches: wait while a suspect runs, or is due and waits
        for the main lane to pause."""
        while (self.suspect_running or self.suspect_waiting) and not self._sub._stopping:
            self._alone.clear()
            self.wake.set()
            await self._alone.wait()

    async def worker(self) -> None:
        """One worker of the lane: runs due attempts until the subscription stops."""
        sub = self._sub
        ctx = Context(sub.name, sub._encode, State(sub.state_cache))
        while True:
            picked = await self._next()
            if picked is None:
                return
            record, suspect = picked
            try:
                await self._attempt(record, ctx)
            finally:
                if suspect:  # only the worker that started the suspect ends its turn
                    self.suspect_running = False
                    self._alone.set()
                    self.wake.set()

    async def _next(self) -> tuple[RetryRecord, bool] | None:
        sub = self._sub
        lane = self.schedule
        while not sub._stopping:
            now = time.monotonic()
            wait = sub.breaker.wait_time(now) if sub.breaker is not None else 0.0
            due = lane.next_due()
            head = lane.peek_due() if due is not None and due <= now else None
            suspect = head is not None and head.error_type == PROCESS_DIED
            # A suspect of killing the process runs alone, so that if it does again,
            # no innocent event in flight is blamed with it; the main lane pauses
            # between batches to let it.
            blocked = suspect and (bool(lane.running) or sub._busy)
            waiting = suspect and wait <= 0 and not self.suspect_running
            if waiting != self.suspect_waiting:
                self.suspect_waiting = waiting
                if not waiting:
                    self._alone.set()
            if wait <= 0 and head is not None:
                if self.suspect_running or blocked:
                    wait = float("inf")
                elif head.attempt >= 2 and not suspect and not self.budget.take(now):
                    # Recovery after a death is not a retry storm: no budget for it.
                    wait = self.budget.wait_time(now)
                else:
                    record = lane.pop_due(now)
                    if record is not None:
                        if suspect:
                            self.suspect_running = True
                            self.suspect_waiting = False
                        return record, suspect
            elif due is not None:
                wait = max(wait, due - now)
            elif wait <= 0:
                wait = float("inf")
            self.wake.clear()
            with anyio.move_on_after(wait):
                await self.wake.wait()
        return None

    async def _attempt(self, record: RetryRecord, ctx: Context) -> None:
        """Run one attempt, then settle the event, reschedule it or dead-letter it."""
        sub = self._sub
        seq = record.record.seq
        attempt = record.attempt
        # Record the attempt before it runs: if it kills the process, it counts.
        await sub._commit(WriteBatch(retries=[msgspec.structs.replace(record, running=True)]))
        try:
            event = msgspec.structs.replace(sub._to_event(record.record), attempt=attempt)
        except msgspec.DecodeError as exc:
            self.schedule.attempt_over(seq)
            await self._dead_letter(record, exc)
            return
        mark = ctx._begin(None if sub.is_batch else event, attempt)
        error: Exception | None = None
        try:
            await sub._call([event] if sub.is_batch else event, ctx)
            error = ctx._failed.get(seq)
        except Exception as exc:  # noqa: BLE001 - retried again or dead-lettered
            error = exc
        # From here the attempt is over: a close must not count it as a death.
        self.schedule.attempt_over(seq)
        if error is None:
            sub._record_breaker(1, 0)
            done = WriteBatch(
                appends=ctx._take_outbox(), state=ctx.state._take(), settled=[(sub.name, seq)]
            )
            await sub._commit(done)
            sub.state_cache.committed(done.state)
            self._settle(seq)
            return
        ctx._rollback_to(mark)
        sub._record_breaker(0, 1)
        sub.stats.failed_attempts += 1
        if attempt >= sub.retry.max_attempts or not sub.retry.retryable(error):
            logger.error(
                "subscription %s: event %s (seq %d) failed %d times, dead-lettering it: %s: %s",
                sub.name,
                record.record.id,
                seq,
                attempt,
                type(error).__name__,
                error,
            )
            await self._dead_letter(record, error)
            return
        delay = backoff_delay(sub.retry, attempt, sub.retry.initial_delay, self.rng)
        logger.warning(
            "subscription %s: event %s attempt %d failed (%s: %s); retrying in %.3fs",
            sub.name,
            record.record.id,
            attempt,
            type(error).__name__,
            error,
            delay,
        )
        again = retry_record(
            sub.name,
            record.record,
            attempt + 1,
            time.time() + delay,
            error,
            record.first_failed_at,
        )
        await sub._commit(WriteBatch(retries=[again]))
        self.schedule.reschedule(again, time.monotonic() + delay)
        self.wake.set()

    async def _dead_letter(self, record: RetryRecord, exc: BaseException) -> None:
        """Give up on the event: dead-letter it and take it out of the lane."""
        sub = self._sub
        seq = record.record.seq
        dead = dead_record(sub.name, record.record, record.attempt, exc, record.first_failed_at)
        await sub._commit(WriteBatch(dead=[dead], settled=[(sub.name, seq)]))
        sub.stats.dead_lettered += 1
        self._settle(seq)

    def _settle(self, seq: int) -> None:
        self.schedule.settle(seq, time.monotonic())
        self.wake.set()
        self._sub._on_progress()
