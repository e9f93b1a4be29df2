"""Regression tests for the workflow engine: each pins a bug found in review (now
fixed) or a refusal that keeps replays correct."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from eventbus import (
    Bus,
    BusClosed,
    BusConfig,
    RetryPolicy,
    StepFailed,
    Workflow,
    WorkflowFailed,
)
from eventbus.storage import MemoryStorage, StorageError, WriteBatch

pytestmark = pytest.mark.anyio

ONE = RetryPolicy(max_attempts=1, initial_delay=0.0, max_delay=0.0, jitter="none")


async def _until(predicate: object, timeout: float = 5.0) -> None:
    """Yield to the loop (no timed sleep) until ``predicate()`` holds."""
    with anyio.fail_after(timeout):
        while not predicate():  # type: ignore[operator]
            await anyio.lowlevel.checkpoint()


# -- 1. _finished leaks an Event per result() of a finished run ------------------------


async def test_result_of_a_finished_run_leaves_nothing_behind() -> None:
    async with Bus.open(":memory:") as bus:

        @bus.workflow("w")
        async def w(wf: Workflow, x: int) -> int:
            return x

        ids = []
        for i in range(50):
            handle = await bus.start_workflow("w", i, workflow_id=f"r{i}")
            assert await handle.result(timeout=5) == i
            ids.append(handle.id)
        for run_id in ids:  # e.g. an API that reports results of old runs
            await (await bus.get_workflow(run_id)).result(timeout=5)
        leaked = len(bus._workflows._finished)
    assert leaked == 0, f"{leaked} anyio.Event objects left in WorkflowEngine._finished"


# -- 2. result() waits forever once the bus closes under it ---------------------------


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
async def test_a_result_waiter_is_released_when_the_bus_closes(
    log_path: Path, backend: str
) -> None:
    started = anyio.Event()
    returned = anyio.Event()
    outcome: list[BaseException | object] = []

    async def forever() -> None:
        started.set()
        await anyio.sleep_forever()

    async def waiter(handle: object) -> None:
        try:
            outcome.append(await handle.result())  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001
            outcome.append(exc)
        returned.set()  # not on cancellation

    async with anyio.create_task_group() as tg:
        path = log_path if backend == "sqlite" else ":memory:"
        async with Bus.open(path, config=BusConfig(close_timeout=1)) as bus:

            @bus.workflow("stuck")
            async def stuck(wf: Workflow, _: None) -> None:
                await wf.step("forever", forever)

            handle = await bus.start_workflow("stuck", workflow_id="s")
            with anyio.fail_after(5):
                await started.wait()
            tg.start_soon(waiter, handle)
            await _until(lambda: "s" in bus._workflows._finished)
        # The bus is closed; the run stays "running" in the log for the next open.
        with anyio.move_on_after(5):
            await returned.wait()
        tg.cancel_scope.cancel()
    assert returned.is_set(), "handle.result() still waits after the bus closed"
    # A typed, documented error: every error the bus raises derives from BusError.
    assert isinstance(outcome[0], BusClosed), outcome


# -- 3. cancelling a run that waits for a concurrency slot ----------------------------


async def test_cancelling_a_queued_run_cancels_it_at_once() -> None:
    ran: Counter[str] = Counter()
    a_started = anyio.Event()
    release_a = anyio.Event()

    async def work(x: str) -> str:
        ran[x] += 1
        if x == "a":
            a_started.set()
            await release_a.wait()
        return x

    async with Bus.open(":memory:", config=BusConfig(workflow_concurrency=1)) as bus:

        @bus.workflow("w")
        async def w(wf: Workflow, x: str) -> str:
            return await wf.step("work", work, x)

        await bus.start_workflow("w", "a", workflow_id="a")
        with anyio.fail_after(5):
            await a_started.wait()
        b = await bus.start_workflow("w", "b", workflow_id="b")  # queued behind "a"
        try:
            with anyio.fail_after(5):
                assert await b.cancel() is True
        finally:
            release_a.set()
        status = await b.status()
    assert status.status == "cancelled"
    assert ran["b"] == 0, "the cancelled run's step ran anyway"


# -- 4. close while a run is between the limiter and its cancel scope ------------------
# stop() cancels only runs whose scope is set; a run that passed the _stopping check
# but still awaits its record read is not cancelled: its steps start after close()
# began, and close() waits the whole close_timeout before the second stop() cancels it.


class _GatedStorage(MemoryStorage):
    """Holds the run task's read of its record (a real await on SQLite) on demand."""

    def __init__(self, gated_id: str) -> None:
        super().__init__()
        self.gated_id = gated_id
        self.reads = 0
        self.entered = anyio.Event()
        self.release = anyio.Event()

    async def workflow(self, workflow_id: str):  # type: ignore[no-untyped-def]
        if workflow_id == self.gated_id:
            self.reads += 1
            if self.reads == 2:  # 1: start_workflow's read-back, 2: the run task's read
                self.entered.set()
                await self.release.wait()
        return await super().workflow(workflow_id)


async def test_close_stops_a_run_that_was_starting() -> None:
    storage = _GatedStorage("g")
    step_started = anyio.Event()
    closed = anyio.Event()

    async def forever() -> None:
        step_started.set()
        await anyio.sleep_forever()

    with anyio.fail_after(15):
        async with Bus.open(":memory:", storage=storage, config=BusConfig(close_timeout=1)) as bus:

            @bus.workflow("w")
            async def w(wf: Workflow, _: None) -> None:
                await wf.step("forever", forever)

            await bus.start_workflow("w", workflow_id="g")
            await storage.entered.wait()

            async def close() -> None:
                await bus.close()
                closed.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(close)
                await _until(lambda: bus._workflows._stopping)
                storage.release.set()
                with anyio.move_on_after(6):
                    await closed.wait()
                tg.cancel_scope.cancel()
            assert not step_started.is_set(), "a run started its step after close() began"
            assert closed.is_set(), "close() did not return"


# -- 5. MemoryStorage reuses run numbers after compaction: a dead letter is lost ------


async def test_memory_backend_keeps_every_failed_run_in_the_dead_letters() -> None:
    config = BusConfig(idempotency_retention=0, retention=0)
    async with Bus.open(":memory:", config=config) as bus:

        async def maybe_fail(x: str) -> str:
            if x.startswith("bad"):
                raise RuntimeError(f"{x} failed")
            return x

        @bus.workflow("w")
        async def w(wf: Workflow, x: str) -> str:
            return await wf.step("s", maybe_fail, x, retry=ONE)

        ok = await bus.start_workflow("w", "ok", workflow_id="ok")
        assert await ok.result(timeout=5) == "ok"
        bad1 = await bus.start_workflow("w", "bad1", workflow_id="bad1")
        with pytest.raises(WorkflowFailed):
            await bad1.result(timeout=5)
        await bus.compact()  # forgets the completed run "ok"
        bad2 = await bus.start_workflow("w", "bad2", workflow_id="bad2")
        with pytest.raises(WorkflowFailed):
            await bad2.result(timeout=5)
        dead = await bus.dead_letters.list(subscription="workflow:w")
    assert sorted(d.event.id for d in dead) == ["bad1", "bad2"]


# -- 6. a replayed StepFailed has no __cause__: compensation takes another path -------


async def test_a_replayed_step_failure_carries_the_same_cause(log_path: Path) -> None:
    gate = anyio.Event()
    slow_started = anyio.Event()
    seen: list[str] = []

    async def broken() -> None:
        raise ValueError("card declined")

    async def note(what: str) -> str:
        return what

    async def slow() -> str:
        slow_started.set()
        await gate.wait()  # the first bus closes here
        return "done"

    async def flow(wf: Workflow, _: None) -> str:
        try:
            await wf.step("charge", broken, retry=ONE)
        except StepFailed as exc:
            # The contract: error_type and the message are the same on a replay
            # (__cause__ is the live exception on the first run only).
            seen.append(f"{exc.error_type}|{exc.error_message}|{exc}")
            if exc.error_type == "builtins.ValueError":
                await wf.step("refund", note, "refund")
            else:
                await wf.step("escalate", note, "escalate")
        return await wf.step("slow", slow)

    async with Bus.open(log_path) as bus:
        bus.workflow("saga")(flow)
        await bus.start_workflow("saga", workflow_id="s")
        with anyio.fail_after(5):
            await slow_started.wait()
    gate.set()
    async with Bus.open(log_path) as bus:
        bus.workflow("saga")(flow)
        handle = await bus.get_workflow("s")
        try:
            result: object = await handle.result(timeout=5)
        except WorkflowFailed as exc:
            result = exc
    assert result == "done", result
    assert seen[0] == seen[1], seen


# -- 7. redrive re-runs a step whose failure was already compensated -------------------


async def test_redrive_does_not_rerun_a_compensated_step(log_path: Path) -> None:
    """The README's own example: charge fails, the reservation is released, the run
    fails. A redrive must not charge the customer again after the release, and must
    not blame a code change."""
    calls: Counter[str] = Counter()
    charge_works = False

    async def reserve() -> str:
        calls["reserve"] += 1
        return "slot-1"

    async def charge() -> str:
        calls["charge"] += 1
        if not charge_works:
            raise RuntimeError("payment provider down")
        return "paid"

    async def release(slot: str) -> None:
        calls["release"] += 1

    async def ship() -> str:
        calls["ship"] += 1
        return "shipped"

    async with Bus.open(log_path) as bus:

        @bus.workflow("fulfil")
        async def fulfil(wf: Workflow, _: None) -> str:
            slot = await wf.step("reserve", reserve)
            try:
                await wf.step("charge", charge, retry=ONE)
            except StepFailed:
                await wf.step("release", release, slot)
                raise
            return await wf.step("ship", ship)

        handle = await bus.start_workflow("fulfil", workflow_id="o-1")
        with pytest.raises(WorkflowFailed):
            await handle.result(timeout=5)
        charge_works = True  # "fix the cause, then redrive"
        assert await bus.dead_letters.redrive(subscription="workflow:fulfil") == 1
        with pytest.raises(WorkflowFailed) as failed:
            await handle.result(timeout=5)
    assert calls["charge"] == 1, f"charged again after the reservation was released: {calls}"
    assert "changed incompatibly" not in str(failed.value), failed.value


# -- 8. steps called from nested coroutines in gather: positions follow timing --------


async def test_gather_refuses_branches_that_could_not_replay(log_path: Path) -> None:
    """A coroutine running several steps would take positions in the order its
    steps finish; gather refuses it rather than mis-replay."""
    async with Bus.open(log_path) as bus:

        async def get(name: str) -> str:
            return name

        @bus.workflow("fan")
        async def flow(wf: Workflow, _: None) -> list[str]:
            async def branch(name: str) -> str:
                return await wf.step("get", get, name)

            return await wf.gather(branch("a"), wf.step("get", get, "b"))

        handle = await bus.start_workflow("fan")
        with pytest.raises(WorkflowFailed, match=r"wf.gather takes wf.step\(...\)"):
            await handle.result(timeout=5)


async def test_steps_started_concurrently_outside_gather_are_refused(log_path: Path) -> None:
    async with Bus.open(log_path) as bus:
        gate = anyio.Event()

        async def wait() -> str:
            await gate.wait()
            return "w"

        @bus.workflow("tasks")
        async def flow(wf: Workflow, _: None) -> str:
            async with anyio.create_task_group() as tg:
                tg.start_soon(wf.step, "first", wait)
                await anyio.lowlevel.checkpoint()
                try:
                    await wf.step("second", wait)
                finally:
                    gate.set()
            return "unreachable"

        handle = await bus.start_workflow("tasks")
        with pytest.raises(WorkflowFailed, match=r"only run concurrently through wf\.gather"):
            await handle.result(timeout=5)


# -- 9. a "running" marker committed as the bus closes counts as a crashed attempt ----


async def test_close_during_the_running_marker_commit_is_not_a_crashed_attempt(
    log_path: Path,
) -> None:
    ran: Counter[str] = Counter()
    marked = anyio.Event()

    async def charge() -> str:
        ran["charge"] += 1
        return "paid"

    async def flow(wf: Workflow, _: None) -> str:
        return await wf.step("charge", charge, retry=ONE)

    async with Bus.open(log_path) as bus:
        bus.workflow("pay")(flow)
        commit = bus._workflows._commit

        async def spy(batch: WriteBatch) -> object:
            result = await commit(batch)  # committed (a cancelled commit commits too)
            if any(s.name == "charge" and s.status == "running" for s in batch.steps):
                marked.set()
                await anyio.sleep_forever()  # close() cancels the run right here
            return result

        bus._workflows._commit = spy
        await bus.start_workflow("pay", workflow_id="p")
        with anyio.fail_after(5):
            await marked.wait()
    assert ran["charge"] == 0
    async with Bus.open(log_path) as bus:
        bus.workflow("pay")(flow)
        handle = await bus.get_workflow("p")
        try:
            result: object = await handle.result(timeout=5)
        except WorkflowFailed as exc:
            result = exc
    # The step never ran; closing the bus is "not counted as a failed attempt".
    assert result == "paid", result
    assert ran["charge"] == 1


# -- 10. a log error while resuming runs at registration takes the whole bus down ----


class _FlakyListStorage(MemoryStorage):
    """``workflows()`` fails once, like SQLITE_BUSY past busy_timeout or an I/O error."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_next = False

    async def workflows(self, **kwargs):  # type: ignore[no-untyped-def]
        if self.fail_next:
            self.fail_next = False
            raise StorageError("database is locked")
        return await super().workflows(**kwargs)


async def test_a_failed_resume_scan_does_not_crash_the_bus() -> None:
    storage = _FlakyListStorage()
    outcome: list[BaseException] = []
    try:
        with anyio.fail_after(10):
            async with Bus.open(":memory:", storage=storage) as bus:
                storage.fail_next = True

                @bus.workflow("w")
                async def w(wf: Workflow, x: int) -> int:
                    return x

                handle = await bus.start_workflow("w", 3)
                assert await handle.result(timeout=5) == 3
    except BaseException as exc:  # noqa: BLE001
        outcome.append(exc)
    # A transient read error at registration should be logged and retried (the
    # periodic reconcile resumes runs anyway), not tear down every subscription.
    assert outcome == [], outcome
