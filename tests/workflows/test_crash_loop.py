"""A step the process stops during: such attempts are counted apart from those that
raised, so a crash never uses up a step's retries, and a step fails as a crash loop
only once the process stopped during ``max_attempts`` of its attempts.

The step's executions follow a plan, one letter each:

- ``S`` succeeds;
- ``T`` raises a transient error (retried in the same process);
- ``K`` raises a transient error, then the process dies before the next attempt
  starts (a SIGKILL during the backoff delay);
- ``D`` dies inside the step, before its output is checkpointed;
- ``C`` is interrupted by a clean close of the bus.

A death is modelled at the storage boundary, as in tests/stateful: the log refuses
every commit from then on, the bus is torn down without a clean close, and a new bus
opens on what was committed.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

from eventbus import (
    Bus,
    BusConfig,
    RetryPolicy,
    StorageError,
    Workflow,
    WorkflowFailed,
    WorkflowStatus,
    current_step,
)
from eventbus.storage import MemoryStorage, Receipt, WriteBatch

pytestmark = pytest.mark.anyio

CONFIG = BusConfig(
    close_timeout=0.5,
    retry=RetryPolicy(max_attempts=4, initial_delay=0.0, max_delay=0.0, jitter="none"),
)


class Transient(Exception):
    pass


class MortalLog(MemoryStorage):
    """An in-memory log that "dies": from the first batch ``dies_at`` picks on, it
    refuses every commit, as a killed process makes none."""

    def __init__(self) -> None:
        super().__init__()
        self.dies_at: Callable[[WriteBatch], bool] = lambda batch: False
        self.dead = anyio.Event()

    async def commit(self, batch: WriteBatch) -> list[Receipt]:
        if not self.dead.is_set() and self.dies_at(batch):
            self.dead.set()
        if self.dead.is_set():
            raise StorageError("simulated crash: the process is gone")
        return await super().commit(batch)

    def revive(self) -> None:
        self.dies_at = lambda batch: False
        self.dead = anyio.Event()


class Lives:
    """A one-step workflow run over as many process lives as its plan needs."""

    def __init__(self, plan: str) -> None:
        self.plan = plan
        self.log = MortalLog()
        self.ran: list[int] = []  # the attempt number of each execution
        self.closing = anyio.Event()

    async def step(self) -> str:
        attempt = current_step().attempt
        self.ran.append(attempt)
        what = self.plan[len(self.ran) - 1]
        if what == "T":
            raise Transient(f"attempt {attempt}")
        if what == "K":
            self.log.dies_at = lambda batch: any(
                s.status == "running" and s.attempts > attempt for s in batch.steps
            )
            raise Transient(f"attempt {attempt}")
        if what == "D":
            self.log.dies_at = lambda batch: True  # its output is never checkpointed
        elif what == "C":
            self.closing.set()
            await anyio.sleep_forever()
        return f"ok at attempt {attempt}"

    async def flow(self, wf: Workflow, _: int) -> str:
        return await wf.step("only", self.step)

    async def life(self) -> tuple[WorkflowStatus, object] | None:
        """One process life: until the run finishes (its status and its result or
        WorkflowFailed), the log dies or a step asks for a clean close (None)."""
        finished: list[tuple[WorkflowStatus, object]] = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as process:

                async def run() -> None:
                    async with Bus.open(":memory:", config=CONFIG, storage=self.log) as bus:
                        bus.workflow("flow")(self.flow)
                        handle = await bus.start_workflow("flow", 0, workflow_id="run")
                        async with anyio.create_task_group() as race:

                            async def died() -> None:
                                await self.log.dead.wait()
                                process.cancel_scope.cancel()  # torn down, no clean close

                            async def closing() -> None:
                                await self.closing.wait()
                                race.cancel_scope.cancel()  # the bus closes cleanly

                            async def ended() -> None:
                                result: object
                                try:
                                    result = await handle.result()
                                except WorkflowFailed as exc:
                                    result = exc
                                finished.append((await handle.status(), result))
                                race.cancel_scope.cancel()

                            race.start_soon(died)
                            race.start_soon(closing)
                            race.start_soon(ended)

                process.start_soon(run)
        return finished[0] if finished else None

    async def follow(self) -> tuple[WorkflowStatus, object]:
        for _ in range(len(self.plan) + 1):  # the last one fails a crash loop
            finished = await self.life()
            if finished is not None:
                return finished
            self.log.revive()
            self.closing = anyio.Event()
        raise AssertionError(f"plan {self.plan}: the run had not finished; ran {self.ran}")


@pytest.mark.parametrize(
    ("plan", "attempts"),
    [
        # The example hypothesis found in tests/stateful/test_workflow_replay.py: two
        # failures and two deaths were taken for four deaths, a crash loop.
        pytest.param("TTDDS", [1, 2, 3, 4, 5], id="two-failures-two-deaths"),
        pytest.param("KKDDS", [1, 2, 3, 4, 5], id="killed-in-backoff-is-no-death"),
        pytest.param("DDDTTTS", [1, 2, 3, 4, 5, 6, 7], id="deaths-leave-the-retries"),
        pytest.param("DDDCCS", [1, 2, 3, 4, 4, 4], id="a-clean-close-is-no-death"),
        pytest.param("CCCCCS", [1, 1, 1, 1, 1, 1], id="closed-every-time"),
    ],
)
async def test_a_step_that_died_fewer_than_max_attempts_times_runs_again_and_finishes(
    plan: str, attempts: list[int]
) -> None:
    lives = Lives(plan)
    status, result = await lives.follow()
    assert result == f"ok at attempt {attempts[-1]}"
    assert lives.ran == attempts
    (step,) = status.steps
    assert (step.status, step.attempts, step.error_type) == ("done", attempts[-1], "")


@pytest.mark.parametrize(
    ("plan", "error_type"),
    [
        pytest.param("DDDD", "eventbus.ProcessDied", id="died-every-time"),
        pytest.param("TDTDDD", "eventbus.ProcessDied", id="died-four-times-of-six"),
        pytest.param("TTTT", Transient.__qualname__, id="failed-every-time"),
        pytest.param("DTTTT", Transient.__qualname__, id="failed-four-times-of-five"),
    ],
)
async def test_a_step_gives_up_once_its_failures_or_its_deaths_reach_max_attempts(
    plan: str, error_type: str
) -> None:
    lives = Lives(plan)
    status, result = await lives.follow()
    assert isinstance(result, WorkflowFailed)
    # It never ran again: not even to be failed as a crash loop.
    assert lives.ran == list(range(1, len(plan) + 1))
    (step,) = status.steps
    assert (step.status, step.attempts) == ("fatal", len(plan))
    assert step.error_type.endswith(error_type), step.error_type
