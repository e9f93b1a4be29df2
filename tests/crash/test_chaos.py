"""The chaos harness, in a small configuration: real subprocesses killed with SIGKILL
at random (seeded) moments, restarted, and the books checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from eventbus.chaos import format_report, run_harness


@pytest.mark.slow
def test_a_two_stage_pipeline_is_exactly_once_across_kills(tmp_path: Path) -> None:
    report = run_harness(
        tmp_path, events=6000, kills=4, seed=3, poison_every=100, min_wait=0.3, max_wait=0.9
    )
    text = format_report(report, seed=3)
    assert report.ok, text
    assert report.kills == 4, text
    assert report.lost == 0
    assert report.dead_letters == 60
