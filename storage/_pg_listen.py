"""Waking on a PostgreSQL log: one connection that LISTENs on the log's channel.

Appends announce the new head (``h<seq>``, sent by the commit itself, so delivered
when it commits); a subscription whose partitions change hands or gains a member is
announced as ``s<name>``, one whose retry lane was written outside its holders'
handling (a redrive, a repair) as ``r<name>``. Notifications only wake: what they
say is read again from the log, and a slow poll (each lease heartbeat reads the
head) covers a notification lost with a dropped connection. The connection is a
session of its own, outside the pool (LISTEN is session state), and is made again
when it drops.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

import anyio

from ._types import Notice

if TYPE_CHECKING:
    import asyncpg

logger = logging.getLogger("eventbus.storage")

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record]"


Watcher = Callable[[Notice], None]


class Listener:
    """The LISTEN connection of one log (see the module docstring).

    Args:
        connect: Opens a new connection to the log's database.
        channel: The log's channel (the schema's ``log_channel()``).
        on_notice: Called (on the event loop) with each :class:`Notice`.
    """

    def __init__(
        self,
        connect: Callable[[], object],
        channel: str,
        on_notice: Watcher,
    ) -> None:
        self._connect = connect
        self.channel = channel
        self._on_notice = on_notice
        self._conn: Connection | None = None

    @property
    def alive(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def start(self) -> None:
        """Connect and LISTEN (again, after a drop)."""
        await self.stop()
        conn: Connection = await self._connect()  # type: ignore[misc]
        try:
            await conn.add_listener(self.channel, self._notified)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        text = str(payload)
        kind, rest = text[:1], text[1:]
        if kind == "h":
            try:
                self._on_notice(Notice("head", "", int(rest)))
            except ValueError:
                return
        elif kind == "s" and rest:
            self._on_notice(Notice("share", rest))
        elif kind == "r" and rest:
            self._on_notice(Notice("retries", rest))

    async def stop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception), anyio.move_on_after(2.0):
                await conn.close()
            conn.terminate()
