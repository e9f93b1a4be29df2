"""Processes sharing one log, killed, paused and crashing: another process finishes a
killed one's events within the lease time; one paused past its lease (a zombie) can
neither acknowledge nor write state when it resumes; an event that kills whichever
process handles it is dead-lettered after max_attempts deaths in all; and publishers
in several processes never make a consumer skip an event, with a transaction held
open elsewhere in the database. On PostgreSQL (partitions leased to every consumer)
and on a SQLite file shared by the processes of one machine (one dispatches at a
time; a paused one keeps that right, so the zombie test is PostgreSQL's only)."""

from __future__ import annotations

import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import anyio
import asyncpg
import msgspec
import pytest

from eventbus import Bus, BusConfig, Message
from eventbus.storage import PROCESS_DIED, is_postgres_url
from eventbus.storage._pg_url import parse
from tests import postgres
from tests.postgres import log_at

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("_shared_worker.py")
LEASE = 2.0
KEYS = 11  # as the worker keys its orders


class Worker:
    """A worker process and the lines it prints."""

    def __init__(self, role: str, url: str, record: Path, *args: str) -> None:
        self.record = record
        self.log = record.with_suffix(f".{role}.{time.monotonic_ns()}.log")
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER), role, url, str(record), *args],
                stdout=subprocess.PIPE,
                stderr=err,
            )

    def wait_for(self, prefix: str, timeout: float = 60) -> str:
        """The next line of stdout starting with ``prefix``."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline().decode()
                if not line:
                    break
                if line.startswith(prefix):
                    return line.strip()
            elif self.proc.poll() is not None:
                break
        raise AssertionError(
            f"no {prefix!r} line from the worker (exit {self.proc.poll()}):\n"
            + self.log.read_text()[-3000:]
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A log shared by processes: a SQLite file, then a PostgreSQL schema (each
    consumer's lease, or the SQLite dispatcher's polling, at LEASE seconds)."""
    if request.param == "sqlite":
        return str(tmp_path / "log.db")
    return f"{request.getfixturevalue('pg_url')}&lease={LEASE}"


def _config(url: str) -> BusConfig:
    return BusConfig(shared=not is_postgres_url(url))


def _lines(record: Path, what: str) -> list[list[str]]:
    if not record.exists():
        return []
    return [
        line.split()[1:]
        for line in record.read_text().split("\n")[:-1]
        if line.startswith(what + " ")
    ]


async def _publish(url: str, n: int, first: int = 0) -> None:
    async with Bus.open(url, config=_config(url)) as bus:
        await bus.publish_many(
            Message("orders", i, key=f"k{i % KEYS}", idempotency_key=f"order-{i}")
            for i in range(first, first + n)
        )


async def _counts(url: str) -> dict[str, int]:
    if not is_postgres_url(url):
        conn = sqlite3.connect(f"file:{url}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT key, value FROM state WHERE subscription = 'work'")
            return {str(k): int(msgspec.msgpack.decode(v)) for k, v in rows}
        finally:
            conn.close()
    pg = await asyncpg.connect(postgres.SERVER, server_settings={"search_path": parse(url).schema})
    try:
        found = await pg.fetch("SELECT key, value FROM state WHERE subscription = 'work'")
        return {str(k): int(msgspec.msgpack.decode(v)) for k, v in found}
    finally:
        await pg.close()


def _expected(n: int) -> dict[str, int]:
    return dict(Counter(f"k{i % KEYS}" for i in range(n)))


def test_a_killed_process_s_events_are_finished_by_another_within_the_lease(
    shared_url: str, tmp_path: Path
) -> None:
    url = shared_url
    record = tmp_path / "calls.txt"
    n = 300
    anyio.run(_publish, url, n)
    # The first worker stalls on order 5, in the middle of its work, holding its
    # partition (and, alone, every partition).
    first = Worker("consume", url, record, "--io", "0.005", "--stall", "5")
    second: Worker | None = None
    try:
        first.wait_for("ready")
        deadline = time.monotonic() + 60
        while not any(n == "5" for _, n, _, _ in _lines(record, "start")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = Worker("consume", url, record, "--io", "0.005")
        time.sleep(0.5)  # it joins, but the first keeps what it holds: a call runs
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        killed = time.monotonic()
        second.wait_for("drained", timeout=60)
        took = time.monotonic() - killed
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert took < LEASE + 10, took
    # Every event handled (a few twice: delivery is at least once across a kill),
    # every effect once.
    assert {int(m) for _, m, _, _ in _lines(record, "done")} == set(range(n))
    # The stalled call was charged to the death: it ran again at attempt 2.
    assert [a for _, m, a, _ in _lines(record, "start") if m == "5"] == ["1", "2"]
    assert anyio.run(_counts, url) == _expected(n)


@pytest.mark.postgres
def test_a_process_paused_past_its_lease_can_neither_acknowledge_nor_write_state(
    pg_url: str, tmp_path: Path
) -> None:
    url = f"{pg_url}&lease={LEASE}"
    record = tmp_path / "calls.txt"
    n = 400
    anyio.run(_publish, url, n)
    zombie = Worker("consume", url, record, "--io", "0.05")
    other: Worker | None = None
    try:
        zombie.wait_for("ready")
        time.sleep(0.5)
        zombie.proc.send_signal(signal.SIGSTOP)  # mid-call, most likely
        paused_at = len(_lines(record, "done"))
        other = Worker("consume", url, record, "--io", "0.001")
        other.wait_for("drained", timeout=60)  # took every partition over
        finished = anyio.run(_counts, url)
        zombie.proc.send_signal(signal.SIGCONT)
        # It finds out: its calls in flight finish or are abandoned, its writes
        # are refused, and it says so.
        deadline = time.monotonic() + 20
        while "no longer holds partitions" not in zombie.log.read_text():
            assert time.monotonic() < deadline, zombie.log.read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(1.0)  # whatever it still tries to commit, it has tried
        after = anyio.run(_counts, url)
    finally:
        zombie.stop()
        if other is not None:
            other.stop()
    assert paused_at > 0
    assert finished == _expected(n)
    assert after == finished  # the zombie wrote nothing
    # Its effects are in the log once each: the outbox too.
    outbox = anyio.run(_outbox, url)
    assert sorted(outbox) == list(range(n))


async def _outbox(url: str) -> list[int]:
    store = log_at(url, read_only=True)
    await store.open()
    try:
        return [
            int(msgspec.msgpack.decode(r.payload))
            for r in await store.read(0, store.head, frozenset({"counted"}), 100_000)
        ]
    finally:
        await store.close()


def test_an_event_that_kills_whichever_process_handles_it_dies_max_attempts_times_in_all(
    shared_url: str, tmp_path: Path
) -> None:
    url = shared_url
    record = tmp_path / "calls.txt"
    n, poison = 60, 17
    anyio.run(_publish, url, n)
    workers = [Worker("consume", url, record, "--kill", str(poison)) for _ in range(3)]
    deaths = 0
    try:
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline, "never finished"
            for i, worker in enumerate(workers):
                code = worker.proc.poll()
                if code is not None:
                    assert code == 13, worker.log.read_text()[-3000:]
                    deaths += 1
                    worker.stop()
                    workers[i] = Worker("consume", url, record, "--kill", str(poison))
            done = {int(m) for _, m, _, _ in _lines(record, "done")}
            if len(done) == n - 1 and anyio.run(_dead, url):
                break
            time.sleep(0.1)
    finally:
        for worker in workers:
            worker.stop()
    assert deaths == 3  # max_attempts, whichever processes handled it
    (dead,) = anyio.run(_dead, url)
    assert (dead.event.payload, dead.attempts, dead.error_type) == (poison, 3, PROCESS_DIED)
    starts = [int(a) for _, m, a, _ in _lines(record, "start") if int(m) == poison]
    assert starts == [1, 2, 3]
    # Everything else handled (some twice: at least once across a kill), each
    # effect once.
    assert {int(m) for _, m, _, _ in _lines(record, "done")} == set(range(n)) - {poison}
    expected = _expected(n)
    expected[f"k{poison % KEYS}"] -= 1
    assert anyio.run(_counts, url) == expected


async def _seqs(url: str) -> list[int]:
    store = log_at(url, read_only=True)
    await store.open()
    try:
        return [r.seq for r in await store.read(0, store.head, None, 1_000_000)]
    finally:
        await store.close()


async def _dead(url: str) -> list[object]:
    async with Bus.open(url, config=_config(url)) as bus:
        return list(await bus.dead_letters.list("work"))


def test_publishers_in_several_processes_never_make_a_consumer_skip_an_event(
    shared_url: str, tmp_path: Path
) -> None:
    """The sequence-gap trap across processes: three processes publish one event per
    commit, as fast as they can, while two consumers read as fast as they can and a
    transaction stays open elsewhere in the database the whole time. Every event is
    handled once, and the consumers are not held back by the open transaction."""
    url = shared_url
    record = tmp_path / "calls.txt"
    per = 300
    anyio.run(_publish, url, 0)  # create the log
    # Another session's transaction, open for the whole test (PostgreSQL).
    holder = _OpenTransaction() if is_postgres_url(url) else None
    consumers = [Worker("consume", url, record) for _ in range(2)]
    publishers: list[Worker] = []
    try:
        time.sleep(1.0)  # both have joined
        publishers = [
            Worker("publish", url, record, "--first", str(p * per), "--count", str(per))
            for p in range(3)
        ]
        for publisher in publishers:
            assert publisher.proc.wait(timeout=120) == 0, publisher.log.read_text()[-3000:]
        published = time.monotonic()
        deadline = published + 30
        while len(_lines(record, "done")) < 3 * per:
            assert time.monotonic() < deadline, f"{len(_lines(record, 'done'))} of {3 * per}"
            time.sleep(0.05)
        caught_up = time.monotonic() - published
    finally:
        for worker in [*consumers, *publishers]:
            worker.stop()
        if holder is not None:
            holder.close()
    assert len(_lines(record, "published")) == 3 * per
    seqs = anyio.run(_seqs, url)  # orders and outbox events, from every process
    assert seqs == list(range(1, len(seqs) + 1))  # dense: no gap
    done = Counter(int(n) for _, n, _, _ in _lines(record, "done"))
    assert sorted(done) == list(range(3 * per))
    assert set(done.values()) == {1}
    assert caught_up < 10  # not stalled by the open transaction


_HOLD = """
import asyncio, sys, asyncpg
async def main():
    conn = await asyncpg.connect(sys.argv[1])
    tx = conn.transaction()
    await tx.start()
    await conn.fetchval("SELECT pg_current_xact_id()")  # holds the xmin back
    await conn.execute("CREATE TEMP TABLE unrelated (x int)")
    await conn.execute("INSERT INTO unrelated VALUES (1)")
    print("holding", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
"""


class _OpenTransaction:
    """A session elsewhere in the database holding a transaction (and an xid) open,
    until closed."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLD, postgres.SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == b"holding"

    def close(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()
