"""The throughput benchmark as quick tests: small workloads, one round each.

``pyproject`` passes ``--benchmark-disable``, so each entry runs once as a plain test
that checks the scenario completes (every event handled and acknowledged). For real
numbers run ``pytest tests/test_bench.py --benchmark-enable`` or, better, the full
side-by-side comparison: ``python bench/throughput.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from types import ModuleType
from typing import Any

import pytest

import eventbus
from tests.conftest import load_bench


def _load() -> ModuleType:
    return load_bench("throughput")


tp = _load()

EVENTS = 2000
WORK = tp.Workload(events=EVENTS, chunk=250, publish_producers=16)


def _run_once(benchmark: Any, make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return benchmark.pedantic(lambda: eventbus.run(make()), rounds=1, iterations=1)


def test_queue_ceiling(benchmark: Any) -> None:
    result = _run_once(benchmark, lambda: tp.run_ceiling(WORK, tp.QUEUE))
    assert result.events == EVENTS
    assert result.rate > 0


def test_sqlite_ceiling(benchmark: Any) -> None:
    result = benchmark.pedantic(lambda: tp.sqlite_ceiling(WORK, "NORMAL"), rounds=1, iterations=1)
    assert result.events == EVENTS
    assert result.rate > 0


@pytest.mark.parametrize(
    ("storage", "producer", "handler"),
    [
        ("memory", "publish_many", "event"),
        ("memory", "publish", "batch"),
        ("memory", "publish_nowait", "event"),
        ("normal", "publish_many", "event"),
        ("normal", "publish", "batch"),
        ("normal", "publish_nowait", "batch"),
        ("full", "publish_many", "batch"),
    ],
)
def test_bus_scenario(benchmark: Any, storage: str, producer: str, handler: str) -> None:
    # bus_scenario raises unless every event was handled and acknowledged.
    result = _run_once(benchmark, lambda: tp.run_scenario(WORK, storage, producer, handler))
    assert result.name == f"{storage}/{producer}/{handler}"
    assert result.events == EVENTS


def test_report_and_verdicts() -> None:
    work = tp.Workload(events=500, chunk=100, publish_producers=8)
    report = eventbus.run(
        tp.measure(
            work,
            storages=("memory", "normal"),
            producers=("publish_many",),
            handlers=("event",),
            repeat=1,
        )
    )
    assert [row.measurement.name for row in report.rows] == [
        "memory/publish_many/event",
        "normal/publish_many/event",
    ]
    assert all(row.ratio is not None and row.ratio > 0 for row in report.rows)
    lines = [text for text, _ in tp.verdicts(report)]
    assert len(lines) == 4
    assert all(line.startswith(("PASS", "FAIL")) for line in lines[:2])
    # The concurrent publishers' targets, not measured in this run.
    assert all(line.startswith("SKIP") and "publish x8 tasks" in line for line in lines[2:])
    text = tp.format_report(report)
    assert "asyncio.Queue" in text
    assert "sqlite3 executemany" in text


SMALL_RUN = ["--events", "300", "--repeat", "1", "--storage", "memory", "--only", "publish_many/"]


def test_command_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(tp, "MEMORY_TARGET", 0.0)  # judged, and met whatever the machine
    code = tp.main(SMALL_RUN)
    assert code == 0
    out = capsys.readouterr().out
    assert "on uvloop" in out
    assert "memory/publish_many" not in out  # rows show labels, not scenario ids
    assert "publish_many 4x1000" in out


def test_a_failed_target_exits_non_zero_even_in_a_quick_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Regression: a run that printed FAIL lines exited 0 unless --strict was given.
    monkeypatch.setattr(tp, "MEMORY_TARGET", 1e9)
    assert tp.main(["--quick", *SMALL_RUN]) == 1
    assert "FAIL memory" in capsys.readouterr().out
