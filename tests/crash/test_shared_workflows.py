"""Workflows and handler state on a log shared by processes (PostgreSQL, and a SQLite
file opened with ``shared=True``): two processes that both start (or resume) the
same runs execute each step once in all, counted by an outside sink; and two
processes counting the same keys in ``ctx.state`` while the keys move between them
lose no update."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import anyio
import pytest

from eventbus.storage import is_postgres_url
from tests.crash.test_shared_processes import LEASE, Worker, _counts, _expected, _lines, _publish

pytestmark = pytest.mark.slow

WORKFLOW_WORKER = Path(__file__).with_name("_shared_workflow_worker.py")
STEPS = ("reserve", "charge", "ship")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "log.db")
    return f"{request.getfixturevalue('pg_url')}&lease={LEASE}"


def _workflow_worker(
    url: str, sink: Path, runs: int, log: Path, *, io: float = 0.01, start: bool = True
) -> subprocess.Popen[bytes]:
    if not sink.exists():
        # Made here, once: two workers switching a new file to WAL at the same moment
        # make one of them fail with "database is locked" (the switch does not wait).
        conn = sqlite3.connect(sink, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS steps"
                " (run TEXT NOT NULL, step TEXT NOT NULL, pid INTEGER)"
            )
        finally:
            conn.close()
    with open(log, "wb") as err:
        return subprocess.Popen(
            [sys.executable, str(WORKFLOW_WORKER), url, str(sink), "--runs", str(runs)]
            + ["--io", str(io)]
            + (["--start"] if start else []),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def _executed(sink: Path) -> Counter[tuple[str, str]]:
    """Each step execution the sink counted (none while its table is being made)."""
    if not sink.exists():
        return Counter()
    conn = sqlite3.connect(f"file:{sink}?mode=ro", uri=True)
    try:
        return Counter(conn.execute("SELECT run, step FROM steps").fetchall())
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        return Counter()
    finally:
        conn.close()


def test_two_processes_starting_the_same_runs_execute_each_step_once_in_all(
    shared_url: str, tmp_path: Path
) -> None:
    runs = 40
    sink = tmp_path / "sink.db"
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    workers = [_workflow_worker(shared_url, sink, runs, log) for log in logs]
    try:
        for proc, log in zip(workers, logs, strict=True):
            assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    executed = _executed(sink)
    twice = {k: n for k, n in executed.items() if n > 1}
    assert twice == {}, f"steps executed more than once: {sorted(twice.items())[:10]}"
    assert set(executed) == {(f"order-{i}", s) for i in range(runs) for s in STEPS}


def test_the_runs_of_a_killed_process_are_finished_by_another_without_repeating_done_steps(
    shared_url: str, tmp_path: Path
) -> None:
    runs = 10
    sink = tmp_path / "sink.db"
    killed = _workflow_worker(shared_url, sink, runs, tmp_path / "killed.log", io=0.3)
    other: subprocess.Popen[bytes] | None = None
    try:
        # Until every run is in its second step (the first of each done).
        deadline = time.monotonic() + 60
        while sum(_executed(sink).values()) < runs + 1:
            assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first process never got going"
            time.sleep(0.05)
        killed.kill()
        killed.wait()
        at_kill = _executed(sink)
        other = _workflow_worker(
            shared_url, sink, runs, tmp_path / "other.log", io=0.01, start=False
        )
        assert other.wait(timeout=120) == 0, (tmp_path / "other.log").read_text()[-3000:]
    finally:
        for proc in (killed, other):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    executed = _executed(sink)
    assert set(executed) == {(f"order-{i}", s) for i in range(runs) for s in STEPS}
    # Only a step in flight at the kill (at most one per run) runs again: every run's
    # steps before it were checkpointed.
    again = [k for k, n in executed.items() if n > 1]
    assert all(n <= 2 for n in executed.values()), executed
    assert len(again) <= runs
    for run, step in again:
        position = STEPS.index(step)
        assert all(at_kill[run, s] == 1 for s in STEPS[:position]), (run, step)


def test_two_processes_counting_the_same_keys_in_state_lose_no_update(
    shared_url: str, tmp_path: Path
) -> None:
    """The second process joins while the first is busy: on PostgreSQL it takes
    partitions (and their keys) over mid-stream and counts on from what the first
    committed; on SQLite it waits its turn. Every key's count is exact."""
    url = shared_url
    record = tmp_path / "calls.txt"
    n = 1000
    anyio.run(_publish, url, n)
    first = Worker("consume", url, record, "--io", "0.005")
    second: Worker | None = None
    try:
        first.wait_for("ready")
        second = Worker("consume", url, record, "--io", "0.005")
        second.wait_for("drained", timeout=120)
    finally:
        first.stop()
        if second is not None:
            second.stop()
    done = Counter(int(m) for _, m, _, _ in _lines(record, "done"))
    assert set(done) == set(range(n))
    assert set(done.values()) == {1}  # no kill: each event handled once
    assert anyio.run(_counts, url) == _expected(n)
    if is_postgres_url(url):
        # The keys moved: both processes counted some of them.
        assert len({pid for _, _, _, pid in _lines(record, "done")}) == 2
