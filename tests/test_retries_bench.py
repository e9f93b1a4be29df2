"""bench/retries.py on tiny workloads: every healthy event handled, every poison event
dead-lettered; in the recovery phase every retried event handled once the dependency
is back, none dead-lettered, the retry lane empty; a FAIL line exits 1.

Speed is not judged here: for the numbers run ``python bench/retries.py``.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import pytest

import eventbus
from tests.conftest import load_bench


def _load() -> ModuleType:
    return load_bench("retries")


rb = _load()


def test_the_retries_benchmark_runs_and_accounts_for_every_event(tmp_path: Path) -> None:
    kinds = rb.kinds_for(300, True, 3)
    seconds, latencies, commits, dead = eventbus.run(
        rb.one_run(tmp_path / "r.db", kinds, 0.0005, None)
    )
    assert seconds > 0
    assert len(latencies) == kinds.count("ok")
    assert dead == kinds.count("poison")
    assert commits > 0


def test_the_recovery_phase_drains_every_retry_once_the_dependency_is_back(
    tmp_path: Path,
) -> None:
    # recovery_run raises unless the retry lane is empty after the drain.
    r = eventbus.run(rb.recovery_run(tmp_path / "r.db", 600, 0.0005, 0.2, settle=0.1))
    assert r.events == 600
    assert 0 < r.dependency_events < 600
    assert 0 < r.waiting_at_recovery <= r.dependency_events
    assert r.drained == r.dependency_events  # each failed while it was down, then was handled
    assert r.dead == 0
    assert r.attempts_max >= 2
    assert r.drain_seconds > 0
    assert r.held_seconds > 0
    assert r.floor == rb.RetryPolicy().budget_floor


def _bars_every_run_clears(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rb, "THROUGHPUT_SHARE", 0.0)
    monkeypatch.setattr(rb, "P99_FACTOR", math.inf)
    monkeypatch.setattr(rb, "RECOVERY_TARGET", 0.0)
    monkeypatch.setattr(rb, "HELD_RANGE", (0.0, math.inf))
    monkeypatch.setattr(rb, "SETTLE_SECONDS", 0.1)


QUICK_RUN = ["--quick", "--events", "400", "--work", "0.0005", "--hold", "0.2"]


def test_command_line_quick_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Bars every run clears, so the exit status shows the mechanics, not the machine.
    _bars_every_run_clears(monkeypatch)
    assert rb.main(QUICK_RUN) == 0
    out = capsys.readouterr().out
    assert "on uvloop" in out
    for stage in ("burst", "still failing", "recovered"):
        assert stage in out
    verdicts = [line for line in out.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(verdicts) == 4
    assert all(line.startswith("PASS") for line in verdicts)


def test_a_missed_recovery_target_exits_non_zero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _bars_every_run_clears(monkeypatch)
    monkeypatch.setattr(rb, "RECOVERY_TARGET", 1e9)
    assert rb.main(QUICK_RUN) == 1
    assert "FAIL recovered dependency" in capsys.readouterr().out
