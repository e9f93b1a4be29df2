"""The benchmark scripts' progress: every step they announce is counted against the
total they expect, so the line ends at N/N (and the ETA means something)."""

from __future__ import annotations

import re

import pytest

from eventbus import progress
from tests.conftest import load_bench


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "should_draw", lambda *_a, **_k: True)
    monkeypatch.setenv("COLUMNS", "200")


def counts(label: str, err: str) -> list[str]:
    """Every count the progress line showed, in order."""
    return re.findall(rf"\r{label}  (\d+/\d+) steps", err)


@pytest.mark.parametrize(
    ("script", "argv", "expected"),
    [
        pytest.param(
            "throughput",
            ["--events", "300", "--repeat", "1", "--storage", "memory", "--only", "publish_many/"],
            "2/2 steps",  # per-event and batch handlers
            id="throughput",
        ),
        pytest.param("concurrency", ["--quick", "--levels", "1", "--levels", "4"], "4/4 steps"),
        pytest.param("workflows", ["--runs", "20", "--repeat", "1"], "3/3 steps"),
    ],
)
def test_a_benchmark_counts_each_step_it_announces(
    terminal: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    script: str,
    argv: list[str],
    expected: str,
) -> None:
    module = load_bench(script)
    monkeypatch.setattr(module, "MEMORY_TARGET", 0.0, raising=False)
    module.main(argv)
    err = capsys.readouterr().err
    assert "\r  .. " in err  # each step message on a line of its own, over a cleared line
    shown = counts(script, err)
    assert shown, err
    assert shown[-1] == expected.split()[0], err  # never short of N/N, never past it


def test_quiet_prints_no_step_messages_and_no_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = load_bench("workflows")
    module.main(["--runs", "20", "--repeat", "1", "--quiet"])
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "runs/s" in captured.out
