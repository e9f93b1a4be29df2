"""Random workflow shapes, transient step failures and crashes at any commit: a step
whose output is checkpointed never runs again, and every run ends with the result a
crash-free run would give.

A crash is modelled at the storage boundary (see test_exactly_once.py): the log
stops accepting commits after a chosen number, the bus is torn down without a
clean close, and a new bus opens on what was committed.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter

import anyio
import anyio.lowlevel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventbus import Bus, BusConfig, RetryPolicy, StorageError, Workflow
from storage import WriteBatch
from tests.stateful.test_exactly_once import CrashableStorage

CONFIG = BusConfig(
    close_timeout=0.5,
    retry=RetryPolicy(max_attempts=4, initial_delay=0.0, max_delay=0.0, jitter="none"),
)

# A shape: groups of steps; a group of two runs with wf.gather. Each step fails
# transiently a number of times (fewer than max_attempts) before it succeeds.
shapes = st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=2), min_size=1, max_size=5)
crash_points = st.lists(st.integers(0, 25), max_size=4)


class Transient(Exception):
    pass


async def scenario(shape: list[list[int]], crashes: list[int]) -> None:
    log = CrashableStorage()
    runs_of: Counter[str] = Counter()  # executions per step name
    failures_left = {f"s{g}.{i}": n for g, group in enumerate(shape) for i, n in enumerate(group)}
    violations: list[str] = []
    checkpointed: set[str] = set()  # steps whose output commit succeeded

    def open_bus() -> contextlib.AbstractAsyncContextManager[Bus]:
        return Bus.open(":memory:", config=CONFIG, storage=log)

    def register(bus: Bus) -> None:
        bus.workflow("flow")(flow)
        commit = bus._workflows._commit

        async def spy(batch: WriteBatch) -> object:
            result = await commit(batch)
            checkpointed.update(s.name for s in batch.steps if s.status == "done")
            return result

        bus._workflows._commit = spy

    async def step(name: str, value: int) -> int:
        if name in checkpointed:
            violations.append(f"{name} ran after its output was checkpointed")
        runs_of[name] += 1
        if failures_left[name] > 0:
            failures_left[name] -= 1
            raise Transient(name)
        await anyio.lowlevel.checkpoint()
        return value

    async def flow(wf: Workflow, base: int) -> int:
        total = base
        for g, group in enumerate(shape):
            calls = [wf.step(f"s{g}.{i}", step, f"s{g}.{i}", 10**g + i) for i in range(len(group))]
            if len(calls) == 1:
                total += await calls[0]
            else:
                total += sum(await wf.gather(*calls))
        return total

    expected = 1 + sum(10**g + i for g, group in enumerate(shape) for i in range(len(group)))

    for crash_after in crashes:
        async with anyio.create_task_group() as tg:

            async def life(crash_after: int = crash_after) -> None:
                async with open_bus() as bus:
                    register(bus)
                    log.crash_at = log.commits + crash_after
                    with anyio.move_on_after(5), contextlib.suppress(StorageError):
                        # Until the crash, or the run finishes first (then die anyway).
                        handle = await bus.start_workflow("flow", 1, workflow_id="run")
                        async with anyio.create_task_group() as race:

                            async def crashed() -> None:
                                await log.crashed.wait()
                                race.cancel_scope.cancel()

                            async def finished() -> None:
                                await handle.result()
                                race.cancel_scope.cancel()

                            race.start_soon(crashed)
                            race.start_soon(finished)
                    log.crash_at = log.commits
                    tg.cancel_scope.cancel()  # torn down, no clean close

            tg.start_soon(life)
        log.revive()

    async with open_bus() as bus:
        register(bus)
        handle = await bus.start_workflow("flow", 1, workflow_id="run")
        assert await handle.result(timeout=10) == expected
        status = await handle.status()
    assert violations == []
    assert [s.status for s in status.steps] == ["done"] * len(status.steps)
    for s in status.steps:
        # Each failure and each crash may cost one more execution; never more.
        assert runs_of[s.name] <= 1 + sum(shape_failures(shape, s.name)) + len(crashes)


def shape_failures(shape: list[list[int]], name: str) -> list[int]:
    g, i = (int(x) for x in name[1:].split("."))
    return [shape[g][i]]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes, crash_points)
def test_checkpointed_steps_never_run_again(shape: list[list[int]], crashes: list[int]) -> None:
    logging.getLogger("eventbus").setLevel(logging.CRITICAL)
    try:
        anyio.run(scenario, shape, crashes)
    finally:
        logging.getLogger("eventbus").setLevel(logging.NOTSET)
