"""``eventbus workflows list|show`` reads runs and their steps from the log file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import pytest

from eventbus import Bus, RetryPolicy, Workflow, WorkflowFailed

pytestmark = pytest.mark.anyio


async def make_runs(path: Path) -> None:
    async def ok(x: int) -> int:
        return x * 2

    async def bad() -> None:
        raise LookupError("no such sku")

    async with Bus.open(path) as bus:

        @bus.workflow("flow")
        async def flow(wf: Workflow, x: int) -> int:
            doubled = await wf.step("double", ok, x)
            if x < 0:
                await wf.step("lookup", bad, retry=RetryPolicy(max_attempts=2, initial_delay=0))
            return doubled

        assert await (await bus.start_workflow("flow", 4, workflow_id="good")).result(10) == 8
        with pytest.raises(WorkflowFailed):
            await (await bus.start_workflow("flow", -1, workflow_id="bad")).result(10)


async def test_list_and_show_runs_with_their_steps(log_path: Path) -> None:
    await make_runs(log_path)
    listed = await anyio.run_process(
        [sys.executable, "-m", "eventbus", "workflows", "list", str(log_path), "--json"],
        check=True,
    )
    runs = {r["id"]: r for r in json.loads(listed.stdout)}
    assert runs["good"]["status"] == "completed"
    assert runs["good"]["output"] == 8
    assert runs["bad"]["status"] == "failed"
    assert "no such sku" in runs["bad"]["error_message"]

    failed_only = await anyio.run_process(
        [
            sys.executable,
            "-m",
            "eventbus",
            "workflows",
            "list",
            str(log_path),
            "--status",
            "failed",
        ],
        check=True,
    )
    text = failed_only.stdout.decode()
    assert "bad" in text
    assert "good" not in text

    shown = await anyio.run_process(
        [sys.executable, "-m", "eventbus", "workflows", "show", str(log_path), "bad", "--json"],
        check=True,
    )
    steps = json.loads(shown.stdout)["steps"]
    assert [(s["name"], s["status"], s["attempts"]) for s in steps] == [
        ("double", "done", 1),
        ("lookup", "fatal", 2),
    ]
    human = await anyio.run_process(
        [sys.executable, "-m", "eventbus", "workflows", "show", str(log_path), "bad"],
        check=True,
    )
    out = human.stdout.decode()
    assert "lookup" in out
    assert "LookupError" in out
    missing = await anyio.run_process(
        [sys.executable, "-m", "eventbus", "workflows", "show", str(log_path), "nope"],
        check=False,
    )
    assert missing.returncode == 1
    assert b"no workflow run with id 'nope'" in missing.stderr
