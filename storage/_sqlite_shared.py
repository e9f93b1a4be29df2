"""A SQLite log shared by the processes of one machine: every one of them publishes,
one at a time dispatches.

Each process holds ``<real path>.share`` shared (:class:`~._ownership.ShareLock`), so
no process can own the log alone meanwhile. Appends take turns, as SQLite writers
do (one write transaction at a time, ``BEGIN IMMEDIATE``); one that finds its idea of
the head overtaken by another process's commit numbers its events again after the
file's head. The right to dispatch is the log's ordinary ownership lock
(:class:`~._ownership.LogOwnership`, two ``flock`` locks the kernel releases when the
process dies), taken only once a subscription wants to dispatch: a process that
only publishes never takes it. The process that takes it charges the deaths its
predecessor's call journal records, as the SQLite log does at open, and keeps the
journal from then on.

To the bus this is a :class:`~._protocol.SharedLog` of one partition: its lease is
that lock, which the holder never loses while it lives (``SIGSTOP`` included: a
paused dispatcher keeps it, and dispatching waits for it). A process that does not
hold it polls for it every third of ``lease`` seconds, so another takes over within
that much after the dispatcher dies. The other processes' appends are noticed by
polling the file's data version (every ``poll_interval`` seconds): a SQLite file has
no notifications.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Sequence

import anyio

from . import _statements as stmts
from ._calls import CallSlots, NoCallSlots
from ._errors import LeaseLost, LogLocked, RunClaimLost
from ._sqlite import SQLiteStorage
from ._types import Claim, Lease, Notice, Receipt, Record, RetryRecord, Share, WriteBatch

logger = logging.getLogger("eventbus.storage")

#: Seconds between looks for another process's appends.
DEFAULT_POLL = 0.05
#: Seconds within which a waiting process takes over from a dispatcher that died.
DEFAULT_LEASE = 1.5


class SharedSQLiteStorage(SQLiteStorage):
    """A SQLite log shared by the processes of one machine (see the module
    docstring). Takes the arguments of :class:`SQLiteStorage`, and:

    Args:
        lease: A process waiting to dispatch tries every third of this many seconds.
        poll_interval: Seconds between looks for other processes' appends.
    """

    records_calls = False
    partitions = 1

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lease: float = DEFAULT_LEASE,
        poll_interval: float = DEFAULT_POLL,
        **kwargs: object,
    ) -> None:
        super().__init__(path, **kwargs)  # type: ignore[arg-type]
        self.lease_time = lease
        self.poll_interval = poll_interval
        self.member = f"{socket.gethostname()[:40]}:{os.getpid()}:{os.urandom(4).hex()}"
        self.dispatching = False
        self._held: set[str] = set()  # subscriptions dispatching here
        self._watchers: list[Callable[[Notice], None]] = []
        self._data_version = -1

    def _take_locks(self) -> None:
        self._share.acquire(shared=True)

    # -- dispatching in turn ----------------------------------------------------------

    async def _take_dispatch(self) -> bool:
        """Take the right to dispatch if no other process holds it; the first time,
        charge the deaths the previous dispatcher's journal records."""
        if self.dispatching:
            return True
        try:
            await anyio.to_thread.run_sync(self._lock.acquire)
        except LogLocked:
            return False
        try:
            await self._open_journal()
            self._head = max(self._head, await self._run("w", stmts.read_head))
        except BaseException:
            self._lock.release()
            raise
        self.dispatching = True
        logger.warning("log %s: this process (pid %d) dispatches now", self.path, os.getpid())
        return True

    async def heartbeat(self, subscription: str, lease: Lease | None) -> Share:
        await self.poll()
        held = (0,) if self.dispatching and subscription in self._held else ()
        return Share(
            held=held, target=1, free=0 if self.dispatching else 1, members=1, head=self.head
        )

    async def acquire(self, subscription: str, want: int) -> Claim:
        if want > 0 and await self._take_dispatch():
            self._held.add(subscription)
        if subscription not in self._held:
            return Claim(Lease(subscription, self.member, (), ()), ())
        info = (await self.subscriptions()).get(subscription)
        cursor = info.cursor if info is not None else 0
        return Claim(Lease(subscription, self.member, (0,), (1,)), (cursor,))

    async def release(self, subscription: str, partitions: Sequence[int] | None) -> None:
        self._held.discard(subscription)
        if not self._held and self.dispatching and partitions is None:
            # Nothing dispatches here any more: another process may.
            self.dispatching = False
            if self._journal is not None:
                self._journal.close()
                self._journal = None
            await anyio.to_thread.run_sync(self._lock.release)

    async def mark_call(
        self,
        lease: Lease,
        slot: int,
        seqs: Sequence[int],
        attempts: Sequence[int],
        keys: Sequence[str | None],
        call: int = 0,
    ) -> None:
        return None  # the call journal records calls (records_calls is False)

    async def end_calls(self, lease: Lease, calls: Sequence[tuple[int, int]]) -> None:
        return None

    def calls(self, subscription: str, slots: int, width: int) -> CallSlots:
        if not self.dispatching or self._journal is None:
            return NoCallSlots()
        return super().calls(subscription, slots, width)

    async def read_claimed(
        self, claim: Claim, after: int, upto: int, topics: frozenset[str] | None, limit: int
    ) -> list[Record]:
        if not claim.lease.partitions:
            return []
        return await self.read(max(after, claim.start), upto, topics, limit)

    async def claimed_retries(self, lease: Lease) -> list[RetryRecord]:
        return await self.retries(lease.subscription) if lease.partitions else []

    async def claimed_finished_ahead(self, lease: Lease, after: int) -> list[tuple[int, int]]:
        return await self.finished_ahead(lease.subscription, after)

    async def progress(
        self, subscription: str, topics: frozenset[str], upto: int
    ) -> tuple[int, int]:
        await self.poll()
        info = (await self.subscriptions()).get(subscription)
        cursor = info.cursor if info is not None else 0
        finished = upto
        if cursor < upto:
            first = await self.read(cursor, upto, None if "*" in topics else topics, 1)
            finished = first[0].seq - 1 if first else upto
        return finished, len(await self.retries(subscription))

    async def announce(self, subscription: str) -> None:
        return None  # only the dispatcher writes retry lanes it runs

    # -- noticing the others -----------------------------------------------------------

    def watch(self, watcher: Callable[[Notice], None]) -> None:
        self._watchers.append(watcher)

    async def poll(self) -> None:
        """Look for appends by other processes (cheap when there are none: one read
        of the file's data version)."""
        version = await self._run("r", _data_version)
        if version == self._data_version:
            return
        self._data_version = version
        head = await self._run("r", stmts.read_head)
        if head > self._head:
            self._head = head
            for watcher in list(self._watchers):
                watcher(Notice("head", "", head))

    # -- workflow runs ----------------------------------------------------------------

    async def claim_runs(self, ids: Sequence[str], lease: float) -> dict[str, int]:
        if not ids:
            return {}
        return await self._run("w", stmts.claim_runs, list(ids), self.member, lease, time.time())

    async def release_runs(self, ids: Sequence[str]) -> None:
        if ids:
            await self._run("w", stmts.release_runs, list(ids), self.member)

    # -- writing ------------------------------------------------------------------------

    async def commit(self, batch: WriteBatch) -> list[Receipt]:
        """As :meth:`SQLiteStorage.commit`; a batch carrying a lease is refused with
        :class:`LeaseLost` unless this process dispatches, one carrying workflow runs
        with :class:`RunClaimLost` unless this process holds their claims."""
        if batch.leases and not self.dispatching:
            raise LeaseLost(self.path, tuple(batch.leases))
        try:
            return await super().commit(batch)
        except RunClaimLost as exc:
            raise RunClaimLost(self.path, exc.runs) from None

    async def close(self) -> None:
        self.dispatching = False
        self._held.clear()
        await super().close()


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])
