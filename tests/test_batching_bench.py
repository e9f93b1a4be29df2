"""The batching benchmark as a smoke test: tiny phases, a few settings, one round.

It checks the harness (every event handled, each phase measured, the report and the
verdict lines printed), not the numbers: for those run ``python bench/batching.py``.
"""

from __future__ import annotations

import math
from types import ModuleType

import pytest

import eventbus
from tests.conftest import load_bench


def _load() -> ModuleType:
    return load_bench("batching")


bb = _load()

TINY = bb.Plan(light_seconds=0.1, saturated_seconds=0.15, window=64, rounds=1)


def settings(*labels: str) -> tuple[object, ...]:
    return tuple(s for s in bb.SETTINGS if s.label in labels)


def test_one_run_measures_every_phase_of_the_step_load() -> None:
    workload = bb.WORKLOADS[0]
    (adaptive,) = settings("adaptive")
    run = eventbus.run(bb.run_one(workload, adaptive, TINY, "/nonexistent"))
    assert run.events > 0
    assert run.throughput > 0
    for phase in bb.PHASES:
        assert len(run.latencies[phase]) > 0
        assert all(x > 0 and math.isfinite(x) for x in run.latencies[phase])
    # Under saturation a call-dominated handler gets more than one event per call.
    assert run.batch_mean["saturated"] > 1


def test_the_report_compares_each_setting_with_the_best_static_one() -> None:
    report = eventbus.run(
        bb.measure(TINY, bb.WORKLOADS, settings("adaptive", "natural", "fixed 8"))
    )
    text = bb.format_report(report)
    for name in ("adaptive", "natural", "fixed 8", "call-dominated", "item-dominated"):
        assert name in text
    lines = bb.verdicts(report)
    assert [text.split()[1] for text, _ in lines] == ["call-dominated:", "item-dominated:"]
    assert all(text.startswith("PASS" if ok else "FAIL") for text, ok in lines)
    assert report.best_throughput("call-dominated").setting.static


def test_io_wait_keeps_the_loop_free_and_lasts_as_long_as_asked() -> None:
    async def main() -> tuple[float, int]:
        ticks = 0

        async def other() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await bb.asyncio.sleep(0)

        task = bb.asyncio.get_running_loop().create_task(other())
        started = bb.time.perf_counter()
        await bb.io_wait(0.003)
        elapsed = bb.time.perf_counter() - started
        task.cancel()
        return elapsed, ticks

    elapsed, ticks = eventbus.run(main())
    assert elapsed >= 0.003
    assert ticks > 10  # other tasks ran while the handler "waited"


QUICK_RUN = [
    "--quick",
    "--light",
    "0.05",
    "--saturated",
    "0.1",
    "--workload",
    "item",
    "--setting",
    "natural",
]


def test_command_line_quick_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A bar every run clears, so the exit status shows the mechanics, not the machine.
    monkeypatch.setattr(bb, "THROUGHPUT_SHARE", 0.0)
    monkeypatch.setattr(bb, "P99_FACTOR", float("inf"))
    code = bb.main(QUICK_RUN)
    assert code == 0
    out = capsys.readouterr().out
    assert "on uvloop" in out
    assert "item-dominated" in out
    assert "call-dominated" not in out
    assert out.rstrip().splitlines()[-1].startswith(("PASS", "FAIL"))


def test_a_failed_verdict_exits_non_zero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Regression: a run that printed FAIL exited 0 unless --strict was given.
    monkeypatch.setattr(bb, "THROUGHPUT_SHARE", 1e9)
    assert bb.main(QUICK_RUN) == 1
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("FAIL")
