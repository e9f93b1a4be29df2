"""Reconciliation: account for every event in the log, and repair what is not.

Each subscription's position in the log says which events it has passed; the log's
acknowledgement ledger, retry lane and dead letters say where each of them went. A
pass checks, per subscription, that every event its cursor passed is done, waiting
for a retry, or dead-lettered (anything else is *lost*), and looks at the work in
flight: retries due long ago that nothing will run (*overdue*), and handler calls
running longer than ``BusConfig.reconcile_lease`` (*stuck*). With ``repair``, lost
events are re-dispatched through the subscription's retry lane (so they end done or
dead-lettered like any other), overdue retries are re-armed, stuck calls are
cancelled (a failed attempt: :class:`~eventbus.HandlerStuck`), and unfinished
workflow runs nobody runs are resumed.

User reconcilers (``@bus.reconciler(every=...)``) compare the bus's view with an
outside system, publish corrective events and flag what they cannot correct; their
latest results ride in the report.

The bus runs a pass shortly after it opens (once the subscriptions made by then have
recovered), then every ``reconcile_interval`` seconds; ``eventbus reconcile FILE``
runs one from the file alone.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

import anyio
import anyio.lowlevel

import eventbus.storage as _storage
from eventbus.storage import Record, RetryRecord, SubscriptionInfo, Unaccounted, WriteBatch

from .._clock import Clock
from .._config import BusConfig
from .._errors import BusClosed, translate_storage_error
from .._logging import get_logger
from .._metrics import ReconcileMetrics
from ..dispatch import SubscriptionRuntime as Subscription
from ..workflows import WorkflowEngine, unfinished_runs
from ._report import SHOWN, ReconcileReport, ReconcilerResult, Repairs, SubscriptionReport

logger = get_logger("reconcile")

# Lost events re-dispatched per transaction.
_CHUNK = 1000
# Flags kept per reconciler run (all are counted).
_MAX_FLAGS = 100

LOST = "eventbus.Lost"
_LOST_MESSAGE = (
    "the subscription's cursor passed this event without an acknowledgement, a retry "
    "or a dead letter; reconciliation re-dispatched it"
)

ReconcilerFunction = Callable[[Any], Awaitable[None]]
R = TypeVar("R", bound=ReconcilerFunction)


# -- reading the log ----------------------------------------------------------------


class _Findings:
    """What the log says about one subscription."""

    __slots__ = ("info", "lost", "retries")

    def __init__(self, info: SubscriptionInfo, lost: Unaccounted, retries: list[RetryRecord]):
        self.info = info
        self.lost = lost
        self.retries = retries


async def _examine(log: _storage.Storage, info: SubscriptionInfo, head: int) -> _Findings:
    lost = await log.unaccounted(info.name, head, _CHUNK)
    return _Findings(info, lost, await log.retries(info.name))


def _overdue(retries: list[RetryRecord], before: float) -> list[RetryRecord]:
    """Retries due before ``before`` (unix time) and not marked running."""
    return [r for r in retries if not r.running and r.due_at is not None and r.due_at < before]


async def _late_workflows(log: _storage.Storage, now: float) -> list[str]:
    return [
        run.id
        async for run in unfinished_runs(log)
        if run.deadline is not None and run.deadline < now
    ]


async def check_log(log: _storage.Storage, *, lease: float) -> ReconcileReport:
    """One pass from the log alone (what ``eventbus reconcile FILE`` prints): nothing
    is repaired, nothing is known to be in flight.

    Args:
        log: An open storage (a read-only one is enough).
        lease: Seconds past due after which a retry counts as overdue.

    Raises:
        StorageError: The log could not be read.
    """
    started, now = time.monotonic(), time.time()
    stats = await log.stats()
    subs: list[SubscriptionReport] = []
    for info in stats.subscriptions:
        found = await _examine(log, info, stats.head)
        overdue = _overdue(found.retries, now - lease)
        subs.append(_report(found, stats.head, stats, False, overdue))
    late = await _late_workflows(log, now)
    return ReconcileReport(
        at=now,
        duration=time.monotonic() - started,
        head=stats.head,
        repair=False,
        offline=True,
        subscriptions=tuple(sorted(subs, key=lambda s: s.name)),
        workflows_overdue=len(late),
        overdue_workflow_ids=tuple(late[:SHOWN]),
    )


def _report(
    found: _Findings,
    head: int,
    stats: _storage.LogStats,
    registered: bool,
    overdue: list[RetryRecord],
    stuck: Sequence[int] = (),
    repaired: Repairs | None = None,
) -> SubscriptionReport:
    info = found.info
    return SubscriptionReport(
        name=info.name,
        topics=info.topics,
        registered=registered,
        head=head,
        cursor=info.cursor,
        pending=stats.lag.get(info.name, 0),
        retrying=len(found.retries),
        overdue=len(overdue),
        dead=stats.dead_letters.get(info.name, 0),
        lost=found.lost.count,
        lost_seqs=found.lost.seqs[:SHOWN],
        overdue_seqs=tuple(r.record.seq for r in overdue[:SHOWN]),
        stuck=len(stuck),
        stuck_seqs=tuple(stuck[:SHOWN]),
        repaired=repaired or Repairs(),
    )


async def _read_seqs(log: _storage.Storage, seqs: Sequence[int]) -> list[Record]:
    """The events with these seqs (ascending) that are still in the log."""
    out: list[Record] = []
    i = 0
    while i < len(seqs):
        j = i
        # One read per run of close seqs, so a scattered few do not read everything.
        while j + 1 < len(seqs) and seqs[j + 1] - seqs[j] <= 64:
            j += 1
        lo, hi = seqs[i], seqs[j]
        wanted = set(seqs[i : j + 1])
        out.extend(r for r in await log.read(lo - 1, hi, None, hi - lo + 1) if r.seq in wanted)
        i = j + 1
    return out


# -- user reconcilers ---------------------------------------------------------------


class UserRun(Protocol):
    """What a user reconciler's run reports (``eventbus.Reconciliation``)."""

    corrections: int
    flagged: int

    @property
    def flags(self) -> tuple[str, ...]: ...


class Subscriptions(Protocol):
    """The running subscriptions, by name (the bus's registry)."""

    def get(self, name: str, /) -> Subscription | None: ...

    def values(self) -> Iterable[Subscription]: ...


class _UserReconciler:
    __slots__ = ("every", "fn", "last", "lock", "name")

    def __init__(self, fn: ReconcilerFunction, name: str, every: float) -> None:
        self.fn = fn
        self.name = name
        self.every = every
        self.lock = anyio.Lock()
        self.last = ReconcilerResult(name, every)


# -- the bus's side -----------------------------------------------------------------


class Reconciler:
    """Runs the reconciliation of one bus: the periodic pass, ``bus.reconcile()``,
    and the user reconcilers' loops (all in one task of the bus's task group, which
    the bus stops at close)."""

    def __init__(
        self,
        *,
        log: _storage.Storage,
        config: BusConfig,
        clock: Clock,
        commit: Callable[[WriteBatch], Awaitable[object]],
        subscriptions: Subscriptions,
        workflows: WorkflowEngine,
        is_closing: Callable[[], bool],
        wait_for_progress: Callable[[], Awaitable[None]],
        new_run: Callable[[str], UserRun],
    ) -> None:
        self._log = log
        self._config = config
        self._clock = clock
        self._commit = commit
        self._subs = subscriptions
        self._workflows = workflows
        self._is_closing = is_closing
        self._wait_for_progress = wait_for_progress
        self._new_run = new_run
        self._scope = anyio.CancelScope()
        self._lock = anyio.Lock()  # one pass at a time: a repair is not done twice
        self._tg: anyio.abc.TaskGroup | None = None
        self._users: dict[str, _UserReconciler] = {}
        self.last: ReconcileReport | None = None
        self.runs = 0
        self.repaired_total = 0

    # -- lifecycle ------------------------------------------------------------------

    async def run(self) -> None:
        """The periodic pass and the user reconcilers' loops, until :meth:`stop`."""
        with self._scope:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for user in self._users.values():
                    tg.start_soon(self._user_loop, user, name=f"eventbus reconciler {user.name}")
                await self._periodic()
                await anyio.sleep_forever()

    def stop(self) -> None:
        """Cancel the periodic pass and the user reconcilers' loops."""
        self._scope.cancel()

    async def _periodic(self) -> None:
        config = self._config
        if config.reconcile_interval <= 0:
            return
        # The first pass: once the subscriptions made right after open (before the
        # body's first await, which is what let this task start) have recovered, so
        # that they are repaired rather than only reported.
        with anyio.move_on_after(config.reconcile_lease):
            while not all(s.started for s in self._subs.values()):
                await self._wait_for_progress()
        while True:
            try:
                await self.reconcile(repair=True, users=False)
            except Exception as exc:  # noqa: BLE001 - a failed pass must not stop the bus
                logger.warning("reconciliation failed, will retry: %s", exc)
            await anyio.sleep(config.reconcile_interval)

    # -- user reconcilers -----------------------------------------------------------

    def register(self, fn: ReconcilerFunction, every: float, name: str | None) -> None:
        if not (every > 0 and every != float("inf")):
            raise ValueError(f"every must be a finite number of seconds > 0, got {every!r}")
        name = name or f"{fn.__module__}.{fn.__qualname__}"
        if name in self._users:
            raise ValueError(
                f"a reconciler named {name!r} already exists on this bus; give each a "
                "distinct name="
            )
        user = self._users[name] = _UserReconciler(fn, name, float(every))
        if self._tg is not None:
            self._tg.start_soon(self._user_loop, user, name=f"eventbus reconciler {name}")

    async def _user_loop(self, user: _UserReconciler) -> None:
        while True:
            await anyio.sleep(user.every)
            await self._run_user(user)

    async def _run_user(self, user: _UserReconciler) -> None:
        """One run; its exceptions are logged and recorded, never raised."""
        lease = self._config.reconcile_lease
        clock = self._clock
        async with user.lock:
            rc = self._new_run(user.name)
            at, started = clock.wall(), clock.now()
            error: str | None = None
            try:
                with anyio.move_on_after(lease) as timer:
                    await user.fn(rc)
                if timer.cancelled_caught:
                    error = f"TimeoutError: ran longer than the reconcile lease ({lease:g}s)"
                    logger.error("reconciler %s cancelled: %s", user.name, error)
            except Exception as exc:  # recorded in the report; the bus goes on
                error = f"{type(exc).__name__}: {exc}"
                logger.error("reconciler %s failed: %s", user.name, error, exc_info=exc)
            if rc.flagged:
                logger.warning(
                    "reconciler %s flagged %d inconsistencies: %s",
                    user.name,
                    rc.flagged,
                    "; ".join(rc.flags[:5]),
                )
            last = user.last
            user.last = ReconcilerResult(
                name=user.name,
                every=user.every,
                runs=last.runs + 1,
                last_run_at=at,
                duration=clock.now() - started,
                corrections=rc.corrections,
                flags=rc.flags,
                flagged=rc.flagged,
                error=error,
                total_corrections=last.total_corrections + rc.corrections,
            )

    # -- a pass ---------------------------------------------------------------------

    async def reconcile(self, *, repair: bool = True, users: bool = True) -> ReconcileReport:
        """One pass over every subscription in the log (and, with ``users``, one run
        of each user reconciler first).

        Raises:
            StorageError: The log could not be read (or a repair not written).

        Cancellation: as for :meth:`Bus.reconcile`.
        """
        if users and self._users:
            async with anyio.create_task_group() as tg:
                for user in self._users.values():
                    tg.start_soon(self._run_user, user)
        async with self._lock:
            try:
                report = await self._pass(repair)
            except _storage.StorageError as exc:
                raise translate_storage_error(exc) from exc
        self.last = report
        self.runs += 1
        self.repaired_total += report.repaired.total
        return report

    async def _pass(self, repair: bool) -> ReconcileReport:
        log = self._log
        clock = self._clock
        started, now = clock.now(), clock.wall()
        lease = self._config.reconcile_lease
        stats = await log.stats()
        head = stats.head
        reports: list[SubscriptionReport] = []
        for info in stats.subscriptions:
            # An in-memory log answers without suspending: let the bus breathe.
            await anyio.lowlevel.checkpoint()
            sub = self._subs.get(info.name)
            # What the lane held before the log is read: a retry that settles while
            # the read runs is in neither afterwards, and must not look forgotten.
            held_before = sub.retry_seqs() if sub is not None else set()
            found = await _examine(log, info, head)
            sub = self._subs.get(info.name)
            if sub is None or not sub.started:
                # Known to the log only (or still recovering): reported, not repaired.
                overdue = _overdue(found.retries, now - lease)
                reports.append(_report(found, head, stats, sub is not None, overdue))
                continue
            reports.append(await self._live(sub, found, head, stats, now, repair, held_before))
        resumed: list[str] = []
        if repair and not self._is_closing():
            resumed, late = await self._workflows.reconcile()
        else:
            late = await _late_workflows(log, now)
        if late:
            logger.warning(
                "reconciliation: %d workflow runs are past their deadline (%s)",
                len(late),
                ", ".join(late[:SHOWN]),
            )
        return ReconcileReport(
            at=now,
            duration=clock.now() - started,
            head=head,
            repair=repair,
            offline=False,
            subscriptions=tuple(sorted(reports, key=lambda s: s.name)),
            reconcilers=tuple(u.last for u in self._users.values()),
            workflows_overdue=len(late),
            overdue_workflow_ids=tuple(late[:SHOWN]),
            workflows_resumed=tuple(resumed),
        )

    async def _live(
        self,
        sub: Subscription,
        found: _Findings,
        head: int,
        stats: _storage.LogStats,
        now: float,
        repair: bool,
        held_before: set[int],
    ) -> SubscriptionReport:
        """A subscription running on this bus: what it holds in memory counts too."""
        lease = self._config.reconcile_lease
        repair = repair and not self._is_closing()
        fixed_lost = fixed_stuck = fixed_overdue = 0
        # Stuck calls first, with no await between finding and cancelling them: a
        # worker moves its call record on to the next event once one finishes.
        calls = sub.running_calls(lease)
        stuck = sorted(seq for call in calls for seq in call.seqs)
        if calls:
            logger.warning(
                "reconciliation: subscription %s has handler calls running longer than %gs "
                "(events %s)%s",
                sub.name,
                lease,
                ", ".join(map(str, stuck[:SHOWN])),
                "; cancelling them (a failed attempt each)" if repair else "",
            )
            if repair:
                for call in calls:
                    if sub.cancel_stuck(call, lease):
                        fixed_stuck += len(call.seqs)
        # A retry the lane holds is its business (it may wait for its key, the
        # breaker or the budget); one due long ago that the lane held neither before
        # nor after the log was read, and that no attempt runs, would never run.
        overdue = [
            r
            for r in _overdue(found.retries, now - lease)
            if r.record.seq not in held_before and not sub.holds(r.record.seq)
        ]
        if found.lost.count:
            logger.error(
                "reconciliation: subscription %s lost %d events (seq %s%s)%s",
                sub.name,
                found.lost.count,
                ", ".join(map(str, found.lost.seqs[:SHOWN])),
                ", ..." if found.lost.count > SHOWN else "",
                "; re-dispatching them through its retry lane" if repair else "",
            )
            if repair:
                fixed_lost = await self._redispatch(sub, found.lost, head)
        if overdue:
            logger.warning(
                "reconciliation: subscription %s has %d retries due more than %gs ago that "
                "its retry lane does not hold%s",
                sub.name,
                len(overdue),
                lease,
                "; re-arming them" if repair else "",
            )
            if repair:
                sub.add_retries(overdue)
                fixed_overdue = len(overdue)
        return _report(
            found,
            head,
            stats,
            True,
            overdue,
            stuck,
            Repairs(lost=fixed_lost, stuck=fixed_stuck, overdue=fixed_overdue),
        )

    async def _redispatch(self, sub: Subscription, lost: Unaccounted, head: int) -> int:
        """Put lost events in the subscription's retry lane (attempt 1, due now): the
        log first, then the lane. Returns how many."""
        log = self._log
        done = 0
        while lost.seqs:
            now = self._clock.wall()
            retries = [
                RetryRecord(sub.name, record, 1, now, None, LOST, _LOST_MESSAGE)
                for record in await _read_seqs(log, lost.seqs)
            ]
            if retries:
                try:
                    await self._commit(WriteBatch(retries=retries))
                except BusClosed:
                    return done
                sub.add_retries(retries)
                done += len(retries)
            if lost.count <= len(lost.seqs) or len(retries) < len(lost.seqs):
                return done  # all of them, or some went (compacted) meanwhile
            lost = await log.unaccounted(sub.name, head, _CHUNK)
        return done

    # -- looking --------------------------------------------------------------------

    def metrics(self) -> ReconcileMetrics:
        """The last pass and the user reconcilers' latest runs (no I/O)."""
        last = self.last
        users = [u.last for u in self._users.values()]
        return ReconcileMetrics(
            runs=self.runs,
            last_run_at=last.at if last else None,
            last_duration=last.duration if last else 0.0,
            lost=last.lost if last else 0,
            stuck=last.stuck if last else 0,
            overdue=last.overdue if last else 0,
            repaired=last.repaired.total if last else 0,
            repaired_total=self.repaired_total,
            flags=sum(u.flagged for u in users),
            reconciler_errors=sum(1 for u in users if u.error),
            dead_letters={s.name: s.dead for s in last.subscriptions} if last else {},
        )

    def reconciler(self, every: float, name: str | None) -> Callable[[R], R]:
        def decorator(fn: R) -> R:
            self.register(fn, every, name)
            return fn

        return decorator
