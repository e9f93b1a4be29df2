"""bench/retries.py on a tiny workload: every healthy event handled, every poison
event dead-lettered."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import eventbus
from tests.conftest import load_bench


def _load() -> ModuleType:
    return load_bench("retries")


def test_the_retries_benchmark_runs_and_accounts_for_every_event(tmp_path: Path) -> None:
    bench = _load()
    kinds = bench.kinds_for(300, True, 3)
    seconds, latencies, commits, dead = eventbus.run(
        bench.one_run(tmp_path / "r.db", kinds, 0.0005, None)
    )
    assert seconds > 0
    assert len(latencies) == kinds.count("ok")
    assert dead == kinds.count("poison")
    assert commits > 0
