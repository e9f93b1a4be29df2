"""bench/peers_workflows.py as a smoke test: tiny workloads, one round.

It checks the harness (DBOS finishes every run with the right result, its SQLite file
holds every checkpoint, it runs with the settings claimed and shuts down cleanly, the
report), not the numbers: for those run ``python bench/peers_workflows.py``. Without
``dbos`` installed only the install hint is checked.
"""

from __future__ import annotations

from types import ModuleType

import pytest

import eventbus
from tests.conftest import load_bench


def _load() -> ModuleType:
    return load_bench("peers_workflows")


pw = _load()

TINY = pw.wb.Workload(runs=30)


def test_without_dbos_it_says_how_to_install_it_and_exits_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(pw, "dbos_version", lambda: None)
    assert pw.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SKIP DBOS Transact is not installed")
    assert "pip install dbos" in out


@pytest.mark.parametrize("defaults", [False, True], ids=["same-pragmas", "dbos-defaults"])
def test_dbos_finishes_every_run_and_checkpoints_every_step(defaults: bool) -> None:
    pytest.importorskip("dbos")
    setup = pw.dbos_setups(TINY, defaults=defaults)[-1]
    # dbos_runs raises unless every result is right and the file holds every checkpoint.
    run = eventbus.run(pw.dbos_runs(TINY, setup))
    assert run.checkpoints == (30, 90)
    assert run.measurement.runs == 30
    assert len(run.measurement.latencies) == 30
    assert run.measurement.commits_per_step > 0
    assert run.leftover == 0  # DBOS.destroy() ended every thread DBOS started
    if defaults:
        assert "journal_mode=wal" not in run.settings
    else:
        assert run.settings == "journal_mode=wal synchronous=NORMAL"


def test_command_line_prints_the_table_and_the_ratios(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("dbos")
    assert pw.main(["--runs", "30", "--repeat", "1", "--no-dbos-defaults"]) == 0
    out = capsys.readouterr().out
    assert "30 runs x 3 steps" in out
    assert "on uvloop" in out
    assert "bus, concurrency 100 (default)" in out
    assert "DBOS, WAL + synchronous=NORMAL" in out
    assert "30 completed runs and 90 step outputs counted in its file" in out
    assert out.rstrip().splitlines()[-1].startswith("bus vs DBOS, WAL + synchronous=NORMAL: ")
