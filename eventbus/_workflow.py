"""Stage-aware workflows: steps checkpointed in the log, replayed after a crash.

A workflow is an async function ``(wf, input)``. Every ``await wf.step(name, fn,
...)`` is one position in the run's call order. Before a step runs, a "running"
checkpoint (with its attempt count) is committed; when it returns, its output is
committed. After a crash, a cancel or a redrive the run is replayed from the start:
a step whose output is checkpointed is answered from the log without running, so
only unfinished steps run again. The replay must reach the same step names in the
same order; if the code changed so that it does not, the run fails with
:class:`WorkflowIncompatible` instead of doing something else.

Values crossing a checkpoint (the input, step outputs, the result) are msgpack-
encoded and decoded back to the function's annotated type on the first run as on a
replay, so a workflow sees the same values either way.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import random
import time
import typing
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import anyio
import anyio.abc
import msgspec

import storage as _storage
from storage import DeadRecord, Record, StepRecord, WorkflowRecord, WriteBatch

from ._config import RetryPolicy
from ._errors import BusClosed, BusError, PayloadError, translate_storage_error
from ._event import new_event_id
from ._handler import error_type_name, format_error
from ._metrics import WorkflowMetrics
from ._retry import backoff_delay

logger = logging.getLogger(__name__)

T = TypeVar("T")
WorkflowFunction = Callable[..., Awaitable[Any]]

#: Dead letters of failed runs of workflow NAME are filed under "workflow:NAME".
WORKFLOW_PREFIX = "workflow:"

# Names starting with "@" are the engine's own.
_SLEEP = "@sleep"
_GATHER_SLOT: contextvars.ContextVar[bool] = contextvars.ContextVar("eventbus_gather_slot")


# -- errors ---------------------------------------------------------------------------


class WorkflowError(BusError):
    """A workflow cannot be started, or a run cannot go on."""


class StepFailed(WorkflowError):
    """A step gave up: its retries are exhausted, or its error is not retried.

    Raised inside the workflow function at the ``wf.step`` call, so the workflow can
    compensate; if it escapes, the run fails and is dead-lettered. A replay raises it
    again at the same call with the same attributes and message; branch on
    ``error_type`` (the qualified name, e.g. ``"builtins.ValueError"``), not on
    ``__cause__``, which is the step's exception object on the first run only.

    Attributes:
        step: The step's name; ``position`` its place in the run's call order.
        attempts: Attempts made.
        error_type: The qualified type name of the step's last error.
        error_message: Its message.
    """

    def __init__(
        self,
        workflow_id: str,
        step: str,
        position: int,
        attempts: int,
        error_type: str,
        error_message: str,
    ) -> None:
        self.workflow_id = workflow_id
        self.step = step
        self.position = position
        self.attempts = attempts
        self.error_type = error_type
        self.error_message = error_message
        super().__init__(
            f"step {step!r} of workflow run {workflow_id!r} failed after {attempts} "
            f"attempt(s): {error_type}: {error_message}"
        )


class WorkflowIncompatible(WorkflowError):
    """The workflow's code no longer reaches its checkpointed steps in the same order.

    Replaying it would answer a step with another step's output. Deploy code that
    keeps the old steps (or give the new version a new workflow name), then redrive
    the run from the dead letters.
    """


class WorkflowFailed(WorkflowError):
    """``handle.result()`` of a run that failed. The run is in the dead letters
    (subscription ``workflow:<name>``); redrive it once the cause is fixed."""

    def __init__(self, workflow_id: str, error_type: str, error_message: str) -> None:
        self.workflow_id = workflow_id
        self.error_type = error_type
        self.error_message = error_message
        super().__init__(
            f"workflow run {workflow_id!r} failed: {error_type}: {error_message}; it is in "
            "the dead letters: fix the cause, then bus.dead_letters.redrive(...) resumes it"
        )


class WorkflowCancelled(WorkflowError):
    """``handle.result()`` of a run that was cancelled."""

    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        super().__init__(f"workflow run {workflow_id!r} was cancelled")


# -- what users see -------------------------------------------------------------------


class StepStatus(msgspec.Struct, frozen=True):
    """One step of a run: ``status`` is ``"running"``, ``"done"``, ``"failed"`` (it
    gave up and the workflow went on) or ``"fatal"`` (it gave up and that failed the
    run; a redrive runs it again)."""

    position: int
    name: str
    status: str
    attempts: int
    started_at: float
    finished_at: float | None
    error_type: str
    error_message: str


class WorkflowStatus(msgspec.Struct, frozen=True):
    """A snapshot of a run: ``status`` is ``"running"``, ``"completed"``,
    ``"failed"`` or ``"cancelled"``; ``runs`` counts starts and resumes."""

    id: str
    name: str
    status: str
    created_at: float
    updated_at: float
    runs: int
    deadline: float | None
    error_type: str
    error_message: str
    steps: tuple[StepStatus, ...]


class StepInfo(msgspec.Struct, frozen=True):
    """The step running in the current task (see :func:`current_step`)."""

    workflow_id: str
    step: str
    position: int
    attempt: int
    idempotency_key: str


_CURRENT_STEP: contextvars.ContextVar[StepInfo] = contextvars.ContextVar("eventbus_step")


def current_step() -> StepInfo:
    """The workflow step the calling code runs in, with its stable idempotency key.

    Raises:
        RuntimeError: Not called from inside a step function.
    """
    try:
        return _CURRENT_STEP.get()
    except LookupError:
        raise RuntimeError("current_step() is only available inside a workflow step") from None


def step_status(step: StepRecord) -> StepStatus:
    return StepStatus(
        step.position,
        step.name,
        step.status,
        step.attempts,
        step.started_at,
        step.finished_at,
        step.error_type,
        step.error_message,
    )


# -- encoding -------------------------------------------------------------------------

_ENCODER = msgspec.msgpack.Encoder()
_DECODERS: dict[object, msgspec.msgpack.Decoder[Any]] = {}


def _decoder(kind: object) -> msgspec.msgpack.Decoder[Any]:
    try:
        return _DECODERS[kind]
    except KeyError:
        dec: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(kind)
        _DECODERS[kind] = dec
        return dec
    except TypeError:  # unhashable annotation
        return msgspec.msgpack.Decoder(kind)


def _encode(what: str, value: object) -> bytes:
    try:
        return _ENCODER.encode(value)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise PayloadError(what, str(exc)) from exc


def _hints(fn: Callable[..., object]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: decode untyped
        return {}


def _return_type(fn: Callable[..., object]) -> object:
    kind = _hints(fn).get("return", Any)
    return type(None) if kind is None else kind


def _wants_key(fn: Callable[..., object]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    p = params.get("idempotency_key")
    return p is not None and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)


# What a step function returns and whether it takes an idempotency key: read once per
# function (type hints of string annotations cost tens of microseconds a call).
_STEP_FN: weakref.WeakKeyDictionary[Callable[..., object], tuple[object, bool]] = (
    weakref.WeakKeyDictionary()
)


def _step_fn(fn: Callable[..., object]) -> tuple[object, bool]:
    target = getattr(fn, "__func__", fn)  # a bound method: its function
    try:
        return _STEP_FN[target]
    except (KeyError, TypeError):
        pass
    found = (_return_type(fn), _wants_key(fn))
    with contextlib.suppress(TypeError):  # not weakly referable: not cached
        _STEP_FN[target] = found
    return found


def _deadline(seconds: float | None) -> contextlib.AbstractContextManager[object]:
    # A cancel scope costs microseconds; with no timeout there is nothing to cancel.
    return contextlib.nullcontext() if seconds is None else anyio.fail_after(seconds)


# -- one run --------------------------------------------------------------------------


class Workflow:
    """The ``wf`` a workflow function receives: its steps, sleeps and gathers.

    Attributes:
        id: The run's id (``workflow_id``).
        name: The workflow's name.
        runs: 1 on the first run, counting up each time the run is resumed.
    """

    def __init__(self, engine: WorkflowEngine, record: WorkflowRecord, steps: list[StepRecord]):
        self.id = record.id
        self.name = record.name
        self.runs = record.runs
        self._engine = engine
        self._checkpoints = {s.position: s for s in steps}
        self._next = 0
        self._in_progress = 0
        # Positions whose StepFailed was raised with no step called since, and
        # those the workflow went on from (handled: a redrive replays them).
        self._raised: list[int] = []
        self.handled: set[int] = set()
        self._rng: random.Random | None = None  # for backoff jitter, made when needed

    def __repr__(self) -> str:
        return f"<Workflow {self.name!r} id={self.id!r} run={self.runs}>"

    def _position(self, name: str) -> tuple[int, StepRecord | None]:
        if self._in_progress and not _GATHER_SLOT.get(False):
            raise WorkflowError(
                f"workflow {self.name!r} run {self.id!r}: step {name!r} started while "
                "another step of the run was running; steps of one run may only run "
                "concurrently through wf.gather(wf.step(...), ...), so that a replay "
                "matches each step to its checkpoint"
            )
        pos = self._next
        self._next += 1
        self.handled.update(self._raised)
        self._raised.clear()
        found = self._checkpoints.get(pos)
        if found is not None and found.name != name:
            raise WorkflowIncompatible(
                f"workflow {self.name!r} run {self.id!r}: step {pos} was checkpointed as "
                f"{found.name!r} but the code now calls {name!r} there; the code changed "
                "incompatibly with the run's checkpoints. Finish old runs on the old code "
                "or name the new version differently, then redrive the run"
            )
        return pos, found

    def _check_replayed(self) -> None:
        """At the end of a run: every checkpoint must have been reached again."""
        missed = sorted(p for p in self._checkpoints if p >= self._next)
        if missed:
            names = ", ".join(repr(self._checkpoints[p].name) for p in missed)
            raise WorkflowIncompatible(
                f"workflow {self.name!r} run {self.id!r} finished without reaching its "
                f"checkpointed step(s) {names}; the code changed incompatibly with the "
                "run's checkpoints"
            )

    def idempotency_key(self, step: str, position: int) -> str:
        """The stable idempotency key of the step ``step`` at ``position``."""
        return f"{self.id}:{position}:{step}"

    async def step(
        self,
        name: str,
        fn: Callable[..., Awaitable[T]],
        *args: object,
        retry: RetryPolicy | None = None,
        result_type: object = None,
        **kwargs: object,
    ) -> T:
        """Run ``fn(*args, **kwargs)`` as the step ``name`` and checkpoint its output.

        On a replay the checkpointed output is returned without running ``fn``. A
        failing call is retried with ``retry`` (the workflow's step policy by
        default) with backoff; when it gives up, :class:`StepFailed` is raised here.
        ``fn`` gets a stable idempotency key for outside calls as the keyword
        ``idempotency_key`` if it declares one, and from :func:`current_step`.

        Args:
            name: The step's name; the run must call its steps in the same order
                every time it replays.
            fn: An async function (a plain function works too).
            retry: Attempts and backoff for this step.
            result_type: The type to decode the output to; by default ``fn``'s
                return annotation. The first run returns the decoded value too.

        Raises:
            StepFailed: The step gave up.
            WorkflowIncompatible: The code reached another step here than the one
                checkpointed.
            PayloadError: The output cannot be encoded.
        """
        if not isinstance(name, str) or not name or name.startswith("@"):
            raise ValueError(f"a step needs a non-empty name not starting with '@', got {name!r}")
        pos, found = self._position(name)
        returns, wants_key = _step_fn(fn)
        kind = returns if result_type is None else result_type
        if found is not None and found.status == "done":
            self._engine.counts["steps_replayed"] += 1
            assert found.output is not None
            return _decoder(kind).decode(found.output)  # type: ignore[no-any-return]
        if found is not None and found.status == "failed":
            # Replayed as it happened, so code that caught it takes the same path.
            self._raised.append(pos)
            raise StepFailed(
                self.id, name, pos, found.attempts, found.error_type, found.error_message
            )
        if wants_key:
            kwargs = {**kwargs, "idempotency_key": self.idempotency_key(name, pos)}
        self._in_progress += 1
        try:
            value: T = await self._run_step(pos, name, fn, args, kwargs, retry, kind, found)
        finally:
            self._in_progress -= 1
        return value

    async def _run_step(
        self,
        pos: int,
        name: str,
        fn: Callable[..., object],
        args: tuple[object, ...],
        kwargs: dict[str, object],
        retry: RetryPolicy | None,
        kind: object,
        found: StepRecord | None,
    ) -> Any:
        engine = self._engine
        policy = retry or engine.step_retry
        attempts = found.attempts if found is not None else 0
        started = found.started_at if found is not None else time.time()
        key = self.idempotency_key(name, pos)
        if attempts >= policy.max_attempts:
            # Every attempt so far ended with the process: do not let it crash-loop.
            await self._step_failed(pos, name, attempts, started, _DIED_TYPE, _DIED)
            self._raised.append(pos)
            raise StepFailed(self.id, name, pos, attempts, _DIED_TYPE, _DIED)
        previous = 0.0
        while True:
            attempts += 1
            token = _CURRENT_STEP.set(StepInfo(self.id, name, pos, attempts, key))
            try:
                try:
                    # Inside the cancellation handler: a commit cancelled by a close
                    # may still land, and must not count as an attempt either.
                    marker = StepRecord(self.id, pos, name, "running", attempts, started)
                    await engine.commit(WriteBatch(steps=[marker]))
                    with _deadline(policy.timeout):
                        value = fn(*args, **kwargs)
                        if inspect.isawaitable(value):
                            value = await value
                finally:
                    _CURRENT_STEP.reset(token)
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    await engine.interrupted(self.id, pos, name, attempts - 1, started)
                raise
            except Exception as exc:
                if isinstance(exc, (BusClosed, _storage.StorageError)):
                    raise  # the bus, not the step: the run pauses
                if not policy.retryable(exc) or attempts >= policy.max_attempts:
                    engine.counts["steps_failed"] += 1
                    kind_name, message = error_type_name(exc), str(exc)
                    await self._step_failed(pos, name, attempts, started, kind_name, message)
                    self._raised.append(pos)
                    raise StepFailed(self.id, name, pos, attempts, kind_name, message) from exc
                logger.info(
                    "workflow %s step %r attempt %d failed: %r", self.id, name, attempts, exc
                )
                engine.counts["step_retries"] += 1
                if self._rng is None:
                    self._rng = random.Random()
                previous = backoff_delay(policy, attempts, previous, self._rng)
                await anyio.sleep(previous)
                continue
            engine.counts["steps_run"] += 1
            raw = _encode(f"the output of step {name!r}", value)
            done = StepRecord(self.id, pos, name, "done", attempts, started, time.time(), raw)
            await engine.commit(WriteBatch(steps=[done]))
            return _decoder(kind).decode(raw)

    async def _step_failed(
        self, pos: int, name: str, attempts: int, started: float, kind: str, message: str
    ) -> None:
        record = StepRecord(
            self.id, pos, name, "failed", attempts, started, time.time(), None, kind, message
        )
        await self._engine.commit(WriteBatch(steps=[record]))

    async def sleep(self, seconds: float) -> None:
        """Sleep durably: the wake-up time is checkpointed, so a run resumed after a
        restart sleeps only what is left (or not at all)."""
        if not seconds >= 0:
            raise ValueError(f"sleep needs seconds >= 0, got {seconds!r}")
        pos, found = self._position(_SLEEP)
        self._in_progress += 1
        try:
            if found is not None and found.status == "done" and found.output is not None:
                wake = float(_decoder(float).decode(found.output))
            else:
                now = time.time()
                wake = now + seconds
                raw = _encode("sleep", wake)
                done = StepRecord(self.id, pos, _SLEEP, "done", 1, now, now, raw)
                await self._engine.commit(WriteBatch(steps=[done]))
            await anyio.sleep(max(0.0, wake - time.time()))
        finally:
            self._in_progress -= 1

    async def gather(self, *steps: Awaitable[T]) -> list[T]:
        """Run steps concurrently; their results in argument order.

        Pass the ``wf.step(...)`` (or ``wf.sleep(...)``) calls themselves: they
        take their positions in argument order, so a replay matches them to their
        checkpoints. If one fails, the others are cancelled and its error is raised.

        Raises:
            TypeError: An argument is not a ``wf.step`` or ``wf.sleep`` call (a
                coroutine running several steps would take positions in whatever
                order its steps finish, and a replay could not match them).
        """
        ours = (Workflow.step.__code__, Workflow.sleep.__code__)
        strays = [aw for aw in steps if getattr(aw, "cr_code", None) not in ours]
        if strays:
            for aw in steps:
                close = getattr(aw, "close", None)
                if close is not None:
                    close()  # never awaited: say nothing more about them
            raise TypeError(
                "wf.gather takes wf.step(...) and wf.sleep(...) calls only, got "
                f"{strays[0]!r}; to run a sequence of steps beside others, make it a "
                "workflow of its own, or gather its steps stage by stage"
            )
        results: list[Any] = [None] * len(steps)
        failure: list[BaseException] = []

        async def run(i: int, aw: Awaitable[T]) -> None:
            _GATHER_SLOT.set(True)
            try:
                results[i] = await aw
            except Exception as exc:  # noqa: BLE001 - re-raised below, siblings cancelled
                if not failure:
                    failure.append(exc)
                tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            for i, aw in enumerate(steps):
                tg.start_soon(run, i, aw)
        if failure:
            raise failure[0]
        return results


_DIED_TYPE = "eventbus.ProcessDied"
_DIED = "the process stopped during every attempt (crash loop); see the step's logs"


# -- the engine -----------------------------------------------------------------------


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
        self._fresh: dict[str, WorkflowRecord] = {}
        self._finished: dict[str, _Waiters] = {}
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._tg: anyio.abc.TaskGroup | None = None
        self._stopping = False
        self._idle = anyio.Event()
        self._idle.set()
        self.counts: Counter[str] = Counter()

    async def commit(self, batch: WriteBatch) -> None:
        await self._commit(batch)

    def attach(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg

    @property
    def names(self) -> list[str]:
        return sorted(self._defs)

    def live(self) -> list[str]:
        return list(self._live)

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
        after = 0
        try:
            while True:
                runs = await self._log.workflows(
                    name=name, status="running", after=after, limit=500
                )
                for run in runs:
                    if run.name in self._defs:
                        self.launch(run.id)
                if len(runs) < 500:
                    return
                after = runs[-1].num
        except (BusClosed, _storage.StorageError) as exc:
            # Reconciliation looks for unfinished runs again on its next pass.
            logger.warning("could not look for unfinished %s workflow runs: %s", name, exc)

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
                    if record is None:
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
            del self._live[workflow_id]
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
        wf = Workflow(self, record, steps)
        try:
            value = await d.fn(wf, _decoder(d.input_type).decode(record.input))
            wf._check_replayed()
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
        logger.error("workflow run %s (%s) failed: %s", record.id, record.name, exc)
        await self.commit(WriteBatch(workflows=[failed], dead=[dead], steps=fatal))
        self.counts["failed"] += 1
        return failed

    async def _cancelled(self, record: WorkflowRecord) -> None:
        done = msgspec.structs.replace(record, status="cancelled", updated_at=time.time())
        await self.commit(WriteBatch(workflows=[done]))
        self.counts["cancelled"] += 1

    async def interrupted(
        self, workflow_id: str, pos: int, name: str, attempts: int, started: float
    ) -> None:
        """A step was cancelled (bus closing, run cancelled): not a failed attempt."""
        with anyio.move_on_after(2.0):
            with contextlib.suppress(BusClosed, _storage.StorageError):
                await self.commit(
                    WriteBatch(
                        steps=[StepRecord(workflow_id, pos, name, "running", attempts, started)]
                    )
                )

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
                        return record
                    if self._stopping:
                        raise BusClosed(
                            f"the bus closed before workflow run {workflow_id!r} finished "
                            "(it resumes when a bus opens the log again)"
                        )
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
        return _decoder(Any if d is None else d.result_type).decode(record.output)

    async def reconcile(self) -> tuple[list[str], list[str]]:
        """Resume unfinished runs of registered workflows that this process does not
        run (their task died, or they were redriven elsewhere); list the runs past
        their deadline. Returns (resumed, overdue)."""
        resumed: list[str] = []
        overdue: list[str] = []
        now = time.time()
        after = 0
        while True:
            runs = await self._log.workflows(status="running", after=after, limit=500)
            for run in runs:
                if run.deadline is not None and run.deadline < now:
                    overdue.append(run.id)
                if run.name in self._defs and self.launch(run.id):
                    resumed.append(run.id)
            if len(runs) < 500:
                return resumed, overdue
            after = runs[-1].num

    async def stop(self) -> None:
        """Cancel every run (they resume on the next open), wake every waiter, and
        wait for the runs to stop."""
        self._stopping = True
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

    def __init__(self, engine: WorkflowEngine, log: _storage.Storage, record: WorkflowRecord):
        self.id = record.id
        self.name = record.name
        self._engine = engine
        self._log = log

    def __repr__(self) -> str:
        return f"<WorkflowHandle {self.name!r} id={self.id!r}>"

    async def status(self) -> WorkflowStatus:
        """The run's status and its steps, as committed."""
        record = await self._engine.read(self.id)
        try:
            steps = await self._log.steps(self.id)
        except _storage.StorageError as exc:
            raise translate_storage_error(exc) from exc
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
        """
        record = await self._engine.wait(self.id, timeout)
        return self._engine.decode_result(record)

    async def cancel(self) -> bool:
        """Cancel the run: a step in progress is cancelled and no further step runs.
        Returns False if it had already finished."""
        return await self._engine.cancel(self.id)
