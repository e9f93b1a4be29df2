"""Reaching a log from outside the bus that owns it (the command line, the dashboard):
open it read-only, and change it directly when no bus owns it or queue the change in
it for the owner, which applies it within ``BusConfig.control_interval``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Literal

import anyio
import msgspec

import eventbus.storage as _storage
from eventbus.storage import SQLiteStorage, WorkflowRecord, WriteBatch

from .failures import CONTROL_ENCODER, ControlCommand

#: Dead letters re-injected per transaction on a log no bus owns: progress moves
#: between chunks, and each chunk is a short write.
REDRIVE_CHUNK = 1000

_MSGPACK: msgspec.msgpack.Decoder[object] = msgspec.msgpack.Decoder()


def decoded(raw: bytes | None) -> object:
    """A stored payload, headers, input or output as plain data (the log keeps them
    as msgpack); one that does not decode as its hex digits."""
    if raw is None:
        return None
    try:
        return _MSGPACK.decode(raw)
    except msgspec.DecodeError:
        return raw.hex()


class Outcome(msgspec.Struct, frozen=True):
    """What a change did.

    Attributes:
        count: How many dead letters (or runs) it changed; None when it was queued.
        owner: Who owns the log, as ``"pid 1234"``, when the change was queued for it.
    """

    count: int | None = None
    owner: str | None = None

    @property
    def queued(self) -> bool:
        return self.owner is not None


async def open_read_only(path: str) -> SQLiteStorage:
    """The log at ``path``, read-only; a missing file or one that is not a log is
    refused (``StorageError``) and left as it was."""
    store = SQLiteStorage(path, read_only=True)
    await store.open()
    return store


async def open_for_change(path: str) -> SQLiteStorage:
    """The log at ``path`` for writing, once a read-only open has shown that it is an
    existing log. Raises ``LogLocked`` while a bus owns it."""
    await (await open_read_only(path)).close()
    store = SQLiteStorage(path)
    await store.open()
    return store


async def queue(path: str, command: ControlCommand) -> None:
    """Queue ``command`` in the log at ``path`` for the bus that owns it."""
    await anyio.to_thread.run_sync(_storage.submit_control, path, CONTROL_ENCODER.encode(command))


async def change_dead_letters(
    path: str,
    action: Literal["redrive", "purge"],
    subscription: str | None,
    *,
    ids: Sequence[str] | None = None,
    error_type: str | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Outcome:
    """Redrive or purge the matching dead letters of the log at ``path``: directly when
    no bus owns it (a redrive ``REDRIVE_CHUNK`` per transaction, ``on_progress`` told
    the count after each), else queued for the owner.

    Raises:
        StorageError: The log could not be opened or written.

    Cancellation: a redrive interrupted between chunks leaves the letters not yet
    reached as dead letters; running it again re-injects them.
    """
    id_list = list(ids) if ids else None
    try:
        store = await open_for_change(path)
    except _storage.LogLocked as exc:
        await queue(path, ControlCommand(action, subscription, id_list, error_type))
        return Outcome(owner=exc.owner)
    try:
        if action == "purge":
            return Outcome(
                count=await store.purge(subscription, ids=id_list, error_type=error_type)
            )
        count = 0
        while True:
            moved = await store.redrive(
                subscription,
                ids=id_list,
                error_type=error_type,
                due_at=time.time(),
                limit=REDRIVE_CHUNK,
            )
            count += len(moved)
            if on_progress is not None:
                on_progress(count)
            if len(moved) < REDRIVE_CHUNK:
                return Outcome(count=count)
    finally:
        await store.close()


async def cancel_workflow(path: str, workflow_id: str) -> Outcome:
    """Cancel the run ``workflow_id`` of the log at ``path``: directly when no bus owns
    it (the run is marked cancelled; count 1, or 0 if it was not running), else queued
    for the owner, which cancels a step in progress too.

    Raises:
        StorageError: The log could not be opened or written.
    """
    try:
        store = await open_for_change(path)
    except _storage.LogLocked as exc:
        await queue(path, ControlCommand("cancel", ids=[workflow_id]))
        return Outcome(owner=exc.owner)
    try:
        run = await store.workflow(workflow_id)
        if run is None or run.status != "running":
            return Outcome(count=0)
        cancelled = msgspec.structs.replace(run, status="cancelled", updated_at=time.time())
        await store.commit(WriteBatch(workflows=[cancelled]))
        return Outcome(count=1)
    finally:
        await store.close()


class LogReader:
    """The reads an operator's tools make of a log, and nothing that writes: what
    ``Bus.log_reader()`` hands out (a dashboard mounted next to a live bus) and what a
    read-only open of a log file offers.

    Every method is a read of one consistent snapshot; cancelling one changes nothing.
    """

    def __init__(self, log: _storage.Storage) -> None:
        self._log = log

    @property
    def head(self) -> int:
        """The last committed seq, as this process knows it."""
        return self._log.head

    async def stats(self, *, exact: bool = True) -> _storage.LogStats:
        """The log's size, cursors, lag, retry and dead-letter counts (see
        ``Storage.stats`` for ``exact``)."""
        return await self._log.stats(exact=exact)

    async def subscriptions(self) -> dict[str, _storage.SubscriptionInfo]:
        """Every subscription in the log, with its cursor."""
        return await self._log.subscriptions()

    async def read(
        self, after: int, upto: int, topics: frozenset[str] | None, limit: int
    ) -> list[_storage.Record]:
        """Events with ``after < seq <= upto`` on ``topics`` (all if None), in order."""
        return await self._log.read(after, upto, topics, limit)

    async def dead_letters(
        self,
        subscription: str | None = None,
        limit: int = 100,
        after_seq: int = 0,
        *,
        error_type: str | None = None,
        since: float | None = None,
        until: float | None = None,
        ids: Sequence[str] | None = None,
        after_subscription: str | None = None,
    ) -> list[_storage.DeadRecord]:
        """A page of dead letters (see ``Storage.dead_letters``)."""
        return await self._log.dead_letters(
            subscription,
            limit,
            after_seq,
            error_type=error_type,
            since=since,
            until=until,
            ids=ids,
            after_subscription=after_subscription,
        )

    async def count_dead_letters(
        self,
        subscription: str | None = None,
        *,
        error_type: str | None = None,
        since: float | None = None,
        until: float | None = None,
        ids: Sequence[str] | None = None,
    ) -> int:
        """How many dead letters match (see ``Storage.count_dead_letters``)."""
        return await self._log.count_dead_letters(
            subscription, error_type=error_type, since=since, until=until, ids=ids
        )

    async def workflows(
        self,
        *,
        name: str | None = None,
        status: str | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> list[WorkflowRecord]:
        """A page of workflow runs (see ``Storage.workflows``)."""
        return await self._log.workflows(name=name, status=status, after=after, limit=limit)

    async def count_workflows(self, *, name: str | None = None, status: str | None = None) -> int:
        """How many workflow runs match."""
        return await self._log.count_workflows(name=name, status=status)

    async def workflow(self, workflow_id: str) -> WorkflowRecord | None:
        """The run with this id, if any."""
        return await self._log.workflow(workflow_id)

    async def steps(self, workflow_id: str) -> list[_storage.StepRecord]:
        """A run's step checkpoints, in call order."""
        return await self._log.steps(workflow_id)
