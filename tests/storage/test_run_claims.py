"""Workflow run claims on a log shared by processes (a SQLite file opened shared, and
PostgreSQL): one process at a time holds a run; the holder renews it at the same
epoch; once it expires another process takes it at a new epoch, and the old holder's
writes of that run are refused whole (fencing), while the new holder's commit."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from eventbus.storage import (
    PostgresStorage,
    RunClaimLost,
    SharedSQLiteStorage,
    StepRecord,
    WorkflowRecord,
    WriteBatch,
)

pytestmark = pytest.mark.anyio

LEASE = 0.3


@pytest.fixture(params=["sqlite-shared", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return str(tmp_path / "shared.db")


def _open(target: str) -> SharedSQLiteStorage | PostgresStorage:
    if target.startswith("postgresql"):
        return PostgresStorage(target)
    return SharedSQLiteStorage(target)


def _run(workflow_id: str) -> WorkflowRecord:
    now = time.time()
    return WorkflowRecord(workflow_id, "fulfil", "running", b"\x01", now, now)


async def test_one_process_holds_a_run_and_loses_its_writes_once_another_took_it_over(
    shared_target: str,
) -> None:
    a, b = _open(shared_target), _open(shared_target)
    await a.open()
    await b.open()
    try:
        await a.commit(WriteBatch(workflow_starts=[_run("w1")]))
        held = await a.claim_runs(["w1"], LEASE)
        assert set(held) == {"w1"}
        assert await b.claim_runs(["w1"], LEASE) == {}  # a live process holds it
        assert await a.claim_runs(["w1"], LEASE) == held  # renewed, same epoch
        step = StepRecord("w1", 0, "reserve", "done", 1, time.time())
        await a.commit(WriteBatch(steps=[step], runs={"w1": (a.member, held["w1"])}))
        # a stops renewing (paused): b takes the run over once the claim expired.
        taken: dict[str, int] = {}
        with anyio.fail_after(10):
            while not taken:
                await anyio.sleep(0.05)  # a's claim expires after LEASE seconds
                taken = await b.claim_runs(["w1"], 30)
        assert taken["w1"] > held["w1"]
        late = StepRecord("w1", 1, "charge", "done", 1, time.time())
        with pytest.raises(RunClaimLost, match="w1") as lost:
            await a.commit(WriteBatch(steps=[late], runs={"w1": (a.member, held["w1"])}))
        assert lost.value.runs == ("w1",)
        assert await a.claim_runs(["w1"], LEASE) == {}  # b holds it now
        assert [s.position for s in await b.steps("w1")] == [0]  # a's late write is not in
        await b.commit(WriteBatch(steps=[late], runs={"w1": (b.member, taken["w1"])}))
        assert [s.position for s in await b.steps("w1")] == [0, 1]
        await b.release_runs(["w1"])
        assert set(await a.claim_runs(["w1"], LEASE)) == {"w1"}  # free again
    finally:
        await a.close()
        await b.close()


async def test_a_run_no_longer_running_is_neither_claimed_nor_renewed(
    shared_target: str,
) -> None:
    a, b = _open(shared_target), _open(shared_target)
    await a.open()
    await b.open()
    try:
        await a.commit(WriteBatch(workflow_starts=[_run("w1")]))
        assert await a.claim_runs(["w0"], LEASE) == {}  # never started
        assert set(await a.claim_runs(["w1"], 30)) == {"w1"}
        # Cancelled by another process: the holder's next renewal fails, so it stops.
        now = time.time()
        cancelled = WorkflowRecord("w1", "fulfil", "cancelled", b"\x01", now, now)
        await b.commit(WriteBatch(workflows=[cancelled]))
        assert await a.claim_runs(["w1"], 30) == {}
    finally:
        await a.close()
        await b.close()
