"""A subscription's pending writes: what its calls produced and the log must record.

It is the scheduler's :class:`~._scheduler.Sink` (retry records, dead letters,
settled retries) and the log writer's :class:`~eventbus.publish._writer.Source`:
the writer takes everything pending in its next group commit, with the cursor the
scheduler computes at that moment, so the cursor never passes an event whose fate is
not in the same transaction. A commit that fails is put back ahead of anything newer.
"""

from __future__ import annotations

import typing

from eventbus.storage import PROCESS_DIED, DeadRecord, NewRecord, Record, RetryRecord, WriteBatch

from .._clock import Clock
from .._errors import PayloadValidationError
from .._event import Event
from .._logging import event_fields, get_logger
from .._metrics import SubscriptionRecorder
from ..failures import dead_record, event_record, retry_record
from ._buffer import CallBuffer
from ._ports import DispatchWriter
from ._scheduler import PARKED, Entry, Scheduler
from ._state import StateCache

logger = get_logger("dispatch")


class Undecodable:
    """A stored event whose payload does not decode: dead-lettered when reached."""

    __slots__ = ("error", "record")

    def __init__(self, record: Record, error: PayloadValidationError) -> None:
        self.record = record
        self.error = error


def stored_record(entry: Entry) -> Record:
    """The stored form of an entry's event."""
    item = entry.item
    if isinstance(item, RetryRecord | Undecodable):
        return item.record
    return event_record(typing.cast("Event[object]", item))


def event_id(entry: Entry) -> str:
    """The id of an entry's event."""
    item = entry.item
    if isinstance(item, Event):
        return item.id
    if isinstance(item, RetryRecord | Undecodable):
        return item.record.id
    return ""


class PendingWrites:
    """The pending writes of subscription ``name`` (see the module docstring).

    ``scheduler`` is set once the subscription has built it (the scheduler needs
    this object as its sink first).
    """

    def __init__(
        self,
        name: str,
        clock: Clock,
        writer: DispatchWriter,
        state: StateCache,
        stats: SubscriptionRecorder,
        cursor: int,
    ) -> None:
        self.name = name
        self._clock = clock
        self._writer = writer
        self._state_cache = state
        self._stats = stats
        self.scheduler: Scheduler | None = None
        self.acked = cursor  # the cursor the log holds
        self._appends: list[NewRecord] = []
        self._state: list[tuple[str, str, bytes | None]] = []
        self._dead: list[DeadRecord] = []
        self._retries: dict[int, RetryRecord] = {}
        self._settled: list[tuple[str, int]] = []
        self._done: list[tuple[str, int, int]] = []
        self._notified = False
        self._committing = 0  # batches taken by the writer, not yet committed
        self.on_committed: typing.Callable[[], None] = lambda: None
        # Told of dead letters once committed, with the errors that caused them.
        self.on_dead: typing.Callable[[list[DeadRecord], list[BaseException | None]], None] = (
            lambda dead, errors: None
        )
        self._errors: dict[int, BaseException] = {}  # of dead letters not committed yet

    @property
    def clean(self) -> bool:
        """Nothing pending, nothing being committed."""
        return not self._notified and not self._committing

    def touch(self) -> None:
        """Something may be pending (a cursor that moved): have the writer look."""
        if not self._notified:
            self._notified = True
            self._writer.notify(self)

    def absorb(self, buf: CallBuffer) -> None:
        """A call succeeded: its outbox and state writes join the pending writes."""
        if buf.outbox:
            self._appends.extend(buf.outbox)
            buf.outbox = []
        if buf.writes:
            writes = buf.writes
            self._state.extend(writes)
            self._state_cache.stage(writes)
            buf.writes = []
            buf.overlay = {}
        if buf.failed:
            buf.failed = {}

    # -- the scheduler's sink -------------------------------------------------------

    def retry(self, entry: Entry, error: BaseException | None) -> None:
        clock = self._clock
        wall = clock.wall()
        due_at = None if entry.state == PARKED else wall + max(0.0, entry.due - clock.now())
        if error is not None and entry.first_failed is None:
            entry.first_failed = wall
        self._retries[entry.seq] = retry_record(
            self.name, stored_record(entry), entry.attempt, due_at, error, entry.first_failed
        )
        self.touch()

    def dead(self, entry: Entry, error: BaseException | None) -> None:
        record = stored_record(entry)
        if error is None:  # it killed the process once too often
            attempts = entry.attempt - 1
            dead = dead_record(
                self.name,
                record,
                attempts,
                None,
                entry.first_failed,
                error_type=PROCESS_DIED,
                message=f"process died while handling ({attempts} attempts)",
            )
        else:
            dead = dead_record(self.name, record, entry.attempt, error, entry.first_failed)
        self._dead.append(dead)
        if error is not None:
            self._errors[entry.seq] = error
        if not entry.fresh:
            self._retries.pop(entry.seq, None)
            self._settled.append((self.name, entry.seq))
        self._stats.dead_lettered += 1
        logger.warning(
            "subscription %s: event %s (seq %d) dead-lettered after %d attempts: %s: %s",
            self.name,
            record.id,
            entry.seq,
            dead.attempts,
            dead.error_type,
            dead.error_message,
            extra=event_fields(self.name, record.id, entry.seq, dead.attempts),
        )
        self.touch()

    def settle(self, entry: Entry) -> None:
        self._retries.pop(entry.seq, None)
        self._settled.append((self.name, entry.seq))
        self.touch()

    # -- the writer's source --------------------------------------------------------

    def take_writes(self) -> WriteBatch | None:
        self._notified = False
        assert self.scheduler is not None
        cursor, ranges = self.scheduler.take_acks()
        name = self.name
        if not (
            ranges
            or self._appends
            or self._state
            or self._dead
            or self._retries
            or self._settled
            or self._done
        ):
            # Only the cursor (the common acknowledgement of healthy traffic).
            if cursor <= self.acked:
                return None
            self._committing += 1
            return WriteBatch(acks={name: cursor})
        if ranges:
            self._done.extend((name, lo, hi) for lo, hi in ranges)
        batch = WriteBatch(
            appends=self._appends,
            state=self._state,
            dead=self._dead,
            retries=list(self._retries.values()),
            settled=self._settled,
            done=self._done,
        )
        if cursor > self.acked:
            batch.acks[name] = cursor
        if batch.is_empty():
            return None
        self._appends, self._state, self._dead = [], [], []
        self._retries, self._settled, self._done = {}, [], []
        self._committing += 1
        return batch

    def committed(self, batch: WriteBatch) -> None:
        self._committing -= 1
        if batch.state:
            self._state_cache.committed(batch.state)
        cursor = batch.acks.get(self.name)
        if cursor is not None and cursor > self.acked:
            self.acked = cursor
        if batch.dead:
            errors = self._errors
            self.on_dead(batch.dead, [errors.pop(d.record.seq, None) for d in batch.dead])
        self.on_committed()

    def lease_lost(self, batch: WriteBatch) -> None:
        raise AssertionError("unreachable: a subscription's own writes carry no lease")

    def commit_failed(self, batch: WriteBatch) -> None:
        self._committing -= 1
        self._appends[:0] = batch.appends
        self._state[:0] = batch.state
        self._dead[:0] = batch.dead
        retries = {r.record.seq: r for r in batch.retries}
        retries.update(self._retries)
        self._retries = retries
        self._settled[:0] = batch.settled
        self._done[:0] = batch.done
        self._notified = True  # the writer keeps this source on its list
