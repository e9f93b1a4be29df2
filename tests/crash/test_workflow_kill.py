"""A workflow killed with SIGKILL at every step boundary and inside every step
finishes with the right result on the next run, and every step whose output was
checkpointed ran exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_workflow_worker.py")
STEPS = ("reserve", "charge", "pack", "label", "ship")
EXPECTED = {"charge": "ch-o-1-42", "shipped": "shipped label-o-1 boxes=2 paid=ch-o-1-42"}

POINTS = [f"{when}:{step}" for step in STEPS for when in ("before", "inside", "after")]
POINTS.insert(POINTS.index("before:pack"), "after:@sleep")


def run(log: Path, sink: Path, kill_at: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(WORKER), str(log), str(sink), kill_at],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", POINTS)
def test_a_killed_workflow_resumes_and_runs_each_finished_step_once(
    tmp_path: Path, kill_at: str
) -> None:
    log, sink = tmp_path / "log.db", tmp_path / "sink.txt"
    killed = run(log, sink, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run(log, sink)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout) == EXPECTED

    lines = [line.split() for line in sink.read_text().splitlines()]
    cut = lines.index(["killed", kill_at, "-"])
    checkpointed = {step for kind, step, _ in lines[:cut] if kind == "done"}
    starts = Counter(step for kind, step, _ in lines if kind == "start")
    keys = {
        step: {key for kind, s, key in lines if kind == "start" and s == step} for step in STEPS
    }
    when, where = kill_at.split(":")
    assert (where in checkpointed) == (when == "after")
    for step in STEPS:
        # One idempotency key per step, whatever ran twice: outside effects dedupe.
        assert len(keys[step]) == 1, (step, keys[step])
        if step in checkpointed:
            # Its output was in the log when the process died: never run again.
            assert starts[step] == 1, (step, starts)
        elif step == where:
            # Died in it before its output was checkpointed: runs once more.
            assert starts[step] == 2, (step, starts)
        else:
            # Not started yet, or running beside it in a gather.
            assert starts[step] in (1, 2), (step, starts)
    # A sibling in a gather runs again only if it had started and not finished.
    for step in STEPS:
        if starts[step] == 2 and step != where:
            assert ["start", step] in [ln[:2] for ln in lines[:cut]]
