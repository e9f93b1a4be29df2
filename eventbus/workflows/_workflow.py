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
import random
import time
import typing
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import anyio
import anyio.abc
import msgspec

import eventbus.storage as _storage
from eventbus.storage import StepRecord, WorkflowRecord, WriteBatch

from .._config import RetryPolicy
from .._errors import BusClosed, BusError, PayloadError
from .._logging import get_logger
from .._payloads import payload_type
from ..failures import backoff_delay, error_type_name


class StepHost(Protocol):
    """What a run's steps need of the engine that runs them."""

    step_retry: RetryPolicy
    counts: Counter[str]
    #: Entered around each attempt of a step while hooks are registered (else None).
    around_step: Callable[[StepInfo], contextlib.AbstractAsyncContextManager[object]] | None

    async def commit(self, batch: WriteBatch) -> None:
        """Commit step checkpoints (through the log writer)."""

    async def interrupted(self, step: StepRecord) -> None:
        """A step's attempt was cancelled: its checkpoint goes back to ``step``."""


logger = get_logger("workflows")

T = TypeVar("T")
WorkflowFunction = Callable[..., Awaitable[Any]]


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
    """The step running in the current task (see :func:`current_step`), also what an
    ``around_step`` hook sees.

    Attributes:
        workflow_id: The run's id.
        step: The step's name.
        position: Its position in the run's call order.
        attempt: This attempt (1 for the first).
        idempotency_key: A key for outside calls, stable across attempts and replays.
        workflow: The workflow's name.
    """

    workflow_id: str
    step: str
    position: int
    attempt: int
    idempotency_key: str
    workflow: str = ""


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


class _Checkpoints:
    """A run's step checkpoints as the log holds them, and how far the run has reached
    them again. The engine makes one per execution, hands it to the :class:`Workflow`
    (which claims a position per step) and, when the workflow function returns,
    checks that every checkpoint was reached."""

    __slots__ = ("_by_position", "_id", "_name", "_next")

    def __init__(self, record: WorkflowRecord, steps: list[StepRecord]) -> None:
        self._name = record.name
        self._id = record.id
        self._by_position = {s.position: s for s in steps}
        self._next = 0

    def claim(self, name: str) -> tuple[int, StepRecord | None]:
        """The next position, taken by the step ``name``, and its checkpoint if any.

        Raises:
            WorkflowIncompatible: The checkpoint there is another step's.
        """
        pos = self._next
        self._next += 1
        found = self._by_position.get(pos)
        if found is not None and found.name != name:
            raise WorkflowIncompatible(
                f"workflow {self._name!r} run {self._id!r}: step {pos} was checkpointed as "
                f"{found.name!r} but the code now calls {name!r} there; the code changed "
                "incompatibly with the run's checkpoints. Finish old runs on the old code "
                "or name the new version differently, then redrive the run"
            )
        return pos, found

    def check_all_reached(self) -> None:
        """At the end of a run: every checkpoint must have been reached again.

        Raises:
            WorkflowIncompatible: The run ended before a checkpointed step.
        """
        missed = sorted(p for p in self._by_position if p >= self._next)
        if missed:
            names = ", ".join(repr(self._by_position[p].name) for p in missed)
            raise WorkflowIncompatible(
                f"workflow {self._name!r} run {self._id!r} finished without reaching its "
                f"checkpointed step(s) {names}; the code changed incompatibly with the "
                "run's checkpoints"
            )


class Workflow:
    """The ``wf`` a workflow function receives: its steps, sleeps and gathers.

    Attributes:
        id: The run's id (``workflow_id``).
        name: The workflow's name.
        runs: 1 on the first run, counting up each time the run is resumed.
    """

    def __init__(self, engine: StepHost, record: WorkflowRecord, checkpoints: _Checkpoints):
        self.id = record.id
        self.name = record.name
        self.runs = record.runs
        self._engine = engine
        self._checkpoints = checkpoints
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
        self.handled.update(self._raised)
        self._raised.clear()
        return self._checkpoints.claim(name)

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

        Cancellation: the step's attempt is abandoned, counted neither as failed nor
        as died; the run replays the step when it resumes.
        """
        if not isinstance(name, str) or not name or name.startswith("@"):
            raise ValueError(f"a step needs a non-empty name not starting with '@', got {name!r}")
        pos, found = self._position(name)
        returns, wants_key = _step_fn(fn)
        kind = returns if result_type is None else result_type
        if found is not None and found.status == "done":
            self._engine.counts["steps_replayed"] += 1
            assert found.output is not None
            return payload_type(kind).decode(found.output)  # type: ignore[no-any-return]
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
        # An attempt ends in one of three ways, counted apart: it raises (the retry
        # policy gives up after max_attempts of those), the process stops during it
        # (a crash loop after max_attempts of those), or a close interrupts it (not
        # counted at all). So a crash never uses up a step's retries.
        step = found or StepRecord(self.id, pos, name, "running", 0, time.time())
        key = self.idempotency_key(name, pos)
        if step.died >= policy.max_attempts:
            # The process stopped during max_attempts of its attempts: a crash loop.
            message = _DIED.format(died=step.died)
            await self._step_failed(step, _DIED_TYPE, message)
            self._raised.append(pos)
            raise StepFailed(self.id, name, pos, step.attempts, _DIED_TYPE, message)
        previous = 0.0
        failed = False  # the last attempt raised; ``step`` records it
        while True:
            attempts = step.attempts + 1
            try:
                # Inside the cancellation handler: a commit cancelled by a close may
                # still land, and must not count as an attempt either.
                if failed:
                    # The failed attempt ended here: the process stopping during the
                    # backoff must not count it as died.
                    await engine.commit(WriteBatch(steps=[step]))
                    await anyio.sleep(previous)
                # Counted as died until it ends otherwise: if the process stops, no
                # code runs to count it.
                marker = msgspec.structs.replace(step, attempts=attempts, died=step.died + 1)
                await engine.commit(WriteBatch(steps=[marker]))
                info = StepInfo(self.id, name, pos, attempts, key, self.name)
                token = _CURRENT_STEP.set(info)
                try:
                    with _deadline(policy.timeout):
                        if engine.around_step is None:
                            value = fn(*args, **kwargs)
                            if inspect.isawaitable(value):
                                value = await value
                        else:
                            async with engine.around_step(info):
                                value = fn(*args, **kwargs)
                                if inspect.isawaitable(value):
                                    value = await value
                finally:
                    _CURRENT_STEP.reset(token)
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    await engine.interrupted(step)
                raise
            except Exception as exc:
                if isinstance(exc, (BusClosed, _storage.StorageError)):
                    raise  # the bus, not the step: the run pauses
                step = msgspec.structs.replace(
                    step,
                    attempts=attempts,
                    error_type=error_type_name(exc),
                    error_message=str(exc),
                )
                failures = step.attempts - step.died
                if not policy.retryable(exc) or failures >= policy.max_attempts:
                    engine.counts["steps_failed"] += 1
                    await self._step_failed(step, step.error_type, step.error_message)
                    self._raised.append(pos)
                    raise StepFailed(
                        self.id, name, pos, attempts, step.error_type, step.error_message
                    ) from exc
                logger.info(
                    "workflow %s step %r attempt %d failed: %r", self.id, name, attempts, exc
                )
                engine.counts["step_retries"] += 1
                if self._rng is None:
                    self._rng = random.Random()
                previous = backoff_delay(policy, failures, previous, self._rng)
                failed = True
                continue
            engine.counts["steps_run"] += 1
            raw = _encode(f"the output of step {name!r}", value)
            done = msgspec.structs.replace(
                step,
                status="done",
                attempts=attempts,
                finished_at=time.time(),
                output=raw,
                error_type="",
                error_message="",
            )
            await engine.commit(WriteBatch(steps=[done]))
            return payload_type(kind).decode(raw)

    async def _step_failed(self, step: StepRecord, kind: str, message: str) -> None:
        record = msgspec.structs.replace(
            step,
            status="failed",
            finished_at=time.time(),
            output=None,
            error_type=kind,
            error_message=message,
        )
        await self._engine.commit(WriteBatch(steps=[record]))

    async def sleep(self, seconds: float) -> None:
        """Sleep durably: the wake-up time is checkpointed, so a run resumed after a
        restart sleeps only what is left (or not at all).

        Cancellation: the wake-up time stays checkpointed; a resumed run sleeps until it.
        """
        if not seconds >= 0:
            raise ValueError(f"sleep needs seconds >= 0, got {seconds!r}")
        pos, found = self._position(_SLEEP)
        self._in_progress += 1
        try:
            if found is not None and found.status == "done" and found.output is not None:
                wake = float(payload_type(float).decode(found.output))
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

        Cancellation: every step of the gather is cancelled, as :meth:`step` says.
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
_DIED = "the process stopped during {died} of its attempts (crash loop); see the step's logs"
