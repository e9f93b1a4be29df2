"""Crash recovery of one subscription at open: register it, rebuild its retry lane from
the log, and move what a dead process was handling into that lane, the attempt counted.

An attempt recorded as running when the process died counts as failed; so does the
stretch of the main lane that the in-flight marker covers beyond the acknowledged
cursor (attempt 1). Their events are retried one at a time, as suspects, and an event
that has killed the process ``max_attempts`` times is dead-lettered instead of
crash-looping forever.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import anyio
import msgspec

import storage as _storage
from storage import DeadRecord, Record, RetryRecord, WriteBatch

from .failures import PROCESS_DIED, backoff_delay, dead_record

if TYPE_CHECKING:
    from ._subscription import Subscription

logger = logging.getLogger(__name__)


async def recover(sub: Subscription) -> None:
    """Recover ``sub`` at open, retrying storage failures (neither lane runs until it
    has)."""
    delay = 0.05
    while True:
        try:
            await _recover(sub)
            break
        except _storage.StorageError as exc:
            logger.warning(
                "subscription %s: recovery failed (%s); retrying in %.2fs",
                sub.name,
                exc,
                delay,
            )
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def _recover(sub: Subscription) -> None:
    """Register; rebuild the retry lane; settle what a dead process left behind."""
    rng = sub.retry_lane.rng
    batch = WriteBatch(subscriptions=[sub._register])
    now_wall, now = time.time(), time.monotonic()
    schedule: list[tuple[RetryRecord, float | None]] = []
    for record in await sub._log.retries(sub.name):
        if record.running:
            # The process died during this attempt: it counts.
            failed = record.attempt
            record = msgspec.structs.replace(
                record,
                running=False,
                error_type=PROCESS_DIED,
                error_message=f"process died while handling (attempt {failed})",
                traceback="",
                first_failed_at=record.first_failed_at or now_wall,
            )
            if failed >= sub.retry.max_attempts:
                batch.dead.append(_died(sub, record.record, failed, record.first_failed_at))
                batch.settled.append((sub.name, record.record.seq))
                continue
            delay = backoff_delay(sub.retry, failed, sub.retry.initial_delay, rng)
            record = msgspec.structs.replace(record, attempt=failed + 1, due_at=now_wall + delay)
            batch.retries.append(record)
        schedule.append((record, _monotonic_due(sub, record.due_at, now_wall, now)))
    known = sub._known
    # A marker can reach past the last event (it is an upper bound): cap it.
    inflight_upto = min(known.inflight_upto, sub._open_head) if known else 0
    if inflight_upto > sub.acked:
        # The process died while handling (acked, inflight_upto]: attempt 1 counts.
        upto = inflight_upto
        in_lane = {r.record.seq for r, _ in schedule}
        pos = sub.acked
        while pos < upto:
            records = await sub._log.read(pos, upto, sub._filter, 1000)
            for rec in records:
                if rec.seq in in_lane:
                    continue
                if sub.retry.max_attempts <= 1:
                    batch.dead.append(_died(sub, rec, 1, now_wall))
                    continue
                delay = backoff_delay(sub.retry, 1, sub.retry.initial_delay, rng)
                moved = RetryRecord(
                    sub.name,
                    rec,
                    2,
                    now_wall + delay,
                    now_wall,
                    PROCESS_DIED,
                    "process died while handling (attempt 1)",
                )
                batch.retries.append(moved)
                schedule.append((moved, now + delay))
            pos = records[-1].seq if len(records) == 1000 else upto
        logger.warning(
            "subscription %s: the process died while handling events %d..%d; they "
            "are retried one at a time",
            sub.name,
            sub.acked + 1,
            upto,
        )
        batch.acks[sub.name] = upto
        sub.read_pos = sub.acked = sub._marked = upto
    batch.inflight[sub.name] = sub.acked
    await sub._commit(batch)
    for record, due in sorted(schedule, key=lambda item: item[0].record.seq):
        sub.lane.add(record, due)


def _monotonic_due(
    sub: Subscription, due_at: float | None, now_wall: float, now: float
) -> float | None:
    if due_at is None:
        return None
    # A wall clock that jumped while the process was down cannot delay a retry
    # beyond the policy's cap.
    return now + min(max(0.0, due_at - now_wall), sub.retry.max_delay)


def _died(
    sub: Subscription, record: Record, attempts: int, first_failed: float | None
) -> DeadRecord:
    logger.error(
        "subscription %s: the process died %d times while handling event %s (seq %d); "
        "dead-lettering it",
        sub.name,
        attempts,
        record.id,
        record.seq,
    )
    sub.stats.dead_lettered += 1
    return dead_record(
        sub.name,
        record,
        attempts,
        None,
        first_failed,
        error_type=PROCESS_DIED,
        message=f"process died while handling ({attempts} attempts)",
    )
