"""Records and write batches exchanged between the bus and a storage backend."""

from __future__ import annotations

from typing import NamedTuple

import msgspec


class NewRecord(msgspec.Struct, frozen=True, gc=False):
    """An event to append: the storage assigns its sequence number.

    ``payload`` and ``headers`` are already encoded; the storage never looks inside.
    """

    id: str
    topic: str
    key: str | None
    payload: bytes
    headers: bytes | None
    created_at: float
    idempotency_key: str | None = None


class Record(msgspec.Struct, frozen=True, gc=False):
    """An event as stored in the log, with its position ``seq``."""

    seq: int
    id: str
    topic: str
    key: str | None
    payload: bytes
    headers: bytes | None
    created_at: float


class Receipt(msgspec.Struct, frozen=True, gc=False):
    """Proof that an event is in the log.

    ``duplicate`` is true when the append carried an idempotency key already in the
    log: ``seq`` and ``id`` are then those of the original event and nothing new was
    written.
    """

    seq: int
    id: str
    duplicate: bool = False


class DeadRecord(msgspec.Struct, frozen=True, gc=False):
    """An event that a subscription gave up on, with why."""

    subscription: str
    record: Record
    attempts: int
    error_type: str
    error_message: str
    traceback: str
    first_failed_at: float
    last_failed_at: float


class SubscriptionInfo(msgspec.Struct, frozen=True, gc=False):
    """A subscription's persisted position: every event with ``seq <= cursor`` is
    finished for it (done or dead-lettered)."""

    name: str
    topics: tuple[str, ...]
    cursor: int
    updated_at: float


class RetryRecord(msgspec.Struct, frozen=True, gc=False):
    """An event waiting in a subscription's retry lane.

    The record carries its own copy of the event, so compaction of the main log
    never takes a pending retry's payload away.

    Attributes:
        attempt: The attempt that runs next (2 after one failure).
        due_at: Unix time when it is due; None while it waits behind an earlier
            event of the same key.
        running: True while an attempt runs: found true on open, the process died
            during that attempt.
    """

    subscription: str
    record: Record
    attempt: int
    due_at: float | None
    first_failed_at: float | None = None
    error_type: str = ""
    error_message: str = ""
    traceback: str = ""
    running: bool = False


#: The error type of an attempt that was running when the process died.
PROCESS_DIED = "eventbus.ProcessDied"

#: Dead letters of failed runs of workflow NAME are filed under "workflow:NAME".
WORKFLOW_PREFIX = "workflow:"


class WorkflowRecord(msgspec.Struct, frozen=True, gc=False):
    """One run of a workflow, identified by ``id``.

    Attributes:
        num: A number the storage gives the run when it is first written (0 before);
            a failed run's dead letter carries it as its ``seq``.
        status: ``"running"``, ``"completed"``, ``"failed"`` or ``"cancelled"``.
        input: The encoded input; ``output`` the encoded result once completed.
        deadline: Unix time by which the run should have finished, if it has one.
        runs: How many times the run was started or resumed.
    """

    id: str
    name: str
    status: str
    input: bytes
    created_at: float
    updated_at: float
    num: int = 0
    output: bytes | None = None
    error_type: str = ""
    error_message: str = ""
    traceback: str = ""
    deadline: float | None = None
    runs: int = 0


class StepRecord(msgspec.Struct, frozen=True, gc=False):
    """The checkpoint of one step of a workflow run, at ``position`` in call order.

    Attributes:
        status: ``"running"`` while an attempt runs (found so on open: the process
            stopped during it), ``"done"`` with its encoded ``output``, ``"failed"``
            once its retries gave up, or ``"fatal"``: failed, and its failure failed
            the run (a redrive runs it again; a ``"failed"`` one replays as failed).
        attempts: How many attempts have started (one that a close or a cancel
            interrupted is taken back).
        died: How many of those the process stopped during. An attempt counts here
            from its ``"running"`` checkpoint on, until it ends otherwise (returns,
            raises, is interrupted): one found running on open is already counted.
        error_type: Of a ``"running"`` step, its last failed attempt's, if any.
    """

    workflow_id: str
    position: int
    name: str
    status: str
    attempts: int
    started_at: float
    finished_at: float | None = None
    output: bytes | None = None
    error_type: str = ""
    error_message: str = ""
    died: int = 0


class Lease(msgspec.Struct, frozen=True, gc=False):
    """The partitions of one subscription that one process holds on a log shared by
    several processes, with the fencing epoch of each.

    A write batch that carries a subscription's lease is applied only if the process
    still holds every one of those partitions at those epochs (see
    :class:`LeaseLost`); its acknowledgement then moves the cursors of exactly
    those partitions.

    Attributes:
        subscription: The subscription.
        member: The process holding it (the log's :attr:`SharedLog.member`).
        partitions: The partitions held, ascending.
        epochs: The epoch of each, in the same order: bumped every time a partition
            changes hands, so a lease that was lost never matches again.
    """

    subscription: str
    member: str
    partitions: tuple[int, ...]
    epochs: tuple[int, ...]


class Claim(msgspec.Struct, frozen=True, gc=False):
    """A lease just granted or renewed, and where each of its partitions stands.

    Attributes:
        lease: The partitions held.
        starts: Each partition's cursor when granted (same order): every event of the
            partition at or below it is finished.
        taken_over: Partitions taken from a holder whose lease expired (it died, or
            stopped answering); the deaths its calls in flight caused are charged.
    """

    lease: Lease
    starts: tuple[int, ...]
    taken_over: tuple[int, ...] = ()

    @property
    def start(self) -> int:
        """The lowest cursor of the claim: where reading begins."""
        return min(self.starts, default=0)


class Share(msgspec.Struct, frozen=True, gc=False):
    """What one heartbeat of a process on a shared log learned about a subscription.

    Attributes:
        held: The partitions of the lease sent that are still held (renewed).
        target: How many partitions this process should hold: a fair share of the
            subscription's partitions among the live processes subscribed to it.
        free: Partitions nobody holds (released, or their holder's lease expired).
        members: Live processes subscribed.
        head: The log's head.
    """

    held: tuple[int, ...]
    target: int
    free: int
    members: int
    head: int


class WriteBatch(msgspec.Struct, gc=False):
    """Everything one transaction writes: applied all together or not at all.

    ``acks`` maps a subscription name to its new cursor; cursors only move forward.
    ``subscriptions`` registers subscriptions (an existing one keeps its cursor).
    ``retries`` are written (replacing the same subscription and seq), then
    ``settled`` ones removed from the retry lane. ``done`` adds ranges
    ``(subscription, lo, hi)`` to the acknowledgement ledger: events handled ahead
    of the cursor (which only passes a prefix that is all finished).
    ``workflow_starts`` are written only if no run with that id exists;
    ``workflows`` and ``steps`` replace what is stored under the same id (and
    position). ``leases`` fence the writes of subscriptions on a shared log: the
    whole batch is refused with :class:`LeaseLost` if one of them was lost (logs that
    one process owns ignore them). ``runs`` fence the writes of workflow runs the
    same way: workflow id to the process (:attr:`SharedLog.member`) and the epoch it
    claimed the run at (:meth:`SharedLog.claim_runs`); the batch is refused with
    :class:`RunClaimLost` unless that process still holds each at that epoch.
    """

    appends: list[NewRecord] = msgspec.field(default_factory=list)
    acks: dict[str, int] = msgspec.field(default_factory=dict)
    subscriptions: list[SubscriptionInfo] = msgspec.field(default_factory=list)
    dead: list[DeadRecord] = msgspec.field(default_factory=list)
    retries: list[RetryRecord] = msgspec.field(default_factory=list)
    settled: list[tuple[str, int]] = msgspec.field(default_factory=list)
    done: list[tuple[str, int, int]] = msgspec.field(default_factory=list)
    state: list[tuple[str, str, bytes | None]] = msgspec.field(default_factory=list)
    effects: list[tuple[str, bytes]] = msgspec.field(default_factory=list)
    workflow_starts: list[WorkflowRecord] = msgspec.field(default_factory=list)
    workflows: list[WorkflowRecord] = msgspec.field(default_factory=list)
    steps: list[StepRecord] = msgspec.field(default_factory=list)
    leases: dict[str, Lease] = msgspec.field(default_factory=dict)
    runs: dict[str, tuple[str, int]] = msgspec.field(default_factory=dict)

    def is_empty(self) -> bool:
        return not (
            self.appends
            or self.acks
            or self.subscriptions
            or self.dead
            or self.retries
            or self.settled
            or self.done
            or self.state
            or self.effects
            or self.workflow_starts
            or self.workflows
            or self.steps
        )

    def merge(self, other: WriteBatch) -> None:
        """Fold ``other`` into this batch (later acks win only if they are further)."""
        self.appends.extend(other.appends)
        for name, cursor in other.acks.items():
            if cursor > self.acks.get(name, -1):
                self.acks[name] = cursor
        self.subscriptions.extend(other.subscriptions)
        self.dead.extend(other.dead)
        self.retries.extend(other.retries)
        self.settled.extend(other.settled)
        self.done.extend(other.done)
        self.state.extend(other.state)
        self.effects.extend(other.effects)
        self.workflow_starts.extend(other.workflow_starts)
        self.workflows.extend(other.workflows)
        self.steps.extend(other.steps)
        if other.leases:
            self.leases.update(other.leases)
        if other.runs:
            self.runs.update(other.runs)


class LogStats(msgspec.Struct, frozen=True):
    """A snapshot of the log, readable from the file alone."""

    head: int
    events: int
    oldest_seq: int | None
    subscriptions: tuple[SubscriptionInfo, ...]
    lag: dict[str, int]
    dead_letters: dict[str, int]
    size_bytes: int
    wal_bytes: int
    retries: dict[str, int] = msgspec.field(default_factory=dict)


class Unaccounted(msgspec.Struct, frozen=True):
    """Events a subscription's cursor has passed that are neither acknowledged as
    done, nor in its retry lane, nor dead-lettered: lost to it.

    ``count`` is the total; ``seqs`` the first of them, in log order.
    """

    subscription: str
    count: int
    seqs: tuple[int, ...]


class Notice(NamedTuple):
    """What another process announced on the log.

    Attributes:
        kind: ``"head"`` (events appended: ``head`` is the new head), ``"share"`` (the
            partitions of ``subscription`` changed hands, or it gained a member) or
            ``"retries"`` (its retry lane was written outside its holders' handling).
        subscription: The subscription concerned (empty for ``"head"``).
        head: The new head, for ``"head"``.
    """

    kind: str
    subscription: str = ""
    head: int = 0


def batch_rows(batch: WriteBatch) -> int:
    """About how many rows ``batch`` writes: what a transaction costs, roughly."""
    return (
        len(batch.appends)
        + len(batch.acks)
        + len(batch.subscriptions)
        + len(batch.dead)
        + len(batch.retries)
        + len(batch.settled)
        + len(batch.done)
        + len(batch.state)
        + len(batch.effects)
        + len(batch.workflow_starts)
        + len(batch.workflows)
        + len(batch.steps)
    )


def batch_bytes(batch: WriteBatch) -> int:
    """About how many bytes of values ``batch`` writes: its events' payloads and
    headers, and :func:`side_bytes`."""
    n = side_bytes(batch)
    for r in batch.appends:
        n += len(r.payload) if r.headers is None else len(r.payload) + len(r.headers)
    return n


def side_bytes(batch: WriteBatch) -> int:
    """About how many bytes of values ``batch`` writes beside its events: state
    values, effect results, the copies of events entering the retry lane or the dead
    letters (with their tracebacks), workflow inputs and outputs. Rows of a few
    numbers (acknowledgements, ledger ranges) count as nothing here."""
    n = 0
    if batch.state:
        n += sum(len(value) for _, _, value in batch.state if value is not None)
    if batch.effects:
        n += sum(len(result) for _, result in batch.effects)
    if batch.retries:
        n += sum(len(r.record.payload) + len(r.traceback) for r in batch.retries)
    if batch.dead:
        n += sum(len(d.record.payload) + len(d.traceback) for d in batch.dead)
    if batch.workflow_starts:
        n += sum(_run_bytes(w) for w in batch.workflow_starts)
    if batch.workflows:
        n += sum(_run_bytes(w) for w in batch.workflows)
    if batch.steps:
        n += sum(len(st.output or b"") for st in batch.steps)
    return n


def _run_bytes(run: WorkflowRecord) -> int:
    return len(run.input) + len(run.output or b"") + len(run.traceback)


def overrides(storage: object, cls: type, name: str) -> bool:
    """Whether ``storage``'s method ``name`` is not ``cls``'s own: overridden by a
    subclass or replaced on the instance (as tests that inject faults do)."""
    return getattr(type(storage), name, None) is not getattr(cls, name, None) or (
        name in getattr(storage, "__dict__", ())
    )


def plain_commit(storage: object, cls: type) -> bool:
    """Whether ``storage.commit`` is ``cls.commit`` itself. Only then may a commit
    skip it (``commit_now``): a ``commit`` put in the way must see every commit."""
    return not overrides(storage, cls, "commit")
