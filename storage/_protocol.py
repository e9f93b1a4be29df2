"""The contract every log backend implements."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from ._calls import CallSlots
from ._types import (
    Claim,
    DeadRecord,
    Lease,
    LogStats,
    NewRecord,
    Notice,
    Receipt,
    Record,
    RetryRecord,
    Share,
    StepRecord,
    SubscriptionInfo,
    Unaccounted,
    WorkflowRecord,
    WriteBatch,
)


@runtime_checkable
class Storage(Protocol):
    """A durable, ordered log with subscription cursors.

    One writer (the bus) drives it; reads may happen concurrently with a commit.
    ``head`` is the sequence number of the last committed event (0 when empty) and
    is only read after :meth:`open`.
    """

    @property
    def head(self) -> int: ...

    @property
    def commits_now(self) -> bool:
        """Whether :meth:`commit_now` can ever commit (read once the log is open):
        False where every commit is a network round trip or an fsync, so that a
        caller need not gather a batch only to be told to await :meth:`commit`."""
        ...

    @property
    def appends_now(self) -> bool:
        """Whether :meth:`append_now` can ever append (read once the log is open):
        True only where an append costs no I/O at all (an in-memory log), so that a
        publish gains nothing by waiting to share a commit with others."""
        ...

    async def open(self) -> None:
        """Open (creating if needed) the log. Raises a ``StorageError`` subclass."""

    async def close(self) -> None:
        """Flush and release the log. Idempotent."""

    async def commit(self, batch: WriteBatch) -> list[Receipt]:
        """Apply ``batch`` in one transaction and return one receipt per append.

        Appends get consecutive sequence numbers after ``head``, except those whose
        idempotency key is already known: they get the original's receipt with
        ``duplicate=True``. Either everything in the batch is written, or nothing.
        """

    def commit_now(self, batch: WriteBatch) -> list[Receipt] | None:
        """:meth:`commit` without awaiting, when this storage can do it cheaply on the
        calling thread (a small transaction, no lock to wait for); otherwise None,
        with nothing written, and the caller awaits :meth:`commit`.

        Raises as :meth:`commit` does when it tried and failed.
        """

    def append_now(self, record: NewRecord) -> Receipt | None:
        """Append one record at once, without awaiting, as a :meth:`commit` of it
        alone would; None, with nothing written, when this storage cannot (any I/O,
        an idempotency key to look up, a ``commit`` put in the way that must see
        every append), and the caller commits it the usual way.
        """

    async def read(
        self, after: int, upto: int, topics: frozenset[str] | None, limit: int
    ) -> list[Record]:
        """Events with ``after < seq <= upto`` on ``topics`` (all if None), in order."""

    async def finished_ahead(self, subscription: str, after: int) -> list[tuple[int, int]]:
        """Ranges ``(lo, hi)`` of events past ``after`` that the subscription has
        finished (acknowledged as done, or dead-lettered), in order: what it finished
        ahead of its cursor, which must not be handled again."""

    def calls(self, subscription: str, slots: int, width: int) -> CallSlots:
        """Slots in which ``subscription`` records the handler calls it runs (at most
        ``slots`` at once, each of at most ``width`` events), so that a death is
        blamed on exactly those. A log that outlives the process counts, when it is
        next opened, one failed attempt (``PROCESS_DIED``) for every event whose call
        was in flight: events in the retry lane get their attempt counted there,
        unfinished ones enter the retry lane at attempt 2."""

    async def subscriptions(self) -> dict[str, SubscriptionInfo]:
        """Every registered subscription with its cursor."""

    async def dead_letters(
        self,
        subscription: str | None = None,
        limit: int = 100,
        after_seq: int = 0,
        *,
        error_type: str | None = None,
        since: float | None = None,
        until: float | None = None,
        ids: Sequence[str] | None = None,
        after_subscription: str | None = None,
    ) -> list[DeadRecord]:
        """Dead-lettered events in ``(seq, subscription)`` order, filtered; page with
        ``after_seq`` (and ``after_subscription``: then the page resumes after that
        subscription's letter of event ``after_seq``, where several subscriptions
        dead-lettered one event). ``error_type`` matches the qualified name or its
        last part; ``since`` and ``until`` bound the last failure time."""

    async def count_dead_letters(
        self,
        subscription: str | None = None,
        *,
        error_type: str | None = None,
        since: float | None = None,
        until: float | None = None,
        ids: Sequence[str] | None = None,
    ) -> int:
        """How many dead letters match the filters of :meth:`dead_letters`."""

    async def get_state(self, subscription: str, keys: Sequence[str]) -> dict[str, bytes]:
        """Committed state values of ``keys`` (absent keys are left out)."""

    async def state_items(
        self, subscription: str, after: str = "", limit: int = 1000
    ) -> list[tuple[str, bytes]]:
        """Committed state in key order, ``limit`` at a time after key ``after``."""

    async def get_effect(self, key: str) -> bytes | None:
        """The recorded result of the outside effect with idempotency key ``key``."""

    async def retries(self, subscription: str) -> list[RetryRecord]:
        """The subscription's retry lane, in log order."""

    async def redrive(
        self,
        subscription: str | None,
        *,
        ids: Sequence[str] | None = None,
        error_type: str | None = None,
        due_at: float,
        spacing: float = 0.0,
        limit: int = 1_000_000,
    ) -> list[RetryRecord]:
        """Move matching dead letters into their subscriptions' retry lanes in one
        transaction, attempts reset, the i-th due at ``due_at + i * spacing``."""

    async def purge(
        self,
        subscription: str | None,
        *,
        ids: Sequence[str] | None = None,
        error_type: str | None = None,
        until: float | None = None,
    ) -> int:
        """Delete matching dead letters; returns how many."""

    async def workflow(self, workflow_id: str) -> WorkflowRecord | None:
        """The workflow run with this id, if any."""

    async def workflows(
        self,
        *,
        name: str | None = None,
        status: str | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> list[WorkflowRecord]:
        """Workflow runs in the order they were first written, filtered; page with
        ``after`` (the last ``num`` seen)."""

    async def count_workflows(self, *, name: str | None = None, status: str | None = None) -> int:
        """How many workflow runs match the filters of :meth:`workflows`."""

    async def drop_subscription(self, name: str) -> bool:
        """Forget the subscription ``name`` in one transaction: its cursor, its
        acknowledgement ledger, retry lane, dead letters and state. Returns whether
        it existed."""

    async def steps(self, workflow_id: str) -> list[StepRecord]:
        """The step checkpoints of a workflow run, in call order."""

    async def unaccounted(self, subscription: str, upto: int, limit: int = 100) -> Unaccounted:
        """Events up to ``upto`` (and the subscription's cursor) on its topics that it
        has neither acknowledged as done, nor in its retry lane, nor dead-lettered:
        what a correct log never holds. Read from one consistent snapshot."""

    async def take_control(self) -> list[tuple[int, bytes]]:
        """Commands other processes queued in the log for its owner."""

    async def done_control(self, ids: Sequence[int]) -> None:
        """Remove handled commands."""

    async def compact(
        self, upto: int, older_than: float, idempotency_older_than: float, limit: int = 10_000
    ) -> int:
        """Delete up to ``limit`` events with ``seq <= upto`` created before
        ``older_than`` (a unix time), oldest first, and idempotency keys recorded before
        ``idempotency_older_than``, and completed or cancelled workflow runs last
        updated before that too. Returns the number of events deleted; call again
        while it returns ``limit`` (each call is one short transaction)."""

    async def stats(self, *, exact: bool = True) -> LogStats:
        """A snapshot of the log's size, cursors and lag.

        With ``exact=False`` (for a page that polls a big log) nothing is counted row
        by row: ``events`` is the span of seqs kept (``head - oldest_seq + 1``) and a
        subscription's ``lag`` the head minus its cursor (which counts events on other
        topics too, as ``SubscriptionMetrics.lag`` does): a few index reads, whatever
        the log's size.
        """


@runtime_checkable
class SharedLog(Storage, Protocol):
    """A log that several processes dispatch from at once (PostgreSQL), on top of
    :class:`Storage`: each subscription's events are divided into partitions, and a
    process handles only those of the partitions it holds a lease on.

    The writes a process makes for a subscription carry its :class:`Lease`
    (``WriteBatch.leases``): a batch whose lease was lost is refused whole with
    :class:`LeaseLost` (fencing).
    """

    #: This process's name among those sharing the log.
    member: str
    #: Seconds a lease lasts unless renewed.
    lease_time: float
    #: Whether handler calls are recorded in the log (:meth:`mark_call`); if not,
    #: :meth:`Storage.calls` records them.
    records_calls: bool
    #: Seconds between :meth:`poll` calls the log needs to notice other processes'
    #: appends (None: it announces them itself).
    poll_interval: float | None
    #: Whether this process may do the log's upkeep (queued commands, compaction).
    dispatching: bool

    @property
    def partitions(self) -> int: ...

    def watch(self, watcher: Callable[[Notice], None]) -> None:
        """Call ``watcher`` with each :class:`Notice` of what processes announce on
        the log: appends, partitions changing hands, retry lanes written."""

    async def announce(self, subscription: str) -> None:
        """Tell the holders of ``subscription``'s partitions that its retry lane was
        written outside their handling: they read it again."""

    async def poll(self) -> None:
        """Look for other processes' appends (and tell the watchers)."""

    async def heartbeat(self, subscription: str, lease: Lease | None) -> Share:
        """Renew what of ``lease`` is still held, say this process is alive on
        ``subscription``, and learn its fair share of the partitions."""

    async def acquire(self, subscription: str, want: int) -> Claim:
        """Take up to ``want`` more free partitions (charging the deaths a holder
        whose lease expired left in flight); returns everything held now."""

    async def release(self, subscription: str, partitions: Sequence[int] | None) -> None:
        """Give up ``partitions`` (all of them, and membership, if None)."""

    async def mark_call(
        self,
        lease: Lease,
        slot: int,
        seqs: Sequence[int],
        attempts: Sequence[int],
        keys: Sequence[str | None],
        call: int = 0,
    ) -> None:
        """Record handler call number ``call`` of ``seqs`` (at ``attempts``, of
        ``keys``) in ``slot`` before it starts."""

    async def end_calls(self, lease: Lease, calls: Sequence[tuple[int, int]]) -> None:
        """The calls ``(slot, call number)`` returned or raised."""

    async def read_claimed(
        self, claim: Claim, after: int, upto: int, topics: frozenset[str] | None, limit: int
    ) -> list[Record]:
        """:meth:`Storage.read` of the claim's partitions, each past its start."""

    async def claimed_retries(self, lease: Lease) -> list[RetryRecord]:
        """:meth:`Storage.retries` of the lease's partitions."""

    async def claimed_finished_ahead(self, lease: Lease, after: int) -> list[tuple[int, int]]:
        """:meth:`Storage.finished_ahead` for a reader of the lease's partitions."""

    async def progress(
        self, subscription: str, topics: frozenset[str], upto: int
    ) -> tuple[int, int]:
        """How far the subscription finished the log up to ``upto`` in every
        partition, and how many of its events wait in its retry lane."""

    async def claim_runs(self, ids: Sequence[str], lease: float) -> dict[str, int]:
        """Claim the workflow runs ``ids`` for this process for ``lease`` seconds, in
        one transaction: those nobody holds, those whose claim expired (their epoch
        bumped: the old holder's writes are refused from then on) and those this
        process holds already (renewed), if they are still running. Returns the ids
        held now, with their epochs; the others are held by live processes, or no
        longer running (cancelled, finished)."""

    async def release_runs(self, ids: Sequence[str]) -> None:
        """Give up this process's claims of the workflow runs ``ids``."""
