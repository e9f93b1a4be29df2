"""A bus process killed with SIGKILL at random moments loses nothing it acknowledged.

The worker (``_worker.py``) publishes numbered events with idempotency keys from many
concurrent tasks (so group commits carry many events) and records every receipt and
every handled event in plain files. The test kills it at seeded random points of
observable progress, restarts it (it publishes everything again: the idempotency keys
dedupe), lets the last run finish, and then checks the log against the files.

Reproduce a failure with ``EVENTBUS_CRASH_SEED=<seed from the message>``.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

from eventbus.storage import Record, SubscriptionInfo
from tests import postgres

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("_worker.py")
ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("EVENTBUS_CRASH_SEED", "20240611"))
COUNT = 4000
PUBLISHERS = 16
KILLS = 8
RUN_TIMEOUT = 30.0  # seconds any one worker process may take
POLL_INTERVAL = 0.002


@dataclass
class Run:
    """One worker process and the files it wrote."""

    index: int
    handled: Path
    acked: Path
    output: Path
    returncode: int | None = None
    killed_at: str = ""
    _offsets: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def count_lines(self, path: Path) -> int:
        """Complete lines in ``path`` so far, reading only what was added since last time."""
        offset, lines = self._offsets.get(path, (0, 0))
        try:
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            return 0
        lines += chunk.count(b"\n")
        self._offsets[path] = (offset + len(chunk), lines)
        return lines

    def describe(self) -> str:
        output = self.output.read_text(errors="replace")[-4000:] if self.output.exists() else ""
        return f"run {self.index} (rc={self.returncode}, {self.killed_at}): {output}"


def _complete_lines(path: Path) -> list[str]:
    """The whole lines of ``path``: a line torn by the kill (no newline) is dropped."""
    if not path.exists():
        return []
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def _start(tmp_path: Path, log: str, index: int) -> tuple[subprocess.Popen[bytes], Run]:
    run = Run(
        index,
        handled=tmp_path / f"handled-{index}.txt",
        acked=tmp_path / f"acked-{index}.txt",
        output=tmp_path / f"output-{index}.txt",
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with run.output.open("wb") as output:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                log,
                str(run.handled),
                str(run.acked),
                str(COUNT),
                str(PUBLISHERS),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
    return proc, run


def _reap(proc: subprocess.Popen[bytes], run: Run) -> None:
    """Make sure the process is gone (killing it if need be) and record how it ended."""
    if proc.poll() is None:
        proc.kill()
    run.returncode = proc.wait(timeout=RUN_TIMEOUT)


def _kill_at_random_progress(
    proc: subprocess.Popen[bytes], run: Run, watched: Path, target: int
) -> None:
    """Wait until ``watched`` has ``target`` lines, then SIGKILL the worker. Returns
    early if it finished by itself first."""
    run.killed_at = f"after {target} lines of {watched.name}"
    deadline = time.monotonic() + RUN_TIMEOUT
    while proc.poll() is None and run.count_lines(watched) < target:
        if time.monotonic() > deadline:
            _reap(proc, run)
            pytest.fail(f"seed {SEED}: no progress within {RUN_TIMEOUT}s: {run.describe()}")
        time.sleep(POLL_INTERVAL)  # polling another process's file, not synchronising tasks
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    _reap(proc, run)


def _pick_kill_point(
    run: Run, rng: random.Random, acked: int, handled: int, left: int
) -> tuple[Path, int]:
    """A random point of progress to kill ``run`` at. Mostly in the stretch of events
    no run has published yet (spread so every run gets some), sometimes while the
    worker is still replaying duplicates, sometimes by handled rather than acked count.
    """
    roll = rng.random()
    if roll < 0.2 and acked > 1:
        return run.acked, rng.randint(1, acked)  # during the replay of known keys
    if roll < 0.4:
        return run.handled, rng.randint(1, max(1, (COUNT - handled) // left))
    return run.acked, min(COUNT - 1, acked + rng.randint(1, max(1, (COUNT - acked) // left)))


@dataclass
class LogContents:
    head: int
    records: list[Record]
    subscriptions: dict[str, SubscriptionInfo]
    unfinished: int  # dead letters plus events waiting in retry lanes


async def _read_log(target: str) -> LogContents:
    log = postgres.log_at(target, read_only=True)
    await log.open()
    try:
        records: list[Record] = []
        while True:
            chunk = await log.read(records[-1].seq if records else 0, log.head, None, 1000)
            if not chunk:
                break
            records.extend(chunk)
        stats = await log.stats()
        unfinished = sum(stats.dead_letters.values()) + sum(stats.retries.values())
        return LogContents(log.head, records, await log.subscriptions(), unfinished)
    finally:
        await log.close()


def test_acknowledged_publishes_and_deliveries_survive_repeated_sigkill(
    tmp_path: Path, log_url: str
) -> None:
    rng = random.Random(SEED)
    log = log_url
    runs: list[Run] = []

    acked_so_far: set[str] = set()  # numbers some run was told are committed
    handled_so_far: set[str] = set()  # events some run's sink handled
    for index in range(KILLS):
        proc, run = _start(tmp_path, log, index)
        runs.append(run)
        watched, target = _pick_kill_point(
            run, rng, len(acked_so_far), len(handled_so_far), KILLS - index
        )
        try:
            _kill_at_random_progress(proc, run, watched, target)
        finally:
            _reap(proc, run)
        assert run.returncode in (0, -signal.SIGKILL), f"seed {SEED}: {run.describe()}"
        acked_so_far.update(line.split()[0] for line in _complete_lines(run.acked))
        handled_so_far.update(_complete_lines(run.handled))

    proc, final = _start(tmp_path, log, KILLS)
    runs.append(final)
    try:
        proc.wait(timeout=RUN_TIMEOUT)
    finally:
        _reap(proc, final)
    assert final.returncode == 0, f"seed {SEED}: the last run failed: {final.describe()}"
    killed = [r for r in runs if r.returncode == -signal.SIGKILL]
    assert killed, f"seed {SEED}: every worker finished before its kill; nothing was tested"

    contents = asyncio.run(_read_log(log))
    head, records = contents.head, contents.records
    context = f"seed {SEED}, kills: {[r.killed_at for r in killed]}"

    # The log is dense: no duplicate or missing sequence numbers, no duplicate ids.
    seqs = [r.seq for r in records]
    assert seqs == list(range(1, head + 1)), context
    by_seq = {r.seq: r for r in records}
    ids = {r.id: r.seq for r in records}
    assert len(ids) == len(records), f"{context}: an event id appears twice"

    # Each idempotency key (one per number i) was written exactly once.
    numbers = [msgspec.msgpack.decode(r.payload)["i"] for r in records]
    assert sorted(numbers) == list(range(COUNT)), f"{context}: a number is missing or doubled"
    seq_of = {i: r.seq for i, r in zip(numbers, records, strict=True)}

    # Every publish that returned is in the log, with the receipt it returned: the
    # original's seq and id, whichever run asked and whether or not it was a duplicate.
    originals: dict[int, int] = {}
    for run in runs:
        for line in _complete_lines(run.acked):
            i, seq, event_id, duplicate = line.split()
            n = int(i)
            assert (int(seq), event_id) == (seq_of[n], by_seq[seq_of[n]].id), (
                f"{context}: run {run.index} was told evt-{n} is {seq}/{event_id}, "
                f"but the log has it at {seq_of[n]}/{by_seq[seq_of[n]].id}"
            )
            if duplicate == "0":
                originals[n] = originals.get(n, 0) + 1
    assert all(c == 1 for c in originals.values()), f"{context}: written as new twice"
    assert len(_complete_lines(final.acked)) == COUNT, context

    # Every event in the log reached "sink" at least once across all runs, nothing it
    # handled is missing from the log, and within one process each key kept its order
    # (redelivery comes only with a restart: sink never fails).
    handled: set[str] = set()
    for run in runs:
        per_key: dict[str, list[int]] = {}
        for event_id in _complete_lines(run.handled):
            assert event_id in ids, f"{context}: run {run.index} handled unknown {event_id}"
            handled.add(event_id)
            rec = by_seq[ids[event_id]]
            per_key.setdefault(rec.key or "", []).append(rec.seq)
        for key, order in per_key.items():
            assert order == sorted(set(order)), (
                f"{context}: run {run.index} handled key {key} out of order or twice: {order}"
            )
    missing = sorted(ids[e] for e in set(ids) - handled)
    assert not missing, f"{context}: never handled by sink: seqs {missing[:20]}"

    # And the last run finished everything: the cursor is at the head, nothing was
    # dead-lettered and no retry is pending. (A death while an event's attempt is
    # running counts as a failed attempt, so an event could in principle be
    # dead-lettered after max_attempts kills that each land inside its attempt; the
    # handler takes microseconds, so that needs five near-impossible coincidences.)
    assert contents.subscriptions["sink"].cursor == head, context
    assert contents.unfinished == 0, context
