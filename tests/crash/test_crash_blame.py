"""A death is blamed on the events whose handler call was running, and on no other.

A real worker process (``_blame_worker.py``) publishes 3,000 events on 101 keys, then
subscribes, so the crash lands on a deep backlog. Its handler records every call it
starts and ends in a line-buffered file, so the calls in flight at the kill can be
read after it. Then:

- **SIGKILL inside a call.** The worker's 10th handler call blocks and says so on
  stdout; the test kills it with SIGKILL, and a second run drains the log. With
  ``RetryPolicy(max_attempts=1)`` one death is one attempt too many: exactly the
  events of the calls in flight at the kill are dead-lettered, as
  ``eventbus.ProcessDied``; every other event is handled exactly once and in order per
  key. With concurrency 1 that is one event (one batch for a batch handler); with
  concurrency 16 at most 16 calls' events, whatever the backlog behind them.
- **An event that kills the process on every attempt** (``os._exit``), with
  ``max_attempts=3``: the first death also blames the calls running beside it (each
  then retried alone, and handled once); the next deaths blame that event alone; after
  the third it is dead-lettered and everything else is handled.
"""

from __future__ import annotations

import select
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from eventbus import Bus

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("_blame_worker.py")
EVENTS = 3000
KEYS = 101
PROCESS_DIED = "eventbus.ProcessDied"
RUN_TIMEOUT = 60.0


@dataclass
class Calls:
    """What one life of the worker did, from its calls file."""

    started: list[tuple[int, ...]]  # each call's seqs, in start order
    attempts: dict[int, list[int]]  # seq -> the attempts it started with
    in_flight: set[int]  # seqs of calls started and not ended
    last_ended: set[int]  # seqs of the call whose end is the file's last line

    @classmethod
    def read(cls, path: Path) -> Calls:
        started: list[tuple[int, ...]] = []
        attempts: dict[int, list[int]] = {}
        running: dict[tuple[int, ...], int] = {}
        last_ended: set[int] = set()
        # A line torn by the kill (no newline) is dropped.
        for line in path.read_text(encoding="utf-8").split("\n")[:-1]:
            what, *fields = line.split()
            seqs = tuple(int(s) for s in fields[0].split(","))
            if what == "start":
                started.append(seqs)
                running[seqs] = running.get(seqs, 0) + 1
                for seq, attempt in zip(seqs, fields[1].split(","), strict=True):
                    attempts.setdefault(seq, []).append(int(attempt))
                last_ended = set()
            else:
                running[seqs] -= 1
                last_ended = set(seqs)
        in_flight = {seq for seqs, n in running.items() if n for seq in seqs}
        return cls(started, attempts, in_flight, last_ended)


def _command(log: Path, calls: Path, *options: str) -> list[str]:
    return [sys.executable, str(WORKER), str(log), str(calls), *options]


def _read_line(proc: subprocess.Popen[bytes], expected: str, stderr: Path) -> str:
    """The worker's next line on stdout, which must start with ``expected`` (waited
    for on the pipe, up to RUN_TIMEOUT)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], RUN_TIMEOUT)
    assert ready, f"no {expected!r} within {RUN_TIMEOUT}s: {stderr.read_text()[-3000:]}"
    line = proc.stdout.readline().decode()
    assert line.startswith(expected), (line, stderr.read_text()[-3000:])
    return line


def _seqs(line: str) -> tuple[int, ...]:
    return tuple(int(s) for s in line.split()[1].split(","))


def _run_to_marker(command: list[str], stderr: Path) -> tuple[int, ...]:
    """Start the worker, wait for its ``blocked`` line, SIGKILL it; the seqs of the
    call that blocked."""
    with stderr.open("wb") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err)
    try:
        line = _read_line(proc, "blocked ", stderr)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=RUN_TIMEOUT)
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return _seqs(line)


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT)


@dataclass
class Outcome:
    dead: dict[int, tuple[str, int, str]]  # seq -> (error type, attempts, message)
    handled: dict[int, int]  # seq -> times its effect was committed
    per_key: dict[str, list[int]]  # key -> [count, last seq]
    violations: list[str]
    lag: int
    retries: int


def _outcome(log: Path) -> Outcome:
    async def inspect() -> Outcome:
        async with Bus.open(log) as bus:
            dead = {
                letter.event.seq: (letter.error_type, letter.attempts, letter.error_message)
                async for letter in bus.dead_letters.iter(subscription="sink")
            }
            state = bus.state("sink")
            handled: dict[int, int] = {}
            for seq in range(1, EVENTS + 1):
                count = await state.get(f"h:{seq}", 0)
                assert isinstance(count, int)
                handled[seq] = count
            per_key: dict[str, list[int]] = {}
            for k in range(KEYS):
                value = await state.get(f"k{k}", [0, -1])
                assert isinstance(value, list)
                per_key[f"k{k}"] = value
            violations = [
                f"violation:{seq}"
                for seq in range(1, EVENTS + 1)
                if await state.get(f"violation:{seq}") is not None
            ]
            stats = await bus.stats()
            return Outcome(
                dead,
                handled,
                per_key,
                violations,
                stats.lag.get("sink", -1),
                stats.retries.get("sink", 0),
            )

    return anyio.run(inspect)


def _check_everything_else_handled_once(outcome: Outcome, dead: set[int]) -> None:
    """Every event not dead-lettered had its effect committed once, in key order."""
    assert outcome.violations == []
    assert outcome.lag == 0
    assert outcome.retries == 0
    twice = {seq: n for seq, n in outcome.handled.items() if n > 1}
    assert twice == {}, "events whose effect was committed twice"
    missing = {seq for seq, n in outcome.handled.items() if n == 0}
    assert missing == dead, "events neither handled nor dead-lettered, or both"
    # The per-key aggregate agrees with a recomputation from the log (seq n + 1 holds
    # the number n, on key n % KEYS).
    for k in range(KEYS):
        seqs = [n + 1 for n in range(k, EVENTS, KEYS) if n + 1 not in dead]
        assert outcome.per_key[f"k{k}"] == [len(seqs), max(seqs)], f"key k{k}"


MODES = [
    pytest.param(1, False, id="per-event-concurrency-1"),
    pytest.param(16, False, id="per-event-concurrency-16"),
    pytest.param(1, True, id="batch-concurrency-1"),
    pytest.param(16, True, id="batch-concurrency-16"),
]


def _options(concurrency: int, batch: bool, *more: str) -> list[str]:
    options = ["--concurrency", str(concurrency), "--events", str(EVENTS), "--keys", str(KEYS)]
    return [*options, *(["--batch"] if batch else []), *more]


@pytest.mark.parametrize(("concurrency", "batch"), MODES)
def test_a_sigkill_inside_a_call_dead_letters_only_the_calls_in_flight(
    tmp_path: Path, concurrency: int, batch: bool
) -> None:
    log = tmp_path / "log.db"
    options = _options(concurrency, batch, "--max-attempts", "1")
    blocked = _run_to_marker(
        _command(log, tmp_path / "calls-1.txt", *options, "--block-call", "10"),
        tmp_path / "stderr-1.txt",
    )
    first = Calls.read(tmp_path / "calls-1.txt")
    assert set(blocked) <= first.in_flight
    # The kill also stops the other calls wherever they are. One of them may be
    # between its handler's last line and the call's end (single-threaded: at most
    # one), and counts as running.
    may_blame = first.in_flight | first.last_ended

    second = _run(_command(log, tmp_path / "calls-2.txt", *options))
    assert second.returncode == 0, second.stderr[-3000:]

    outcome = _outcome(log)
    dead = set(outcome.dead)
    assert first.in_flight <= dead
    # And one call may have been in its first instant: recorded in the journal, its
    # handler not yet at its first line (a call begins with the journal's record).
    beyond = dead - may_blame
    assert len(beyond) <= (1 if not batch else 32), beyond  # 32: the worker's batch size
    for seq, (error_type, attempts, message) in outcome.dead.items():
        assert error_type == PROCESS_DIED, (seq, error_type, message)
        assert attempts == 1
        assert "process died while handling" in message
    if concurrency == 1:
        assert dead == set(blocked)  # the blocked call alone was running
    calls_at_kill = {c for c in first.started if set(c) & dead}
    assert len(calls_at_kill) <= concurrency
    if not batch:
        assert len(dead) <= concurrency
    # The backlog behind the kill was not blamed: the second run handled it, each
    # event at its first attempt.
    later = Calls.read(tmp_path / "calls-2.txt")
    assert set(later.attempts).isdisjoint(dead)
    assert all(a == [1] for a in later.attempts.values())
    _check_everything_else_handled_once(outcome, dead)


@pytest.mark.parametrize(("concurrency", "batch"), MODES)
def test_a_sigkill_while_acknowledgements_wait_to_commit_blames_nothing(
    tmp_path: Path, concurrency: int, batch: bool
) -> None:
    """Every call has ended, none of their acknowledgements has committed (another
    connection holds the log's write lock, as a backup or an operator's shell can):
    a kill then blames no event, whatever ran before it."""
    log = tmp_path / "log.db"
    options = _options(concurrency, batch, "--max-attempts", "1")
    stderr = tmp_path / "stderr-1.txt"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            _command(log, tmp_path / "calls-1.txt", *options, "--hold-call", "10"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    holder = sqlite3.connect(log, timeout=RUN_TIMEOUT, isolation_level=None)
    try:
        held = _seqs(_read_line(proc, "holding ", stderr))
        holder.execute("BEGIN IMMEDIATE")  # from here on no acknowledgement commits
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        _read_line(proc, "all handled", stderr)  # every call has ended
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=RUN_TIMEOUT)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
        holder.close()
    assert proc.returncode == -signal.SIGKILL
    first = Calls.read(tmp_path / "calls-1.txt")
    assert first.in_flight == set()

    second = _run(_command(log, tmp_path / "calls-2.txt", *options))
    assert second.returncode == 0, second.stderr[-3000:]

    outcome = _outcome(log)
    assert outcome.dead == {}
    later = Calls.read(tmp_path / "calls-2.txt")
    # What ran after the lock was taken was redelivered, at its first attempt.
    assert set(held) <= set(later.attempts)
    assert all(a == [1] for a in later.attempts.values())
    _check_everything_else_handled_once(outcome, set())


@pytest.mark.parametrize(("concurrency", "batch"), MODES)
def test_an_event_that_kills_the_process_every_time_is_dead_lettered_after_three_deaths(
    tmp_path: Path, concurrency: int, batch: bool
) -> None:
    log = tmp_path / "log.db"
    poison = 1500  # seq 1501, in the middle of the backlog
    options = _options(concurrency, batch, "--max-attempts", "3", "--poison", str(poison))
    codes = []
    for life in range(1, 7):
        result = _run(_command(log, tmp_path / f"calls-{life}.txt", *options))
        codes.append(result.returncode)
        if result.returncode == 0:
            break
        assert result.returncode == 13, result.stderr[-3000:]
    # Three attempts, three deaths; the fourth run dead-letters it and finishes.
    assert codes == [13, 13, 13, 0]
    lives = [Calls.read(tmp_path / f"calls-{life}.txt") for life in range(1, 5)]
    # os._exit runs inside the poison's handler: nothing else runs at that instant,
    # so the calls in flight are exactly the unended ones.
    first_death = lives[0].in_flight
    assert poison + 1 in first_death
    bystanders = first_death - {poison + 1}
    calls_blamed = {c for c in lives[0].started if set(c) & first_death}
    assert len(calls_blamed) <= concurrency
    if concurrency == 1:
        assert len(calls_blamed) == 1
        if not batch:
            assert bystanders == set()
    # After a death, the events it was blamed on run one at a time, alone: the later
    # deaths find the poison alone in flight.
    assert lives[1].in_flight == {poison + 1}
    assert lives[2].in_flight == {poison + 1}
    # Blame, counted: an event started at attempt 2 or more is one a death was
    # charged to. Only the bystanders of the first death and the poison are.
    blamed = {seq for calls in lives for seq, tries in calls.attempts.items() if max(tries) > 1}
    assert blamed == first_death
    for calls in lives[1:]:
        for seq in bystanders & set(calls.attempts):
            assert calls.attempts[seq] == [2], "a bystander runs again at its second attempt"

    outcome = _outcome(log)
    assert set(outcome.dead) == {poison + 1}
    error_type, attempts, message = outcome.dead[poison + 1]
    assert (error_type, attempts) == (PROCESS_DIED, 3)
    assert "process died while handling" in message
    _check_everything_else_handled_once(outcome, {poison + 1})
