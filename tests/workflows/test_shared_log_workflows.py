"""Workflows on a log shared by several buses (a SQLite file opened shared, and
PostgreSQL): a run is executed by one bus at a time, another bus waits for its result
and cancels it, and the bus executing it stops it at its next claim renewal."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from eventbus import Bus, BusConfig, Workflow, WorkflowCancelled
from eventbus.storage import is_postgres_url

pytestmark = pytest.mark.anyio

LEASE = 1.5


@pytest.fixture(params=["sqlite-shared", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return f"{request.getfixturevalue('pg_url')}&lease={LEASE}"
    return str(tmp_path / "shared.db")


def _config(url: str) -> BusConfig:
    return BusConfig(breaker=None, shared=not is_postgres_url(url))


async def test_a_run_executes_in_one_bus_and_a_cancel_from_another_stops_it(
    shared_url: str,
) -> None:
    started: list[str] = []
    finished: list[str] = []
    entered = anyio.Event()

    async def wait_long(who: str) -> str:
        started.append(who)
        entered.set()
        await anyio.sleep(60)
        finished.append(who)
        return who

    def register(bus: Bus, who: str) -> None:
        @bus.workflow("slow")
        async def slow(wf: Workflow, n: int) -> str:
            return await wf.step("wait", wait_long, who)

    async with (
        Bus.open(shared_url, config=_config(shared_url)) as a,
        Bus.open(shared_url, config=_config(shared_url)) as b,
    ):
        register(a, "a")
        register(b, "b")
        handles = {
            "a": await a.start_workflow("slow", 1, workflow_id="run-1"),
            "b": await b.start_workflow("slow", 1, workflow_id="run-1"),  # the same run
        }
        with anyio.fail_after(10):
            await entered.wait()
        (executor,) = started  # one of them executes it; the other does not
        other = "b" if executor == "a" else "a"
        assert await handles[other].cancel()
        with anyio.fail_after(LEASE * 3):
            with pytest.raises(WorkflowCancelled):
                await handles[executor].result()
            await (a if executor == "a" else b).drain(workflows=True)  # its task ended
        assert (await handles[other].status()).status == "cancelled"
    assert len(started) == 1
    assert finished == []
