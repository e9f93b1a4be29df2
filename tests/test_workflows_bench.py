"""bench/workflows.py as a smoke test: tiny workloads, one round.

It checks the harness (every run finishes with the right result, the ceilings write
what they claim, the report and its verdict lines), not the numbers: for those run
``python bench/workflows.py``.
"""

from __future__ import annotations

from types import ModuleType

import pytest

import eventbus
from tests.conftest import load_bench


def _load() -> ModuleType:
    return load_bench("workflows")


wb = _load()

TINY = wb.Workload(runs=40)


def test_the_ceilings_checkpoint_every_step_of_every_run() -> None:
    # Each ceiling raises unless its file holds every step and every completed run.
    per_step = wb.saga_per_step(TINY)
    batched = wb.saga_batched(TINY)
    assert per_step.runs == batched.runs == 40
    assert per_step.commits_per_step == 1.0
    assert batched.commits == 3
    assert len(per_step.latencies) == len(batched.latencies) == 40
    assert per_step.steps_per_s > 0
    assert batched.steps_per_s > 0


@pytest.mark.parametrize("concurrency", [wb.DEFAULT_CONCURRENCY, 1])
def test_the_bus_finishes_every_run_with_its_result(concurrency: int) -> None:
    # bus_runs raises unless every run returned the expected Shipment and every step ran.
    run = eventbus.run(wb.bus_runs(TINY, concurrency))
    assert run.runs == 40
    assert len(run.latencies) == 40
    assert list(run.latencies) == sorted(run.latencies)
    assert 0 < run.latency(0.5) <= run.latency(0.99)
    if concurrency == 1:
        # One run at a time, and each step's output is committed before the next
        # step starts: no two checkpoints can share a commit.
        assert run.commits_per_step >= 1
    else:
        assert run.commits > 0


def test_quick_command_line_prints_the_table_and_three_verdicts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Targets every run meets, so the exit status shows the mechanics, not the machine.
    for target in ("PER_STEP_TARGET", "BATCHED_TARGET", "GROUP_COMMIT_TARGET"):
        monkeypatch.setattr(wb, target, 0.0)
    assert wb.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "200 runs x 3 steps" in out
    assert "on uvloop" in out
    for row in (
        "sqlite3 saga, per-step commit",
        "sqlite3 saga, batched",
        "bus, concurrency 100 (default)",
        "bus, concurrency 1 ",
    ):
        assert row in out
    verdicts = out.rstrip().splitlines()[-3:]
    assert all(line.startswith(("PASS ", "FAIL ")) for line in verdicts)


def test_a_failed_target_exits_non_zero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(wb, "GROUP_COMMIT_TARGET", 1e9)
    assert wb.main(["--runs", "20", "--repeat", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL bus at concurrency 100 (default), normal >= 1000000000.0x" in out
