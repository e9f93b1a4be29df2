"""bench/peers.py as a smoke test: small runs, one round, each system in its child.

It checks the harness (every child's count and sum are checked, a mismatch is a failure
and never a number, the JSON, the verdicts, the README section), not the numbers: for
those run ``python bench/peers.py --repeat 3``. Peers that are not installed (the
``peers`` extra) are skipped with the reason the bench itself gives.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import load_bench


def _load() -> ModuleType:
    return load_bench("peers")


pb = _load()
ps = load_bench("_peers_systems")

EVENTS = 500
IN_MEMORY = ("eventbus-memory", "pyee", "ceiling-queue")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], Path]:
    pytest.importorskip("pyee", reason="pyee (in the test extra) is not installed")
    out = tmp_path_factory.mktemp("peers")
    status = pb.main(
        ["--quick", "--events", str(EVENTS), "--only", ",".join(IN_MEMORY), "--output", str(out)]
    )
    return status, json.loads((out / "peers.json").read_text()), out


def test_quick_run_checks_every_count_and_sum_and_writes_the_json(
    quick: tuple[int, dict[str, Any], Path],
) -> None:
    status, report, _ = quick
    assert status in (0, 1)  # 1: a target FAILed; 2 would be a failed measurement
    assert report["events"] == EVENTS
    assert report["repeat"] == 1
    assert [row["system"] for row in report["systems"]] == list(IN_MEMORY)
    want_count, want_sum = ps.expected(EVENTS)
    for row in report["systems"]:
        assert row["status"] == "ok", row
        assert row["rate"] > 0
        assert row["cpu_us_per_event"] > 0
        assert row["how"]
        (run,) = report["runs"][row["system"]]
        assert (run["count"], run["sum"]) == (want_count, want_sum)
        assert run["events"] == EVENTS


def test_quick_run_judges_the_in_memory_target_and_skips_the_unmeasured(
    quick: tuple[int, dict[str, Any], Path],
) -> None:
    status, report, _ = quick
    verdicts = {t["target"]: t for t in report["targets"]}
    memory = verdicts[":memory:, one producer: eventbus >= 1x pyee"]
    assert memory["verdict"] in ("PASS", "FAIL")
    assert memory["value"] > 0
    assert (status == 1) == (memory["verdict"] == "FAIL")
    others = [t for name, t in verdicts.items() if name != memory["target"]]
    assert others
    assert all(t["verdict"] == "SKIP" and t["note"] == "not measured in this run" for t in others)


def test_quick_run_draws_the_chart_when_matplotlib_is_there(
    quick: tuple[int, dict[str, Any], Path],
) -> None:
    _, _, out = quick
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (out / "peers.png").exists()
        pytest.skip("matplotlib (the bench extra) is not installed")
    assert (out / "peers.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("name", "events"),
    [
        ("persist-queue", 200),
        ("litequeue", 200),
        ("localqueue", 200),
        ("huey", 200),
        ("abxbus", 200),
        ("dbos", 30),
        ("ceiling-sqlite", 200),
        ("ceiling-sqlite-inline", 200),
        ("eventbus-file-64-batch", 200),
        ("eventbus-latency", 50),
    ],
)
def test_each_system_handles_every_event_in_its_child(name: str, events: int) -> None:
    result = pb.run_child(pb.BY_NAME[name], events)
    if result["status"] == "unavailable":
        pytest.skip(result["reason"])
    assert result["status"] == "ok", result
    assert (result["count"], result["sum"]) == ps.expected(events)
    assert result["seconds"] > 0
    if name == "eventbus-latency":
        assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]


def test_a_count_or_sum_mismatch_is_a_failure_not_a_number() -> None:
    count, total = ps.expected(100)
    assert pb.check(count, total, count, total) == {"status": "ok"}
    lost = pb.check(count - 1, total - ps.amount(99), count, total)
    assert lost["status"] == "failed"
    assert "counted 99 events" in lost["reason"]
    doubled = pb.check(count, total + 1, count, total)  # right count, wrong events
    assert doubled["status"] == "failed"

    system = pb.BY_NAME["eventbus-memory"]
    good = {"status": "ok", "events": 100, "seconds": 0.1, "cpu_seconds": 0.05}
    good |= {"count": count, "sum": total, "how": "h", "version": "v"}
    bad = {**good, **lost}
    row = pb.summarise(system, [good, bad])
    assert row["status"] == "failed"
    assert "rate" not in row
    rows = {"eventbus-memory": row, "pyee": pb.summarise(pb.BY_NAME["pyee"], [good, good])}
    runs = {"eventbus-memory": [good, bad], "pyee": [good, good]}
    (memory,) = [t for t in pb.verdicts(rows, runs) if "pyee" in t["target"]]
    assert memory["verdict"] == "FAIL"
    assert memory["value"] is None


def test_a_crashed_child_is_a_failure_with_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pb, "CHILD_TIMEOUT", 60.0)
    result = pb.run_child(pb.System("no-such-driver", "x", pb.ONE, pb.NONE), 10)
    assert result["status"] == "failed"
    assert "KeyError" in result["reason"]


def test_unknown_system_names_are_refused_with_the_known_ones() -> None:
    with pytest.raises(SystemExit, match="unknown system"):
        pb.select("eventbus-memory,nope")


def test_the_readme_section_is_rewritten_between_its_markers(
    quick: tuple[int, dict[str, Any], Path], tmp_path: Path
) -> None:
    _, report, out = quick
    assert (out / "peers.md").read_text() == pb.tables(report)  # the docs site shows it
    readme = tmp_path / "README.md"
    readme.write_text(f"# before\n\n{pb.BEGIN}\nold\n{pb.END}\n\n# after\n")
    pb.rewrite_readme(report, readme)
    text = readme.read_text()
    assert text.startswith("# before\n\n<!-- peers:begin -->")
    assert text.endswith("<!-- peers:end -->\n\n# after\n")
    assert "\nold\n" not in text
    assert "| **eventbus, :memory:** (" in text
    assert ":memory:, one producer: eventbus >= 1x pyee" in text


def test_the_committed_readme_table_is_generated_from_the_committed_results() -> None:
    results = pb.RESULTS / "peers.json"
    report = json.loads(results.read_text())
    assert pb.readme_section(report) in pb.README.read_text(), (
        "README.md's peers section is stale: run python bench/peers.py --readme"
    )
    assert (pb.RESULTS / "peers.md").read_text() == pb.tables(report)
    assert {row["system"] for row in report["systems"]} == set(pb.BY_NAME)
