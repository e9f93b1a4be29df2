"""bench/hooks.py on a tiny workload: every scenario handles every event (a short
count raises) and the report has a line per scenario.

Speed is not judged here: for the numbers run ``python bench/hooks.py``.
"""

from __future__ import annotations

import eventbus
from tests.conftest import load_bench

hb = load_bench("hooks")


def test_the_hooks_benchmark_runs_every_scenario() -> None:
    runs = eventbus.run(hb.measure(128, 1))
    assert set(runs) == set(hb.SCENARIOS)
    assert all(len(v) == 1 and v[0] > 0 for v in runs.values())
    lines = hb.report(runs, 128).splitlines()
    assert [line.split()[0] for line in lines[3:]] == list(hb.SCENARIOS)
