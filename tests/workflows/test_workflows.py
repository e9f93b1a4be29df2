"""Workflows in one process: checkpoints, replay, retries, failure, redrive, cancel."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import anyio
import msgspec
import pytest

from eventbus import (
    Bus,
    BusConfig,
    DrainTimeout,
    Event,
    RetryPolicy,
    StepFailed,
    Workflow,
    WorkflowCancelled,
    WorkflowError,
    WorkflowFailed,
    WorkflowIncompatible,
    current_step,
)
from eventbus.storage import WriteBatch

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(max_attempts=3, initial_delay=0.0, max_delay=0.0, jitter="none")


class Order(msgspec.Struct):
    id: str
    amount: int


class Reservation(msgspec.Struct):
    order: str
    slot: int


async def test_steps_run_once_and_the_result_is_typed(log_url: str) -> None:
    ran: Counter[str] = Counter()

    async def reserve(order: Order) -> Reservation:
        ran["reserve"] += 1
        return Reservation(order.id, 7)

    async def charge(r: Reservation, idempotency_key: str) -> str:
        ran["charge"] += 1
        assert current_step().idempotency_key == idempotency_key
        return f"charged {r.order} slot {r.slot} key {idempotency_key}"

    async with Bus.open(log_url) as bus:

        @bus.workflow("fulfil")
        async def fulfil(wf: Workflow, order: Order) -> str:
            r = await wf.step("reserve", reserve, order)
            assert isinstance(r, Reservation)
            return await wf.step("charge", charge, r)

        handle = await bus.start_workflow("fulfil", Order("o-1", 5), workflow_id="o-1")
        result = await handle.result(timeout=10)
        assert result == "charged o-1 slot 7 key o-1:1:charge"
        again = await bus.start_workflow("fulfil", Order("o-1", 99), workflow_id="o-1")
        assert await again.result(timeout=10) == result
        status = await handle.status()
    assert status.status == "completed"
    assert [(s.name, s.status, s.attempts) for s in status.steps] == [
        ("reserve", "done", 1),
        ("charge", "done", 1),
    ]
    assert ran == {"reserve": 1, "charge": 1}


async def test_a_resumed_run_replays_only_unfinished_steps(log_url: str) -> None:
    ran: Counter[str] = Counter()
    gate = anyio.Event()
    b_started = anyio.Event()

    async def step_a() -> int:
        ran["a"] += 1
        return 1

    async def step_b() -> int:
        ran["b"] += 1
        b_started.set()
        await gate.wait()  # the bus closes while this runs
        return 2

    async def flow(wf: Workflow, x: int) -> int:
        a = await wf.step("a", step_a)
        b = await wf.step("b", step_b)
        return x + a + b

    async with Bus.open(log_url) as bus:
        bus.workflow("flow")(flow)
        await bus.start_workflow("flow", 10, workflow_id="w")
        with anyio.fail_after(10):
            await b_started.wait()
    assert ran == {"a": 1, "b": 1}
    gate.set()
    async with Bus.open(log_url) as bus:
        bus.workflow("flow")(flow)  # resumes by itself
        handle = await bus.get_workflow("w")
        assert await handle.result(timeout=10) == 13
        status = await handle.status()
        metrics = bus.metrics().workflows
    assert metrics is not None
    assert (metrics.steps_replayed, metrics.steps_run) == (1, 1)
    assert ran == {"a": 1, "b": 2}
    # The step cancelled by close did not count as a failed attempt.
    assert [s.attempts for s in status.steps] == [1, 1]
    assert status.runs == 2


async def test_a_step_is_retried_then_its_failure_can_be_compensated(log_url: str) -> None:
    calls: list[str] = []

    async def flaky() -> str:
        calls.append("flaky")
        if len(calls) < 3:
            raise ConnectionError("try again")
        return "ok"

    async def broken() -> None:
        calls.append("broken")
        raise ValueError("card declined")

    async def refund() -> str:
        calls.append("refund")
        return "refunded"

    async with Bus.open(log_url) as bus:

        @bus.workflow("saga")
        async def saga(wf: Workflow, _: None) -> list[str]:
            out = [await wf.step("flaky", flaky, retry=FAST)]
            try:
                await wf.step("broken", broken, retry=FAST)
            except StepFailed as exc:
                out.append(type(exc.__cause__).__name__)
                out.append(await wf.step("refund", refund))
            return out

        handle = await bus.start_workflow("saga")
        assert await handle.result(timeout=10) == ["ok", "ValueError", "refunded"]
        status = await handle.status()
        metrics = bus.metrics().workflows
    assert metrics is not None
    assert (metrics.started, metrics.completed, metrics.failed) == (1, 1, 0)
    assert (metrics.steps_run, metrics.step_retries, metrics.steps_failed) == (2, 4, 1)
    assert (metrics.running, metrics.queued) == (0, 0)
    assert calls == ["flaky"] * 3 + ["broken"] * 3 + ["refund"]
    assert [(s.name, s.status, s.attempts) for s in status.steps] == [
        ("flaky", "done", 3),
        ("broken", "failed", 3),
        ("refund", "done", 1),
    ]


async def test_a_failed_run_is_dead_lettered_and_redrive_resumes_it(log_url: str) -> None:
    broken = True
    ran: Counter[str] = Counter()

    async def first() -> int:
        ran["first"] += 1
        return 1

    async def second() -> int:
        ran["second"] += 1
        if broken:
            raise RuntimeError("inventory service down")
        return 2

    async with Bus.open(log_url) as bus:

        @bus.workflow("two")
        async def two(wf: Workflow, _: None) -> int:
            return await wf.step("first", first) + await wf.step("second", second, retry=FAST)

        handle = await bus.start_workflow("two", workflow_id="run-1")
        with pytest.raises(WorkflowFailed, match="inventory service down"):
            await handle.result(timeout=10)
        (dead,) = await bus.dead_letters.list(subscription="workflow:two")
        assert dead.event.id == "run-1"
        assert "second" in dead.traceback
        assert "first" in dead.traceback
        assert "RuntimeError" in dead.traceback
        broken = False
        assert await bus.dead_letters.redrive(subscription="workflow:two") == 1
        assert await handle.result(timeout=10) == 3
        assert await bus.dead_letters.list(subscription="workflow:two") == []
    assert ran == {"first": 1, "second": 4}


async def test_changed_code_fails_with_a_clear_error(log_url: str) -> None:
    gate = anyio.Event()
    started = anyio.Event()

    async def step(name: str) -> str:
        if name == "slow":
            started.set()
            await gate.wait()
        return name

    async with Bus.open(log_url) as bus:

        @bus.workflow("v")
        async def v1(wf: Workflow, _: None) -> str:
            await wf.step("reserve", step, "reserve")
            return await wf.step("slow", step, "slow")

        await bus.start_workflow("v", workflow_id="r")
        with anyio.fail_after(10):
            await started.wait()
    async with Bus.open(log_url) as bus:

        @bus.workflow("v")
        async def v2(wf: Workflow, _: None) -> str:
            await wf.step("charge", step, "charge")  # was "reserve" at position 0
            return await wf.step("slow", step, "slow")

        handle = await bus.get_workflow("r")
        with pytest.raises(WorkflowFailed, match="changed incompatibly"):
            await handle.result(timeout=10)
        status = await handle.status()
    assert status.error_type.endswith("WorkflowIncompatible")
    assert issubclass(WorkflowIncompatible, WorkflowError)


async def test_a_replay_that_ends_before_its_checkpoints_fails_naming_them(
    log_url: str,
) -> None:
    gate = anyio.Event()
    started = anyio.Event()

    async def step(name: str) -> str:
        if name == "slow":
            started.set()
            await gate.wait()
        return name

    async with Bus.open(log_url) as bus:

        @bus.workflow("v")
        async def v1(wf: Workflow, _: None) -> str:
            await wf.step("reserve", step, "reserve")
            return await wf.step("slow", step, "slow")

        await bus.start_workflow("v", workflow_id="r")
        with anyio.fail_after(10):
            await started.wait()
    async with Bus.open(log_url) as bus:

        @bus.workflow("v")
        async def v2(wf: Workflow, _: None) -> str:
            return "no steps any more"

        handle = await bus.get_workflow("r")
        with pytest.raises(WorkflowFailed, match=r"checkpointed step\(s\) 'reserve', 'slow'"):
            await handle.result(timeout=10)
        status = await handle.status()
    assert status.error_type.endswith("WorkflowIncompatible")


async def test_gather_runs_steps_concurrently_and_replays_them(log_url: str) -> None:
    running = 0
    peak = 0
    both = anyio.Event()

    async def part(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == 2:
            both.set()
        with anyio.fail_after(10):
            await both.wait()
        running -= 1
        return i * 10

    async with Bus.open(log_url) as bus:

        @bus.workflow("fan")
        async def fan(wf: Workflow, n: int) -> list[int]:
            return await wf.gather(wf.step("p1", part, 1), wf.step("p2", part, 2))

        handle = await bus.start_workflow("fan", 2)
        assert await handle.result(timeout=10) == [10, 20]
    assert peak == 2


async def test_durable_sleep_survives_a_restart(log_url: str) -> None:
    async def flow(wf: Workflow, _: None) -> str:
        await wf.sleep(0.3)
        return "woke"

    async with Bus.open(log_url) as bus:
        bus.workflow("nap")(flow)
        checkpointed = anyio.Event()
        commit = bus._workflows._commit

        async def spy(batch: WriteBatch) -> object:
            result = await commit(batch)
            if any(step.name == "@sleep" for step in batch.steps):
                checkpointed.set()
            return result

        bus._workflows._commit = spy
        await bus.start_workflow("nap", workflow_id="n")
        with anyio.fail_after(10):
            await checkpointed.wait()
        (before,) = (await (await bus.get_workflow("n")).status()).steps
    async with Bus.open(log_url) as bus:
        bus.workflow("nap")(flow)
        handle = await bus.get_workflow("n")
        assert await handle.result(timeout=10) == "woke"
        status = await handle.status()
    # The wake-up time was not re-armed by the restart.
    assert status.steps == (before,)
    assert before.name == "@sleep"
    assert before.status == "done"


async def test_cancel_stops_a_run(log_url: str) -> None:
    started = anyio.Event()

    async def forever() -> None:
        started.set()
        await anyio.sleep_forever()

    async with Bus.open(log_url) as bus:

        @bus.workflow("stuck")
        async def stuck(wf: Workflow, _: None) -> None:
            await wf.step("forever", forever)

        handle = await bus.start_workflow("stuck")
        with anyio.fail_after(10):
            await started.wait()
        assert await handle.cancel() is True
        with pytest.raises(WorkflowCancelled):
            await handle.result(timeout=10)
        assert await handle.cancel() is False
        assert (await handle.status()).status == "cancelled"


async def test_a_subscription_starts_one_run_per_event(log_url: str) -> None:
    ran: Counter[str] = Counter()

    async def ship(order_id: str) -> str:
        ran[order_id] += 1
        return f"shipped {order_id}"

    async with Bus.open(log_url) as bus:

        @bus.workflow("ship")
        async def flow(wf: Workflow, order_id: str) -> str:
            return await wf.step("ship", ship, order_id)

        seen: list[str] = []

        @bus.subscribe("orders", name="starter")
        async def start(event: Event[str], ctx: object) -> None:
            # Delivered twice (retried once): still one run, by the event's id.
            await bus.start_workflow("ship", event.payload, workflow_id=event.id)
            seen.append(event.id)
            if len(seen) == 1:
                raise ConnectionError("lost the ack")

        receipt = await bus.publish("orders", "o-9")
        await bus.drain(timeout=10)
        handle = await bus.get_workflow(receipt.id)
        assert await handle.result(timeout=10) == "shipped o-9"
    assert seen == [receipt.id, receipt.id]
    assert ran == {"o-9": 1}


async def test_bad_registrations_and_starts_are_refused() -> None:
    async with Bus.open(":memory:", config=BusConfig(workflow_concurrency=2)) as bus:
        with pytest.raises(WorkflowError, match="no workflow named 'nope'"):
            await bus.start_workflow("nope")

        @bus.workflow("one")
        async def one(wf: Workflow, x: int) -> int:
            return x

        with pytest.raises(WorkflowError, match="already registered"):
            bus.workflow("one")(one)
        with pytest.raises(WorkflowError, match="must take"):
            bus.workflow("two")(lambda wf: None)  # type: ignore[arg-type,return-value]

        @bus.workflow("other")
        async def other(wf: Workflow, x: int) -> int:
            return -x

        assert await (await bus.start_workflow("one", 4, workflow_id="id")).result(5) == 4
        with pytest.raises(WorkflowError, match="already used by a run of 'one'"):
            await bus.start_workflow("other", 4, workflow_id="id")
        with pytest.raises(TypeError):
            await bus.start_workflow("one", object())


async def test_drain_waits_for_workflow_runs_only_when_asked(log_path: Path) -> None:
    # Regression: drain() returned while a run still executed, and said nothing of it;
    # drain(workflows=True) waits until no run executes in this process.
    entered = anyio.Event()
    release = anyio.Event()
    order: list[str] = []

    async def held() -> str:
        entered.set()
        await release.wait()
        order.append("step done")
        return "done"

    async def drain_all(bus: Bus) -> None:
        await bus.drain(timeout=10, workflows=True)
        order.append("drained with workflows")

    async with Bus.open(log_path) as bus:

        @bus.workflow("held")
        async def run(wf: Workflow, _: None) -> str:
            return await wf.step("held", held)

        handle = await bus.start_workflow("held")
        with anyio.fail_after(10):
            await entered.wait()
        await bus.drain(timeout=10)  # returns at once: runs are not waited for
        assert (await handle.status()).status == "running"
        with pytest.raises(DrainTimeout) as info:
            await bus.drain(timeout=0.05, workflows=True)
        assert info.value.workflows == [handle.id]
        assert f"workflow runs still executing: {handle.id!r}" in str(info.value)
        assert "subscriptions still behind" not in str(info.value)
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain_all, bus)
            await anyio.wait_all_tasks_blocked()
            assert order == [], "drain(workflows=True) returned while the run executed"
            release.set()
        assert order == ["step done", "drained with workflows"]
        assert await handle.result(timeout=10) == "done"
