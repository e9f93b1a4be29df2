"""The workflow engine of one bus: starts, resumes, cancels and finishes runs, and
the handles users hold. What a run does step by step is in :mod:`._workflow`.

On a log shared by processes every process may start or resume any run, but one at a
time executes it: a process claims a run in the log before it executes it
(:meth:`SharedLog.claim_runs`), renews its claims every third of the log's lease
time while they run, and every write of the run carries the claim's epoch, so that
a process that lost a claim (paused past it, cut off) can write nothing more of that
run. A run whose process died is claimed by another once its claim expired: each
process looks for such runs every lease time.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.abc
import msgspec

import eventbus.storage as _storage
from eventbus.storage import (
    WORKFLOW_PREFIX,
    DeadRecord,
    Record,
    StepRecord,
    WorkflowRecord,
    WriteBatch,
)

from .._config import RetryPolicy
from .._errors import BusClosed, translate_storage_error
from .._event import new_event_id
from .._logging import get_logger
from .._metrics import WorkflowMetrics
from .._payloads import payload_type
from ..failures import error_type_name, format_error
from ._workflow import (
    StepFailed,
    StepInfo,
    Workflow,
    WorkflowCancelled,
    WorkflowError,
    WorkflowFailed,
    WorkflowFunction,
    WorkflowStatus,
    _Checkpoints,
    _deadline,
    _encode,
    _hints,
    _return_type,
    step_status,
)

logger = get_logger("workflows")


async def unfinished_runs(
    log: _storage.Storage, name: str | None = None
) -> AsyncIterator[WorkflowRecord]:
    """Every run (of workflow ``name``) still running in the log, a page at a time."""
    after = 0
    while True:
        runs = await log.workflows(name=name, status="running", after=after, limit=500)
        for run in runs:
            yield run
        if len(runs) < 500:
            return
        after = runs[-1].num


class _Waiters:
    __slots__ = ("count", "event", "record")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.count = 0
        self.record: WorkflowRecord | None = None  # the run as it finished here


class _Definition(msgspec.Struct, frozen=True):
    fn: WorkflowFunction
    input_type: object
    result_type: object
    timeout: float | None


# How often a process waiting for a run that another process of a shared log
# executes reads the run's status (nothing announces a run's end across processes).
_SHARED_WAIT_POLL = 0.1


class WorkflowEngine:
    """Runs the workflows of one bus: starts, resumes, cancels and finishes runs.

    Every run is a task in the bus's task group, at most ``concurrency`` at a time.
    """

    def __init__(
        self,
        log: _storage.Storage,
        commit: Callable[[WriteBatch], Awaitable[object]],
        step_retry: RetryPolicy,
        concurrency: int,
    ) -> None:
        self._log = log
        self._commit = commit
        self.step_retry = step_retry
        self._defs: dict[str, _Definition] = {}
        # A run executing (or queued to) in this process, with the scope that stops it.
        self._live: dict[str, anyio.CancelScope] = {}
        self._cancelling: set[str] = set()
        self._again: set[str] = set()
        # Runs that ended here while a listing of unfinished runs was being read: the
        # listing may have read them as running just before (see _unfinished_elsewhere).
        self._listings = 0
        self._ended: set[str] = set()
        self._fresh: dict[str, WorkflowRecord] = {}
        self._finished: dict[str, _Waiters] = {}
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._tg: anyio.abc.TaskGroup | None = None
        self._stopping = False
        self._idle = anyio.Event()
        self._idle.set()
        self.counts: Counter[str] = Counter()
        # On a log shared by processes: the runs this process claimed, with their epochs.
        self._shared = log if isinstance(log, _storage.SharedLog) else None
        self._claims: dict[str, int] = {}
        self._claims_scope = anyio.CancelScope()
        # Set by the bus while hooks of these kinds are registered (else None).
        self.around_run: (
            Callable[[Workflow], contextlib.AbstractAsyncContextManager[object]] | None
        ) = None
        self.around_step: (
            Callable[[StepInfo], contextlib.AbstractAsyncContextManager[object]] | None
        ) = None

    async def commit(self, batch: WriteBatch) -> None:
        shared = self._shared
        if shared is not None and self._claims:
            # Fenced: refused if another process took the run over meanwhile.
            ids = {w.id for w in batch.workflows} | {s.workflow_id for s in batch.steps}
            for workflow_id in ids:
                epoch = self._claims.get(workflow_id)
                if epoch is not None:
                    batch.runs[workflow_id] = (shared.member, epoch)
        await self._commit(batch)

    def attach(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg
        if self._shared is not None:
            tg.start_soon(self._keep_claims, self._shared, name="eventbus workflow claims")

    async def _keep_claims(self, log: _storage.SharedLog) -> None:
        """Renew this process's claims every third of the lease time (a run whose
        claim was lost is cancelled here: another process runs it), and every lease
        time claim the unfinished runs of registered workflows that no live process
        holds (their process died) and run them."""
        interval = log.lease_time / 3
        beats = 0
        with self._claims_scope:
            while True:
                await anyio.sleep(interval)
                beats += 1
                try:
                    await self._renew(log)
                    if beats % 3 == 0:
                        await self._adopt(log)
                except (BusClosed, _storage.StorageError) as exc:
                    logger.warning("could not renew or take workflow run claims: %s", exc)

    async def _renew(self, log: _storage.SharedLog) -> None:
        ids = list(self._claims)
        if not ids:
            return
        held = await log.claim_runs(ids, log.lease_time)
        for workflow_id in ids:
            if workflow_id not in self._claims:
                continue  # finished meanwhile (and released)
            if workflow_id in held:
                self._claims[workflow_id] = held[workflow_id]
                continue
            del self._claims[workflow_id]
            scope = self._live.get(workflow_id)
            logger.warning(
                "workflow run %s: this process could not renew its claim (the run was "
                "cancelled or finished in another process, or the claim ran out before "
                "it was renewed and another process runs it now); it stops the run here, "
                "and can write nothing more of it once another process claims it",
                workflow_id,
            )
            if scope is not None:
                scope.cancel()
        stale = [w for w in held if w not in self._claims]
        if stale:
            await log.release_runs(stale)  # runs that finished while being renewed

    async def _adopt(self, log: _storage.SharedLog) -> None:
        if not self._defs or self._stopping:
            return
        orphans = [
            run.id
            async for run in self._unfinished_elsewhere()
            if run.name in self._defs and run.id not in self._live
        ]
        if not orphans:
            return
        for workflow_id, epoch in (await log.claim_runs(orphans, log.lease_time)).items():
            self._claims[workflow_id] = epoch
            if not self.launch(workflow_id):
                await self._release(workflow_id)

    async def _claim(self, workflow_id: str) -> bool:
        """On a shared log, whether this process holds the run now (claiming it if
        it does not yet); always true on a log this process alone runs."""
        log = self._shared
        if log is None or workflow_id in self._claims:
            return True
        held = await log.claim_runs([workflow_id], log.lease_time)
        if workflow_id not in held:
            return False  # a live process runs it
        self._claims[workflow_id] = held[workflow_id]
        return True

    async def _release(self, workflow_id: str) -> None:
        log = self._shared
        if log is None or self._claims.pop(workflow_id, None) is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            try:
                await log.release_runs([workflow_id])
            except _storage.StorageError as exc:
                # It expires by itself after the lease time.
                logger.info("workflow run %s: releasing its claim failed: %s", workflow_id, exc)

    def register(self, name: str, fn: WorkflowFunction, timeout: float | None) -> None:
        if not isinstance(name, str) or not name:
            raise WorkflowError(f"a workflow needs a non-empty name, got {name!r}")
        if name in self._defs:
            raise WorkflowError(
                f"a workflow named {name!r} is already registered on this bus; "
                "give each workflow a distinct name"
            )
        if not callable(fn):
            raise TypeError(f"@bus.workflow decorates an async function, got {fn!r}")
        params = list(inspect.signature(fn).parameters.values())
        if len(params) != 2:
            raise WorkflowError(
                f"workflow {name!r}: the function must take (wf, input), "
                f"it takes {len(params)} parameter(s)"
            )
        hints = _hints(fn)
        self._defs[name] = _Definition(
            fn, hints.get(params[1].name, Any), _return_type(fn), timeout
        )
        if self._tg is not None and not self._stopping:
            self._tg.start_soon(self._resume_all, name)

    async def _resume_all(self, name: str | None) -> None:
        """Resume every unfinished run (of ``name``) this process does not run."""
        try:
            async for run in self._unfinished_elsewhere(name):
                if run.name in self._defs:
                    self.launch(run.id)
        except (BusClosed, _storage.StorageError) as exc:
            # Reconciliation looks for unfinished runs again on its next pass.
            logger.warning("could not look for unfinished %s workflow runs: %s", name, exc)

    async def _unfinished_elsewhere(self, name: str | None = None) -> AsyncIterator[WorkflowRecord]:
        """The unfinished runs (of ``name``) in the log, but those that ended in this
        process while they were read: launched again, such a run would only read its
        record and stop, but would show as queued meanwhile."""
        self._listings += 1
        try:
            async for run in unfinished_runs(self._log, name):
                if run.id not in self._ended:
                    yield run
        finally:
            self._listings -= 1
            if not self._listings:
                self._ended.clear()

    def launch(
        self, workflow_id: str, *, again: bool = False, record: WorkflowRecord | None = None
    ) -> bool:
        """Run ``workflow_id`` in this process unless it already runs here. With
        ``again``, a run that is just finishing here is looked at once more after
        (it was redriven). ``record``: the run as just read, saving a read."""
        if self._tg is None or self._stopping:
            return False
        if workflow_id in self._live:
            if again:
                self._again.add(workflow_id)
            return False
        if record is not None:
            self._fresh[workflow_id] = record
        self._live[workflow_id] = anyio.CancelScope()
        self._idle = anyio.Event()
        self._tg.start_soon(self._run, workflow_id, name=f"eventbus workflow {workflow_id}")
        return True

    def definition(self, name: str) -> _Definition:
        found = self._defs.get(name)
        if found is None:
            raise WorkflowError(
                f"no workflow named {name!r} is registered on this bus; decorate its "
                f"function with @bus.workflow({name!r}) first"
            )
        return found

    async def start(
        self, name: str, input: object, workflow_id: str | None, timeout: float | None
    ) -> WorkflowRecord:
        d = self.definition(name)
        workflow_id = workflow_id or new_event_id()
        if not isinstance(workflow_id, str):
            raise TypeError(f"workflow_id must be a string, got {workflow_id!r}")
        now = time.time()
        timeout = timeout if timeout is not None else d.timeout
        record = WorkflowRecord(
            workflow_id,
            name,
            "running",
            _encode(f"the input of workflow {name!r}", input),
            now,
            now,
            deadline=None if timeout is None else now + timeout,
        )
        await self.commit(WriteBatch(workflow_starts=[record]))
        stored = await self._log.workflow(workflow_id)
        assert stored is not None
        if stored.name != name:
            raise WorkflowError(
                f"workflow id {workflow_id!r} is already used by a run of {stored.name!r}; "
                "ids must be unique across workflows"
            )
        if stored.status == "running":
            self.launch(workflow_id, record=stored)
        return stored

    async def _run(self, workflow_id: str) -> None:
        # The scope exists from launch on, so cancel() and stop() reach a run that
        # still waits for a slot or reads its record.
        scope = self._live[workflow_id]
        final: WorkflowRecord | None = None
        try:
            with scope:
                async with self._limiter:
                    record = self._fresh.pop(workflow_id, None)
                    if not await self._claim(workflow_id):
                        return
                    if record is None or self._shared is not None:
                        # Shared: as the last holder left it, not as read before the claim.
                        record = await self._log.workflow(workflow_id)
                    if record is None or record.status != "running":
                        return
                    d = self._defs.get(record.name)
                    if d is None:
                        return
                    final = await self._execute(d, record)
        except (BusClosed, _storage.StorageError) as exc:
            # The bus is closing or the log failed: the run stays "running" in the
            # log and resumes on the next open (or reconciliation pass).
            logger.warning("workflow run %s paused: %s", workflow_id, exc)
        finally:
            await self._release(workflow_id)
            del self._live[workflow_id]
            if self._listings:
                self._ended.add(workflow_id)
            self._fresh.pop(workflow_id, None)
            self._cancelling.discard(workflow_id)
            waiters = self._finished.pop(workflow_id, None)
            if waiters is not None:
                waiters.record = final  # what the waiters would read: spare the read
                waiters.event.set()
            if workflow_id in self._again:
                self._again.discard(workflow_id)
                self.launch(workflow_id)
            if not self._live:
                self._idle.set()

    def metrics(self) -> WorkflowMetrics:
        c = self.counts
        return WorkflowMetrics(
            running=c["executing"],
            queued=len(self._live) - c["executing"],
            started=c["started"],
            completed=c["completed"],
            failed=c["failed"],
            cancelled=c["cancelled"],
            steps_run=c["steps_run"],
            steps_replayed=c["steps_replayed"],
            step_retries=c["step_retries"],
            steps_failed=c["steps_failed"],
        )

    async def _execute(self, d: _Definition, record: WorkflowRecord) -> WorkflowRecord | None:
        self.counts["executing"] += 1
        try:
            return await self._execute_run(d, record)
        finally:
            self.counts["executing"] -= 1

    async def _execute_run(self, d: _Definition, record: WorkflowRecord) -> WorkflowRecord | None:
        """Run it; returns the finished record (None if it did not finish)."""
        first = record.runs == 0  # never started: no checkpoints to read
        record = msgspec.structs.replace(record, runs=record.runs + 1, updated_at=time.time())
        await self.commit(WriteBatch(workflows=[record]))
        steps = [] if first else await self._log.steps(record.id)
        self.counts["started"] += 1
        checkpoints = _Checkpoints(record, steps)
        wf = Workflow(self, record, checkpoints)
        try:
            if self.around_run is None:
                value = await d.fn(wf, payload_type(d.input_type).decode(record.input))
            else:
                async with self.around_run(wf):
                    value = await d.fn(wf, payload_type(d.input_type).decode(record.input))
            checkpoints.check_all_reached()
            output = _encode(f"the result of workflow {record.name!r}", value)
        except (BusClosed, _storage.StorageError):
            raise
        except anyio.get_cancelled_exc_class():
            if record.id in self._cancelling:
                with anyio.CancelScope(shield=True):
                    await self._cancelled(record)
            raise
        except Exception as exc:  # noqa: BLE001 - the run fails and is dead-lettered
            return await self._fail(record, exc, wf.handled)
        done = msgspec.structs.replace(
            record, status="completed", output=output, updated_at=time.time()
        )
        await self.commit(WriteBatch(workflows=[done]))
        self.counts["completed"] += 1
        return done

    async def _fail(
        self, record: WorkflowRecord, exc: Exception, handled: set[int]
    ) -> WorkflowRecord:
        while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]  # a task group in the workflow: name the real error
        now = time.time()
        steps = await self._log.steps(record.id)
        fatal: list[StepRecord] = []
        if (
            isinstance(exc, StepFailed)
            and exc.workflow_id == record.id
            and exc.position not in handled
        ):
            # The step whose failure failed the run, with no step called after it:
            # a redrive runs it again. A failure the workflow went on from (say, it
            # compensated, then failed the run) replays as it happened.
            fatal = [
                msgspec.structs.replace(s, status="fatal")
                for s in steps
                if s.position == exc.position and s.status == "failed"
            ]
            steps = [fatal[0] if fatal and s.position == exc.position else s for s in steps]
        history = "".join(
            f"  {s.position:>3} {s.name:<24} {s.status:<8} attempts={s.attempts}"
            + (f"  {s.error_type}: {s.error_message}" if s.error_message else "")
            + "\n"
            for s in steps
        )
        cause = exc.__cause__ if isinstance(exc, StepFailed) and exc.__cause__ else exc
        trace = "Steps:\n" + (history or "  (none)\n") + "\n" + format_error(cause)
        failed = msgspec.structs.replace(
            record,
            status="failed",
            updated_at=now,
            error_type=error_type_name(exc),
            error_message=str(exc),
            traceback=trace,
        )
        topic = WORKFLOW_PREFIX + record.name
        dead = DeadRecord(
            topic,
            Record(record.num, record.id, topic, record.id, record.input, None, record.created_at),
            record.runs,
            error_type_name(exc),
            str(exc),
            trace,
            now,
            now,
        )
        logger.warning(
            "workflow run %s (%s) failed, dead-lettered: %s", record.id, record.name, exc
        )
        await self.commit(WriteBatch(workflows=[failed], dead=[dead], steps=fatal))
        self.counts["failed"] += 1
        return failed

    async def _cancelled(self, record: WorkflowRecord) -> None:
        done = msgspec.structs.replace(record, status="cancelled", updated_at=time.time())
        await self.commit(WriteBatch(workflows=[done]))
        self.counts["cancelled"] += 1

    async def interrupted(self, step: StepRecord) -> None:
        """A step was cancelled (bus closing, run cancelled): its checkpoint goes back
        to ``step``, as before the attempt, which counts neither as failed nor died."""
        with anyio.move_on_after(2.0):
            with contextlib.suppress(BusClosed, _storage.StorageError):
                await self.commit(WriteBatch(steps=[step]))

    async def read(self, workflow_id: str) -> WorkflowRecord:
        try:
            record = await self._log.workflow(workflow_id)
        except _storage.StorageError as exc:
            raise translate_storage_error(exc) from exc
        if record is None:
            raise WorkflowError(
                f"no workflow run with id {workflow_id!r} in this log (never started, or "
                "finished and compacted after idempotency_retention)"
            )
        return record

    async def steps(self, workflow_id: str) -> list[StepRecord]:
        try:
            return await self._log.steps(workflow_id)
        except _storage.StorageError as exc:
            raise translate_storage_error(exc) from exc

    @contextlib.contextmanager
    def _waiting(self, workflow_id: str) -> Iterator[_Waiters]:
        """An event set when the run's task here ends; forgotten with its last waiter."""
        waiters = self._finished.get(workflow_id)
        if waiters is None:
            waiters = self._finished[workflow_id] = _Waiters()
        waiters.count += 1
        try:
            yield waiters
        finally:
            waiters.count -= 1
            if waiters.count == 0 and self._finished.get(workflow_id) is waiters:
                del self._finished[workflow_id]

    async def cancel(self, workflow_id: str) -> bool:
        """Cancel a run; True if it was running."""
        record = await self.read(workflow_id)
        if record.status != "running":
            return False
        with self._waiting(workflow_id) as gone:
            scope = self._live.get(workflow_id)
            if scope is not None:
                self._cancelling.add(workflow_id)
                scope.cancel()
                await gone.event.wait()
        record = await self.read(workflow_id)
        if record.status == "running":
            await self._cancelled(record)
        return True

    async def wait(self, workflow_id: str, timeout: float | None) -> WorkflowRecord:
        """Wait until the run is no longer running (or ``timeout`` passes)."""
        with _deadline(timeout):
            while True:
                with self._waiting(workflow_id) as changed:
                    record = await self.read(workflow_id)
                    if record.status != "running":
                        if workflow_id in self._live:
                            # Finished here, and its task is still letting go of it
                            # (its claim on a shared log): done once that is.
                            await changed.event.wait()
                        return record
                    if self._stopping:
                        raise BusClosed(
                            f"the bus closed before workflow run {workflow_id!r} finished "
                            "(it resumes when a bus opens the log again)"
                        )
                    if self._shared is None:
                        await changed.event.wait()
                    else:
                        # Another process may run it: look at the log now and then.
                        with anyio.move_on_after(_SHARED_WAIT_POLL):
                            await changed.event.wait()
                    if changed.record is not None:
                        return changed.record

    def decode_result(self, record: WorkflowRecord) -> object:
        if record.status == "failed":
            raise WorkflowFailed(record.id, record.error_type, record.error_message)
        if record.status == "cancelled":
            raise WorkflowCancelled(record.id)
        assert record.output is not None
        d = self._defs.get(record.name)
        return payload_type(Any if d is None else d.result_type).decode(record.output)

    async def reconcile(self) -> tuple[list[str], list[str]]:
        """Resume unfinished runs of registered workflows that this process does not
        run (their task died, or they were redriven elsewhere); list the runs past
        their deadline. Returns (resumed, overdue)."""
        resumed: list[str] = []
        overdue: list[str] = []
        now = time.time()
        async for run in self._unfinished_elsewhere():
            if run.deadline is not None and run.deadline < now:
                overdue.append(run.id)
            if run.name in self._defs and self.launch(run.id):
                resumed.append(run.id)
        return resumed, overdue

    def idle(self) -> bool:
        """No run executes (or waits for a slot) in this process."""
        return self._idle.is_set()

    def live(self) -> list[str]:
        """The ids of the runs executing (or waiting for a slot) in this process."""
        return sorted(self._live)

    async def wait_idle(self) -> None:
        """Until no run executes in this process."""
        await self._idle.wait()

    async def stop(self) -> None:
        """Cancel every run (they resume on the next open), wake every waiter, and
        wait for the runs to stop."""
        self._stopping = True
        self._claims_scope.cancel()
        for scope in list(self._live.values()):
            scope.cancel()
        for waiters in self._finished.values():
            waiters.event.set()
        await self._idle.wait()


class WorkflowHandle:
    """A run of a workflow, from :meth:`Bus.start_workflow`.

    Attributes:
        id: The run's id.
        name: The workflow's name.
    """

    def __init__(self, engine: WorkflowEngine, record: WorkflowRecord):
        self.id = record.id
        self.name = record.name
        self._engine = engine

    def __repr__(self) -> str:
        return f"<WorkflowHandle {self.name!r} id={self.id!r}>"

    async def status(self) -> WorkflowStatus:
        """The run's status and its steps, as committed.

        Cancellation: a read; nothing changes.
        """
        record = await self._engine.read(self.id)
        steps = await self._engine.steps(self.id)
        return WorkflowStatus(
            record.id,
            record.name,
            record.status,
            record.created_at,
            record.updated_at,
            record.runs,
            record.deadline,
            record.error_type,
            record.error_message,
            tuple(step_status(s) for s in steps),
        )

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the run to finish and return its result.

        Raises:
            WorkflowFailed: The run failed (it is in the dead letters).
            WorkflowCancelled: The run was cancelled.
            TimeoutError: ``timeout`` seconds passed first; the run goes on.

        Cancellation: only the wait stops; the run goes on.
        """
        record = await self._engine.wait(self.id, timeout)
        return self._engine.decode_result(record)

    async def cancel(self) -> bool:
        """Cancel the run: a step in progress is cancelled and no further step runs.
        Returns False if it had already finished.

        Cancellation: the cancel may still commit; calling it again is harmless.
        """
        return await self._engine.cancel(self.id)
