"""bench/concurrency.py on tiny workloads: what it checks in every run holds (no two
events of one key in the handler at once, per-key publish order, every event exactly
once), its checker catches each kind of violation, and a FAIL line exits 1.

Speed is not judged here: for the numbers run ``python bench/concurrency.py``.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

import eventbus
from tests.conftest import load_bench


def _load() -> ModuleType:
    return load_bench("concurrency")


cb = _load()

IO = 0.0005  # a shorter wait than the benchmark's, so the tests stay quick


@pytest.mark.parametrize("level", [1, 16, 64])
def test_a_backlog_drains_in_key_order_exactly_once(tmp_path: Path, level: int) -> None:
    events = 1200  # several events per key for every level: 256 keys
    run, checker = eventbus.run(cb.backlog_run(str(tmp_path / "b.db"), level, events, IO))
    assert checker.overlaps == 0
    assert checker.out_of_order == 0
    assert checker.missing == 0
    assert checker.repeated == 0
    assert checker.clean
    assert checker.calls == events
    assert run.events == events
    assert run.rate > 0
    assert 1 <= run.peak <= level
    if level > 1:
        assert run.peak > 1  # the calls did overlap


def test_a_paced_run_keeps_key_order_and_handles_every_event_once(tmp_path: Path) -> None:
    paced, checker = eventbus.run(cb.paced_run(str(tmp_path / "p.db"), 16, 2000.0, 0.25, IO))
    assert checker.events == 500
    assert checker.clean
    assert checker.calls == 500
    assert 0 < paced.p50_ms <= paced.p99_ms
    assert paced.offered > 0
    assert paced.handled > 0
    assert 1 <= paced.peak <= 16


def test_the_bare_worker_pool_runs_as_many_calls_at_once_as_asked() -> None:
    ceiling = eventbus.run(cb.pool_ceiling(8, 200, IO))
    assert ceiling.events == 200
    assert ceiling.peak == 8
    assert ceiling.rate > 0


def test_the_checker_counts_overlaps_reorders_misses_and_repeats() -> None:
    checker = cb.Checker(3)
    checker.enter(1, "a")
    checker.enter(0, "a")  # the same key while a call of it runs, and out of order
    checker.leave("a")
    checker.enter(1, "b")  # event 1 again; event 2 never comes
    checker.leave("b")
    assert checker.overlaps == 1
    assert checker.out_of_order == 1
    assert checker.repeated == 1
    assert checker.missing == 1
    assert not checker.clean


def test_a_broken_check_prints_fail() -> None:
    report = cb.Report(cb.QUICK)
    checker = cb.Checker(2)
    checker.enter(0, "a")
    checker.enter(0, "a")
    report.checks.add(checker)
    lines = dict(cb.verdicts(report))
    failed = [text for text, ok in lines.items() if ok is False]
    assert any("no two events of one key" in text for text in failed)
    assert any("publish order" in text for text in failed)
    assert any("exactly once" in text for text in failed)
    assert any(text.startswith("SKIP concurrency 64") for text in lines)  # nothing timed


QUICK_RUN = ["--quick", "--levels", "1", "--levels", "64"]


def test_command_line_quick_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A bar every run clears, so the exit status shows the mechanics, not the machine.
    monkeypatch.setattr(cb, "TARGET_RATIO", 0.0)
    assert cb.main(QUICK_RUN) == 0
    out = capsys.readouterr().out
    assert "on uvloop" in out
    assert "paced at 50%" in out
    verdicts = [line for line in out.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(verdicts) == 4
    assert all(line.startswith("PASS") for line in verdicts)


def test_a_missed_target_exits_non_zero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cb, "TARGET_RATIO", 1e9)
    assert cb.main(QUICK_RUN) == 1
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("FAIL concurrency 64")
