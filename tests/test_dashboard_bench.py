"""bench/dashboard.py at a small size: the log fills, every page answers (and at this
size well inside its 200 ms target). For the full size (1,000,000 events, 10,000 dead
letters) run ``python bench/dashboard.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import load_bench

db = load_bench("dashboard")


def test_the_dashboard_benchmark_runs_on_a_small_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "small.db"
    status = db.main(["--events", "20000", "--dead", "500", "--requests", "3", "--path", str(path)])
    out = capsys.readouterr().out
    assert "20000 events, 500 dead letters" in out
    lines = [line for line in out.splitlines() if line.endswith((" ok", " FAIL"))]
    assert len(lines) == len(db._pages(500))
    assert status == 0, out
